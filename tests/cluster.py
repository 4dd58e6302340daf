"""A real local Redis Cluster for tests: 3 primaries and 3 replicas on loopback ports.

Started once per session by the ``redis_cluster`` fixture (conftest), torn down reliably (every
process is killed, even when start-up failed half-way), and healed between tests that break it
(:meth:`LocalCluster.heal` restarts killed nodes and waits until every slot is served and every
replica is linked). Only ``redis-server`` is needed: the cluster is joined with ``CLUSTER
ADDSLOTSRANGE / MEET / REPLICATE`` (what ``redis-cli --cluster create`` does), and administration
goes through a tiny RESP client here, so it never depends on the client under test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ClusterNode", "LocalCluster"]

#: A primary that stops answering is declared failed after this long (ms); its replica is then
#: promoted within about two node timeouts. Small, so failover tests finish quickly.
NODE_TIMEOUT_MS = 1000


def _free_port() -> int:
    """A free loopback port whose cluster-bus port (port + 10000) is free as well."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port > 55_535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


@dataclass
class ClusterNode:
    """One redis-server of the cluster; it keeps its port and node id across restarts."""

    executable: str
    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running
        self.directory.mkdir(parents=True, exist_ok=True)
        # stderr goes to a file: a node that cannot start leaves its reason there
        with open(self.directory / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.executable,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(self.directory / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                    # a replica may always take over, however long its primary was gone
                    "--cluster-replica-validity-factor",
                    "0",
                    # a replica syncs at once (the default waits 5 s for more replicas)
                    "--repl-diskless-sync-delay",
                    "0",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--loglevel",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the process (SIGKILL by default: no goodbye to the cluster)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.process.wait(10)
                self.process = None

    def call(self, *args: str, timeout: float = 5) -> Any:
        """Send one command; the reply (str, int, list, None), an error as ``ValueError``.

        Raises:
            OSError: if the node does not answer.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            sock.sendall(payload.encode())
            return _read_reply(sock.makefile("rb"))

    def read(self, *args: str, timeout: float = 5) -> Any:
        """Send one read command after ``READONLY`` (so a replica answers for its own data)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            stream = sock.makefile("rb")
            for command in (("READONLY",), args):
                payload = f"*{len(command)}\r\n" + "".join(
                    f"${len(a.encode())}\r\n{a}\r\n" for a in command
                )
                sock.sendall(payload.encode())
                reply = _read_reply(stream)
            return reply

    def replica(self, cluster: LocalCluster) -> ClusterNode:
        """The running replica of this primary."""
        port = str(self.port)
        return next(
            node
            for node in cluster.nodes
            if node.running and node.info("replication").get("master_port") == port
        )

    def cli(self, *args: str, timeout: float = 5) -> str:
        """One command's reply as text; ``""`` if the node does not answer or answers an error."""
        try:
            reply = self.call(*args, timeout=timeout)
        except (OSError, ValueError):
            return ""
        return reply if isinstance(reply, str) else str(reply)

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` (or ``CLUSTER INFO`` for ``"cluster-info"``) as a dict."""
        if section == "cluster-info":
            text = self.cli("CLUSTER", "INFO")
        else:
            text = self.cli("INFO", section)
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}

    @property
    def node_id(self) -> str:
        return self.cli("CLUSTER", "MYID").strip()

    @property
    def role(self) -> str:
        """``"master"``, ``"slave"`` or ``""`` (not answering)."""
        return self.info("replication").get("role", "")


class LocalCluster:
    """Six cluster-enabled redis-servers on loopback, joined into 3 primaries + 3 replicas."""

    def __init__(self, executable: str, directory: Path, *, start_timeout: float = 60) -> None:
        self.start_timeout = start_timeout
        self.nodes = [
            ClusterNode(executable, directory / f"node{i}", _free_port()) for i in range(6)
        ]

    @property
    def url(self) -> str:
        """A seed URL for a cluster client (any node will do; the client discovers the rest)."""
        return f"redis://{self.nodes[0].address}"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    def start(self) -> None:
        """Start the nodes, create the cluster, wait until it is healthy; on failure tear down."""
        try:
            for node in self.nodes:
                node.start()
            self._wait(lambda: all(node.cli("PING").strip() == "PONG" for node in self.nodes))
            self._create()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _create(self) -> None:
        """Join the nodes: 3 primaries with a third of the slots each, a replica for each."""
        primaries, replicas = self.nodes[:3], self.nodes[3:]
        bounds = [0, 5461, 10923, 16384]
        for i, node in enumerate(primaries):
            node.call("CLUSTER", "ADDSLOTSRANGE", str(bounds[i]), str(bounds[i + 1] - 1))
            node.call("CLUSTER", "SET-CONFIG-EPOCH", str(i + 1))
        for node in self.nodes[1:]:
            self.nodes[0].call("CLUSTER", "MEET", "127.0.0.1", str(node.port))
        self._wait(
            lambda: all(len(n.cli("CLUSTER", "NODES").splitlines()) == 6 for n in self.nodes)
        )
        ids = [node.node_id for node in primaries]
        for primary_id, node in zip(ids, replicas, strict=True):
            node.call("CLUSTER", "REPLICATE", primary_id)

    def stop(self) -> None:
        """Kill every node (no persistence is configured, so nothing needs a clean shutdown)."""
        for node in self.nodes:
            node.kill()

    def primaries(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.running and node.role == "master"]

    def node_for_port(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def primary_for_key(self, key: str) -> ClusterNode:
        """The primary that serves ``key``'s slot (as the first running node sees it)."""
        seed = next(node for node in self.nodes if node.running)
        slot = int(seed.cli("CLUSTER", "KEYSLOT", key).strip())
        for line in seed.cli("CLUSTER", "NODES").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for ranges in parts[8:]:
                low, _, high = ranges.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return self.node_for_port(int(parts[1].split("@")[0].rsplit(":", 1)[1]))
        raise RuntimeError(f"no primary serves slot {slot}")

    def start_migration(self, key: str) -> Migration:
        """Start moving ``key``'s slot to another primary (``MIGRATING`` / ``IMPORTING``)."""
        source = self.primary_for_key(key)
        target = next(node for node in self.primaries() if node is not source)
        slot = int(source.call("CLUSTER", "KEYSLOT", key))
        target.call("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.node_id)
        source.call("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.node_id)
        return Migration(self, slot, source, target)

    def healthy(self) -> bool:
        """Every node runs, sees cluster_state:ok and the same epoch view; replicas are linked."""
        if not all(node.running for node in self.nodes):
            return False
        roles: dict[str, int] = {}
        for node in self.nodes:
            if node.info("cluster-info").get("cluster_state") != "ok":
                return False
            replication = node.info("replication")
            role = replication.get("role", "")
            roles[role] = roles.get(role, 0) + 1
            if role == "slave" and replication.get("master_link_status") != "up":
                return False
            if role == "master" and replication.get("connected_slaves") != "1":
                return False
        return roles == {"master": 3, "slave": 3}

    def wait_healthy(self) -> None:
        """Wait (bounded by ``start_timeout``) until :meth:`healthy`."""
        self._wait(self.healthy)

    def heal(self) -> None:
        """Restart killed or stopped nodes (they rejoin as replicas) and wait until healthy."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.process.pid, signal.SIGCONT)
            elif node.process is not None:
                node.process = None
            if node.process is None:
                node.start()
        self.wait_healthy()

    def _wait(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not ready():
            if time.monotonic() > deadline:
                states = {n.address: (n.running, n.role) for n in self.nodes}
                raise RuntimeError(f"the Redis Cluster is not healthy in time: {states}")
            time.sleep(0.05)


@dataclass
class Migration:
    """A slot on its way from one primary to another (what ``redis-cli --cluster reshard`` does)."""

    cluster: LocalCluster
    slot: int
    source: ClusterNode
    target: ClusterNode

    def move_keys(self) -> None:
        """MIGRATE every key of the slot; afterwards the source answers ``ASK`` for them."""
        while keys := self.source.call("CLUSTER", "GETKEYSINSLOT", str(self.slot), "100"):
            args = ["127.0.0.1", str(self.target.port), "", "0", "5000", "KEYS", *keys]
            self.source.call("MIGRATE", *args)

    def finish(self) -> None:
        """Give the slot to the target on every node; the source answers ``MOVED`` from now."""
        self.move_keys()
        target_id = self.target.node_id
        for node in (self.target, self.source, *self.cluster.nodes):
            if node.running:
                with contextlib.suppress(ValueError, OSError):
                    node.call("CLUSTER", "SETSLOT", str(self.slot), "NODE", target_id)


def _read_reply(stream: Any) -> Any:
    """Read one RESP2 reply."""
    line = stream.readline()
    if not line:
        raise OSError("connection closed")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise ValueError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if rest == "-1":
            return None
        data = stream.read(int(rest) + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        return None if rest == "-1" else [_read_reply(stream) for _ in range(int(rest))]
    raise OSError(f"unexpected reply {line!r}")
