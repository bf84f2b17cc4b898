"""The SGLang-native API: /generate, model and server info, health, cache flush, abort, metrics, and
/debug/check_integrity (waits for idle, then checks the engine's no-leak invariant)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from jaxradix import __version__
from jaxradix.engine.request import SamplingParams
from jaxradix.server.engine_client import LogprobArgs, check_output, engine_errors, new_rid
from jaxradix.server.errors import APIError, bad_request, from_value_error
from jaxradix.server.metrics import engine_load
from jaxradix.server.protocol import AbortRequest, GenerateRequest
from jaxradix.server.state import ServerState, TokenTexts
from jaxradix.server.streaming import DONE, EngineStreamingResponse, sse

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
        with engine_errors():
            ids = [engine.encode(t) if t else [] for t in texts]
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
    for x, sp in zip(ids, sps, strict=True):
        try:
            params = SamplingParams(**sp)
        except TypeError as e:
            raise bad_request(f"sampling_params: {e}", "sampling_params") from e
        except ValueError as e:
            raise from_value_error(e) from e
        ctx = engine.context_len
        if len(x) >= ctx:
            raise bad_request(f"{field}: {len(x)} tokens do not fit the context length {ctx}", field)
        if len(x) + params.max_new_tokens > ctx:
            raise bad_request(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested "
                f"a total of {len(x) + params.max_new_tokens} tokens: {len(x)} tokens from the input and "
                f"{params.max_new_tokens} tokens for the completion. Reduce the input or max_new_tokens.",
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

    if not body.stream:
        outs = await client.generate(request, ids, sps, lp, rids)
        results = [native_output(o, text, lp.return_logprob) for o in outs]
        return JSONResponse(results[0] if single and len(results) == 1 else results)

    group = await client.stream(ids, sps, lp, rids)

    async def events() -> AsyncIterator[bytes]:
        async for i, out in group.events():
            try:
                check_output(out)
            except APIError as e:
                yield sse(e.body())
                break
            res = native_output(out, text, lp.return_logprob)
            if len(group) > 1:
                res["index"] = i
            yield sse(res)
        yield DONE

    return EngineStreamingResponse(events(), group.close)


def native_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/generate")
    async def generate_route(body: GenerateRequest, request: Request) -> Response:
        return await generate(state, body, request)

    @router.get("/health")
    async def health() -> Response:
        state.require()
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
    async def get_model_info() -> dict[str, Any]:
        engine = state.require().engine
        mc = engine.model_config
        return {"model_path": state.model_path, "tokenizer_path": state.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default",
                "served_model_name": state.model_name, "model_type": mc.model_type,
                "context_length": engine.context_len, "vocab_size": mc.vocab_size}

    async def server_info() -> Response:
        engine = state.require().engine
        pool = getattr(engine, "pool", None)
        info = {
            **dataclasses.asdict(engine.config), "version": __version__, "status": "ready",
            "served_model_name": state.model_name, "context_length": engine.context_len,
            "max_total_num_tokens": pool.capacity * pool.page_size if pool is not None else None,
            "stats": dict(engine.stats), **engine_load(engine),
            "cache": await asyncio.to_thread(engine.cache_stats),
        }
        return JSONResponse(_jsonable(info))

    router.add_api_route("/get_server_info", server_info, methods=["GET"])
    router.add_api_route("/server_info", server_info, methods=["GET"])

    @router.api_route("/flush_cache", methods=["GET", "POST"])
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
