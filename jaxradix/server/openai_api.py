"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from jaxradix.engine.request import MAX_TOP_LOGPROBS, SamplingParams
from jaxradix.server.engine_client import LogprobArgs, StreamGroup, engine_errors, new_rid
from jaxradix.server.errors import APIError, bad_request
from jaxradix.server.protocol import ChatCompletionRequest, CompletionRequest
from jaxradix.server.reasoning import PARSERS as REASONING_PARSERS
from jaxradix.server.reasoning import ReasoningStream, split
from jaxradix.server.state import ServerState, TokenTexts
from jaxradix.server.streaming import DONE, EngineStreamingResponse, sse
from jaxradix.server.tool_calls import (
    ToolCall,
    ToolFormat,
    ToolRequest,
    ToolStream,
    format_for,
    parse_tools,
    template_messages,
)

PARAM_NAMES = {"max_new_tokens": "max_tokens"}
LpEntry = tuple[float | None, int, list | None]  # (logprob, token id, [(id, logprob)] top alternatives)


# == shared helpers ===============================================================================
def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_new_tokens: int,
                    json_schema: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "n": body.n, "top_k": body.top_k, "min_p": body.min_p,
        "frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
        "repetition_penalty": body.repetition_penalty, "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
    }
    optional = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": body.stop,
                "stop_token_ids": body.stop_token_ids, "logit_bias": body.logit_bias, "regex": body.regex,
                "ebnf": body.ebnf, "json_schema": json_schema}
    d.update({k: v for k, v in optional.items() if v is not None})
    with engine_errors(PARAM_NAMES):
        SamplingParams(**d)
    return d


def check_context(context_len: int, prompt_len: int, max_new_tokens: int, prompt_param: str) -> None:
    if prompt_len >= context_len:
        raise bad_request(f"This model's maximum context length is {context_len} tokens, but the prompt has "
                          f"{prompt_len} tokens.", prompt_param)
    if prompt_len + max_new_tokens > context_len:
        raise bad_request(
            f"This model's maximum context length is {context_len} tokens. However, you requested "
            f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the prompt, {max_new_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.", "max_tokens")


def check_max_tokens(value: int, minimum: int) -> None:
    if value < minimum:
        raise bad_request(f"max_tokens: must be an integer >= {minimum}, got {value}", "max_tokens")


def finish_reason(meta: dict) -> str | None:
    fin = meta["finish_reason"]
    return None if fin is None else fin["type"]


def matched_stop(meta: dict) -> Any:
    fin = meta["finish_reason"]
    return fin.get("matched") if fin is not None and fin["type"] == "stop" else None


def output_entries(meta: dict, start: int = 0) -> list[LpEntry]:
    lps = meta.get("output_token_logprobs", [])[start:]
    tops = meta.get("output_top_logprobs") or []
    tops = tops[start:] if tops else [None] * len(lps)
    return [(lp, tid, top) for (lp, tid), top in zip(lps, tops, strict=False)]


def input_entries(meta: dict) -> list[LpEntry]:
    lps = meta.get("input_token_logprobs", [])
    tops = meta.get("input_top_logprobs") or [None] * len(lps)
    return [(lp, tid, top) for (lp, tid), top in zip(lps, tops, strict=False)]


def usage(outs: list[dict], n: int) -> dict[str, Any]:
    """Prompt tokens count once per prompt (not per choice); completion tokens over all choices."""
    prompt = cached = 0
    for j in range(0, len(outs), n):
        group = [o["meta_info"] for o in outs[j:j + n]]
        prompt += group[0]["prompt_tokens"]
        cached += max(m.get("cached_tokens", 0) for m in group)
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class _UsageTracker:
    def __init__(self, num: int, n: int) -> None:
        self.finals: list[dict | None] = [None] * num
        self.n = n

    def add(self, i: int, out: dict) -> None:
        self.finals[i] = out

    def usage(self) -> dict[str, Any]:
        outs = [o if o is not None else {"meta_info": {"prompt_tokens": 0, "completion_tokens": 0}}
                for o in self.finals]
        return usage(outs, self.n)


def _stream_error(e: APIError) -> bytes:
    return sse(e.body())


# == completions =================================================================================
def legacy_logprobs(entries: list[LpEntry], text: TokenTexts, offset: int = 0) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for lp, tid, top in entries:
        s = text(tid)
        tokens.append(s)
        lps.append(lp)
        tops.append(None if top is None else {text(i): v for i, v in top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def parse_prompt(prompt: Any, state: ServerState) -> tuple[list[list[int]], list[str | None]]:
    """Token ids and (for text prompts) the text of each prompt in the request."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        texts: list[str | None] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif is_ids(prompt):
        return [list(prompt)], [None]
    elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return [list(p) for p in prompt], [None] * len(prompt)
    else:
        raise bad_request("prompt: must be a non-empty string, list of strings, list of token ids or list of "
                          "token id lists", "prompt")
    assert state.prep is not None
    ids = await state.prep.encode([t or "" for t in texts], "prompt")
    if any(not x for x in ids):
        raise bad_request("prompt: must not be empty", "prompt")
    return ids, texts


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    client = state.require()
    model = state.check_model(body.model)
    engine, text = client.engine, state.token_text
    assert text is not None
    if body.suffix:
        raise bad_request("suffix: is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of: only best_of == n is supported", "best_of")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    check_max_tokens(max_tokens, 0)
    k = body.logprobs
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs: must be in [0, {MAX_TOP_LOGPROBS}], got {k}", "logprobs")
    ids, texts = await parse_prompt(body.prompt, state)
    for x in ids:
        check_context(engine.context_len, len(x), max_tokens, "prompt")
    schema = json.dumps(body.json_schema) if isinstance(body.json_schema, dict) else body.json_schema
    params = sampling_params(body, max_tokens, schema)
    echo_texts = [""] * len(ids)
    if body.echo:
        echo_texts = [t if t is not None else engine.tokenizer.decode(x, skip_special_tokens=False)
                      for t, x in zip(texts, ids, strict=True)]
    lp = LogprobArgs(k is not None, k or 0, 0 if body.echo and k is not None else -1)
    base = body.rid or new_rid()
    rids = [base] if len(ids) == 1 else [f"{base}-p{j}" for j in range(len(ids))]
    n = body.n
    rid, created = f"cmpl-{base}", int(time.time())

    if not body.stream:
        outs = await client.generate(request, ids, [params] * len(ids), lp, rids, PARAM_NAMES)
        choices = []
        for idx, out in enumerate(outs):
            meta, echo = out["meta_info"], echo_texts[idx // n]
            logprobs = None
            if k is not None:
                entries = (input_entries(meta) if body.echo else []) + output_entries(meta)
                logprobs = legacy_logprobs(entries, text)
            choices.append({"index": idx, "text": echo + out["text"], "logprobs": logprobs,
                            "finish_reason": finish_reason(meta), "matched_stop": matched_stop(meta)})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(outs, n)})

    group = await client.stream(ids, [params] * len(ids), lp, rids, PARAM_NAMES)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choice: dict) -> bytes:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        prev_text, prev_n, started = [""] * len(group), [0] * len(group), [False] * len(group)
        tracker = _UsageTracker(len(group), n)
        async for i, out in group.events():
            meta = out["meta_info"]
            if meta.get("error"):
                yield _stream_error(APIError(f"generation failed: {meta['error']}", 500))
                break
            delta = out["text"][len(prev_text[i]):]
            entries = output_entries(meta, prev_n[i]) if k is not None else []
            new_tokens = len(out["output_ids"]) > prev_n[i]
            if not started[i] and body.echo:
                delta = echo_texts[i // n] + delta
                entries = (input_entries(meta) if k is not None else []) + entries
            if new_tokens or delta or (not started[i] and body.echo):
                yield chunk({"index": i, "text": delta,
                             "logprobs": legacy_logprobs(entries, text) if k is not None else None,
                             "finish_reason": None})
                started[i] = True
            prev_text[i], prev_n[i] = out["text"], len(out["output_ids"])
            if meta["finish_reason"] is not None:
                tracker.add(i, out)
                yield chunk({"index": i, "text": "", "logprobs": None, "finish_reason": finish_reason(meta),
                             "matched_stop": matched_stop(meta)})
        if include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": tracker.usage()})
        yield DONE

    return EngineStreamingResponse(events(), group.close)


# == chat ========================================================================================
def chat_logprobs(entries: list[LpEntry], text: TokenTexts) -> dict[str, Any]:
    def item(tid: int, lp: float | None) -> dict[str, Any]:
        s = text(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for lp, tid, top in entries:
        content.append(item(tid, lp) | {"top_logprobs": [item(i, v) for i, v in (top or [])]})
    return {"content": content, "refusal": None}


async def render_messages(state: ServerState, body: ChatCompletionRequest, tools: ToolRequest | None) -> list[int]:
    tokenizer = state.engine.tokenizer
    if tokenizer is None:
        raise bad_request("this model has no tokenizer: use /generate with input_ids", "messages")
    messages = []
    for j, m in enumerate(body.messages):
        content: Any = m.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise bad_request(f"messages[{j}].content: only text parts are supported", "messages")
            content = "".join(p.text or "" for p in content)
        msg = {"role": m.role, "content": content or "", "name": m.name, "tool_calls": m.tool_calls,
               "tool_call_id": m.tool_call_id}
        messages.append(msg)
    messages = template_messages(messages)
    kwargs = dict(body.chat_template_kwargs or {})
    if body.continue_final_message:
        kwargs["continue_final_message"] = True
    if tools is not None:
        kwargs["tools"] = body.tools
    assert state.prep is not None
    state.prep.check_template_kwargs(kwargs)  # the client's own; the server's --chat-template is added next
    if state.chat_template is not None:
        kwargs.setdefault("chat_template", state.chat_template)
    return await state.prep.render_chat(messages, add_generation_prompt=not body.continue_final_message, **kwargs)


class ChatOutput:
    """One choice's text as the chat API shows it: reasoning apart, tool calls parsed out."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest, tools: ToolRequest | None,
                 fmt: ToolFormat | None) -> None:
        parser = state.reasoning_parser if body.separate_reasoning else None
        self.reasoning = REASONING_PARSERS[parser] if parser else None
        self.tools, self.fmt = tools, fmt
        self.names = {f.name for f in tools.functions} if tools is not None else set()
        self._rs = ReasoningStream(self.reasoning) if self.reasoning else None
        self._ts = ToolStream(fmt, self.names) if fmt is not None else None
        self._sent = 0

    def _calls(self, calls: list[ToolCall]) -> list[ToolCall]:
        return calls if self.tools is None or self.tools.parallel else calls[:1]

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The whole message, and whether it called tools."""
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if self.reasoning is not None:
            sp = split(self.reasoning, text)
            msg["reasoning_content"], msg["content"] = sp.reasoning or None, sp.content
        if self.fmt is not None:
            parsed = self.fmt.parse(msg["content"], self.names)
            if parsed.calls:
                msg["content"] = parsed.content or None
                msg["tool_calls"] = [c.openai() for c in self._calls(parsed.calls)]
                return msg, True
        return msg, False

    def deltas(self, text: str, final: bool) -> tuple[list[dict[str, Any]], bool]:
        """Stream deltas for the cumulative text; the bool says tool calls went out."""
        out: list[dict[str, Any]] = []
        content = text
        if self._rs is not None:
            d = self._rs.update(text, final)
            if d.reasoning:
                out.append({"reasoning_content": d.reasoning})
            content = self._rs.sent.content
        if self._ts is None:
            if len(content) > self._sent:
                out.append({"content": content[self._sent:]})
                self._sent = len(content)
            return out, False
        if not final:
            if c := self._ts.content_delta(content):
                out.append({"content": c})
            return out, False
        rest, calls = self._ts.finish(content)
        if rest:
            out.append({"content": rest})
        for i, c in enumerate(self._calls(calls)):
            out.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]})
        return out, bool(calls)


def response_schema(body: ChatCompletionRequest) -> str | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return json.dumps(body.json_schema) if isinstance(body.json_schema, dict) else body.json_schema
    if body.json_schema is not None:
        raise bad_request("json_schema and response_format cannot both be set", "response_format")
    if rf.type == "json_object":
        return json.dumps({"type": "object"})
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise bad_request("response_format.json_schema.schema is required for type json_schema",
                          "response_format")
    return json.dumps(rf.json_schema.schema_)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    client = state.require()
    model = state.check_model(body.model)
    engine, text = client.engine, state.token_text
    assert text is not None
    tools = parse_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    fmt = format_for(state.tool_call_parser, state.chat_template or getattr(engine.tokenizer, "chat_template", None)) \
        if tools is not None else None
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise bad_request("top_logprobs: requires logprobs=true", "top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}], got {body.top_logprobs}",
                              "top_logprobs")
    ids = await render_messages(state, body, tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = max(engine.context_len - len(ids), 0)
    else:
        check_max_tokens(max_tokens, 1)
    check_context(engine.context_len, len(ids), max_tokens, "messages")
    params = sampling_params(body, max_tokens, response_schema(body))
    if tools is not None and tools.forced is not None:
        assert fmt is not None
        if any(k in params for k in ("regex", "json_schema", "ebnf")):
            raise bad_request(f"tool_choice: {body.tool_choice!r} constrains the output; it cannot be combined "
                              f"with response_format, regex, json_schema or ebnf", "tool_choice")
        params["ebnf"] = fmt.grammar(tools.forced, tools.parallel)
    lp = LogprobArgs(body.logprobs, body.top_logprobs or 0, -1)
    base = body.rid or new_rid()
    n = body.n
    rid, created = f"chatcmpl-{base}", int(time.time())

    if not body.stream:
        outs = await client.generate(request, [ids], [params], lp, [base], PARAM_NAMES)
        choices = []
        for idx, out in enumerate(outs):
            meta = out["meta_info"]
            message, called = ChatOutput(state, body, tools, fmt).message(out["text"])
            choices.append({
                "index": idx, "message": message,
                "logprobs": chat_logprobs(output_entries(meta), text) if body.logprobs else None,
                "finish_reason": "tool_calls" if called else finish_reason(meta), "matched_stop": matched_stop(meta)})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(outs, n), "system_fingerprint": None})

    group: StreamGroup = await client.stream([ids], [params], lp, [base], PARAM_NAMES)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choice: dict) -> bytes:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [choice]})

    async def events() -> AsyncIterator[bytes]:
        prev_n, started = [0] * len(group), [False] * len(group)
        views = [ChatOutput(state, body, tools, fmt) for _ in range(len(group))]
        called = [False] * len(group)
        tracker = _UsageTracker(len(group), n)
        async for i, out in group.events():
            meta = out["meta_info"]
            if meta.get("error"):
                yield _stream_error(APIError(f"generation failed: {meta['error']}", 500))
                break
            final = meta["finish_reason"] is not None
            deltas, called_now = views[i].deltas(out["text"], final)
            called[i] = called[i] or called_now
            new_tokens = len(out["output_ids"]) > prev_n[i]
            if new_tokens and body.logprobs and not deltas:
                deltas = [{"content": ""}]
            for k, d in enumerate(deltas):
                if not started[i]:
                    d = {"role": "assistant", **d}
                    started[i] = True
                logprobs = chat_logprobs(output_entries(meta, prev_n[i]), text) if body.logprobs and k == 0 \
                    else None
                yield chunk({"index": i, "delta": d, "logprobs": logprobs, "finish_reason": None})
            prev_n[i] = len(out["output_ids"])
            if final:
                tracker.add(i, out)
                yield chunk({"index": i, "delta": {}, "logprobs": None,
                             "finish_reason": "tool_calls" if called[i] else finish_reason(meta),
                             "matched_stop": matched_stop(meta)})
        if include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": tracker.usage()})
        yield DONE

    return EngineStreamingResponse(events(), group.close)


# == router ======================================================================================
def openai_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def model_card(name: str) -> dict[str, Any]:
        engine = state.engine
        return {"id": name, "object": "model", "created": 0, "owned_by": "jaxradix", "root": state.model_basename,
                "max_model_len": engine.context_len if engine is not None else None}

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        state.require()
        return {"object": "list", "data": [model_card(n) for n in state.served_names[:2]]}

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        state.require()
        return model_card(state.check_model(model_id))

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    return router
