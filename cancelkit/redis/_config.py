"""The backend's validated options and the names of its keys and channels."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import final
from urllib.parse import urlsplit

__all__ = ["Keys", "Settings", "check_url"]

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
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be seconds > 0, not {value!r}")
        if lease is None:
            lease = 5 * heartbeat
        if not 2 * heartbeat <= lease < math.inf:
            raise ValueError(f"lease must be seconds >= 2 * heartbeat, not {lease!r}")
        for name, count in (
            ("max_tombstones", max_tombstones),
            ("max_tombstones_per_owner", max_tombstones_per_owner),
        ):
            if count < 1:
                raise ValueError(f"{name} must be an int >= 1, not {count!r}")
        if max_seq_keys < 1:
            raise ValueError(f"max_seq_keys must be an int >= 1, not {max_seq_keys!r}")
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


@final
class Keys:
    """Key and channel names (see :mod:`cancelkit.redis._scripts` for the schema).

    ``worker`` is set while the backend runs (a new id at every start).
    """

    __slots__ = ("channel_prefix", "prefix", "worker")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.channel_prefix = f"{prefix}:w:"
        self.worker = ""

    def use_hash_tag(self) -> None:
        """Put every key and channel in one slot of a Redis Cluster: ``{prefix}``.

        A prefix that has a hash tag already (``{...}`` with something inside) is kept.
        """
        if not _HASH_TAG.search(self.prefix):
            self.prefix = "{" + self.prefix + "}"
            self.channel_prefix = f"{self.prefix}:w:"

    def __call__(self, kind: str, name: str) -> str:
        """The key ``<prefix>:<kind>:<name>``."""
        return f"{self.prefix}:{kind}:{name}"

    @property
    def channel(self) -> str:
        """This worker's channel."""
        return self.channel_prefix + self.worker

    @property
    def alive(self) -> str:
        """This worker's liveness key."""
        return f"{self.prefix}:a:{self.worker}"

    @property
    def alive_prefix(self) -> str:
        """The start of every worker's liveness key."""
        return f"{self.prefix}:a:"

    @property
    def tombstones(self) -> str:
        """The sorted set of live tombstones (for the limit)."""
        return f"{self.prefix}:tz"

    def inbox(self, worker: str | None = None) -> str:
        """A worker's inbox (this worker's by default)."""
        return f"{self.prefix}:in:{self.worker if worker is None else worker}"

    @property
    def inbox_prefix(self) -> str:
        """The start of every worker's inbox key."""
        return f"{self.prefix}:in:"

    @property
    def sequences(self) -> str:
        """The sorted set of released keys whose sequence number is remembered (for the limit)."""
        return f"{self.prefix}:sz"

    @property
    def generations(self) -> str:
        """The generation counter."""
        return f"{self.prefix}:gen"

    def me(self, holder: str) -> str:
        """How scripts name one of this worker's holders: ``"W H"``."""
        return f"{self.worker} {holder}"
