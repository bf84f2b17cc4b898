"""Server-sent events, and a streaming response that always aborts its requests when it ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


# Characters that JSON leaves raw in strings but str.splitlines() breaks lines at (httpx's iter_lines
# does): a model's text with one would split an SSE event in two for such clients. Escaped, the JSON
# decodes to the same text. (Control characters below U+0020 are escaped by json.dumps already.)
_LINE_BREAKERS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKERS)


def sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


class MergedStreams:
    """Several output streams as one: (stream index, output) events in arrival order.

    A stream's exception is raised to the consumer. close() may run in any task, also while another
    task is suspended in events(): it cancels the pumps (whose ends wake the consumer) before closing
    the streams, so no stream is closed while it is being iterated."""

    def __init__(self, streams: list[AsyncIterator[dict]]) -> None:
        self.streams = streams
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    async def _pump(self, i: int, it: AsyncIterator[dict]) -> None:
        try:
            async for out in it:
                self._queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((i, e))
        finally:
            self._queue.put_nowait((i, None))

    async def events(self) -> AsyncIterator[tuple[int, dict]]:
        if len(self.streams) == 1:  # no pump task for the common case
            async for out in self.streams[0]:
                yield 0, out
            return
        self._tasks = [asyncio.create_task(self._pump(i, it)) for i, it in enumerate(self.streams)]
        left = len(self.streams)
        while left:
            i, item = await self._queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for it in self.streams:
            with contextlib.suppress(Exception):  # a stream another task still iterates refuses: it ends with it
                await it.aclose()  # type: ignore[attr-defined]


class EngineStreamingResponse(StreamingResponse):
    """SSE response whose on_close runs however the stream ends: finished, failed, or the client
    disconnected (Starlette cancels the body then). on_close aborts what is still running."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close()
