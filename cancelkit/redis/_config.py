"""The backend's validated options and the names of its keys and channels."""

from __future__ import annotations

import binascii
import math
import re
import zlib
from dataclasses import dataclass
from typing import final
from urllib.parse import urlsplit

__all__ = ["Keys", "Settings", "check_url", "key_slot"]

_PREFIX = re.compile(r"[^\s]{1,64}")
_HASH_TAG = re.compile(r"^[^{]*\{[^}]+\}")  # Redis hashes only what the first {...} holds
_SCHEMES = ("redis", "rediss", "unix")


def check_url(url: str) -> None:
    """Raise :exc:`ValueError` naming what is wrong with a Redis URL (nothing connects).

    Accepted: ``redis://[[user]:password@]host[:port][/db]``, the same with ``rediss://``
    (TLS), and ``unix://[[user]:password@]/path/to/socket[?db=N]``.
    """
    example = "redis://host:6379/0"
    if not url.strip():
        raise ValueError(f"the Redis URL is empty; expected something like {example!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"the Redis URL {url!r} is malformed: {exc}") from None
    if parts.scheme not in _SCHEMES:
        found = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(
            f"the Redis URL {url!r} has {found}; use redis://, rediss:// (TLS) or unix:// "
            f"(for example {example!r})"
        )
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"the Redis URL {url!r} names no socket path (unix:///path/to.sock)")
        return
    if not parts.hostname:
        raise ValueError(f"the Redis URL {url!r} names no host (for example {example!r})")
    if port == 0:
        raise ValueError(f"the Redis URL {url!r} has port 0")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"the Redis URL {url!r} has a database {db!r} that is not a number")


def _number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = type(value).__name__
        raise TypeError(f"{name} must be a number of seconds, not {kind}: {value!r}")


@final
@dataclass(frozen=True, slots=True)
class Settings:
    """The options of :class:`~cancelkit.redis.RedisBackend`, validated (times in seconds)."""

    url: str
    prefix: str
    fail_open: bool
    timeout: float
    heartbeat: float
    lease: float
    retry_delay: float
    tombstone_ttl: float
    max_tombstones: int
    max_tombstones_per_owner: int
    poll_interval: float
    seq_ttl: float = 60.0
    max_seq_keys: int = 10_000
    slot_groups: int = 16

    @classmethod
    def validate(
        cls,
        url: str,
        *,
        prefix: str,
        fail_open: bool,
        timeout: float,
        heartbeat: float,
        lease: float | None,
        retry_delay: float,
        tombstone_ttl: float,
        max_tombstones: int,
        max_tombstones_per_owner: int,
        poll_interval: float,
        seq_ttl: float = 60.0,
        max_seq_keys: int = 10_000,
        slot_groups: int = 16,
    ) -> Settings:
        """Check every option; raise :exc:`ValueError` naming the first bad one."""
        check_url(url)
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(f"prefix must be 1 to 64 characters without whitespace: {prefix!r}")
        for name, value in (
            ("timeout", timeout),
            ("heartbeat", heartbeat),
            ("retry_delay", retry_delay),
            ("tombstone_ttl", tombstone_ttl),
            ("poll_interval", poll_interval),
            ("seq_ttl", seq_ttl),
        ):
            _number(name, value)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be seconds > 0, not {value!r}")
        if lease is None:
            lease = 5 * heartbeat
        _number("lease", lease)
        if not 2 * heartbeat <= lease < math.inf:
            raise ValueError(f"lease must be seconds >= 2 * heartbeat, not {lease!r}")
        for name, count, most in (
            ("max_tombstones", max_tombstones, math.inf),
            ("max_tombstones_per_owner", max_tombstones_per_owner, math.inf),
            ("max_seq_keys", max_seq_keys, math.inf),
            ("slot_groups", slot_groups, 1024),
        ):
            if type(count) is not int:  # not a bool, a float or a string of digits either
                raise TypeError(f"{name} must be an int, not {type(count).__name__}: {count!r}")
            if not 1 <= count <= most:
                limit = "from 1 to 1024" if most == 1024 else ">= 1"
                raise ValueError(f"{name} must be an int {limit}, not {count!r}")
        if type(fail_open) is not bool:
            raise TypeError(f"fail_open must be True or False, not {fail_open!r}")
        return cls(
            url,
            prefix,
            fail_open,
            float(timeout),
            float(heartbeat),
            float(lease),
            float(retry_delay),
            float(tombstone_ttl),
            max_tombstones,
            max_tombstones_per_owner,
            float(poll_interval),
            float(seq_ttl),
            max_seq_keys,
            slot_groups,
        )

    @property
    def lease_ms(self) -> str:
        """The lease in milliseconds, as a script argument."""
        return str(math.ceil(self.lease * 1000))

    @property
    def seq_ms(self) -> str:
        """The sequence TTL in milliseconds, as a script argument."""
        return str(math.ceil(self.seq_ttl * 1000))

    @property
    def state_ms(self) -> str:
        """The TTL of a latest-only key's state: the longer of the lease and the sequence TTL."""
        return str(math.ceil(max(self.lease, self.seq_ttl) * 1000))

    @property
    def tombstone_ms(self) -> str:
        """The tombstone TTL in milliseconds, as a script argument."""
        return str(math.ceil(self.tombstone_ttl * 1000))


def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key`` (CRC16/XMODEM of its hash tag, mod 16384)."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % 16384


def _group_tag(prefix: str, group: int, groups: int) -> str:
    """The hash tag of slot group ``group``: ``{prefix:group}``, with a suffix if needed.

    Its slot lies in the group's share of the slot range, so that the groups spread evenly
    over shards that own contiguous slot ranges (what ``redis-cli --cluster create`` makes).
    """
    n = 0
    while True:
        tag = "{" + (f"{prefix}:{group}" if n == 0 else f"{prefix}:{group}.{n}") + "}"
        if key_slot(tag) * groups // 16384 == group:
            return tag
        n += 1


@final
class Keys:
    """Key and channel names (see :mod:`cancelkit.redis._scripts` for the schema).

    Every name starts with a *base*. On a single server the base is the prefix. On a Redis
    Cluster the prefix's key space is split into ``slot_groups`` groups, each with its own
    hash tag ``{prefix:g}``: a registration goes to the group of its operation id (so all
    owners' registrations of one id share a slot), a latest-only key to the group of the
    key, a worker's inbox to the group of the worker's id; a worker has a channel and a
    liveness key in every group, and the counted sets (tombstones, remembered sequence
    numbers) and the generation counter exist once per group. Every script touches the keys
    of one group and publishes on the channels of that group; only the inbox of a worker of
    another group is written by the caller, in a second call (:attr:`spread`). A prefix that
    holds braces, or ``slot_groups=1``, keeps every key under one hash tag (one slot).

    ``worker`` is set while the backend runs (a new id at every start).
    """

    __slots__ = ("_bases", "prefix", "worker")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._bases = [prefix]
        self.worker = ""

    def use_cluster(self, slot_groups: int) -> None:
        """Name keys for a Redis Cluster: ``slot_groups`` hash tags, or one (see the class)."""
        prefix = self.prefix
        if "{" in prefix or "}" in prefix:
            # a hash tag of its own ({...} with something inside) is kept; otherwise wrapped
            self._bases = [prefix if _HASH_TAG.search(prefix) else "{" + prefix + "}"]
        elif slot_groups == 1:
            self._bases = ["{" + prefix + "}"]
        else:
            self._bases = [_group_tag(prefix, g, slot_groups) for g in range(slot_groups)]

    @property
    def groups(self) -> int:
        """How many slot groups the keys are spread over (1 on a single server)."""
        return len(self._bases)

    @property
    def spread(self) -> bool:
        """Whether keys are in several slot groups.

        Scripts then publish in their own group but leave the inbox line of a worker of
        another group to the caller (``>W line`` in their replies).
        """
        return len(self._bases) > 1

    def share(self, limit: int) -> int:
        """A fleet-wide count limit's share per slot group (the limit on a single server)."""
        return -(-limit // len(self._bases))

    def base(self, entity: str) -> str:
        """The start of every key of ``entity`` (an operation id, a key, a worker id)."""
        bases = self._bases
        if len(bases) == 1:
            return bases[0]
        return bases[zlib.crc32(entity.encode(errors="surrogatepass")) % len(bases)]

    def __call__(self, kind: str, name: str, entity: str | None = None) -> str:
        """The key ``<base>:<kind>:<name>``, in the group of ``entity`` (default: ``name``)."""
        return f"{self.base(name if entity is None else entity)}:{kind}:{name}"

    def channels(self) -> list[str]:
        """This worker's channels: one per slot group (one on a single server)."""
        return [f"{base}:w:{self.worker}" for base in self._bases]

    def channel_prefix(self, entity: str) -> str:
        """The start of every worker's channel in the group of ``entity``."""
        return f"{self.base(entity)}:w:"

    def alive(self, entity: str | None = None) -> str:
        """This worker's liveness key in the group of ``entity`` (its own by default)."""
        return f"{self.alive_prefix(entity)}{self.worker}"

    def alive_prefix(self, entity: str | None = None) -> str:
        """The start of every worker's liveness key in the group of ``entity``."""
        return f"{self.base(self.worker if entity is None else entity)}:a:"

    def tombstones(self, entity: str) -> str:
        """The sorted set of live tombstones of ``entity``'s group (for the limit)."""
        return f"{self.base(entity)}:tz"

    def inbox(self, worker: str | None = None) -> str:
        """A worker's inbox (this worker's by default)."""
        worker = self.worker if worker is None else worker
        return f"{self.base(worker)}:in:{worker}"

    @property
    def inbox_prefix(self) -> str:
        """The start of every worker's inbox key, for scripts.

        ``""`` when keys are spread: the caller writes the inbox (see :attr:`spread`).
        """
        return "" if self.spread else f"{self._bases[0]}:in:"

    def sequences(self, entity: str) -> str:
        """The released keys of ``entity``'s group whose sequence number is remembered."""
        return f"{self.base(entity)}:sz"

    def generations(self, entity: str) -> str:
        """The generation counter of ``entity``'s group."""
        return f"{self.base(entity)}:gen"

    def message(self, line: str, lease_ms: str) -> tuple[str, list[str], list[str]]:
        """The call that writes a script's ``>W LINE`` reply line to worker W's inbox."""
        worker, _, text = line[1:].partition(" ")
        return ("INBOX", [self.inbox(worker)], [text, lease_ms])

    def me(self, holder: str) -> str:
        """How scripts name one of this worker's holders: ``"W H"``."""
        return f"{self.worker} {holder}"
