"""The HTTP server on the shared small engine: OpenAI API (official client), SGLang-native API,
bad input, auth, limits, aborts, client disconnects and a 2 x 256-stream load test."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import get_engine, serving

from jaxradix.launch_server import build_parser, engine_kwargs
from jaxradix.server import create_app

GREEDY = {"temperature": 0}
LOAD_CLIENTS = 256
LOAD_MAX_TOKENS = 8


@pytest.fixture(scope="module")
def engine():
    return get_engine()


@pytest.fixture(scope="module")
def base_url(engine):
    with serving(create_app(engine, enable_metrics=True)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """The JSON events of an SSE stream; asserts it ends with [DONE]."""
    done = False
    for line in lines:
        if not line.startswith("data: "):
            continue
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
            continue
        yield json.loads(line[len("data: "):])
    assert done, "stream did not end with [DONE]"


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


# == basics ======================================================================================
def test_health_models_and_info(http, engine):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    models = http.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert "default" in ids and "SmolLM2-135M-Instruct.Q4_1.gguf" in ids
    assert http.get("/v1/models/default").json()["id"] == "default"
    info = http.get("/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"].endswith(".gguf")
    for path in ("/get_server_info", "/server_info"):
        s = http.get(path).json()
        assert s["context_length"] == engine.context_len == 1024
        assert s["max_running_requests"] == 8 and "hit_rate" in s["cache"]
        mem = s["memory"]  # what the start-up log line says, in real bytes
        assert mem["kv_tokens"] == s["max_total_num_tokens"] and mem["kv_bytes"] == engine.pool.nbytes
        assert mem["weights_bytes"] == sum(mem["weights_dtypes"].values()) > 0 and mem["kv_dtype"] == "float32"
        assert mem["kv_cache_dtype"] == "auto" and mem["kv_scale_dtype"] is None


def test_completions_with_the_openai_client(oai, engine):
    prompt = "The capital of France is"
    expected = engine.generate(prompt, {"max_new_tokens": 8, **GREEDY})
    r = oai.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected["text"]
    assert r.usage.prompt_tokens == expected["meta_info"]["prompt_tokens"]
    assert r.usage.completion_tokens == expected["meta_info"]["completion_tokens"]
    assert "." in expected["text"]
    r = oai.completions.create(model="default", prompt=prompt, max_tokens=8, temperature=0, stop=["."])
    assert r.choices[0].text == expected["text"].split(".")[0] and r.choices[0].finish_reason == "stop"
    # the basename is a served name too; token-id prompts and batches of them
    ids = engine.encode(prompt)
    r = oai.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt=[ids, ids[:3]], max_tokens=8,
                               temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == expected["text"]
    # n > 1 with a seed: n choices, reproducible
    a = oai.completions.create(model="default", prompt=["Once upon a time", "Hello"], max_tokens=6, n=2, seed=7)
    b = oai.completions.create(model="default", prompt=["Once upon a time", "Hello"], max_tokens=6, n=2, seed=7)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.prompt_tokens == len(engine.encode("Once upon a time")) + len(engine.encode("Hello"))


def test_echo_with_prompt_logprobs_for_loglikelihood(oai, engine):
    prompt = "The capital of France is Paris"
    ids = engine.encode(prompt)
    r = oai.completions.create(model="default", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                               temperature=0)
    c = r.choices[0]
    assert c.text == prompt
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    ref = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)["meta_info"]["input_token_logprobs"]
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, (b, _) in zip(lp.token_logprobs[1:], ref[1:], strict=True))
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)


def test_completion_logprobs_top_k(oai):
    r = oai.completions.create(model="default", prompt="1, 2, 3,", max_tokens=4, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens == 4
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-4) and tok in top  # greedy: the argmax


def test_chat_completion_usage_cache_and_logprobs(oai, engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 10, **GREEDY})
    r = oai.chat.completions.create(model="default", messages=messages, max_tokens=10, temperature=0,
                                    logprobs=True, top_logprobs=2)
    msg = r.choices[0]
    assert msg.message.role == "assistant" and msg.message.content == expected["text"]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected["output_ids"])
    assert r.usage.prompt_tokens_details.cached_tokens >= 16  # the engine ran this prompt just before
    content = msg.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)


def test_chat_stream_matches_non_stream(oai):
    kw = dict(model="default", messages=[{"role": "user", "content": "Name a color."}], max_tokens=12,
              temperature=0)
    full = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    token_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content is not None]
    assert len(token_chunks) == full.usage.completion_tokens


def test_completion_stream_n2(oai):
    stream = oai.completions.create(model="default", prompt="Once upon a time", max_tokens=5, n=2, seed=3,
                                    stream=True, stream_options={"include_usage": True})
    texts, finished, usage = ["", ""], set(), None
    for c in stream:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finished.add(ch.index)
    full = oai.completions.create(model="default", prompt="Once upon a time", max_tokens=5, n=2, seed=3)
    assert finished == {0, 1} and usage.completion_tokens == full.usage.completion_tokens
    assert texts == [c.text for c in full.choices]


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{2,12}$"},
                                      "ok": {"type": "boolean"}},
     "required": ["city", "ok"], "additionalProperties": False},
]


def test_response_format_json_with_the_openai_client(oai, http):
    for i, schema in enumerate(SCHEMAS):
        r = oai.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=96,
            temperature=1.0, seed=i, n=2,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        for choice in r.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
    r = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "A JSON object:"}],
                                    max_tokens=96, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    body = {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    bad = dict(body, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert_error(http.post("/v1/chat/completions", json=bad), 400, "response_format")


# == native API ==================================================================================
def test_native_generate_single_batch_and_logprobs(http, engine):
    sp = {"max_new_tokens": 6, **GREEDY}
    expected = engine.generate("The capital of France is", sp)
    one = http.post("/generate", json={"text": "The capital of France is", "sampling_params": sp}).json()
    assert one["text"] == expected["text"] and one["output_ids"] == expected["output_ids"]
    assert one["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    batch = http.post("/generate", json={"text": ["The capital of France is", "Hello"], "sampling_params": sp})
    assert [o["text"] for o in batch.json()][0] == expected["text"] and len(batch.json()) == 2
    by_ids = http.post("/generate", json={"input_ids": engine.encode("The capital of France is"),
                                          "sampling_params": sp}).json()
    assert by_ids["output_ids"] == expected["output_ids"]
    n2 = http.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 3, "n": 2}}).json()
    assert isinstance(n2, list) and len(n2) == 2
    lp = http.post("/generate", json={"text": "The capital of France is", "sampling_params": sp,
                                      "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
                                      "return_text_in_logprobs": True}).json()["meta_info"]
    assert len(lp["output_token_logprobs"]) == lp["completion_tokens"]
    first = lp["output_token_logprobs"][0]
    assert first[1] == expected["output_ids"][0] and first[2] == engine.tokenizer.decode([first[1]])
    assert lp["input_token_logprobs"][0][0] is None and len(lp["input_token_logprobs"]) == lp["prompt_tokens"]
    assert len(lp["output_top_logprobs"][0]) == 2 and lp["output_top_logprobs"][0][0][1] == first[1]


def test_native_stream(http):
    body = {"text": "Count: 1, 2,", "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}, "stream": True}
    with http.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert len(events) == 6 and [e["meta_info"]["completion_tokens"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(b["text"].startswith(a["text"]) for a, b in zip(events, events[1:], strict=False))
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


def _long_stream(http: httpx.Client, rid: str, tokens: int = 1000):
    body = {"text": "Tell me a very long story.", "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True}}
    return http.stream("POST", "/generate", json=body)


def test_abort_request_ends_a_stream(http, base_url):
    with _long_stream(http, "abort-me") as r:
        events = sse_events(r.iter_lines())
        next(events)
        with httpx.Client(base_url=base_url, timeout=30) as other:
            assert other.post("/abort_request", json={"rid": "abort-me"}).status_code == 200
        rest = list(events)
    assert rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert rest[-1]["meta_info"]["completion_tokens"] < 500


def test_flush_cache_refused_while_busy_accepted_when_idle(http, base_url):
    with _long_stream(http, "busy") as r:
        events = sse_events(r.iter_lines())
        next(events)
        with httpx.Client(base_url=base_url, timeout=30) as other:
            assert_error(other.post("/flush_cache"), 400)
            other.post("/abort_request", json={"rid": "busy"})
        list(events)
    assert http.get("/debug/check_integrity").status_code == 200
    r = http.post("/flush_cache")
    assert r.status_code == 200, r.text
    assert http.get("/get_server_info").json()["cache"]["unique_tokens"] == 0


def test_client_disconnect_mid_stream_frees_its_pages(http, engine):
    before = engine.stats["generated_tokens"]
    with _long_stream(http, "gone") as r:
        events = sse_events(r.iter_lines())
        next(events)
        next(events)
    # the engine goes idle long before 1000 tokens, and nothing leaks
    r = http.get("/debug/check_integrity", params={"timeout": 60})
    assert r.status_code == 200 and r.json()["ok"], r.text
    assert engine.stats["generated_tokens"] - before < 900


def test_client_disconnect_while_waiting_for_a_whole_response(base_url, engine):
    before = engine.stats["generated_tokens"]
    body = {"text": "Tell me a very long story.", "sampling_params": {"max_new_tokens": 1000, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=base_url, timeout=1.5) as c:
        c.post("/generate", json=body)
    with httpx.Client(base_url=base_url, timeout=120) as c:
        r = c.get("/debug/check_integrity", params={"timeout": 60})
    assert r.status_code == 200, r.text
    assert engine.stats["generated_tokens"] - before < 900


def test_metrics(http):
    http.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    text = http.get("/metrics").text
    for name in ("jaxradix:prompt_tokens_total", "jaxradix:generation_tokens_total", "jaxradix:num_running_reqs",
                 "jaxradix:num_queue_reqs", "jaxradix:token_usage", "jaxradix:cache_hit_rate",
                 "jaxradix:time_to_first_token_seconds_bucket", "jaxradix:inter_token_latency_seconds_bucket"):
        assert name in text, name


# == bad input ===================================================================================
def _still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": "default", "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200, r.text


BAD_REQUESTS = [
    # (path, body (str: raw), status, param)
    ("/v1/completions", '{"model": "default", "prompt": ', 400, None),
    ("/v1/chat/completions", "not json", 400, None),
    ("/generate", '{"text": "x", ', 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 1100, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2, 10**9]], "max_tokens": 1}, 400, None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/generate", {"sampling_params": {}}, 400, "text"),
    ("/generate", {"text": "x", "sampling_params": "fast"}, 400, "sampling_params"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400, None),
    ("/generate", {"text": "x", "sampling_params": {"warp_speed": 9}}, 400, "sampling_params"),
    ("/generate", {"input_ids": [1] * 2000}, 400, "input_ids"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**6}}, 400, None),
    ("/generate", {"text": "x", "return_logprob": True, "top_logprobs_num": 99}, 400, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_input_is_refused_and_the_server_keeps_serving(http, path, body, status, param):
    if isinstance(body, str):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert_error(r, status, param)
    _still_serving(http)


def test_openai_client_error_types(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")
    assert oai.completions.create(model="default", prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_api_key_and_body_limit(engine):
    app = create_app(engine, api_key="sekrit", max_request_bytes=4096)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        assert_error(c.get("/v1/models"), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.post("/generate", json={"text": "x"}), 401)
        auth = {"Authorization": "Bearer sekrit"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
        assert client.completions.create(model="default", prompt="x", max_tokens=1).choices[0].text is not None
        assert_error(c.post("/generate", json={"text": "x" * 5000}, headers=auth), 413)
        chunked = (b"x" * 1024 for _ in range(8))  # no content-length: counted as it arrives
        assert_error(c.post("/generate", content=chunked, headers=auth), 413)
        assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}},
                      headers=auth).status_code == 200


class _Borrowed:
    """The shared engine, lent to an app that would shut down an engine its factory built."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def shutdown(self) -> None:
        pass


def test_health_is_503_while_the_engine_loads(engine):
    release = threading.Event()

    def factory():
        assert release.wait(60)
        return _Borrowed(engine)

    with serving(create_app(factory)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert_error(c.get("/health"), 503)
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 503)
        release.set()
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_launch_server_flags_map_onto_engine_config():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.api_key, args.enable_metrics) == ("127.0.0.1", 30000, None, False)
    assert engine_kwargs(args) == {"log_level": "info"}
    args = build_parser().parse_args(
        ["--model-path", "/m", "--max-running-requests", "4", "--chunked-prefill-size", "-1",
         "--disable-radix-cache", "--page-size", "8", "--schedule-policy", "fcfs", "--context-length", "512",
         "--mem-fraction-static", "0.5", "--max-total-tokens", "2048", "--random-seed", "3",
         "--attention-backend", "reference", "--load-format", "dummy", "--dtype", "bfloat16"])
    assert engine_kwargs(args) == {
        "model_path": "/m", "max_running_requests": 4, "chunked_prefill_size": -1, "disable_radix_cache": True,
        "page_size": 8, "schedule_policy": "fcfs", "context_length": 512, "mem_fraction_static": 0.5,
        "max_total_tokens": 2048, "random_seed": 3, "attention_backend": "reference", "load_format": "dummy",
        "dtype": "bfloat16", "log_level": "info"}


# == load ========================================================================================
async def _native_stream(c: httpx.AsyncClient, i: int) -> tuple[int, int]:
    body = {"text": f"Question {i}: hi", "stream": True,
            "sampling_params": {"max_new_tokens": LOAD_MAX_TOKENS, "ignore_eos": True}}
    events = []
    async with c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    return len(events), events[-1]["meta_info"]["completion_tokens"]


async def _openai_stream(c: httpx.AsyncClient, i: int) -> tuple[int, int]:
    body = {"model": "default", "prompt": f"Request {i}:", "max_tokens": LOAD_MAX_TOKENS, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    tokens, usage = 0, None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            tokens += sum(1 for ch in chunk["choices"] if ch["finish_reason"] is None)
    return tokens, usage["completion_tokens"]


def test_load_256_concurrent_streams_twice(base_url):
    async def wave() -> list[tuple[int, int]]:
        limits = httpx.Limits(max_connections=LOAD_CLIENTS + 8, max_keepalive_connections=LOAD_CLIENTS + 8)
        async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as c:
            jobs = [(_native_stream if i % 2 else _openai_stream)(c, i) for i in range(LOAD_CLIENTS)]
            return await asyncio.gather(*jobs)

    for _ in range(2):
        results = asyncio.run(wave())
        assert len(results) == LOAD_CLIENTS
        assert all(streamed == counted == LOAD_MAX_TOKENS for streamed, counted in results), results
        with httpx.Client(base_url=base_url, timeout=300) as c:
            r = c.get("/debug/check_integrity", params={"timeout": 240})
            assert r.status_code == 200 and r.json()["ok"], r.text
