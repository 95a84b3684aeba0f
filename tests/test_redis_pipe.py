"""The pipelined Redis connection against a real redis-server: order, scripts, restarts, stalls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis import exceptions as redis_errors

from proxy.access.redis_pipe import RedisPipe, Script
from tests.redis_fixtures import REDIS_SERVER, RedisServer, free_port, redis_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)
ECHO = Script("return {tonumber(ARGV[1]), KEYS[1]}")


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP): connections stay open, nothing is answered."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@pytest.fixture
async def pipe(redis_server: RedisServer) -> AsyncIterator[RedisPipe]:  # noqa: F811
    client = RedisPipe(redis_server.url, timeout=0.5)
    yield client
    await client.close()


async def test_concurrent_callers_each_get_their_own_reply(pipe: RedisPipe) -> None:
    replies = await asyncio.gather(*(pipe.run(ECHO, [f"k{i}"], [i]) for i in range(500)))
    assert replies == [[i, f"k{i}".encode()] for i in range(500)]


async def test_an_error_reply_raises_and_the_next_call_still_works(pipe: RedisPipe) -> None:
    with pytest.raises(redis_errors.ResponseError):
        await pipe.execute("NOSUCHCOMMAND")
    assert await pipe.execute("PING") == b"PONG"


async def test_a_flushed_script_cache_is_reloaded(pipe: RedisPipe) -> None:
    assert await pipe.run(ECHO, ["a"], [1]) == [1, b"a"]
    await pipe.execute("SCRIPT", "FLUSH")
    assert await pipe.run(ECHO, ["a"], [2]) == [2, b"a"]
    assert await pipe.execute("SCRIPT", "EXISTS", ECHO.sha) == [1]


async def test_a_restarted_redis_fails_the_waiting_calls_then_is_used_again(
        pipe: RedisPipe, redis_server: RedisServer) -> None:  # noqa: F811
    await pipe.execute("SET", "x", 1)
    redis_server.restart()
    with pytest.raises(redis_errors.ConnectionError):
        for _ in range(50):  # until the loop has seen the old connection close
            await pipe.execute("PING")
            await asyncio.sleep(0.01)
    assert await pipe.execute("GET", "x") is None  # a new connection to the new, empty server
    assert await pipe.run(ECHO, ["b"], [3]) == [3, b"b"]  # its script cache was empty too


async def test_a_late_reply_goes_to_nobody_and_later_replies_stay_matched(
        pipe: RedisPipe, redis_server: RedisServer) -> None:  # noqa: F811
    await pipe.execute("PING")
    with frozen(redis_server), pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # shorter than the pipe's own timeout: no reconnect
            await pipe.execute("ECHO", "late")
    assert await pipe.execute("ECHO", "next") == b"next"


async def test_a_stalled_connection_fails_its_commands_and_is_replaced(pipe: RedisPipe,
                                                                       redis_server: RedisServer) -> None:  # noqa: F811
    await pipe.execute("PING")
    with frozen(redis_server):
        async with asyncio.timeout(5):  # only against a hang: the pipe's own timeout is 0.5 s
            stuck = [asyncio.ensure_future(pipe.execute("ECHO", f"stuck {i}")) for i in range(3)]
            for call in stuck:
                with pytest.raises(redis_errors.TimeoutError):
                    await call
    assert await pipe.execute("ECHO", "fresh") == b"fresh"


async def test_a_caller_giving_up_on_a_stalled_connection_drops_it(pipe: RedisPipe,
                                                                   redis_server: RedisServer) -> None:  # noqa: F811
    await pipe.execute("PING")
    with frozen(redis_server):
        first = asyncio.ensure_future(pipe.execute("ECHO", "stuck"))
        await asyncio.sleep(0.6)  # older than the pipe's timeout (0.5 s)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await pipe.execute("ECHO", "gives up")
        with pytest.raises(redis_errors.RedisError):
            await first  # failed with the dropped connection, not left hanging
    assert await pipe.execute("ECHO", "fresh") == b"fresh"


async def test_password_and_database_from_the_url(redis_server: RedisServer) -> None:  # noqa: F811
    setup = RedisPipe(redis_server.url, timeout=1.0)
    await setup.execute("CONFIG", "SET", "requirepass", "s3cret")
    await setup.close()
    pipe = RedisPipe(f"redis://:s3cret@127.0.0.1:{redis_server.port}/3", timeout=1.0)
    assert b" db=3 " in await pipe.execute("CLIENT", "INFO")
    await pipe.close()
    wrong = RedisPipe(f"redis://:nope@127.0.0.1:{redis_server.port}/0", timeout=1.0)
    with pytest.raises(redis_errors.AuthenticationError) as err:
        await wrong.execute("PING")
    assert "nope" not in str(err.value)
    await wrong.close()


async def test_nothing_listening_is_a_connection_error() -> None:
    server = RedisServer()  # a free port, never started
    pipe = RedisPipe(server.url, timeout=0.5)
    with pytest.raises(redis_errors.ConnectionError):
        await pipe.execute("PING")
    await pipe.close()
    server.close()


async def test_too_many_waiting_commands_are_refused(redis_server: RedisServer) -> None:  # noqa: F811
    pipe = RedisPipe(redis_server.url, timeout=0.5, max_pending=10)
    await pipe.execute("PING")
    with frozen(redis_server):
        waiting = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(10)]
        await asyncio.sleep(0)
        with pytest.raises(redis_errors.ConnectionError):
            await pipe.execute("PING")
    assert await asyncio.gather(*waiting) == [b"PONG"] * 10
    await pipe.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS, with a self-signed certificate; its port and the certificate."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command")
    cert, key = _self_signed(tmp_path)
    port = free_port()
    server = subprocess.Popen([REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                               "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
                               str(cert), "--tls-auth-clients", "no", "--save", "", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, cert
    finally:
        server.terminate()
        server.wait(5)


async def test_tls_with_a_verified_certificate(tls_redis: tuple[int, Path]) -> None:
    port, cert = tls_redis
    pipe = RedisPipe(f"rediss://localhost:{port}/0?ssl_ca_certs={cert}", timeout=1.0)
    for _ in range(100):  # until it listens
        try:
            assert await pipe.execute("PING") == b"PONG"
            break
        except redis_errors.ConnectionError:
            await asyncio.sleep(0.05)
    assert await pipe.run(ECHO, ["tls"], [7]) == [7, b"tls"]
    await pipe.close()
    untrusted = RedisPipe(f"rediss://localhost:{port}/0", timeout=1.0)  # the system CAs do not know it
    with pytest.raises(redis_errors.ConnectionError):
        await untrusted.execute("PING")
    await untrusted.close()


async def _reads(pipe: RedisPipe) -> int:
    info = (await pipe.execute("INFO", "stats")).decode()
    return int(next(line for line in info.splitlines() if line.startswith("total_reads_processed:"))
               .split(":")[1])


async def test_the_calls_of_one_loop_pass_reach_redis_in_one_round_trip(pipe: RedisPipe) -> None:
    """Requests that reserve or settle at the same moment share a send and Redis's read of it."""
    await pipe.run(ECHO, ["k"], [0])  # loaded: no NOSCRIPT round below
    before = await _reads(pipe)
    replies = await asyncio.gather(*(pipe.run(ECHO, [f"k{i}"], [i]) for i in range(50)))
    assert replies == [[i, f"k{i}".encode()] for i in range(50)]
    assert await _reads(pipe) - before == 2  # the 50 calls, then this INFO
