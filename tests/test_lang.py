"""The frontend language on the shared small engine (greedy): every primitive, select against the
engine's own logprobs, cached prefixes of forks and batches, streaming, bad input, the examples."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import get_engine

from jaxradix.lang import (
    BackendError,
    EngineBackend,
    ProgramState,
    RuntimeEndpoint,
    assistant,
    function,
    gen,
    select,
    set_default_backend,
    system,
    user,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PAGE = 16  # conftest's page_size


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class CountingBackend(EngineBackend):
    """Counts generate calls in flight at once."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.active = self.peak = 0
        self._count_lock = threading.Lock()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._count_lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            return super().generate(*args, **kwargs)
        finally:
            with self._count_lock:
                self.active -= 1


@pytest.fixture(scope="module")
def engine():
    return get_engine()


@pytest.fixture(scope="module")
def backend(engine):
    b = EngineBackend(engine)
    set_default_backend(b)
    yield b
    set_default_backend(None)


def direct_scores(engine: Any, prefix: str, choices: list[str], start: int | None = None) -> list[float]:
    """Mean logprob of each choice's tokens, asked of the engine directly (ids tokenized jointly)."""
    tok = engine.tokenizer
    p = len(tok.encode(prefix)) if start is None else start
    out = []
    for c in choices:
        ids = tok.encode(prefix + c)
        r = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                            logprob_start_len=p)
        lps = [lp for lp, _ in r["meta_info"]["input_token_logprobs"]]
        out.append(sum(lps) / len(lps))
    return out


# == chat template =================================================================================
def test_roles_render_like_the_chat_template(engine, backend):
    tpl = backend.chat_template
    apply = engine.tokenizer.apply_chat_template
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Bye"}],
    ]
    for msgs in convs:
        for gen_prompt in (True, False):
            assert tpl.render(msgs, gen_prompt) == apply(msgs, add_generation_prompt=gen_prompt)

    @function
    def chat(s: ProgramState) -> None:
        s += user("Hi")
        s += assistant("Hello!")
        with s.user():
            s += "Bye"

    st = chat.run()
    assert st.text() == apply(convs[2], add_generation_prompt=False)
    # SmolLM2's template adds a default system message when the first is not system: so does the program
    assert [m["role"] for m in st.messages()] == ["system", "user", "assistant", "user"]
    assert st.messages()[1:] == convs[2]


# == gen ===========================================================================================
def test_gen_matches_the_engine_and_records_meta(engine, backend):
    @function
    def qa(s: ProgramState, question: str) -> None:
        s += system("You are a concise assistant.")
        s += user(question)
        s += assistant(gen("answer", max_tokens=10))

    st = qa.run(question="What is the capital of France?", temperature=0)
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a concise assistant."},
         {"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    direct = engine.generate(prompt, {"max_new_tokens": 10, "temperature": 0})
    assert st["answer"] == direct["text"]
    assert st.text() == prompt + direct["text"] + "<|im_end|>\n"
    assert st.messages()[-1] == {"role": "assistant", "content": direct["text"]}
    meta = st.get_meta_info("answer")
    assert meta["prompt_tokens"] == direct["meta_info"]["prompt_tokens"]
    assert meta["completion_tokens"] == len(direct["output_ids"])


def test_gen_stop_defaults_and_expressions(backend):
    @function
    def count(s: ProgramState) -> None:
        s += "Count: 1, 2, 3," + gen("rest", stop=",")  # str + expr concatenates
        s += ", then" + gen("more")  # no max_tokens: run(max_new_tokens=...) applies

    st = count.run(temperature=0, max_new_tokens=3)
    assert "," not in st["rest"] and st.get_meta_info("rest")["finish_reason"]["type"] == "stop"
    assert st.get_meta_info("more")["completion_tokens"] == 3
    assert st.text() == "Count: 1, 2, 3," + st["rest"] + ", then" + st["more"]


def test_nested_function_and_anonymous_gen(backend):
    @function
    def greet(s: ProgramState, name: str) -> None:
        s += f"Hello, {name}! "

    @function
    def outer(s: ProgramState) -> str:
        greet(s, "Ada")  # runs greet's body on s
        s += "Today" + gen(max_tokens=3)  # a gen without a name: text only
        return "done"

    st = outer.run(temperature=0)
    assert st.text().startswith("Hello, Ada! Today") and len(st.text()) > len("Hello, Ada! Today")
    assert st.ret_value == "done"


# == select ========================================================================================
def test_select_picks_the_highest_normalized_logprob(engine, backend):
    prefix = "The capital of France is"
    choices = [" London", " Paris", " Berlin", " a small village"]

    @function
    def pick(s: ProgramState) -> None:
        s += prefix
        s += select("city", choices)

    st = pick.run()
    meta = st.get_meta_info("city")
    want = direct_scores(engine, prefix, choices)
    assert meta["normalized_prompt_logprobs"] == pytest.approx(want, abs=2e-2)
    best = max(range(len(choices)), key=lambda i: want[i])
    assert st["city"] == choices[best] == " Paris"
    assert not meta["token_healing"] and meta["boundary"] == meta["prefix_tokens"]
    assert st.text() == prefix + " Paris"


def test_select_token_healing(engine, backend):
    prefix = "The capital of France is "  # the trailing space merges into the choice's first token
    choices = ["London", "Paris", "Rome"]

    @function
    def pick(s: ProgramState) -> None:
        s += prefix + select("city", choices)

    st = pick.run()
    meta = st.get_meta_info("city")
    assert meta["token_healing"] and meta["boundary"] == meta["prefix_tokens"] - 1
    # scored from the healed boundary: " Paris" as one token, not " " + "Paris"
    want = direct_scores(engine, prefix, choices, start=meta["boundary"])
    assert meta["normalized_prompt_logprobs"] == pytest.approx(want, abs=2e-2)
    assert st["city"] == "Paris"


# == fork ==========================================================================================
def test_fork_runs_branches_in_parallel_on_a_shared_prefix(engine):
    counting = CountingBackend(engine)
    preamble = ("Here are three short, different descriptions of the same calm harbour town at dawn, "
                "written by three different travel writers for a guide book. Each one mentions the boats, "
                "the light on the water and the smell of bread from the bakery by the pier.\n")

    @function
    def branches(s: ProgramState) -> None:
        s += preamble
        forks = s.fork(3)
        forks += lambda i: f"Writer {i + 1}:"
        forks += gen("desc", max_tokens=6)
        forks.join()

    st = branches.run(temperature=0, backend=counting)
    assert counting.peak == 3  # the three gens were in flight at once
    descs, metas = st["desc"], st.get_meta_info("desc")
    assert len(descs) == len(metas) == 3
    prefix_tokens = len(engine.tokenizer.encode(preamble))
    for m in metas:  # every branch found the prefix's pages in the radix cache
        assert m["cached_tokens"] >= (prefix_tokens - 1) // PAGE * PAGE >= 2 * PAGE
    assert st.text() == preamble  # gather_variable leaves the parent's text alone


def test_fork_concat_join_and_select_in_branches(backend):
    @function
    def vote(s: ProgramState) -> None:
        s += "Is the sky blue? Answer:"
        forks = s.fork(2)
        forks += [" Yes.", " No."]
        forks.join("concate_and_append")
        s += " Final:" + select("final", [" yes", " no"])

    st = vote.run()
    assert st.text().startswith("Is the sky blue? Answer: Yes. No. Final:")
    assert st["final"] in (" yes", " no")


# == run_batch =====================================================================================
def test_run_batch_computes_the_shared_prefix_once(engine, backend):
    preamble = "".join(f"Rule {i}: answer in exactly one lowercase word, with no punctuation at all.\n"
                       for i in range(1, 7))
    questions = ["What color is snow?", "What color is coal?", "What color is grass?", "What color is blood?"]

    @function
    def answer(s: ProgramState, q: str) -> str:
        s += preamble + f"Q: {q}\nA:" + gen("a", max_tokens=3, stop="\n")
        return q

    states = answer.run_batch([{"q": q} for q in questions], temperature=0, num_threads=4, progress_bar=True)
    assert [st.ret_value for st in states] == questions
    prefix_tokens = len(engine.tokenizer.encode(preamble))
    assert prefix_tokens > 4 * PAGE
    for st in states:  # all four started together, yet all hit the warmed prefix
        assert st.get_meta_info("a")["cached_tokens"] >= (prefix_tokens - 1) // PAGE * PAGE
    single = answer.run(q=questions[2], temperature=0)
    assert states[2]["a"] == single["a"]


# == streaming =====================================================================================
def test_stream_text_iter(backend):
    @function
    def story(s: ProgramState) -> None:
        s += user("Tell me a one-line story about a cat.")
        s += assistant(gen("story", max_tokens=8))

    st = story.run(stream=True, temperature=0)
    chunks = list(st.text_iter())
    var_chunks = list(st.text_iter("story"))
    assert "".join(chunks) == st.text()
    assert "".join(var_chunks) == st["story"] and len(var_chunks) > 1  # token by token
    assert st.text() == story.run(temperature=0).text()


# == constrained gen ===============================================================================
def test_gen_regex_json_schema_and_choices(backend):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}

    @function
    def constrained(s: ProgramState) -> None:
        s += "A three digit number: " + gen("num", regex=r"[0-9]{3}", max_tokens=6)
        s += "\nAs JSON: " + gen("obj", json_schema=schema, max_tokens=16)
        s += "\nFavourite fruit: " + gen("fruit", choices=["apple", "banana", "cherry"], max_tokens=6)

    st = constrained.run(temperature=0)
    assert len(st["num"]) == 3 and st["num"].isdigit()
    assert isinstance(json.loads(st["obj"])["n"], int)
    assert st["fruit"] in ("apple", "banana", "cherry")


# == bad input =====================================================================================
def test_unknown_variable_is_a_key_error_naming_it(backend):
    @function
    def tiny(s: ProgramState) -> None:
        s += "Hello"
        s["x"] = 1

    st = tiny.run()
    with pytest.raises(KeyError, match="'nope'"):
        st["nope"]
    with pytest.raises(KeyError, match="'nope'"):
        st.get_meta_info("nope")
    assert st["x"] == 1 and "x" in st


def test_select_without_choices_is_a_value_error(backend):
    for bad in ([], None, "yes", ["a", ""]):
        with pytest.raises(ValueError, match="choice"):
            select("x", bad)
    with pytest.raises(ValueError, match="choice"):
        gen("x", choices=[])


def test_errors_inside_a_program_reach_the_caller(backend):
    @function
    def bad_param(s: ProgramState) -> None:
        s += "Hi" + gen("x", temperature=-1.0)

    with pytest.raises(ValueError, match="temperature"):
        bad_param.run()

    @function
    def nested(s: ProgramState) -> None:
        with s.user():
            s += assistant("no")

    with pytest.raises(ValueError, match="nest"):
        nested.run()

    @function
    def reads_after_error(s: ProgramState) -> None:
        s += gen("x", max_tokens=2)  # empty prompt: the engine refuses it
        s["x"]

    with pytest.raises(ValueError, match="prompt"):
        reads_after_error.run()


def test_unreachable_backend_names_the_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(BackendError, match=url):
        RuntimeEndpoint(url)


def test_no_backend_is_a_clear_error(backend):
    @function
    def noop(s: ProgramState) -> None:
        s += "x"

    set_default_backend(None)
    try:
        with pytest.raises(RuntimeError, match="set_default_backend"):
            noop.run()
    finally:
        set_default_backend(backend)


# == examples, in-process ==========================================================================
def test_example_chat_with_rules(backend):
    st = load_example("chat_with_rules").main([], backend=backend)
    assert st["answer"]
    assert st.ret_value == ("paris" in st["answer"].lower())
    assert ("follow_up" in st) == st.ret_value
    # the rule's other branch: a keyword that is not in the answer asks no follow-up
    st = load_example("chat_with_rules").main(["--keyword", "zzzz", "--max-tokens", "8", "--system", "Be brief."],
                                              backend=backend)
    assert st.ret_value is False and "follow_up" not in st
    assert st.messages()[0] == {"role": "system", "content": "Be brief."}


def test_example_tree_of_thought(backend):
    mod = load_example("tree_of_thought")
    st = mod.main([], backend=backend)
    assert len(st["thought"]) == len(st["sound"]) == len(mod.APPROACHES)
    assert all(m["cached_tokens"] > 0 for m in st.get_meta_info("thought"))
    assert 0 <= st.ret_value < len(mod.APPROACHES) and "answer" in st


def test_example_few_shot_extraction(backend):
    jsonschema = pytest.importorskip("jsonschema")
    mod = load_example("few_shot_extraction")
    states = mod.main([], backend=backend)
    assert len(states) == len(mod.TEXTS)
    for st in states:
        jsonschema.validate(st.ret_value, mod.SCHEMA)
        assert st.get_meta_info("record")["cached_tokens"] > 0
