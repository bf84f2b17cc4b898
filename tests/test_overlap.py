"""Overlap scheduling: the host plans step N+1 while the device runs step N, with the same outputs.

The shared engine runs with overlap on (the default); one engine with --disable-overlap-schedule
is the reference. The compiled steps are the same, so the second engine loads them from the
persistent compilation cache.
"""

import asyncio
import json

import jax
import pytest
from conftest import get_engine

from jaxradix import SamplingParams
from jaxradix.cache.page_pool import PagePool
from jaxradix.cache.radix_cache import RadixCache
from jaxradix.engine.batch import Bucket, build_step
from jaxradix.engine.request import Request
from jaxradix.engine.scheduler import Scheduler
from jaxradix.launch_server import build_parser, engine_kwargs
from jaxradix.models.model_config import ModelConfig

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
SHORT = ["The capital of France is", "def fibonacci(n):", "The capital of France is a city where"]
LONG = " ".join(f"item {i}," for i in range(60))  # ~240 tokens: 4 chunks of 64
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def on():
    e = get_engine()
    assert e.overlap
    return e


@pytest.fixture(scope="module")
def off():
    e = get_engine(disable_overlap_schedule=True)
    assert not e.overlap
    return e


def _greedy(engine, prompts):
    return [o["output_ids"] for o in engine.generate(prompts, GREEDY)]


def _mixed(engine, stop: str) -> list[dict]:
    """One batch of everything the loop must keep exact: stop strings, max_new_tokens 0 and 1,
    seeded n>1 sampling, penalties with filters, a chunked prompt, a JSON schema, output logprobs."""
    chat = engine.apply_chat_template([{"role": "user", "content": "Give a person as JSON."}],
                                      add_generation_prompt=True)
    work = [
        ("Count: 1, 2, 3,", SamplingParams(temperature=0, max_new_tokens=16, stop=stop)),
        ("Hello", SamplingParams(temperature=0, max_new_tokens=0)),
        ("Hello", SamplingParams(temperature=0, max_new_tokens=1)),
        ("Write a word:", SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=7)),
        ("one one one one one", SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.01, seed=3,
                                               max_new_tokens=8, repetition_penalty=1.5,
                                               frequency_penalty=0.5, presence_penalty=0.3)),
        (LONG, GREEDY),
        (chat, SamplingParams(temperature=0, max_new_tokens=40, json_schema=SCHEMA)),
    ]
    outs = engine.generate([p for p, _ in work], [sp for _, sp in work], return_logprob=True, top_logprobs_num=2)
    return [o for x in outs for o in (x if isinstance(x, list) else [x])]


def _same(a: dict, b: dict) -> None:
    assert a["output_ids"] == b["output_ids"] and a["text"] == b["text"]
    ma, mb = a["meta_info"], b["meta_info"]
    assert ma["finish_reason"] == mb["finish_reason"]
    assert [t for _, t in ma["output_token_logprobs"]] == a["output_ids"]
    for (la, _), (lb, _) in zip(ma["output_token_logprobs"], mb["output_token_logprobs"], strict=True):
        assert abs(la - lb) < 1e-3
    top = [[[i for i, _ in x] for x in m["output_top_logprobs"]] for m in (ma, mb)]
    assert top[0] == top[1]


def test_same_greedy_ids_on_and_off_chunked_and_cached(on, off):
    for e in (on, off):
        e.flush_cache()
    ref = _greedy(off, SHORT + [LONG])  # uncached; the long prompt runs in chunks of 64
    assert _greedy(on, SHORT + [LONG]) == ref
    assert _greedy(on, SHORT + [LONG]) == ref  # now cached
    assert _greedy(off, SHORT + [LONG]) == ref
    assert [_greedy(on, [p])[0] for p in SHORT] == ref[:3]  # alone
    assert on.stats["overlapped_steps"] > 0 and off.stats["overlapped_steps"] == 0


def test_mixed_batch_same_outputs_without_compiles(on, off):
    full = off.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_new_tokens=16))["text"]
    stop = full.strip().split(" ")[1]
    ref = _mixed(off, stop)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    before, overlapped = on.runner.num_compiles, on.stats["overlapped_steps"]
    got = _mixed(on, stop)
    assert on.runner.num_compiles == before and compiles == []
    assert on.stats["overlapped_steps"] > overlapped
    assert len(got) == len(ref) == 9
    for a, b in zip(got, ref, strict=True):
        _same(a, b)
    # each feature did what it says
    assert got[0]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop} and stop not in got[0]["text"]
    assert got[1]["output_ids"] == [] and got[1]["meta_info"]["finish_reason"]["type"] == "length"
    assert len(got[2]["output_ids"]) == 1
    assert len({tuple(o["output_ids"]) for o in got[3:6]}) > 1
    person = json.loads(got[8]["text"])
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_abort_mid_batch_leaves_the_others_exact(on, off):
    ref = _greedy(off, SHORT)

    async def run():
        it = await on.async_generate("A very long story:", SamplingParams(temperature=0, max_new_tokens=400,
                                                                          ignore_eos=True), stream=True,
                                     rid="overlap-abort")
        others = asyncio.ensure_future(on.async_generate(SHORT, GREEDY))
        n = 0
        async for chunk in it:
            n += 1
            if n == 3:
                on.abort("overlap-abort")
            last = chunk
        return last, await others

    last, others = asyncio.run(run())
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(last["output_ids"]) < 400
    assert [o["output_ids"] for o in others] == ref


@pytest.fixture(scope="module")
def split():
    """The GPU's sampler (its own executable per SamplerPlan, no lax.cond) on CPU, with overlap on;
    no warm-up thread, so each plan compiles on first use."""
    e = get_engine(sampler_mode="split", sampler_warmup=False)
    assert e.runner.split and e.overlap
    return e


def test_split_sampler_same_greedy_ids_and_mixed_outputs(split, off):
    assert not off.runner.split
    split.flush_cache()
    off.flush_cache()
    ref = _greedy(off, SHORT + [LONG])
    assert _greedy(split, SHORT + [LONG]) == ref
    assert _greedy(split, SHORT + [LONG]) == ref  # cached
    full = off.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_new_tokens=16))["text"]
    stop = full.strip().split(" ")[1]
    ref = _mixed(off, stop)
    runner = split.runner
    first = len(runner._samplers)
    got = _mixed(split, stop)
    assert len(runner._samplers) > first  # the mixed batch's plans compiled on first use ...
    for a, b in zip(got, ref, strict=True):
        _same(a, b)
    again = _mixed(split, stop)  # (its steps may group the rows differently: new plans may compile)
    for a, b in zip(again, ref, strict=True):
        _same(a, b)
    # ... once each: every compile is a distinct bucket, (rows, plan) or the slot initialiser
    assert runner.num_compiles == len(runner._compiled) + len(runner._samplers) + 1
    assert split.stats["overlapped_steps"] > 0


def test_server_flag_turns_overlap_off():
    args = build_parser().parse_args(["--disable-overlap-schedule"])
    assert engine_kwargs(args)["disable_overlap_schedule"] is True
    assert "disable_overlap_schedule" not in engine_kwargs(build_parser().parse_args([]))


def test_scheduler_plans_with_tokens_still_on_the_device():
    """Host only: a token launched but unread counts in the plan and feeds the next row from the device."""
    cfg = ModelConfig("llama", vocab_size=64, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
                      num_kv_heads=1, head_dim=8)
    pool = PagePool(cfg, 64, 4, jax.numpy.float32)
    sched = Scheduler(pool, RadixCache(page_size=4, free_slots=pool.free_slots), num_slots=2, context_len=32,
                      chunk_size=16, policy="fcfs", new_token_ratio=0.7, min_new_token_ratio=0.15)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_new_tokens=3))
    sched.add(a)

    def launch():
        rows = sched.schedule().rows
        inp = build_step(rows, Bucket(16, 2), 4, max_pages=8, mask_words=2)
        sched.after_step(rows)
        a.pending += sum(r.samples for r in rows)
        return rows, inp

    rows, _ = launch()  # the prompt; its token stays on the device
    assert [(r.start, r.n, r.samples) for r in rows] == [(0, 5, True)]
    rows, inp = launch()  # scheduled before the first token is read
    assert [(r.start, r.n) for r in rows] == [(5, 1)] and a.pending == 2
    assert inp.input_from_slot[0] == a.slot and inp.sampling.step[0] == 1 and inp.sampling.keep[0]
    a.output_ids.append(9)  # the first token is read
    a.pending -= 1
    rows, inp = launch()
    assert [(r.start, r.n) for r in rows] == [(6, 1)] and inp.input_from_slot[0] == a.slot
    a.output_ids.append(10)
    a.pending -= 1
    assert a.will_finish and sched.schedule().rows == []  # its pending token is the last one: no row
    b = Request("b", [7, 8], SamplingParams(max_new_tokens=4))
    b.pending = 1  # retracted while its token was on the device: waits for it
    sched.add(b)
    assert sched.schedule().rows == [] and b.slot < 0
    sched.release(a)
    sched.check_integrity()
