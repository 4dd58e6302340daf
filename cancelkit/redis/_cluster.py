"""Redis Cluster: one hash slot per backend, sharded pub/sub, recovery after failover.

Layout (see :class:`~cancelkit.redis._config.Keys`). The keys of a prefix are spread over
``slot_groups`` hash tags; every script touches the keys of one group, including the keys it
computes (a holder's ``#c`` key, a worker's liveness key in that group), and ``SPUBLISH``-es
on the workers' channels of that group (every worker subscribes in every group). Only a
worker's inbox lives in the worker's own group; a script that cannot write it returns the
line and the caller writes it. The Lua is the same as on a single server; only ``PUBLISH``
becomes ``SPUBLISH`` (a message then goes to the one shard that serves the slot, not to every
node). With one group (``slot_groups=1``, or a prefix with braces) everything is in one slot,
as on a single server.

Client. coredis's :class:`~coredis.RedisCluster`, found by asking the URL's node (``INFO
cluster``); it follows ``MOVED`` and ``ASK`` and reloads the layout after connection errors.
What this module adds, each for a behaviour measured on coredis 6.9:

- a retry policy that retries connection errors once: coredis reports failed attempts to its
  layout only from the retry hook, and without that report it never learns that a primary was
  replaced (every later call goes to the dead node);
- a pool that gives a slot back when a leased connection died and that shields making a
  connection (the per-node pools otherwise shrink to nothing after enough connection losses);
- the subscription: sharded pub/sub on the shard of this worker's channel only, whose
  connection is given back when it ends (coredis 6.9 leases one per primary and leaks them);
  the server ends it (``sunsubscribe``) when the slot moves, and coredis does not subscribe
  again by itself, so the listener treats that as a lost subscription (and resyncs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import anyio
import coredis
import coredis.exceptions
import coredis.patterns.pubsub
from anyio.abc import TaskStatus
from coredis.connection import TCPLocation
from coredis.pool import ClusterConnectionPool
from coredis.retry import CompositeRetryPolicy, ConstantRetryPolicy, NoRetryPolicy

from ._config import key_slot

__all__ = [
    "CLUSTER_ERRORS",
    "ClusterPool",
    "ShardedSubscription",
    "channel_groups",
    "cluster_client",
    "cluster_scripts",
    "is_cluster",
    "load_scripts",
    "lost_subscription",
    "report_error",
    "subscription",
]

logger = logging.getLogger("cancelkit.redis")


#: What a cluster call raises while a slot is moving or its shard fails over, all transient:
#: ``CLUSTERDOWN``, ``TRYAGAIN``, redirections coredis gave up on, no node for the slot, a
#: fan-out (``SCRIPT LOAD`` after ``NOSCRIPT``) that reached a dead node.
CLUSTER_ERRORS = (coredis.exceptions.RedisClusterError,)


_BUFFERS = tuple(
    f"_{name}_buffer_{end}"
    for name in ("write", "push_message", "streamed_message")
    for end in ("in", "out")
)


def cluster_scripts(scripts: Mapping[str, str]) -> dict[str, str]:
    """The scripts for a cluster: wake-ups go out with ``SPUBLISH`` to the channel's shard."""
    return {
        name: text.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")
        for name, text in scripts.items()
    }


async def is_cluster(client: coredis.Redis[str], url: str) -> bool:
    """Ping the node behind ``client``; whether it runs in cluster mode.

    Raises:
        ValueError: if it does, and the URL names a database other than 0.
    """
    try:
        await client.ping()
    except coredis.exceptions.ResponseError as exc:
        if "not allowed in cluster mode" in str(exc):  # SELECT <db> on a cluster node
            _check_database(url)
        raise
    info = await client.info("cluster")
    return str(info.get("cluster_enabled", "0")) == "1"


def _check_database(url: str) -> None:
    database = urlsplit(url).path.strip("/")
    if database not in ("", "0"):
        raise ValueError(
            f"the Redis URL names database {database!r}, but a Redis Cluster has only "
            "database 0: leave it out of the URL"
        )


class ClusterPool(ClusterConnectionPool):
    """coredis's cluster pool, robust against the connection losses of a failover.

    A leased connection that died gives its slot in the node's pool back (coredis 6.9 drops
    it, and a node's pool is empty after a few losses); making a connection is shielded from
    the caller's cancellation (it is bounded by the connect timeout), so a cancelled caller
    cannot lose a slot either; the pool closes what it opened when it exits.
    """

    async def get_connection(
        self, node: Any = None, primary: bool = True, **options: Any
    ) -> coredis.connection.ClusterConnection:
        with anyio.CancelScope(shield=True):
            connection = await super().get_connection(node, primary, **options)
        return connection

    async def _wrap_connection(
        self,
        connection: coredis.connection.ClusterConnection,
        *,
        task_status: TaskStatus[Exception | None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await super()._wrap_connection(connection, task_status=task_status)
        finally:  # the connection is gone; coredis leaves its buffers open if it never connected
            for name in _BUFFERS:
                stream = getattr(connection, name, None)
                if stream is not None:
                    stream.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc_val, exc_tb)
        finally:
            if self._counter == 0:  # coredis 6.9 leaves its layout's error stream open
                for stream in getattr(self.cluster_layout, "_error_stream", ()):
                    stream.close()

    def release(self, connection: coredis.connection.ClusterConnection) -> None:
        super().release(connection)
        if not connection.usable:
            queue = self._node_pool(connection.location)
            if connection not in queue and not queue.full():
                queue.append_nowait(None)


def cluster_client(url: str, *, timeout: float) -> coredis.RedisCluster[str]:
    """A cluster client seeded by ``url``'s node (it discovers the others).

    Raises:
        ValueError: if the URL names a database other than 0 (a cluster has only 0).
    """
    _check_database(url)
    parts = urlsplit(url)
    pool = ClusterPool.from_url(
        url,
        startup_nodes=[TCPLocation(parts.hostname or "127.0.0.1", parts.port or 6379)],
        # no CONFIG GET on every node at every layout reload (managed clusters refuse CONFIG)
        skip_full_coverage_check=True,
        decode_responses=True,
        connect_timeout=timeout / 2,
        stream_timeout=timeout,
        timeout=timeout,
    )
    return coredis.RedisCluster(
        connection_pool=pool,
        decode_responses=True,
        retry_policy=CompositeRetryPolicy(
            ConstantRetryPolicy(
                (coredis.exceptions.ClusterDownError, coredis.exceptions.TryAgainError),
                retries=2,
                delay=0.05,
            ),
            ConstantRetryPolicy(
                (coredis.exceptions.ConnectionError, TimeoutError), retries=1, delay=0.01
            ),
        ),
    )


async def load_scripts(
    client: coredis.RedisCluster[str], scripts: Mapping[str, str], *, within: float
) -> None:
    """Load the scripts on every node at start, if that works within ``within`` seconds.

    Only to spare the first calls: a call whose script is missing on its node (``NOSCRIPT``,
    for example on a replica promoted since) loads it on every node and runs it again.
    """

    async def load(text: str) -> None:
        await client.script_load(text)

    with anyio.move_on_after(within):
        try:
            async with anyio.create_task_group() as tg:
                for text in scripts.values():
                    tg.start_soon(load, text)
        except Exception as exc:  # best effort, see above
            logger.debug("preloading the scripts failed (%s); they load on first use", exc)


def report_error(client: coredis.Redis[str] | coredis.RedisCluster[str], exc: Exception) -> None:
    """Tell a cluster client's layout that a node failed (it reloads after a few reports)."""
    if isinstance(client, coredis.RedisCluster):
        if not isinstance(exc, (coredis.exceptions.ConnectionError, *CLUSTER_ERRORS)):
            exc = coredis.exceptions.ConnectionError(str(exc))
        client.connection_pool.cluster_layout.report_errors(None, exc)


class ShardedSubscription(coredis.patterns.pubsub.ShardedPubSub[str]):
    """coredis's sharded pub/sub, connected only to the shard of its channels, leaking nothing.

    coredis 6.9 leases a connection to every primary and never gives them back (its exit
    stack is not closed), so each resubscribe would leak one pooled connection per primary
    until the pools are empty; here the connections are released when the subscription ends.
    """

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        layout = self.connection_pool.cluster_layout
        nodes = {
            layout.node_for_slot(key_slot(channel))
            for channel in self._initial_channel_subscriptions
        }
        async with AsyncExitStack() as stack:
            self.shard_connections = {
                node.node_id: await stack.enter_async_context(
                    self.connection_pool.acquire(node=node)
                )
                for node in nodes
                if node.node_id
            }
            try:
                async with anyio.create_task_group() as tg:
                    self._current_scope = tg.cancel_scope
                    for connection in self.shard_connections.values():
                        tg.start_soon(self._consume_shard_push_messages, connection)
                        tg.start_soon(self._shard_keepalive, connection)
                    task_status.started()
            finally:
                if self._current_scope.cancel_called:
                    with anyio.CancelScope(shield=True):
                        await self._cleanup()


def subscription(
    client: coredis.Redis[str] | coredis.RedisCluster[str],
    channels: list[str],
    *,
    timeout: float,
    heartbeat: float,
) -> AbstractAsyncContextManager[Any]:
    """The pub/sub of ``channels``: sharded on a cluster, plain on a single server.

    Sharded: one connection to each shard that serves one of the channels.

    No retry policy (the listener resubscribes, and resyncs, itself); subscribe and
    unsubscribe messages are kept, so the listener sees a ``sunsubscribe`` from the server.
    """
    pubsub: AbstractAsyncContextManager[Any]
    if isinstance(client, coredis.RedisCluster):
        pubsub = ShardedSubscription(
            client.connection_pool,
            channels=channels,
            retry_policy=NoRetryPolicy(),
            subscription_timeout=timeout,
            max_idle_seconds=heartbeat,
        )
    else:
        pubsub = client.pubsub(
            channels=channels,
            retry_policy=NoRetryPolicy(),
            subscription_timeout=timeout,
            max_idle_seconds=heartbeat,
        )
    return pubsub


def channel_groups(
    client: coredis.Redis[str] | coredis.RedisCluster[str], channels: list[str]
) -> list[list[str]]:
    """``channels`` grouped by the shard that serves them now (one group on a single server).

    The groups are only for independence (see the listener): a group whose channels move to
    another shard later still works, its subscription finds their nodes at each subscribe.
    """
    if not isinstance(client, coredis.RedisCluster):
        return [channels]
    layout = client.connection_pool.cluster_layout
    groups: dict[str, list[str]] = {}
    try:
        for channel in channels:
            node = layout.node_for_slot(key_slot(channel))
            groups.setdefault(node.node_id or node.name, []).append(channel)
    except Exception as exc:  # no layout yet: one group, as on a single server
        logger.debug("cluster layout unknown (%s); one subscription for every shard", exc)
        return [channels]
    return list(groups.values())


def lost_subscription(message_type: str) -> bool:
    """Whether a pub/sub message says the server ended the subscription."""
    return message_type in ("unsubscribe", "sunsubscribe")
