"""``unless_disconnected``: the request's work against its client's disconnect, in one task, with a
watcher only for work that outlasts ``watch_after_s``; ``read_body``: a body in parts, or a client gone
before its end."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.router.http_util import ClientGone, read_body, unless_disconnected


class _Client:
    """An ASGI receive: the request body, then http.disconnect once ``leave`` is called."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()
        self.receives = 0

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> dict[str, object]:
        self.receives += 1
        await self._gone.wait()
        return {"type": "http.disconnect"}


async def _left_over_cancellations() -> int:
    task = asyncio.current_task()
    assert task is not None
    return task.cancelling()


def test_work_result_returns_and_leaves_the_task_uncancelled() -> None:
    async def main() -> tuple[str, int]:
        client = _Client()

        async def work() -> str:
            await asyncio.sleep(0.01)
            return "done"

        result = await unless_disconnected(client.receive, work(), watch_after_s=0.005)
        client.leave()  # after the work: nothing may cancel the task now
        await asyncio.sleep(0.01)
        return result, await _left_over_cancellations()

    assert asyncio.run(main()) == ("done", 0)


def test_work_shorter_than_the_watch_delay_never_starts_a_watcher() -> None:
    async def main() -> tuple[str, int, int]:
        client = _Client()

        async def work() -> str:
            await asyncio.sleep(0.01)
            return "done"

        result = await unless_disconnected(client.receive, work(), watch_after_s=0.2)
        await asyncio.sleep(0.3)  # past the delay: the watcher's timer was cancelled with the work
        return result, client.receives, await _left_over_cancellations()

    assert asyncio.run(main()) == ("done", 0, 0)


def test_a_disconnect_before_the_watcher_starts_is_noticed_when_it_does() -> None:
    async def main() -> tuple[float, int]:
        client = _Client()
        client.leave()  # gone at once; the server answers http.disconnect from then on
        started = asyncio.get_running_loop().time()
        with pytest.raises(ClientGone):
            await unless_disconnected(client.receive, asyncio.sleep(10), watch_after_s=0.1)
        return asyncio.get_running_loop().time() - started, await _left_over_cancellations()

    took, left_over = asyncio.run(main())
    assert 0.1 <= took < 1.0 and left_over == 0, took


def test_a_disconnect_cancels_the_work_and_raises_client_gone() -> None:
    async def main() -> tuple[bool, int]:
        client = _Client()
        cancelled = False

        async def work() -> str:
            nonlocal cancelled
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled = True
                raise
            return "never"

        asyncio.get_running_loop().call_later(0.01, client.leave)
        with pytest.raises(ClientGone):
            await unless_disconnected(client.receive, work(), watch_after_s=0.005)
        await asyncio.sleep(0)  # the task goes on awaiting after ClientGone
        return cancelled, await _left_over_cancellations()

    assert asyncio.run(main()) == (True, 0)


def test_work_that_ends_despite_the_disconnect_returns_its_result() -> None:
    async def main() -> tuple[str, int]:
        client = _Client()

        async def work() -> str:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return "finished anyway"
            return "never"

        asyncio.get_running_loop().call_later(0.01, client.leave)
        result = await unless_disconnected(client.receive, work(), watch_after_s=0.005)
        await asyncio.sleep(0)
        return result, await _left_over_cancellations()

    assert asyncio.run(main()) == ("finished anyway", 0)


def test_a_cancellation_from_outside_propagates() -> None:
    async def main() -> bool:
        client = _Client()
        outer = asyncio.create_task(unless_disconnected(client.receive, asyncio.sleep(10),
                                                        watch_after_s=0.005))
        await asyncio.sleep(0.01)
        outer.cancel()
        try:
            await outer
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(main())


def _messages(*messages: dict[str, object]) -> object:
    queue = list(messages)

    async def receive() -> dict[str, object]:
        return queue.pop(0)
    return receive


def test_read_body_joins_the_parts_of_a_body() -> None:
    receive = _messages({"type": "http.request", "body": b'{"a": ', "more_body": True},
                        {"type": "http.request", "body": b"", "more_body": True},
                        {"type": "http.request", "body": b"1}", "more_body": False})
    assert asyncio.run(read_body(receive)) == b'{"a": 1}'  # type: ignore[arg-type]
    assert asyncio.run(read_body(_messages({"type": "http.request", "body": b"x"}))) == b"x"  # type: ignore[arg-type]


def test_read_body_raises_client_gone_when_the_client_leaves_mid_body() -> None:
    receive = _messages({"type": "http.request", "body": b'{"a": ', "more_body": True},
                        {"type": "http.disconnect"})
    with pytest.raises(ClientGone):
        asyncio.run(read_body(receive))  # type: ignore[arg-type]
