"""Where does a single-request decode step go on CPU? Times each part of the compiled step on its own.

    python scripts/profile_cpu_decode.py                    # embedded SmolLM2-135M, context 64 and 512
    python scripts/profile_cpu_decode.py --contexts 64 --quantization int8

Rows (one request, each part compiled alone and timed back to back, median of 3 loops):
  step         the engine's compiled decode step (forward + lm_head + sampler), as served
  forward      the model forward (embedding, 30 layers with attention and the KV write, final norm)
  no attention the same forward with attention replaced by a pass-through of q (the KV write stays)
  lm_head      hidden [1, H] -> logits [1, V]
  sampler      engine/sampler.py's sample() on [1, V] logits (greedy request)
  engine       wall time per token of Engine.generate on one request (host scheduling and copies included)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jaxradix import Engine, SamplingParams
from jaxradix.engine.sampler import sample

_spec = importlib.util.spec_from_file_location("bench_step", pathlib.Path(__file__).with_name("bench_step.py"))
bench_step = importlib.util.module_from_spec(_spec)
sys.modules["bench_step"] = bench_step
_spec.loader.exec_module(bench_step)


def loop_seconds(fn: Callable[[], object], iters: int = 20) -> float:
    jax.block_until_ready(fn())
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return float(np.median(samples))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--contexts", default="64,512")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens of the engine row")
    ap.add_argument("--max-total-tokens", type=int, default=4096)
    ap.add_argument("--engine-option", action="append", default=[],
                    help="extra Engine option name=value (e.g. quantization=int8); repeatable")
    args = ap.parse_args()
    extra = dict(opt.split("=", 1) for opt in args.engine_option)
    engine = Engine(args.model_path, max_running_requests=4, max_total_tokens=args.max_total_tokens,
                    context_length=1024, chunked_prefill_size=256, log_level="warning", precompile=False,
                    **extra)
    runner = engine.runner
    model = nnx.merge(runner.graphdef, runner.params)
    flat = model.flat_params()
    print(f"# {engine.loaded.source}: weights {sum(a.nbytes for a in jax.tree.leaves(flat)) / 1e6:.0f} MB "
          f"({model.dtype}), jax {jax.__version__}, {jax.devices()[0].device_kind}")
    print("| part | " + " | ".join(f"context {c} ms" for c in args.contexts.split(",")) + " |")
    print("|---|" + "---|" * len(args.contexts.split(",")))
    rows: dict[str, list[str]] = {}
    for ctx in (int(c) for c in args.contexts.split(",")):
        engine.wait_idle(timeout=600)
        _, inp = bench_step.decode_input(engine, 1, ctx)
        inp = jax.device_put(inp)
        rows.setdefault("step", []).append(f"{bench_step.device_step_seconds(engine, 1, ctx) * 1e3:.2f}")

        def forward(params, kv, inp, attention_fn):
            m = nnx.merge(runner.graphdef, params)
            return m(inp.input_ids, inp.positions, inp.slot_mapping, kv, inp.attn, attention_fn)

        for name, attn in (("forward", runner.attention_fn), ("no attention", lambda q, kv, md, **kw: q)):
            fn = jax.jit(lambda p, kv, inp, attn=attn: forward(p, kv, inp, attn), donate_argnums=(1,))
            state = {"kv": engine.pool.kv}

            def call(fn=fn, state=state, inp=inp):
                hidden, state["kv"] = fn(runner.params, state["kv"], inp)
                return hidden

            rows.setdefault(name, []).append(f"{loop_seconds(call) * 1e3:.2f}")
            engine.pool.kv = state["kv"]
        hidden = jax.numpy.ones((1, engine.model_config.hidden_size), jax.numpy.float32)
        logits_fn = jax.jit(lambda p, h: nnx.merge(runner.graphdef, p).logits(h))
        head_s = loop_seconds(functools.partial(logits_fn, runner.params, hidden))
        rows.setdefault("lm_head", []).append(f"{head_s * 1e3:.2f}")
        logits = logits_fn(runner.params, hidden)
        sample_fn = jax.jit(lambda logits, sampling, state: sample(logits, sampling, state)[0].tokens)
        sample_s = loop_seconds(functools.partial(sample_fn, logits, inp.sampling, runner.state))
        rows.setdefault("sampler", []).append(f"{sample_s * 1e3:.2f}")
        prompt = np.random.default_rng(0).integers(100, 40000, ctx).tolist()
        sp = SamplingParams(temperature=0, max_new_tokens=args.tokens, ignore_eos=True)
        engine.generate(input_ids=[prompt], sampling_params=sp)  # warm
        engine.flush_cache()
        out = engine.generate(input_ids=[prompt], sampling_params=sp)[0]["meta_info"]
        per_tok = (out["e2e_latency"] - out["ttft"]) / (args.tokens - 1)
        rows.setdefault("engine (per output token)", []).append(f"{per_tok * 1e3:.2f} ({1 / per_tok:.1f} tok/s)")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
    engine.shutdown()


if __name__ == "__main__":
    main()
