"""The engine on the embedded SmolLM2-135M-Instruct (CPU, `auto` attention: the gathered path)."""

import asyncio
import dataclasses

import jax
import numpy as np
import pytest
from conftest import get_engine

from jaxradix import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
PROMPTS = [
    "The capital of France is",
    "List three colors: red,",
    "def fibonacci(n):",
    "The capital of France is a city where",  # shares a prefix with the first
    "Once upon a time, in a small village, there lived a",
]


@pytest.fixture(scope="module")
def engine():
    return get_engine()


def test_capital_of_france_is_paris(engine):
    out = engine.generate("The capital of France is", SamplingParams(temperature=0, max_new_tokens=24))
    assert out["text"].startswith(" Paris"), out["text"]
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) <= 24
    assert meta["prompt_tokens"] == len(engine.encode("The capital of France is"))
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert meta["e2e_latency"] > 0


def test_steps_without_grammars_upload_no_mask(engine):
    """The all-ones grammar mask of an unconstrained step is a device array the runner keeps."""
    from jaxradix.engine.batch import Bucket

    runner = engine.runner
    inp = runner._example(Bucket(4, 4))
    first = runner._resident(inp).sampling.grammar_mask
    assert isinstance(first, jax.Array) and runner._resident(inp).sampling.grammar_mask is first
    own = dataclasses.replace(inp, sampling=dataclasses.replace(inp.sampling,
                                                                 grammar_mask=inp.sampling.grammar_mask.copy()))
    assert runner._resident(own) is own  # a mask of the step's own (a grammar's) is sent as it is


def _greedy(engine, prompts, params=GREEDY):
    return [o["output_ids"] for o in engine.generate(prompts, params)]


def test_same_greedy_output_alone_batched_cached_and_uncached(engine):
    alone = [_greedy(engine, [p])[0] for p in PROMPTS]
    batched = _greedy(engine, PROMPTS)
    assert batched == alone
    again = _greedy(engine, PROMPTS)  # now every prompt hits the cache
    assert again == alone
    no_radix = get_engine(disable_radix_cache=True, release="test")
    assert _greedy(no_radix, PROMPTS) == alone
    unchunked = get_engine(chunked_prefill_size=-1)
    assert _greedy(unchunked, PROMPTS) == alone


def test_long_prompt_chunked_matches_unchunked(engine):
    prompt = " ".join(f"item {i}," for i in range(60))  # ~240 tokens: 4 chunks of 64
    a = engine.generate(prompt, GREEDY)["output_ids"]
    b = get_engine(chunked_prefill_size=-1).generate(prompt, GREEDY)["output_ids"]
    assert a == b


def test_retraction_in_a_tiny_pool_keeps_greedy_output(engine):
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    prompts = [f"Story number {i}: once upon a time" for i in range(8)]
    expected = _greedy(engine, prompts, params)
    tiny = get_engine(max_total_tokens=256, new_token_ratio=0.05, min_new_token_ratio=0.01, release="test")
    outs = tiny.generate(prompts, params)
    assert [o["output_ids"] for o in outs] == expected
    assert tiny.stats["retractions"] > 0


def test_multi_turn_hits_previous_turn(engine):
    engine.flush_cache()
    msgs = [{"role": "user", "content": "Name a fruit."}]
    p1 = engine.apply_chat_template(msgs, add_generation_prompt=True)
    o1 = engine.generate(p1, SamplingParams(temperature=0, max_new_tokens=16))
    msgs += [{"role": "assistant", "content": o1["text"]}, {"role": "user", "content": "Another one?"}]
    p2 = engine.apply_chat_template(msgs, add_generation_prompt=True)
    o2 = engine.generate(p2, SamplingParams(temperature=0, max_new_tokens=8))
    ids1 = engine.encode(p1) + o1["output_ids"]
    ids2 = engine.encode(p2)
    common = next((i for i, (a, b) in enumerate(zip(ids1, ids2, strict=False)) if a != b), min(len(ids1), len(ids2)))
    # everything turn 1 computed and turn 2 repeats is cached, up to page alignment
    expected = min(common, len(ids1) - 1) // 16 * 16
    assert o2["meta_info"]["cached_tokens"] >= expected >= 16
    stats = engine.cache_stats()
    assert "KV Cache Hit Rate" in stats["summary"] and stats["hit_rate"] > 0


def test_no_compile_after_warmup(engine):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    before = engine.runner.num_compiles
    params = [SamplingParams(temperature=t, top_p=0.9, top_k=20, max_new_tokens=10, seed=3) for t in (0, 0.7)]
    engine.generate(PROMPTS * 2, params[0])
    engine.generate(PROMPTS, params[1])
    engine.generate(" ".join(["word"] * 150), params[1])
    assert engine.runner.num_compiles == before
    assert compiles == []


def test_seeded_sampling_is_reproducible_and_n_samples_differ(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1234)
    a = engine.generate("Write a word:", sp)["output_ids"]
    b = engine.generate(["Hello", "Write a word:"], sp)[1]["output_ids"]
    assert a == b
    outs = engine.generate("Write a word:", SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=7))
    assert len(outs) == 4
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_n_samples_compute_the_prompt_once(engine):
    engine.flush_cache()
    prompt = "Here is a list of animals that live in the ocean, with one fact about each of them: whales,"
    n_prompt = len(engine.encode(prompt))
    before = engine.stats["prefill_tokens"]
    outs = engine.generate(prompt, SamplingParams(temperature=1.0, max_new_tokens=4, n=4, seed=1))
    computed = engine.stats["prefill_tokens"] - before
    assert computed == n_prompt + 3 * (n_prompt - (n_prompt - 1) // 16 * 16)
    assert all(o["meta_info"]["cached_tokens"] == (n_prompt - 1) // 16 * 16 for o in outs[1:])


def test_sampling_filters_and_penalties_run(engine):
    for sp in [SamplingParams(temperature=0.8, top_k=1, max_new_tokens=8),
               SamplingParams(temperature=0.8, top_p=0.01, max_new_tokens=8),
               SamplingParams(temperature=0.8, min_p=0.99, max_new_tokens=8)]:
        # each of these keeps only the top token: same as greedy
        assert engine.generate("The capital of France is", sp)["output_ids"] == \
            engine.generate("The capital of France is", SamplingParams(temperature=0, max_new_tokens=8))["output_ids"]
    # penalties must change the output in the expected direction: tests/test_penalties.py
    target = engine.encode(" banana")[0]
    biased = engine.generate("I like", SamplingParams(temperature=0, max_new_tokens=3, logit_bias={target: 100}))
    assert biased["output_ids"] == [target] * 3


def test_logprobs(engine):
    out = engine.generate("The capital of France is", SamplingParams(temperature=0, max_new_tokens=4),
                          return_logprob=True, top_logprobs_num=3, logprob_start_len=0)
    meta = out["meta_info"]
    lps = meta["output_token_logprobs"]
    assert [t for _, t in lps] == out["output_ids"]
    for (lp, tok), top in zip(lps, meta["output_top_logprobs"], strict=True):
        assert top[0][0] == tok and abs(top[0][1] - lp) < 1e-4  # greedy: the top token
        assert top[0][1] >= top[1][1] >= top[2][1]
    inp = meta["input_token_logprobs"]
    assert len(inp) == meta["prompt_tokens"] and inp[0][0] is None
    assert all(lp < 0 for lp, _ in inp[1:])
    # the prompt logprob of the first generated token, seen as a prompt token, equals its output logprob
    ids = engine.encode("The capital of France is") + out["output_ids"][:1]
    again = engine.generate(input_ids=ids, sampling_params=SamplingParams(max_new_tokens=0),
                            return_logprob=True, logprob_start_len=0)
    assert again["output_ids"] == [] and again["meta_info"]["finish_reason"]["type"] == "length"
    assert abs(again["meta_info"]["input_token_logprobs"][-1][0] - lps[0][0]) < 2e-3


def test_stop_strings_and_stop_tokens(engine):
    full = engine.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_new_tokens=16))["text"]
    stop = full.strip().split(" ")[1]
    out = engine.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_new_tokens=16, stop=stop))
    assert stop not in out["text"] and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    chat = engine.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    out = engine.generate(chat, SamplingParams(temperature=0, max_new_tokens=64))
    assert "<|im_end|>" not in out["text"]


def test_streaming_iterator_and_async(engine):
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    whole = engine.generate("Tell me about the sea.", sp)
    chunks = list(engine.generate("Tell me about the sea.", sp, stream=True))
    assert chunks[-1]["text"] == whole["text"] and chunks[-1]["output_ids"] == whole["output_ids"]
    assert len(chunks) > 1
    assert all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:], strict=False))

    async def run():
        it = await engine.async_generate("Tell me about the sea.", sp, stream=True)
        return [c async for c in it], await engine.async_generate("Tell me about the sea.", sp)

    streamed, single = asyncio.run(run())
    assert streamed[-1]["text"] == whole["text"] == single["text"]


def test_abort_and_flush(engine):
    sp = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    it = engine.generate("A very long story:", sp, stream=True, rid="to-abort")
    next(it)
    assert engine.flush_cache() is False  # refused while a request runs
    engine.abort("to-abort")
    last = list(it)[-1]
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    engine.wait_idle()
    assert engine.flush_cache() is True
    assert engine.tree.total_size == 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(input_ids=[]), "prompt"),
    (dict(input_ids=[1, 10**9]), "input_ids"),
    (dict(prompt="x " * 2000), "prompt"),
    (dict(prompt="hi", sampling_params={"temperature": -1}), "temperature"),
    (dict(prompt="hi", sampling_params={"top_p": 0}), "top_p"),
    (dict(prompt="hi", sampling_params={"max_new_tokens": -5}), "max_new_tokens"),
    (dict(prompt="hi", sampling_params={"n": 0}), "sampling_params.n"),
    (dict(prompt="hi", sampling_params={"bogus": 1}), "bogus"),
    (dict(prompt="hi", sampling_params={"logit_bias": {"99999999": 1}}), "logit_bias"),
])
def test_bad_input_is_a_value_error_and_engine_keeps_serving(engine, kwargs, field):
    with pytest.raises(ValueError, match=field):
        engine.generate(**kwargs)
    assert engine.generate("Hello", SamplingParams(temperature=0, max_new_tokens=2))["meta_info"][
        "completion_tokens"] == 2


def test_page_size_one(engine):
    e1 = get_engine(page_size=1, release="test")
    assert _greedy(e1, PROMPTS[:3]) == _greedy(engine, PROMPTS[:3])


def test_policies_same_output(engine):
    expected = _greedy(engine, PROMPTS)
    for policy in ("fcfs", "dfs-weight"):
        assert _greedy(get_engine(schedule_policy=policy, release="test"), PROMPTS) == expected
    assert np.isfinite(engine.cache_stats()["hit_rate"])


def test_pallas_interpret_backend_matches_reference(engine):
    """The engine's greedy output with the Pallas TPU kernel (interpret mode on CPU) equals the reference."""
    pallas = get_engine(attention_backend="pallas", max_running_requests=2, chunked_prefill_size=32,
                        precompile=False, release="test")
    prompts = ["The capital of France is", "def fibonacci(n):"]
    sp = SamplingParams(temperature=0, max_new_tokens=4)
    assert _greedy(pallas, prompts, sp) == _greedy(engine, prompts, sp)


def test_triton_interpret_backend_matches_reference(engine):
    """The same with the Triton kernel of sm_80 GPUs (interpret mode on CPU): SmolLM2's 3 query heads per
    kv head padded to 16 dot rows, f32 pool, page 16, decode and chunked-prefill steps."""
    triton = get_engine(attention_backend="triton", max_running_requests=2, chunked_prefill_size=32,
                        precompile=False, release="test")
    assert not triton.runner.reads_shared_prefix
    prompts = ["The capital of France is", "def fibonacci(n):"]
    sp = SamplingParams(temperature=0, max_new_tokens=4)
    assert _greedy(triton, prompts, sp) == _greedy(engine, prompts, sp)


def test_shared_system_prompt_is_read_once_and_changes_nothing(engine, monkeypatch):
    """Requests after a cached multi-page system prompt: their steps mark it as a shared prefix (the
    gathered path's cascade reads it once per step) and the greedy tokens are those of the same run with
    the cascade off (every row reading its own pages)."""
    import jaxradix.engine.engine as engine_module

    assert engine.runner.reads_shared_prefix  # CPU: the gathered path
    system = "You are a helpful assistant who answers in one short sentence. " * 6  # > 3 pages of 16
    questions = [system + q for q in ("What is the capital of France?", "Name a color.", "What is 2 + 2?")]
    params = SamplingParams(temperature=0, max_new_tokens=8)
    engine.generate(system, SamplingParams(temperature=0, max_new_tokens=1))  # the prompt is cached
    marked = []
    real_build = engine_module.build_step

    def spy(*args, **kwargs):
        inp = real_build(*args, **kwargs)
        marked.append(int(np.max(inp.attn.shared_lens)))
        return inp

    monkeypatch.setattr(engine_module, "build_step", spy)
    with_cascade = _greedy(engine, questions, params)
    assert max(marked) >= 3 * engine.pool.page_size, marked
    monkeypatch.setattr(engine.runner, "reads_shared_prefix", False)
    marked.clear()
    assert _greedy(engine, questions, params) == with_cascade
    assert max(marked) == 0
