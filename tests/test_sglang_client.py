"""SGLang's native API as SGLang's own clients use it.

tests/data/sglang_client/*.json are the exact requests the real `sglang` frontend (0.5.23) sent while
running gen / select / fork / run_batch / roles / regex / streaming / logprob programs, recorded by
scripts/sglang_client_check.sh. Replaying them checks every answer has what that client reads, so a
regression fails here without torch or sglang installed. Then each SGLang sampling parameter that the
server (not the engine) implements: sampling_seed, no_stop_trim, stop_regex, min_new_tokens, stream_interval.
"""

from __future__ import annotations

import json
import pathlib

import httpx
import pytest
from conftest import get_engine, serving

from jaxradix.server import create_app

DATA = pathlib.Path(__file__).parent / "data" / "sglang_client"
RECORDINGS = sorted(DATA.glob("*.json"))


@pytest.fixture(scope="module")
def http():
    with serving(create_app(get_engine())) as url, httpx.Client(base_url=url, timeout=120) as c:
        yield c


def _sse(text: str) -> list[dict]:
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", text[-200:]
    return [json.loads(x) for x in lines[:-1]]


def _check_generate(body: dict, out: dict) -> None:
    """What sglang.lang.backend.runtime_endpoint reads from one /generate answer."""
    assert isinstance(out["text"], str)
    meta = out["meta_info"]
    assert isinstance(meta["prompt_tokens"], int) and meta["prompt_tokens"] > 0
    assert meta["finish_reason"] is not None and meta["finish_reason"]["type"] in ("stop", "length")
    assert meta["completion_tokens"] <= body["sampling_params"].get("max_new_tokens", 128)
    if body.get("return_logprob"):
        entries = meta["input_token_logprobs"] + meta["output_token_logprobs"]
        assert entries and all(len(e) == 3 and isinstance(e[1], int) for e in entries)
        if body.get("return_text_in_logprobs"):
            assert all(isinstance(e[2], str) for e in entries)  # select() reads the healed token's text


def test_recordings_exist():
    names = {p.stem for p in RECORDINGS}
    assert {"gen", "select", "fork", "run_batch", "roles", "regex", "streaming", "logprobs"} <= names


@pytest.mark.parametrize("path", RECORDINGS, ids=[p.stem for p in RECORDINGS])
def test_replay_sglang_frontend_requests(http, path):
    for req in json.loads(path.read_text()):
        assert req["status"] == 200, req
        if req["method"] == "GET":
            r = http.get(req["path"])
        else:
            r = http.post(req["path"], json=req["body"])
        assert r.status_code == 200, (req, r.text)
        if req["path"] == "/get_model_info":
            assert r.json()["model_path"]
        if req["path"] != "/generate":
            continue
        body = req["body"]
        if body.get("stream"):
            events = _sse(r.text)
            assert all(e["text"].startswith(p["text"]) for p, e in zip(events, events[1:], strict=False))
            _check_generate(body, events[-1])
            continue
        out = r.json()
        prompts = body.get("text", body.get("input_ids"))
        if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int):
            assert isinstance(out, list) and len(out) == len(prompts)
            for o in out:
                _check_generate(body, o)
        else:
            _check_generate(body, out)


# == SGLang sampling parameters the server implements =============================================
def _gen(http: httpx.Client, sp: dict, text: str = "Count: 1, 2, 3, 4,", **kw) -> dict:
    r = http.post("/generate", json={"text": text, "sampling_params": {"temperature": 0, **sp}, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_every_sglang_sampling_param_is_accepted(http):
    sp = {"max_new_tokens": 4, "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [],
          "top_p": 1.0, "top_k": 1 << 30, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
          "repetition_penalty": 1.0, "json_schema": None, "regex": None, "ebnf": None, "ignore_eos": False,
          "skip_special_tokens": True, "spaces_between_special_tokens": True, "no_stop_trim": False,
          "custom_params": {"k": 1}, "stream_interval": None, "logit_bias": None, "sampling_seed": 7}
    plain = _gen(http, {"max_new_tokens": 4})
    assert _gen(http, sp)["text"] == plain["text"]


def test_unknown_and_unsupported_params_name_themselves(http):
    for sp, needle in (({"max_new_tokens": 2, "bogus": 1}, "bogus"),
                       ({"structural_tag": "{}"}, "structural_tag"),
                       ({"stop_regex": "("}, "stop_regex"),
                       ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens")):
        r = http.post("/generate", json={"text": "hi", "sampling_params": sp})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_sampling_seed_is_the_seed(http):
    sp = {"temperature": 1.0, "max_new_tokens": 8}
    a = _gen(http, {**sp, "sampling_seed": 3})["text"]
    assert a == _gen(http, {**sp, "seed": 3})["text"] == _gen(http, {**sp, "sampling_seed": 3})["text"]


def test_no_stop_trim_and_stop_regex(http):
    full = _gen(http, {"max_new_tokens": 12})["text"]
    assert "6" in full, full
    trimmed = _gen(http, {"max_new_tokens": 12, "stop": "6"})
    kept = _gen(http, {"max_new_tokens": 12, "stop": "6", "no_stop_trim": True})
    assert kept["text"] == trimmed["text"] + "6" and full.startswith(kept["text"])
    rx = _gen(http, {"max_new_tokens": 12, "stop_regex": r"[5-6],"})
    assert rx["meta_info"]["finish_reason"] == {"type": "stop", "matched": "5,"}
    assert rx["text"] == full[:full.index("5,")]
    kept_rx = _gen(http, {"max_new_tokens": 12, "stop_regex": r"[5-6],", "no_stop_trim": True})
    assert kept_rx["text"] == rx["text"] + rx["meta_info"]["finish_reason"]["matched"]


def test_min_new_tokens_runs_past_a_stop(http):
    stopped = _gen(http, {"max_new_tokens": 12, "stop": ","})
    n = stopped["meta_info"]["completion_tokens"]
    assert stopped["meta_info"]["finish_reason"]["matched"] == "," and n < 6
    longer = _gen(http, {"max_new_tokens": 12, "stop": ",", "min_new_tokens": n + 3})
    assert longer["meta_info"]["completion_tokens"] >= n + 3
    assert longer["text"].startswith(stopped["text"] + ",")
    assert longer["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert len(longer["output_ids"]) == longer["meta_info"]["completion_tokens"]


def test_stream_interval_and_watched_stream(http):
    r = http.post("/generate", json={"text": "Count: 1, 2, 3, 4,", "stream": True,
                                     "sampling_params": {"temperature": 0, "max_new_tokens": 9, "ignore_eos": True,
                                                         "stream_interval": 3}})
    events = _sse(r.text)
    assert [len(e["output_ids"]) for e in events] == [3, 6, 9]
    r = http.post("/generate", json={"text": "Count: 1, 2, 3, 4,", "stream": True,
                                     "sampling_params": {"temperature": 0, "max_new_tokens": 12,
                                                         "stop_regex": "6,"}})
    events = _sse(r.text)
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "6,"}
    assert "6," not in events[-1]["text"]


def test_watched_request_aborted_when_the_client_leaves(http):
    """A non-streamed stop_regex request whose client disconnects is aborted (and frees its pages: conftest)."""
    engine = get_engine()
    before = engine.stats["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        http.post("/generate", timeout=1.5, json={"text": "Once upon a time", "sampling_params": {
            "max_new_tokens": 900, "ignore_eos": True, "stop_regex": "zzzz never"}})
    engine.wait_idle(timeout=120)
    assert engine.stats["generated_tokens"] - before < 900
