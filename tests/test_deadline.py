"""The deadline header: parsed from a request's headers, written for the next hop."""

from __future__ import annotations

import logging
import random
import re

import pytest

from cancelkit._deadline import header_value, parse_deadline

MS = b"request-timeout-ms"
ENVOY = b"x-envoy-expected-rq-timeout-ms"
GRPC = b"grpc-timeout"


@pytest.mark.parametrize(
    ("headers", "maximum", "expected"),
    [
        ([], None, None),
        ([], 5.0, 5.0),
        ([(b"accept", b"*/*")], None, None),
        ([(MS, b"1500")], None, 1.5),
        ([(MS, b" 250\t")], None, 0.25),  # optional whitespace around the value
        ([(MS, b"0")], None, 0.0),  # nothing left
        ([(MS, b"00000007")], None, 0.007),
        ([(MS, b"99999999")], None, 99999.999),
        ([(ENVOY, b"800")], None, 0.8),
        ([(GRPC, b"2S")], None, 2.0),
        ([(GRPC, b"1H")], None, 3600.0),
        ([(GRPC, b"3M")], None, 180.0),
        ([(GRPC, b"1500m")], None, 1.5),
        ([(GRPC, b"1500000u")], None, 1.5),
        ([(GRPC, b"1500000000n")], None, None),  # 10 digits: too many
        ([(MS, b"900"), (GRPC, b"1S"), (ENVOY, b"700")], None, 0.7),  # the smallest wins
        ([(MS, b"900"), (MS, b"300")], None, 0.3),  # repeated: the smallest wins
        ([(MS, b"9000")], 2.0, 2.0),  # never extends the server's maximum
        ([(MS, b"500")], 2.0, 0.5),  # but shortens it
        ([(MS, b"abc"), (MS, b"400")], None, 0.4),  # a malformed one is skipped
    ],
)
def test_parse_deadline(
    headers: list[tuple[bytes, bytes]], maximum: float | None, expected: float | None
) -> None:
    """Each spelling in its format; the smallest of them and the server's maximum wins."""
    assert parse_deadline(headers, maximum) == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"-5",
        b"+5",
        b"5.0",
        b"1e3",
        b"5_000",
        b"0x10",
        b"1 000",
        b"100, 200",  # a list of values
        b"123456789",  # 9 digits
        "\u0663".encode(),  # an Arabic-Indic digit three
        "\uff15".encode(),  # a fullwidth digit five
        b"\xff\xfe",
        b"inf",
        b"NaN",
    ],
)
def test_malformed_values_are_ignored_with_one_log_line(
    value: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed value changes nothing and is logged once per request, shortened."""
    with caplog.at_level(logging.WARNING, logger="cancelkit"):
        assert parse_deadline([(MS, value), (ENVOY, value), (GRPC, value)], 3.0) == 3.0
    assert len(caplog.records) == 1
    assert "malformed deadline header request-timeout-ms" in caplog.records[0].getMessage()


def test_a_long_hostile_value_is_logged_shortened(caplog: pytest.LogCaptureFixture) -> None:
    """The log line shows at most 40 bytes of the value."""
    with caplog.at_level(logging.WARNING, logger="cancelkit"):
        assert parse_deadline([(MS, b"\r\n" * 5000)]) is None
    (record,) = caplog.records
    assert len(record.getMessage()) < 200


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [
        (-1.0, "0"),
        (0.0, "0"),
        (0.0049, "0"),
        (0.0051, "1"),
        (0.2999, "295"),
        (0.300, "296"),
        (1e9, "99999999"),
    ],
)
def test_header_value_is_the_whole_milliseconds_left_less_four(
    remaining: float, expected: str
) -> None:
    """The next hop gets less than is left (4 ms for the answer), never more than 8 digits."""
    assert header_value(remaining) == expected


def test_header_value_of_infinity_is_the_largest() -> None:
    """An unbounded remainder is sent as the largest 8-digit value (never reached in use)."""
    assert header_value(float("inf")) == "99999999"


# -- fuzz: 500 header lists against a plain model ------------------------------------------

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def model(headers: list[tuple[bytes, bytes]], maximum: float | None) -> float | None:
    """What the parser must return, written plainly with regular expressions."""
    values = [] if maximum is None else [maximum]
    for name, raw in headers:
        try:
            text = raw.decode("ascii").strip(" \t")
        except UnicodeDecodeError:
            continue
        if name in (MS, ENVOY) and re.fullmatch(r"[0-9]{1,8}", text):
            values.append(int(text) / 1000)
        elif name == GRPC and re.fullmatch(r"[0-9]{1,8}[HMSmun]", text):
            values.append(int(text[:-1]) * _UNITS[text[-1]])
    return min(values) if values else None


NAMES = [MS, ENVOY, GRPC, b"accept", b"request-timeout", b"grpc-timeout-ms"]
ODD = ["1.5", "1e3", "inf", "NaN", "\u0663", "\uff15", "5_0", "0x1", "", " ", "\r\n"]


def fuzzed_value(rng: random.Random) -> bytes:
    """One header value: well formed, or malformed in one of the ways seen in the wild."""
    number = str(rng.choice([0, 1, 7, 999, 10**8 - 1, 10**8, rng.randrange(10**10)]))
    shape = rng.randrange(8)
    if shape == 0:
        return number.encode()
    if shape == 1:
        return f"-{number}".encode()
    if shape == 2:
        return f" {number}\t".encode()
    if shape == 3:
        return (number + rng.choice("HMSmunsh")).encode()
    if shape == 4:
        return rng.choice(ODD).encode()
    if shape == 5:
        return rng.randbytes(rng.randrange(12))
    if shape == 6:
        return b", ".join(str(rng.randrange(1000)).encode() for _ in range(rng.randrange(2, 4)))
    return (number * rng.randrange(1, 4)).encode()  # repeated digits: often too long


def test_500_fuzzed_header_lists_are_ignored_or_capped_as_documented() -> None:
    """500 header lists (malformed, negative, huge, non-ASCII, repeated): the model's answer."""
    rng = random.Random(22)
    for _ in range(500):
        headers = [(rng.choice(NAMES), fuzzed_value(rng)) for _ in range(rng.randrange(7))]
        maximum = rng.choice([None, 0.0, 0.05, 2.0, rng.uniform(0, 1e6)])
        result = parse_deadline(headers, maximum)
        expected = model(headers, maximum)
        if expected is None:
            assert result is None, headers
        else:
            assert result is not None
            assert result == pytest.approx(expected), headers
            assert result >= 0
        if maximum is not None:
            assert result is not None
            assert result <= maximum
