"""Reliability of the server and engine (issue 18): no request can hang, faults fail loudly, bad input is
a 400 naming its field. Each test reproduces one defect first (it fails on the code before the fix)."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from conftest import get_engine, serving

from jaxradix.cache import page_pool
from jaxradix.engine import engine as engine_mod
from jaxradix.engine import request as request_mod
from jaxradix.server import create_app
from jaxradix.server.app import LOOPBACK_HOSTS, begin_shutdown, host_name

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def engine():
    e = get_engine()
    yield e
    e.fault, e.fault_time = None, 0.0  # the shared engine: later modules' /health must not see an injected fault


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, enable_metrics=True, allowed_hosts=LOOPBACK_HOSTS)


@pytest.fixture(scope="module")
def base_url(app):
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


class HealthPoller:
    """Polls /health from a thread; the slowest answer tells whether the event loop was blocked."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                c.get("/health")
                self.latencies.append(time.perf_counter() - t)
                time.sleep(0.05)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# == 1. request-id collisions ======================================================================
def test_rid_colliding_with_a_running_choice_is_refused_and_the_first_request_completes(http, base_url, engine):
    first: dict = {}

    def run_first() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            first["r"] = c.post("/v1/completions", json={"prompt": "Tell a story", "rid": "foo", "n": 2,
                                                         "max_tokens": 40, "ignore_eos": True})

    t = threading.Thread(target=run_first)
    t.start()
    deadline = time.monotonic() + 30
    while "foo-0" not in engine._live_rids and time.monotonic() < deadline:
        time.sleep(0.01)
    r = http.post("/generate", json={"text": "Hello", "rid": "foo-0", "sampling_params": {"max_new_tokens": 5}})
    assert error_of(r, 400)["param"] == "rid"
    t.join(timeout=60)
    assert not t.is_alive(), "the first request hung"
    assert first["r"].status_code == 200 and len(first["r"].json()["choices"]) == 2
    # the id is free again once its request finished
    r = http.post("/generate", json={"text": "Hello", "rid": "foo", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text


def test_engine_refuses_a_running_rid(engine):
    it = engine.generate("A long story:", {"max_new_tokens": 200, "ignore_eos": True}, stream=True, rid="dup")
    next(it)
    with pytest.raises(ValueError, match="rid"):
        engine.generate("Hi", {"max_new_tokens": 2}, rid="dup")
    with pytest.raises(ValueError, match="rid"):
        engine.generate(["a", "b"], {"max_new_tokens": 2}, rid=["x", "x"])
    engine.abort("dup")
    assert list(it)[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.generate("Hi", {"max_new_tokens": 2}, rid="dup")["meta_info"]["completion_tokens"] == 2


# == 2. CPU work off the event loop =================================================================
SLOW_TEMPLATE = ("{% for i in range(400) %}{% for j in range(400) %}{% for k in range(400) %}{% endfor %}"
                 "{% endfor %}{% endfor %}{{ messages[0]['content'] }}")


def test_client_chat_template_is_refused_unless_allowed(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}})
    assert error_of(r, 400)["param"] == "chat_template_kwargs"


def test_health_answers_while_a_slow_template_renders(engine):
    with serving(create_app(engine, allow_client_chat_template=True)) as url, HealthPoller(url) as poll:
        time.sleep(0.2)
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **GREEDY,
            "chat_template_kwargs": {"chat_template": SLOW_TEMPLATE}})
        slow = time.perf_counter() - t
    assert r.status_code == 200, r.text
    assert slow > 1.0, f"the template rendered in {slow:.2f} s: too fast to show a blocked loop"
    assert len(poll.latencies) >= 5 and max(poll.latencies) < 1.0, poll.latencies


def test_huge_prompt_is_refused_before_tokenizing_and_health_answers(base_url, http):
    with HealthPoller(base_url) as poll:
        time.sleep(0.2)
        t = time.perf_counter()
        r = httpx.post(f"{base_url}/v1/completions", timeout=120,
                       json={"prompt": "word " * 4_000_000, "max_tokens": 1})
        took = time.perf_counter() - t
        err = error_of(r, 400)
        assert err["param"] == "prompt" and "--max-prompt-chars" in err["message"]
        # just under the limit: tokenized on the worker pool (then too long for the context)
        r = httpx.post(f"{base_url}/v1/completions", timeout=120, json={"prompt": "word " * 200_000,
                                                                         "max_tokens": 1})
        assert error_of(r, 400)["param"] == "prompt"
    assert took < 5.0
    assert max(poll.latencies) < 1.0, poll.latencies


# == 4. constrained decoding failures ===============================================================
def test_impossible_regex_is_refused_at_validation(http):
    r = http.post("/generate", json={"text": "a", "sampling_params": {"regex": "a{1000000}", "max_new_tokens": 4}})
    err = error_of(r, 400)
    assert err["param"] == "regex" and "1000000" in err["message"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 4,
                                                "regex": "a{2000000}"})
    assert error_of(r, 400)["param"] == "regex"
    assert http.post("/generate", json={"text": "a", "sampling_params": {"regex": r"a\{1000000\}",
                                                                         "max_new_tokens": 1}}).status_code == 200


def test_grammar_engine_giving_up_is_an_error_never_a_stop(http, monkeypatch):
    monkeypatch.setattr(request_mod, "MAX_REGEX_REPEAT", 10**9)  # let the grammar engine meet it
    r = http.post("/generate", json={"text": "Say a", "sampling_params": {"regex": "a{1000000}",
                                                                          "max_new_tokens": 8, **GREEDY}})
    err = error_of(r, 500)
    assert "constrained decoding failed" in err["message"]


# == 5. metrics of streams cut by the client ========================================================
def test_stream_disconnect_is_counted_as_abort(http, base_url):
    before = http.get("/metrics").text
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=60, json={
            "prompt": "A long story:", "max_tokens": 300, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 20
    while True:
        after = http.get("/metrics").text
        aborts = metric(after, "jaxradix:num_requests_total", '{finish_reason="abort"}')
        if aborts > metric(before, "jaxradix:num_requests_total", '{finish_reason="abort"}') or \
                time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert aborts == metric(before, "jaxradix:num_requests_total", '{finish_reason="abort"}') + 1
    assert metric(after, "jaxradix:generation_tokens_total") > metric(before, "jaxradix:generation_tokens_total")
    assert metric(after, "jaxradix:prompt_tokens_total") > metric(before, "jaxradix:prompt_tokens_total")


def test_line_separator_characters_do_not_split_stream_events(base_url):
    """Found by the 60-minute soak: a token text with U+2028/U+2029/U+0085 (raw in JSON strings) split an
    SSE event for clients that split lines like str.splitlines (httpx's iter_lines)."""
    prompt = "Lines\u2028with\u2029odd\x85breaks:"
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=60, json={
            "prompt": prompt, "max_tokens": 2, "echo": True, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events).startswith(prompt)


# == 6. validation ================================================================================
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.0}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "n": False}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "bogus", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [10**12]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [True]}, "stop_token_ids"),
    ("/generate", {"text": "hi", "sampling_params": {"stop_token_ids": [10**12]}}, "stop_token_ids"),
    ("/generate", {"text": "hi", "top_logprobs_num": 99, "return_logprob": True}, "top_logprobs_num"),
    ("/generate", {"text": "hi", "logprob_start_len": 1000, "return_logprob": True}, "logprob_start_len"),
    ("/generate", {"text": "hi", "logprob_start_len": True, "return_logprob": True}, "logprob_start_len"),
])
def test_bad_fields_are_400_naming_them(http, path, body, param):
    err = error_of(http.post(path, json=body), 400)
    assert err["param"] == param, err


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", '{"prompt": "hi \\ud800 there", "max_tokens": 2}', "prompt"),
    ("/generate", '{"text": "\\udfff", "sampling_params": {"max_new_tokens": 2}}', "text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x\\ud800"}], "max_tokens": 2}',
     "messages[0].content"),
])
def test_lone_surrogate_is_a_clear_400(http, path, body, param):
    err = error_of(http.post(path, content=body, headers={"content-type": "application/json"}), 400)
    assert err["param"] == param and "surrogate" in err["message"], err


# == 7. hygiene ===================================================================================
def test_state_changes_are_post_only_and_foreign_hosts_are_refused(http):
    assert http.get("/flush_cache").status_code == 405
    assert http.post("/flush_cache").status_code == 200
    r = http.get("/health", headers={"host": "evil.example:80"})
    assert error_of(r, 400)["code"] == "invalid_host"
    assert http.get("/health", headers={"host": "localhost:1234"}).status_code == 200
    assert host_name("[::1]:8000") == "::1" and host_name("127.0.0.1") == "127.0.0.1"


def test_the_model_path_is_not_exposed(http):
    info = http.get("/get_model_info").json()
    assert "/" not in info["model_path"] and "/" not in info["tokenizer_path"]
    assert info["chat_template_blocks"]["prefix"]["user"]  # what lang clients render roles with
    assert all("/" not in m["root"] for m in http.get("/v1/models").json()["data"])
    server = http.get("/get_server_info").json()
    assert "/" not in server["model_path"] and server["process"]["open_fds"] > 0


# == fault injection ==============================================================================
def failing_jitted_step(*args, **kwargs):
    """An error raised by the device computation itself (a host callback inside a jitted function)."""
    def boom(x):
        raise RuntimeError("injected device fault")

    f = jax.jit(lambda x: jax.pure_callback(boom, jax.ShapeDtypeStruct((), np.float32), x))
    return jax.block_until_ready(f(np.float32(0)))


def stream_events(base_url: str, body: dict, out: list) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
        out.extend(json.loads(line[6:]) for line in r.iter_lines()
                   if line.startswith("data: ") and line != "data: [DONE]")


@pytest.mark.parametrize("where", ["runner", "scheduler"])
def test_fault_in_the_step_fails_requests_marks_health_and_recovers(app, base_url, http, engine, monkeypatch, where):
    state = app.state.server
    monkeypatch.setattr(state, "fault_health_window_s", 1.5)
    target, name = (engine.runner, "launch") if where == "runner" else (engine.scheduler, "schedule")
    real = getattr(target, name)
    armed = threading.Event()

    def faulty(*args, **kwargs):
        if armed.is_set():
            armed.clear()
            if where == "runner":
                failing_jitted_step()
            raise RuntimeError("injected scheduler fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, faulty)
    streamed: list = []
    results: dict = {}
    t1 = threading.Thread(target=stream_events, args=(base_url, {
        "prompt": "A long story:", "max_tokens": 200, "ignore_eos": True, "stream": True}, streamed))
    t2 = threading.Thread(target=lambda: results.update(r=http.post("/v1/completions", json={
        "prompt": "Another long story:", "max_tokens": 200, "ignore_eos": True})))
    t1.start()
    t2.start()
    deadline = time.monotonic() + 30
    while len(engine.scheduler.running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    armed.set()
    t1.join(timeout=60)
    t2.join(timeout=60)
    assert not t1.is_alive() and not t2.is_alive(), "a request hung after the fault"
    err = error_of(results["r"], 500)
    assert "injected" in err["message"]
    assert streamed and "error" in streamed[-1] and "injected" in streamed[-1]["error"]["message"]
    r = http.get("/health")
    assert error_of(r, 503) and "injected" in r.json()["error"]["message"]
    assert engine.fault_count >= 1
    # recovered: the engine serves on, and /health is healthy again after the window
    ok = http.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 2
    time.sleep(1.6)
    assert http.get("/health").status_code == 200


def test_fault_with_exit_policy_stops_the_server(engine, monkeypatch):
    stopped: list[BaseException] = []
    app = create_app(engine, on_error=stopped.append, on_engine_fault="exit")
    real = engine.runner.launch
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault for exit")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", faulty)
    try:
        out = engine.generate("Hi", {"max_new_tokens": 3})
        assert "injected" in out["meta_info"]["error"] and out["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(stopped) == 1 and "injected" in str(stopped[0])
    finally:
        engine.on_fault = None
    del app


def test_a_dead_engine_loop_fails_waiters_instead_of_hanging(monkeypatch):
    """The loop's own failure (outside a step) answers every waiting caller and refuses new work."""
    e = engine_mod.Engine.__new__(engine_mod.Engine)  # only the loop machinery, no model
    e._inbox, e._handles, e._live_rids = __import__("queue").Queue(), {}, set()
    e._rids_lock, e._stopped, e.broken, e.on_fault = threading.Lock(), False, None, None
    e._inflight, e._last, e._exhausted = None, None, []

    class BadScheduler:
        idle = True
        running: list = []
        waiting: list = []

        def add(self, req):
            raise RuntimeError("injected loop fault")

    e.scheduler = BadScheduler()
    e.tokenizer = None
    req = request_mod.Request("r1", [1, 2], request_mod.SamplingParams(max_new_tokens=2))
    h = engine_mod._Handle(req)
    e._live_rids.add("r1")
    e._inbox.put(("add", h))
    e._thread = threading.Thread(target=e._loop)
    e._thread.start()
    e._thread.join(timeout=10)
    out = h.events.get(timeout=5)
    assert "injected loop fault" in out["meta_info"]["error"] and "r1" not in e._live_rids
    with pytest.raises(RuntimeError, match="out of service"):
        e._check_serving()


# == start-up out of memory =======================================================================
def test_a_pool_larger_than_memory_names_the_flag(engine):
    mc = engine.model_config
    with pytest.raises(MemoryError, match="--max-total-tokens"):
        page_pool.pool_tokens(mc, np.float32, 10**12, 0.85)
    assert page_pool.pool_tokens(mc, np.float32, 4096, 0.85) == 4096


def test_cpu_default_pool_is_sized_to_the_machine_and_model(engine, monkeypatch):
    mc = engine.model_config
    per_token = page_pool.kv_bytes_per_token(mc, np.float32)
    tokens = page_pool.pool_tokens(mc, np.float32, None, 0.85)
    assert tokens * per_token <= page_pool.CPU_POOL_MAX_BYTES
    assert tokens <= page_pool.CPU_POOL_CONTEXTS * mc.max_position_embeddings
    monkeypatch.setattr(page_pool, "available_ram", lambda: 400 * per_token * 4)
    assert page_pool.pool_tokens(mc, np.float32, None, 0.85) == 400


def test_device_oom_while_allocating_the_pool_names_the_flags(engine, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99 GiB")

    monkeypatch.setattr(engine_mod, "PagePool", oom)
    with pytest.raises(MemoryError, match="--max-total-tokens or --mem-fraction-static"):
        engine_mod._allocate_pool(engine.model_config, 10**9, 16, np.float32)


# == 3. shutdown ==================================================================================
def test_shutdown_aborts_streams_in_flight_at_once(engine):
    app = create_app(engine)
    with serving(app) as url:
        streamed: list = []
        t = threading.Thread(target=stream_events, args=(url, {
            "prompt": "A long story:", "max_tokens": 500, "ignore_eos": True, "stream": True}, streamed))
        t.start()
        deadline = time.monotonic() + 30
        while not streamed and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        begin_shutdown(app.state.server, 0)
        t.join(timeout=30)
        took = time.perf_counter() - t0
        assert httpx.get(f"{url}/health").status_code == 503
    assert not t.is_alive() and took < 5, took
    assert streamed[-1]["choices"][0]["finish_reason"] == "abort"
    assert len([c for c in streamed if c["choices"][0]["text"]]) < 400


def test_server_flags_for_reliability():
    from jaxradix.launch_server import allowed_hosts, build_parser

    ap = build_parser()
    args = ap.parse_args([])
    assert allowed_hosts(args) == LOOPBACK_HOSTS and args.shutdown_timeout == 0 and args.on_engine_fault == "recover"
    assert allowed_hosts(ap.parse_args(["--host", "0.0.0.0"])) is None
    assert allowed_hosts(ap.parse_args(["--allowed-hosts", "api.example, [::1]"])) == {"api.example", "::1"}
    assert allowed_hosts(ap.parse_args(["--allowed-hosts", "*"])) is None
    with pytest.raises(ValueError, match="on_engine_fault"):
        create_app(lambda: None, on_engine_fault="explode")


def test_chat_template_blocks_follow_the_servers_template(engine):
    app = create_app(engine)
    app.state.server.configure(chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}</>{% endfor %}"
                                             "{% if add_generation_prompt %}<assistant>{% endif %}")
    with serving(app) as url:
        blocks = httpx.get(f"{url}/get_model_info").json()["chat_template_blocks"]
    assert blocks["prefix"]["user"] == "<user>" and blocks["suffix"]["user"] == "</>"
    assert blocks["prefix"]["assistant"] == "<assistant>" and blocks["default_system"] == ""
