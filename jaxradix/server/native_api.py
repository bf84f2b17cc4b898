"""The SGLang-native API: /generate, model and server info, health, cache flush, abort, metrics, and
/debug/check_integrity (waits for idle, then checks the engine's no-leak invariant)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from jaxradix import __version__
from jaxradix.server.data_parallel import worker_identity
from jaxradix.server.engine_client import (
    DISCONNECT_POLL_S,
    EngineClient,
    LogprobArgs,
    check_output,
    new_rid,
)
from jaxradix.server.errors import APIError, bad_request
from jaxradix.server.metrics import engine_load
from jaxradix.server.protocol import AbortRequest, GenerateRequest
from jaxradix.server.sglang_params import NativeSampling, parse_native
from jaxradix.server.state import ServerState, TokenTexts
from jaxradix.server.streaming import DONE, EngineStreamingResponse, MergedStreams, sse

HEALTH_GENERATE_TIMEOUT_S = 20.0


def native_output(out: dict, text: TokenTexts | None, return_logprob: bool) -> dict[str, Any]:
    """The engine's output dict in SGLang's shape: finish_reason {"type", "matched" | "length" |
    "message"} and logprob entries [logprob, token_id, text or None]."""
    meta = dict(out["meta_info"])
    fin = meta["finish_reason"]
    if fin is not None:
        if fin["type"] == "length":
            meta["finish_reason"] = {"type": "length", "length": meta["completion_tokens"]}
        elif fin["type"] == "abort":
            meta["finish_reason"] = {"type": "abort", "message": fin.get("matched")}
        else:
            meta["finish_reason"] = {"type": "stop", "matched": fin.get("matched")}
    if return_logprob:
        def entry(lp: float | None, tid: int) -> list:
            return [lp, tid, text(tid) if text is not None else None]

        def tops(rows: list) -> list:
            return [None if row is None else [entry(lp, tid) for tid, lp in row] for row in rows]

        meta["output_token_logprobs"] = [entry(lp, t) for lp, t in meta.get("output_token_logprobs", [])]
        meta["input_token_logprobs"] = [entry(lp, t) for lp, t in meta.get("input_token_logprobs", [])]
        meta["output_top_logprobs"] = tops(meta.get("output_top_logprobs", []))
        meta["input_top_logprobs"] = tops(meta.get("input_top_logprobs", []))
    return {"text": out["text"], "output_ids": out["output_ids"], "meta_info": meta}


def _uniform(value: Any, name: str, count: int) -> Any:
    """The engine takes one logprob setting per call; SGLang allows a list per prompt."""
    if not isinstance(value, list):
        return value
    if len(value) != count or len(set(value)) > 1:
        raise bad_request(f"{name}: a per-prompt list must have {count} equal entries", name)
    return value[0]


def process_stats() -> dict[str, int | None]:
    """This server process's resident memory and open file descriptors (Linux; None elsewhere)."""
    rss = fds = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError):
        pass
    return {"rss_bytes": rss, "open_fds": fds}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


async def generate(state: ServerState, body: GenerateRequest, request: Request) -> Response:
    client = state.require()
    engine = client.engine
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("pass exactly one of text or input_ids", "text")
    if body.text is not None:
        single = isinstance(body.text, str)
        texts = [body.text] if isinstance(body.text, str) else body.text
        assert state.prep is not None
        ids = await state.prep.encode(texts, "text")
        field = "text"
    else:
        single = not body.input_ids or isinstance(body.input_ids[0], int)
        ids = [list(body.input_ids)] if single else [list(x) for x in body.input_ids]  # type: ignore[union-attr]
        field = "input_ids"
    if not ids or any(not x for x in ids):
        raise bad_request(f"{field}: must not be empty", field)
    sps = body.sampling_params if isinstance(body.sampling_params, list) else [body.sampling_params or {}] * len(ids)
    if len(sps) != len(ids):
        raise bad_request(f"sampling_params: {len(sps)} given for {len(ids)} prompts", "sampling_params")
    nss = [parse_native(sp) for sp in sps]
    ctx = engine.context_len
    for x, ns in zip(ids, nss, strict=True):
        if len(x) >= ctx:
            raise bad_request(f"{field}: {len(x)} tokens do not fit the context length {ctx}", field)
        if len(x) + ns.max_new_tokens > ctx:
            raise bad_request(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested "
                f"a total of {len(x) + ns.max_new_tokens} tokens: {len(x)} tokens from the input and "
                f"{ns.max_new_tokens} tokens for the completion. Reduce the input or max_new_tokens.",
                "sampling_params.max_new_tokens")
    lp = LogprobArgs(bool(_uniform(body.return_logprob, "return_logprob", len(ids))),
                     _uniform(body.top_logprobs_num, "top_logprobs_num", len(ids)),
                     _uniform(body.logprob_start_len, "logprob_start_len", len(ids)))
    if isinstance(body.rid, list):
        if len(body.rid) != len(ids):
            raise bad_request(f"rid: {len(body.rid)} given for {len(ids)} prompts", "rid")
        rids = list(body.rid)
    else:
        base = body.rid or new_rid()
        rids = [base] if len(ids) == 1 else [f"{base}-p{j}" for j in range(len(ids))]
    text = state.token_text if body.return_text_in_logprobs else None

    if any(ns.server_side for ns in nss):
        return await _generate_watched(client, request, body.stream, single, ids, nss, lp, rids, text)
    params = [ns.engine for ns in nss]
    if not body.stream:
        outs = await client.generate(request, ids, params, lp, rids)
        results = [native_output(o, text, lp.return_logprob) for o in outs]
        return JSONResponse(results[0] if single and len(results) == 1 else results)

    group = await client.stream(ids, params, lp, rids)
    interval = max(ns.stream_interval for ns in nss)

    async def events() -> AsyncIterator[bytes]:
        async for i, out in group.events():
            try:
                check_output(out)
            except APIError as e:
                yield sse(e.body())
                break
            if not _due(out, interval):
                continue
            res = native_output(out, text, lp.return_logprob)
            if len(group) > 1:
                res["index"] = i
            yield sse(res)
        yield DONE

    return EngineStreamingResponse(events(), group.close)


def _due(out: dict, interval: int) -> bool:
    """stream_interval: a chunk every `interval` tokens, and always the last one."""
    return interval <= 1 or out["meta_info"]["finish_reason"] is not None \
        or len(out["output_ids"]) % interval == 0


async def _generate_watched(client: EngineClient, request: Request, stream: bool, single: bool,
                            ids: list[list[int]], nss: list[NativeSampling], lp: LogprobArgs, rids: list[str],
                            text: TokenTexts | None) -> Response:
    streams = []
    for x, ns, rid in zip(ids, nss, rids, strict=True):
        for i in range(ns.n):
            streams.append(watched_choice(client, x, ns, lp, rid if ns.n == 1 else f"{rid}-{i}", i))
    if not stream:
        task = asyncio.ensure_future(asyncio.gather(*(_last(s) for s in streams), return_exceptions=True))
        try:
            while not task.done():  # a client that goes away cancels its requests (each stream aborts its own)
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
            if task.cancelled():
                return Response(status_code=499)  # nobody is listening
            outs = task.result()
        finally:
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.aclose()  # type: ignore[attr-defined]
        for o in outs:
            if isinstance(o, BaseException):
                raise o
        results = [native_output(o, text, lp.return_logprob) for o in outs]  # type: ignore[arg-type]
        return JSONResponse(results[0] if single and len(results) == 1 else results)
    interval = max(ns.stream_interval for ns in nss)
    merged = MergedStreams(streams)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for i, out in merged.events():
                if not _due(out, interval):
                    continue
                res = native_output(out, text, lp.return_logprob)
                if len(streams) > 1:
                    res["index"] = i
                yield sse(res)
        except APIError as e:
            yield sse(e.body())
        yield DONE

    return EngineStreamingResponse(events(), merged.close)


# == server-side sampling: min_new_tokens, stop_regex, no_stop_trim ==============================
def _merge_phase(first: dict, out: dict) -> dict:
    """A continuation's output seen as the rest of the first request's output."""
    m1, m2 = first["meta_info"], out["meta_info"]
    meta = dict(m2, prompt_tokens=m1["prompt_tokens"], cached_tokens=m1.get("cached_tokens", 0),
                completion_tokens=m1["completion_tokens"] + m2["completion_tokens"])
    for k in ("output_token_logprobs", "output_top_logprobs"):
        if k in m1:
            meta[k] = list(m1[k]) + list(m2.get(k, []))
    for k in ("input_token_logprobs", "input_top_logprobs"):
        if k in m1:
            meta[k] = m1[k]
        else:
            meta.pop(k, None)
    return {"text": first["text"] + out["text"], "output_ids": first["output_ids"] + out["output_ids"],
            "meta_info": meta}


def _stop_match(text: str, patterns: list[re.Pattern[str]]) -> re.Match[str] | None:
    found = [m for p in patterns if (m := p.search(text)) is not None]
    return min(found, key=lambda m: m.end()) if found else None


async def _engine_events(client: EngineClient, ids: list[int], params: dict, lp: LogprobArgs,
                         rid: str) -> AsyncIterator[dict]:
    group = await client.stream([ids], [params], lp, [rid])
    try:
        async for _, out in group.events():
            check_output(out)
            yield out
    finally:
        await group.close()


async def watched_choice(client: EngineClient, ids: list[int], ns: NativeSampling, lp: LogprobArgs,
                         rid: str, index: int) -> AsyncIterator[dict]:
    """Cumulative outputs of one choice whose sampling the server completes (see sglang_params)."""
    params = dict(ns.engine, n=1)
    if ns.n > 1 and params.get("seed") is not None:
        params["seed"] += index
    first: dict | None = None
    if ns.min_new_tokens > 0:
        eos = set(client.engine.stop_token_ids) | set(params.get("stop_token_ids") or [])
        bias = dict(params.get("logit_bias") or {}) | {str(t): -100.0 for t in eos}
        head = {k: v for k, v in params.items() if k not in ("stop", "stop_token_ids")}
        head.update(max_new_tokens=ns.min_new_tokens, ignore_eos=True, logit_bias=bias)
        async for out in _engine_events(client, ids, head, lp, f"{rid}-min"):
            first = out
            fin = out["meta_info"]["finish_reason"]
            if fin is None or fin["type"] == "abort" or ns.max_new_tokens == ns.min_new_tokens:
                yield out
        assert first is not None
        fin = first["meta_info"]["finish_reason"]
        if fin["type"] == "abort" or ns.max_new_tokens == ns.min_new_tokens:
            return
        if "seed" in params:
            params["seed"] += 1 << 20  # the continuation draws fresh random numbers
        params["max_new_tokens"] = ns.max_new_tokens - ns.min_new_tokens
        ids = ids + first["output_ids"]
        lp = LogprobArgs(lp.return_logprob, lp.top_logprobs_num, -1)
    async for out in _engine_events(client, ids, params, lp, rid):
        if first is not None:
            out = _merge_phase(first, out)
        meta = out["meta_info"]
        m = _stop_match(out["text"], ns.stop_regex) if ns.stop_regex else None
        if m is not None:
            text = out["text"][:m.end() if ns.no_stop_trim else m.start()]
            yield {**out, "text": text,
                   "meta_info": dict(meta, finish_reason={"type": "stop", "matched": m.group(0)})}
            return  # leaving the loop aborts the engine request
        fin = meta["finish_reason"]
        if fin is not None and ns.no_stop_trim and fin["type"] == "stop" and isinstance(fin.get("matched"), str):
            out = {**out, "text": out["text"] + fin["matched"]}
        yield out


async def _last(events: AsyncIterator[dict]) -> dict:
    last: dict = {}
    async for last in events:  # noqa: B007
        pass
    return last


def native_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/generate")
    async def generate_route(body: GenerateRequest, request: Request) -> Response:
        return await generate(state, body, request)

    @router.get("/health")
    async def health() -> Response:
        problem = state.health_problem()
        if problem is not None:
            raise APIError(problem, 503)
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate() -> Response:
        client = state.require()
        engine = client.engine
        ids = engine.encode("Hello") if engine.tokenizer is not None else [0]
        try:
            await asyncio.wait_for(client.generate(None, [ids], [{"max_new_tokens": 1, "temperature": 0}],
                                                   LogprobArgs(), [new_rid()]), HEALTH_GENERATE_TIMEOUT_S)
        except (TimeoutError, APIError) as e:
            raise APIError(f"health generation failed: {str(e) or 'timed out'}", 503) from e
        return Response(status_code=200)

    @router.get("/get_model_info")
    @router.get("/model_info")  # SGLang's current name; the router asks for it first
    async def get_model_info() -> dict[str, Any]:
        engine = state.require().engine
        mc = engine.model_config
        return {"model_path": state.model_basename, "tokenizer_path": state.model_basename, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default",
                "served_model_name": state.model_name, "model_type": mc.model_type,
                "context_length": engine.context_len, "vocab_size": mc.vocab_size,
                "chat_template_blocks": state.chat_template_blocks()}

    async def server_info() -> Response:
        engine = state.require().engine
        pool = getattr(engine, "pool", None)
        info = {
            **dataclasses.asdict(engine.config), "version": __version__, "status": "ready",
            "served_model_name": state.model_name, "context_length": engine.context_len,
            "max_total_num_tokens": pool.capacity * pool.page_size if pool is not None else None,
            "stats": dict(engine.stats), **engine_load(engine),
            "cache": await asyncio.to_thread(engine.cache_stats), "process": process_stats(),
            # weights / KV pool / activations in real bytes, with their dtypes (engine/memory.py)
            "memory": engine.memory.as_dict() if getattr(engine, "memory", None) is not None else None,
            # what SGLang's router reads at registration (each jaxradix worker is one replica); the model's
            # file name, never the server's path
            "model_path": state.model_basename, "compilation_cache_dir": None,
            "tp_size": getattr(engine.config, "tp_size", 1), "dp_size": 1,
            **worker_identity(),
        }
        return JSONResponse(_jsonable(info))

    def load(engine: Any) -> dict[str, Any]:
        pool = getattr(engine, "pool", None)
        capacity = pool.capacity * pool.page_size if pool is not None else 0
        now = engine_load(engine)
        return {"dp_rank": 0, "num_running_reqs": now["num_running_reqs"], "num_waiting_reqs": now["num_queue_reqs"],
                "num_used_tokens": int(round(now["token_usage"] * capacity)), "max_total_num_tokens": capacity,
                "token_usage": now["token_usage"], "cache_hit_rate": now["cache_hit_rate"],
                "max_running_requests": engine.config.max_running_requests}

    @router.get("/get_load")
    async def get_load() -> list[dict[str, Any]]:
        """SGLang's per-rank load list; sglang-router's power_of_two policy sums num_tokens."""
        now = load(state.require().engine)
        return [{"dp_rank": 0, "num_reqs": now["num_running_reqs"] + now["num_waiting_reqs"],
                 "num_waiting_reqs": now["num_waiting_reqs"], "num_tokens": now["num_used_tokens"]}]

    @router.get("/v1/loads")
    async def loads() -> dict[str, Any]:
        """SGLang's /v1/loads (what smg's load monitor reads: num_used_tokens per rank)."""
        now = load(state.require().engine)
        return {"version": __version__, "dp_rank_count": 1, "loads": [now]}

    router.add_api_route("/get_server_info", server_info, methods=["GET"])
    router.add_api_route("/server_info", server_info, methods=["GET"])

    @router.post("/flush_cache")  # state-changing: POST only, so a web page's GET cannot trigger it
    async def flush_cache() -> Response:
        engine = state.require().engine
        if not await asyncio.to_thread(engine.flush_cache):
            raise APIError("Cache not flushed: requests are running or queued; retry when the server is idle.",
                           400, code="server_busy")
        return PlainTextResponse("Cache flushed.\n")

    @router.post("/abort_request")
    async def abort_request(body: AbortRequest) -> dict[str, Any]:
        client = state.require()
        if body.abort_all:
            client.abort_all()
        elif body.rid:
            client.abort(body.rid)
        else:
            raise bad_request("rid: pass the id of the request to abort, or abort_all=true", "rid")
        return {"success": True}

    @router.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            raise APIError("metrics are disabled; start the server with --enable-metrics", 404)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.api_route("/debug/check_integrity", methods=["GET", "POST"])
    async def check_integrity(timeout: float = 120.0) -> dict[str, Any]:
        engine = state.require().engine
        try:
            await asyncio.to_thread(engine.wait_idle, timeout)
        except TimeoutError as e:
            raise APIError(f"the engine did not become idle within {timeout} s", 503) from e
        try:
            await asyncio.to_thread(engine.check_integrity)
        except AssertionError as e:
            raise APIError(f"integrity check failed: {e}", 500, code="integrity_error") from e
        return {"ok": True, "cache": _jsonable(await asyncio.to_thread(engine.cache_stats))}

    return router
