"""A request's CPU work (tokenizing, rendering the chat template) off the event loop.

Both can take seconds on a large input, and the event loop also answers /health and every other
stream, so they run on a small bounded thread pool. Cheap checks come first: a text longer than
max_prompt_chars or with invalid Unicode is refused before any tokenizer sees it, and a chat
template sent by the client is refused unless the server allows it (it runs sandboxed, but its
loops are unbounded).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from jaxradix.server.errors import APIError, bad_request

T = TypeVar("T")

CHARS_PER_CONTEXT_TOKEN = 16  # the default text limit: this many characters per token of context
MIN_PROMPT_CHARS = 1 << 20
MAX_PENDING = 4096  # jobs queued or running before new requests get 503


def default_workers() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def default_max_prompt_chars(context_len: int) -> int:
    return max(MIN_PROMPT_CHARS, CHARS_PER_CONTEXT_TOKEN * context_len)


class Preprocessor:
    def __init__(self, engine: Any, *, max_prompt_chars: int | None = None, workers: int | None = None,
                 allow_client_chat_template: bool = False) -> None:
        self.engine = engine
        self.max_prompt_chars = max_prompt_chars or default_max_prompt_chars(engine.context_len)
        self.workers = workers or default_workers()
        self.allow_client_chat_template = allow_client_chat_template
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="jaxradix-preprocess")
        self._pending = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_text(self, text: str, field: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise bad_request(f"{field}: {len(text)} characters exceed the server's limit of "
                              f"{self.max_prompt_chars} (--max-prompt-chars)", field)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"{field}: invalid Unicode at character {e.start} (a lone surrogate "
                              f"{text[e.start]!r}); send UTF-8 text", field) from None

    async def run(self, fn: Callable[[], T]) -> T:
        """fn() on the pool; 503 when the pool's queue is full."""
        if self._pending >= MAX_PENDING:
            raise APIError("server busy: too many requests waiting to be tokenized; retry later", 503,
                           code="server_busy")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            self._pending -= 1

    async def encode(self, texts: list[str], field: str) -> list[list[int]]:
        for t in texts:
            self.check_text(t, field)
        engine = self.engine
        try:
            return await self.run(lambda: [engine.encode(t) if t else [] for t in texts])
        except ValueError as e:
            raise bad_request(f"{field}: {e}", field) from e

    def check_template_kwargs(self, kwargs: dict[str, Any]) -> None:
        if "chat_template" in kwargs and not self.allow_client_chat_template:
            raise bad_request("chat_template_kwargs.chat_template: a client's chat template is not accepted "
                              "by this server (start it with --allow-client-chat-template)",
                              "chat_template_kwargs")

    async def render_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of the rendered chat; a template error is the caller's input (400). The caller checks
        the client's template kwargs (check_template_kwargs) before adding the server's own."""
        total = 0
        for j, m in enumerate(messages):
            if isinstance(m.get("content"), str):
                self.check_text(m["content"], f"messages[{j}].content")
                total += len(m["content"])
        if total > self.max_prompt_chars:
            raise bad_request(f"messages: {total} characters exceed the server's limit of {self.max_prompt_chars} "
                              f"(--max-prompt-chars)", "messages")
        tokenizer = self.engine.tokenizer

        def render() -> list[int]:
            return list(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs))

        try:
            return await self.run(render)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - template errors are the caller's input
            raise bad_request(f"messages: the chat template failed: {e}", "messages") from e
