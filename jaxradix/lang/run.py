"""Running programs: one (optionally streaming), or a batch on a thread pool with its shared prefix
computed once.

Batch prefix warm-up. The programs of a batch usually open with the same text (instructions,
few-shot examples). Started together, they would all miss the radix cache, since a prefix enters
the tree only when a request finishes. So each program's first backend call first waits at a
barrier until every program of the first wave has reached its own first call (or ended, or a short
timeout passed); then one request with max_new_tokens=0 computes the longest common prefix of
their prompts, and all proceed and hit it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jaxradix.lang.backends import Backend
from jaxradix.lang.interpreter import ProgramState

BARRIER_TIMEOUT_S = 2.0
MIN_WARM_CHARS = 32  # shorter common prefixes are not worth a request


def run_program(func: Callable[..., Any], args: tuple, kwargs: dict[str, Any], backend: Backend,
                defaults: dict[str, Any], stream: bool = False,
                first_call_hook: Callable[[str], None] | None = None) -> ProgramState:
    state = ProgramState(backend, defaults, stream=stream)
    state._first_call_hook = first_call_hook

    def body() -> None:
        try:
            state.ret_value = func(state, *args, **kwargs)
            state._worker.wait()
        except BaseException as e:  # noqa: BLE001 - kept on the state, raised to the caller
            if state._error is None:
                state._error = e
        finally:
            with state._cond:
                hook, state._first_call_hook = state._first_call_hook, None
            if hook is not None:  # the program ended without calling the backend
                hook(None)  # type: ignore[arg-type]
            state._finish()

    if stream:
        state._program_thread = threading.Thread(target=body, name="jaxradix-program", daemon=True)
        state._program_thread.start()
        return state
    body()
    if state._error is not None:
        raise state._error
    return state


def _common_prefix(texts: list[str]) -> str:
    if not texts:
        return ""
    lo, hi = min(texts), max(texts)
    n = 0
    while n < len(lo) and lo[n] == hi[n]:
        n += 1
    return lo[:n]


class PrefixBarrier:
    """See the module docstring. arrive(text) is called once per program of the first wave: with its
    first prompt, or None when it ended without one."""

    def __init__(self, backend: Backend, expected: int, timeout: float = BARRIER_TIMEOUT_S) -> None:
        self.backend = backend
        self.expected = expected
        self.timeout = timeout
        self.texts: list[str] = []
        self.warmed: str = ""
        self._arrived = 0
        self._state = "waiting"  # -> "warming" -> "done"
        self._cond = threading.Condition()

    def arrive(self, text: str | None) -> None:
        with self._cond:
            if self._state == "done":
                return
            if text:
                self.texts.append(text)
            self._arrived += 1
            deadline = time.monotonic() + self.timeout
            while self._state == "waiting" and self._arrived < self.expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._state != "waiting":
                while self._state != "done":
                    self._cond.wait()
                return
            self._state = "warming"
            texts = list(self.texts)
        try:
            prefix = _common_prefix(texts)
            if len(texts) > 1 and len(prefix) >= MIN_WARM_CHARS:
                self.backend.cache_prefix(prefix)
                self.warmed = prefix
        finally:
            with self._cond:
                self._state = "done"
                self._cond.notify_all()


def run_batch(func: Callable[..., Any], batch: list[dict[str, Any]], backend: Backend, defaults: dict[str, Any],
              num_threads: int | str = "auto", progress_bar: bool = False,
              warm_prefix: bool = True) -> list[ProgramState]:
    batch = list(batch)
    for i, kw in enumerate(batch):
        if not isinstance(kw, dict):
            raise TypeError(f"run_batch: item {i} must be a dict of the program's arguments, got {type(kw).__name__}")
    if not batch:
        return []
    if num_threads == "auto":
        num_threads = max(64, 8 * (os.cpu_count() or 1))
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"run_batch: num_threads must be a positive integer or 'auto', got {num_threads!r}")
    num_threads = min(num_threads, len(batch))
    barrier = PrefixBarrier(backend, num_threads) if warm_prefix and num_threads > 1 else None
    hook = barrier.arrive if barrier is not None else None

    pbar = None
    if progress_bar:
        from tqdm import tqdm

        pbar = tqdm(total=len(batch), desc="programs")

    def one(kw: dict[str, Any]) -> ProgramState:
        try:
            return run_program(func, (), kw, backend, defaults, first_call_hook=hook)
        finally:
            if pbar is not None:
                pbar.update()

    try:
        with ThreadPoolExecutor(num_threads, thread_name_prefix="jaxradix-batch") as pool:
            futures = [pool.submit(one, kw) for kw in batch]
            return [f.result() for f in futures]
    finally:
        if pbar is not None:
            pbar.close()
