"""Real redis-server processes for tests: standalone (stop/restart on the same port) and a 3-node Cluster;
and ``LateReplies``, a TCP proxy in front of one that holds its replies back.

Never the shared Redis on 6379: each server gets a free loopback port and an
empty temporary directory, and is stopped at the end, also when its set-up
fails half-way (a leaked redis-server outlives pytest and holds its port).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loopback_proxy import LoopbackProxy

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"


CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on port + 10000 (its bus)
_CLUSTER_PORTS = (20_000, 45_000)  # so port + 10000 stays a valid port, below the ephemeral range


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A port whose bus port (+10000) is free and ≤ 65535.

    ``free_port`` comes from the ephemeral range (often above 55535), where a
    cluster node exits at once: "Your Redis port number must be 55535 or less".
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*_CLUSTER_PORTS)
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis cluster node")


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            port -= 20000
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _PortTaken(Exception):
    pass


class RedisServer:
    def __init__(self, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self._may_move = port is None  # see GatewayProcess: a port picked here may be taken meanwhile
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="llmp-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait: float = 10.0) -> RedisServer:
        """Start and wait for PONG; on failure nothing is left running."""
        for _ in range(4):
            try:
                started = self._start(wait)
            except _PortTaken:
                self.stop()
                self.port = free_port()
                continue
            except BaseException:
                self.stop()
                raise
            self._may_move = False
            return started
        raise RuntimeError("no free port for redis-server")

    def _start(self, wait: float) -> RedisServer:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), *self.extra],
            stdout=(self.dir / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._may_move and b"in use" in (self.dir / "redis.log").read_bytes():
                    raise _PortTaken
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on {self.port} within {wait}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port (empty: nothing is saved)."""
        self.stop()
        for _ in range(100):  # the port can linger for a moment
            try:
                return self.start()
            except RuntimeError:
                time.sleep(0.05)
        raise RuntimeError(f"could not restart redis on {self.port}")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterNodes:
    """Three masters, no replicas, all 16384 slots assigned."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(cluster_port(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                  "--cluster-node-timeout", "2000") for _ in range(3)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterNodes:
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> RedisClusterNodes:
        for node in self.nodes:
            node.start()
        made = subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                               "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{made.stdout}{made.stderr}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # Every node, not just one: a node that has not yet learnt the slot map answers CLUSTERDOWN.
            if all(self._ready(node) for node in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not become ready")

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        info = subprocess.run([REDIS_CLI, "-p", str(node.port), "cluster", "info"],
                              capture_output=True, text=True, timeout=5).stdout
        return "cluster_state:ok" in info and "cluster_known_nodes:3" in info

    def close(self) -> None:
        for node in self.nodes:
            node.close()


class LateReplies(LoopbackProxy):
    """A TCP proxy in front of Redis: commands pass at once; replies wait ``delay`` seconds."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.delay = 0.0

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            await asyncio.gather(self._pipe(client_r, redis_w, late=False),
                                 self._pipe(redis_r, client_w, late=True))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            client_w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, late: bool) -> None:
        try:
            while data := await reader.read(65536):
                if late and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes()
    try:
        yield cluster.start()
    finally:
        cluster.close()
