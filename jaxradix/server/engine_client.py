"""The server's side of the engine: submit, wait (aborting when the client goes away), stream, abort.

Request ids: a caller's request (one prompt, or one prompt of a batch) has a group rid; with n > 1
its choices run as engine rids `{rid}-{i}`, exactly as Engine.generate names them. Every group
rid is in `active` while it runs, so /abort_request can end all of its choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from jaxradix.server.errors import APIError, from_value_error
from jaxradix.server.metrics import Metrics
from jaxradix.server.streaming import MergedStreams

DISCONNECT_POLL_S = 0.5


@dataclass
class LogprobArgs:
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1

    def kwargs(self) -> dict[str, Any]:
        return {"return_logprob": self.return_logprob, "top_logprobs_num": self.top_logprobs_num,
                "logprob_start_len": self.logprob_start_len}


def child_rids(rid: str, n: int) -> list[str]:
    return [rid] if n == 1 else [f"{rid}-{i}" for i in range(n)]


def new_rid() -> str:
    return uuid.uuid4().hex


@contextlib.contextmanager
def engine_errors(param_names: dict[str, str] | None = None) -> Iterator[None]:
    """Turn the engine's input errors into 400s (the engine names the offending field)."""
    try:
        yield
    except APIError:
        raise
    except (ValueError, TypeError) as e:
        raise from_value_error(e, param_names) from e
    except (ImportError, NotImplementedError) as e:
        raise APIError(f"this feature is not available in this build: {e}", 400) from e
    except RuntimeError as e:
        raise APIError(f"engine unavailable: {e}", 503) from e


def check_output(out: dict) -> None:
    err = out["meta_info"].get("error")
    if err:
        raise APIError(f"generation failed: {err}", 500)


class EngineClient:
    def __init__(self, engine: Any, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.active: dict[str, list[str]] = {}

    # -- bookkeeping ----------------------------------------------------------------------------
    def _register(self, rids: list[str], ns: list[int]) -> list[str]:
        """Claim the group rids and their engine rids; any overlap with a running request (its group
        rid or one of its choices' `{rid}-{i}`) is refused."""
        new = [child_rids(rid, n) for rid, n in zip(rids, ns, strict=True)]
        names = [name for rid, children in zip(rids, new, strict=True) for name in {rid, *children}]
        taken = set(self.active).union(*self.active.values())
        if len(set(names)) != len(names) or taken.intersection(names):
            raise APIError("rid: a request with this id is already running", 400, param="rid")
        engine_rids: list[str] = []
        for rid, children in zip(rids, new, strict=True):
            self.active[rid] = children
            engine_rids += children
        return engine_rids

    def _unregister(self, rids: list[str]) -> None:
        for rid in rids:
            self.active.pop(rid, None)

    def abort(self, rid: str) -> None:
        for r in self.active.get(rid, [rid]):
            self.engine.abort(r)

    def abort_all(self) -> None:
        for rids in list(self.active.values()):
            for r in rids:
                self.engine.abort(r)

    def _finished(self, out: dict, streamed: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(out["meta_info"], streamed)

    # -- whole responses ------------------------------------------------------------------------
    async def generate(self, request: Any, input_ids: list[list[int]], params: list[dict], lp: LogprobArgs,
                       rids: list[str], param_names: dict[str, str] | None = None) -> list[dict]:
        """Outputs in order [prompt][choice]; aborts everything if the HTTP client disconnects."""
        engine_rids = self._register(rids, [p.get("n", 1) for p in params])
        task = asyncio.ensure_future(self.engine.async_generate(
            input_ids=input_ids, sampling_params=params, rid=rids, **lp.kwargs()))
        try:
            with engine_errors(param_names):
                aborted = False
                while True:
                    done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                    if done:
                        break
                    if not aborted and request is not None and await request.is_disconnected():
                        aborted = True
                        for r in engine_rids:
                            self.engine.abort(r)
                outs = task.result()
        finally:
            if not task.done():
                task.cancel()
                for r in engine_rids:
                    self.engine.abort(r)
            self._unregister(rids)
        for out in outs:
            self._finished(out, streamed=False)
        for out in outs:
            check_output(out)
        return outs

    # -- streams --------------------------------------------------------------------------------
    async def stream(self, input_ids: list[list[int]], params: list[dict], lp: LogprobArgs, rids: list[str],
                     param_names: dict[str, str] | None = None) -> StreamGroup:
        """One engine stream per choice (n > 1 runs as n seeded requests, like Engine.generate)."""
        ns = [p.get("n", 1) for p in params]
        engine_rids = self._register(rids, ns)
        iters: list[AsyncIterator[dict]] = []
        prompt_lens = [len(ids) for ids, n in zip(input_ids, ns, strict=True) for _ in range(n)]
        k = 0
        try:
            with engine_errors(param_names):
                for ids, p, n in zip(input_ids, params, ns, strict=True):
                    for i in range(n):
                        sp = dict(p, n=1)
                        if n > 1 and p.get("seed") is not None:
                            sp["seed"] = p["seed"] + i
                        iters.append(await self.engine.async_generate(
                            input_ids=ids, sampling_params=sp, stream=True, rid=engine_rids[k], **lp.kwargs()))
                        k += 1
        except BaseException:
            for r in engine_rids[:k]:
                self.engine.abort(r)
            self._unregister(rids)
            raise
        return StreamGroup(self, iters, engine_rids, rids, prompt_lens)


class StreamGroup:
    """The merged streams of one HTTP request: (choice index, cumulative output dict) events."""

    def __init__(self, client: EngineClient, iters: list[AsyncIterator[dict]], engine_rids: list[str],
                 rids: list[str], prompt_lens: list[int] | None = None) -> None:
        self.client = client
        self.iters = iters
        self.engine_rids = engine_rids
        self.rids = rids
        self.prompt_lens = prompt_lens or [0] * len(iters)
        self.done = [False] * len(iters)
        self.last: list[dict | None] = [None] * len(iters)  # the latest output of each choice
        self._merged = MergedStreams(iters)
        self._closed = False

    def __len__(self) -> int:
        return len(self.iters)

    async def events(self) -> AsyncIterator[tuple[int, dict]]:
        metrics = self.client.metrics
        last = [time.perf_counter()] * len(self.iters)
        seen = [0] * len(self.iters)
        async for i, out in self._merged.events():
            now = time.perf_counter()
            n = len(out["output_ids"])
            if metrics is not None and n > seen[i] and seen[i] > 0:
                metrics.observe_gap(now - last[i])
            if n > seen[i]:
                last[i], seen[i] = now, n
            self.last[i] = out
            if out["meta_info"]["finish_reason"] is not None:
                self.done[i] = True
                self.client._finished(out, streamed=True)
            yield i, out

    def _aborted_output(self, i: int) -> dict:
        """What a choice cut short by the client counts as: its tokens so far, finish reason abort."""
        prev = self.last[i]
        meta = dict(prev["meta_info"]) if prev is not None else {
            "prompt_tokens": self.prompt_lens[i], "completion_tokens": 0, "cached_tokens": 0}
        meta["finish_reason"] = {"type": "abort", "matched": "client disconnected"}
        return {"meta_info": meta}

    async def close(self) -> None:
        """Abort every choice still running (client gone, or an error) and release the iterators."""
        if self._closed:
            return
        self._closed = True
        for i, r in enumerate(self.engine_rids):
            if not self.done[i]:
                self.client.engine.abort(r)
                self.client._finished(self._aborted_output(i), streamed=True)
        await self._merged.close()
        self.client._unregister(self.rids)
