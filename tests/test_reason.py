from __future__ import annotations

import pickle
from dataclasses import FrozenInstanceError

import pytest

from cancelkit import CancelKind, CancelReason, OperationCancelled
from cancelkit._reason import _fast_reason


def test_default_reason_is_requested_with_a_message() -> None:
    """A bare reason means 'requested' and always has a readable message."""
    reason = CancelReason()
    assert reason.kind is CancelKind.REQUESTED
    assert reason.message == "cancellation was requested"
    assert reason.source is None
    assert reason.origin is None


@pytest.mark.parametrize("kind", list(CancelKind))
def test_every_kind_has_a_default_message(kind: CancelKind) -> None:
    """Each kind gets its own non-empty default message."""
    assert CancelReason(kind).message


def test_kind_given_as_string_is_converted() -> None:
    """A kind spelled as its string value becomes the enum member."""
    reason = CancelReason("superseded")  # type: ignore[arg-type]
    assert reason.kind is CancelKind.SUPERSEDED


def test_unknown_kind_names_the_problem() -> None:
    """An unknown kind is a ValueError that lists the valid kinds."""
    with pytest.raises(ValueError, match=r"unknown cancel reason kind 'nope'.*'superseded'"):
        CancelReason("nope")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"message": 3}, "message must be a str, not int"),
        ({"source": 7}, "source must be a str or None, not int"),
    ],
)
def test_bad_field_types_are_rejected(kwargs: dict[str, object], match: str) -> None:
    """Wrongly typed message or source is a TypeError naming the field."""
    with pytest.raises(TypeError, match=match):
        CancelReason(CancelKind.REQUESTED, **kwargs)  # type: ignore[arg-type]


def test_reason_is_frozen() -> None:
    """A reason cannot be changed after it was made."""
    reason = CancelReason()
    with pytest.raises(AttributeError):
        reason.kind = CancelKind.DEADLINE  # type: ignore[misc]


def test_root_follows_the_origin_chain() -> None:
    """root is the first reason of a chain of linked cancellations."""
    first = CancelReason(CancelKind.SUPERSEDED, source="req-2")
    chain = CancelReason(CancelKind.PARENT, origin=CancelReason(CancelKind.PARENT, origin=first))
    assert chain.root is first
    assert first.root is first


def test_str_shows_kind_message_source_and_origin() -> None:
    """str() of a reason reads as one line with every part that is set."""
    inner = CancelReason(CancelKind.SUPERSEDED, source="req-2")
    outer = CancelReason(CancelKind.PARENT, "linked", origin=inner)
    assert (
        str(outer) == "parent: linked <- superseded: superseded by a newer request (source: req-2)"
    )


def test_equality_ignores_the_timestamp() -> None:
    """Two reasons with the same content are equal even if made at different times."""
    assert CancelReason(CancelKind.DEADLINE, at=1.0) == CancelReason(CancelKind.DEADLINE, at=2.0)


def test_exception_is_an_exception_carrying_the_reason() -> None:
    """OperationCancelled is an Exception (not a BaseException) with .reason and a clear str."""
    reason = CancelReason(CancelKind.DEADLINE)
    exc = OperationCancelled(reason)
    assert isinstance(exc, Exception)
    assert exc.reason is reason
    assert str(exc) == "deadline: the deadline passed"


def test_exception_pickles_with_its_reason() -> None:
    """The exception survives pickling (process pools, logging handlers)."""
    exc = OperationCancelled(CancelReason(CancelKind.SUPERSEDED, source="x"))
    copy = pickle.loads(pickle.dumps(exc))
    assert isinstance(copy, OperationCancelled)
    assert copy.reason == exc.reason


@pytest.mark.parametrize("kind", list(CancelKind))
def test_the_internal_fast_reason_equals_the_public_one(kind: CancelKind) -> None:
    """The hot paths' unchecked constructor makes the same frozen value as CancelReason()."""
    origin = CancelReason(CancelKind.SUPERSEDED, source="req-2")
    for source, parent in ((None, None), ("req-3", None), (None, origin)):
        fast = _fast_reason(kind, source, parent)
        public = CancelReason(kind, source=source, origin=parent)
        assert type(fast) is CancelReason
        assert fast == public
        assert hash(fast) == hash(public)
        assert repr(fast).split(", at=")[0] == repr(public).split(", at=")[0]
        assert abs(fast.at - public.at) < 60
        assert pickle.loads(pickle.dumps(fast)) == public
        with pytest.raises(FrozenInstanceError):
            fast.source = "other"  # type: ignore[misc]
