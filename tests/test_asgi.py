"""DisconnectWatch: a request whose client went away stops, under any server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.serving.asgi import DISCONNECT_HOOK, ClientGone, DisconnectSignal, DisconnectWatch


def _lost() -> DisconnectSignal:
    signal = DisconnectSignal()
    signal.fire()
    return signal


async def _wait_forever(watch: DisconnectWatch, receive: Any, scope: dict[str, Any]) -> None:
    with watch.watching(receive, scope):
        await asyncio.sleep(60)


async def test_a_disconnect_reported_by_receive_ends_the_request() -> None:
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    watch = DisconnectWatch()
    task = asyncio.ensure_future(_wait_forever(watch, messages.get, {}))
    await asyncio.sleep(0)
    await messages.put({"type": "http.disconnect"})
    with pytest.raises(ClientGone):
        await asyncio.wait_for(task, 5)


async def test_a_connection_lost_reported_by_the_protocol_ends_the_request() -> None:
    hook = DisconnectSignal()

    async def never() -> dict[str, Any]:
        raise AssertionError("receive is not called when the protocol reports disconnects")

    watch = DisconnectWatch()
    task = asyncio.ensure_future(_wait_forever(watch, never, {"extensions": {DISCONNECT_HOOK: hook}}))
    await asyncio.sleep(0)
    hook.fire()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(task, 5)


async def test_a_connection_lost_before_the_watch_began_ends_the_request() -> None:
    watch = DisconnectWatch()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(_wait_forever(watch, None, {"extensions": {DISCONNECT_HOOK: _lost()}}), 5)


async def test_the_watch_withdraws_its_callback_when_the_answer_is_over() -> None:
    hook = DisconnectSignal()
    watch = DisconnectWatch()
    with watch.watching(None, {"extensions": {DISCONNECT_HOOK: hook}}):
        pass
    hook.fire()  # the connection closes after the answer: nothing of the request is called
    assert not watch.gone


async def test_a_disconnect_while_the_last_bytes_leave_is_not_an_abandon() -> None:
    hook = DisconnectSignal()
    watch = DisconnectWatch()
    with watch.watching(None, {"extensions": {DISCONNECT_HOOK: hook}}):
        watch.finishing = True
        hook.fire()
        await asyncio.sleep(0)  # not cancelled
    assert not watch.gone


async def test_a_client_gone_before_the_watch_began_leaves_no_cancellation_behind() -> None:
    """An error raised at once inside the watch (no upstream available, say) must not turn into a
    cancellation of whatever the request awaits next (settling its quota)."""
    watch = DisconnectWatch()
    settled = False
    with pytest.raises(ClientGone):
        try:
            with watch.watching(None, {"extensions": {DISCONNECT_HOOK: _lost()}}):
                raise AssertionError("nothing is forwarded for a client that is gone")
        finally:
            await asyncio.shield(asyncio.sleep(0))
            settled = True
    assert settled and watch.gone


async def test_the_watch_withdraws_only_its_own_callback() -> None:
    """On a kept-alive connection a request that ends late must not withdraw the next one's."""
    hook = DisconnectSignal()
    scope = {"extensions": {DISCONNECT_HOOK: hook}}
    first, second = DisconnectWatch(), DisconnectWatch()
    with first.watching(None, scope):
        task = asyncio.ensure_future(_wait_forever(second, None, scope))
        await asyncio.sleep(0)  # the second request registers while the first is still ending
    hook.fire()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(task, 5)
    assert not first.gone
