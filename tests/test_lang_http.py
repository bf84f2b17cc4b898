"""The frontend language over HTTP: RuntimeEndpoint against jaxradix.server around the shared
engine, checked against the in-process backend; the examples with --url."""

from __future__ import annotations

import pytest
from conftest import get_engine, serving
from test_lang import load_example

from jaxradix import server as server_mod
from jaxradix.lang import (
    BackendError,
    EngineBackend,
    ProgramState,
    RuntimeEndpoint,
    assistant,
    function,
    gen,
    select,
    user,
)


@pytest.fixture(scope="module")
def engine():
    return get_engine()


@pytest.fixture(scope="module")
def url(engine):
    with serving(server_mod.create_app(engine)) as u:
        yield u


@pytest.fixture(scope="module")
def http(url):
    b = RuntimeEndpoint(url)
    yield b
    b.close()


@function
def program(s: ProgramState, question: str) -> None:
    s += user(question)
    s += assistant(gen("answer", max_tokens=8))
    s += "Is that correct?" + select("verdict", [" yes", " no"])
    forks = s.fork(2)
    forks += lambda i: f" Reason {i + 1}:" + gen("reason", max_tokens=4)
    forks.join()


def test_http_runs_programs_like_the_engine(engine, http):
    assert http.chat_template == EngineBackend(engine).chat_template  # read from the server's tokenizer_path
    kw = dict(question="What is the capital of France?", temperature=0)
    remote = program.run(backend=http, **kw)
    local = program.run(backend=EngineBackend(engine), **kw)
    assert remote.text() == local.text()
    assert remote["reason"] == local["reason"]
    for name in ("answer", "verdict"):
        assert remote[name] == local[name]
    lm, rm = local.get_meta_info("verdict"), remote.get_meta_info("verdict")
    assert rm["normalized_prompt_logprobs"] == pytest.approx(lm["normalized_prompt_logprobs"], abs=2e-2)
    assert all(m["cached_tokens"] > 0 for m in remote.get_meta_info("reason"))


def test_http_stream_and_batch(http):
    @function
    def story(s: ProgramState, animal: str) -> None:
        s += user(f"Tell me a one-line story about a {animal}.")
        s += assistant(gen("story", max_tokens=8))

    st = story.run(animal="cat", stream=True, temperature=0, backend=http)
    var_chunks = list(st.text_iter("story"))
    assert "".join(var_chunks) == st["story"] and len(var_chunks) > 1
    states = story.run_batch([{"animal": "cat"}, {"animal": "dog"}], temperature=0, backend=http)
    assert states[0]["story"] == st["story"]
    assert all(s.get_meta_info("story")["cached_tokens"] > 0 for s in states)


def test_http_errors_name_the_url(engine, http):
    with serving(server_mod.create_app(engine, api_key="sekret")) as u:
        with pytest.raises(BackendError, match=rf"{u}.*401"):
            RuntimeEndpoint(u)
        RuntimeEndpoint(u, api_key="sekret").close()

    @function
    def bad(s: ProgramState) -> None:
        s += "Hi" + gen("x", top_p=5.0)

    with pytest.raises(BackendError, match="top_p"):
        bad.run(backend=http)


# == examples over HTTP ============================================================================
def test_example_chat_with_rules_http(url):
    st = load_example("chat_with_rules").main(["--url", url])
    assert st["answer"] and ("follow_up" in st) == st.ret_value


def test_example_tree_of_thought_http(url):
    st = load_example("tree_of_thought").main(["--url", url])
    assert len(st["thought"]) == 3 and "answer" in st


def test_example_few_shot_extraction_http(url):
    jsonschema = pytest.importorskip("jsonschema")
    mod = load_example("few_shot_extraction")
    for st in mod.main(["--url", url]):
        jsonschema.validate(st.ret_value, mod.SCHEMA)
