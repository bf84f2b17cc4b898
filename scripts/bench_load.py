"""Load time of the embedded model from its GGUF vs from its orbax checkpoint, and single-request
greedy decode speed; with --quantization, the same for each way of holding the weights on the device.

    python scripts/bench_load.py
    python scripts/bench_load.py --quantization none gguf int8 fp8 [--model-path X.gguf] [--tokens 128]

The --quantization table: load time (best of 2), the weights' device bytes, single-request greedy
decode tok/s, and accuracy against the first mode (normally none): max / mean |logit diff| over a
64-token text, and greedy agreement (tokens equal before the first divergence) over --tokens tokens
for 3 prompts.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxradix import Engine, SamplingParams
from jaxradix.models import gguf_file
from jaxradix.models.loader import load_model, save_orbax
from jaxradix.pallas_kernels import get_attention
from jaxradix.pallas_kernels.metadata import AttentionMetadata

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):"]
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light")


def formats() -> None:
    gguf_times = []
    for _ in range(2):
        gguf_file._cached_reader.cache_clear()  # measure the whole parse, not the in-process cache
        gguf_times.append(load_model(None, progress=False, quantization="none").load_seconds)
    with tempfile.TemporaryDirectory() as d:
        save_orbax(load_model(None, progress=False, quantization="none"), d + "/ckpt")
        orbax_times = [load_model(d + "/ckpt").load_seconds for _ in range(2)]
    engine = Engine(None, quantization="none", max_running_requests=1, chunked_prefill_size=64,
                    max_total_tokens=4096, context_length=1024, log_level="warning")
    sp = SamplingParams(temperature=0, max_new_tokens=128, ignore_eos=True)
    engine.generate("The capital of France is", SamplingParams(temperature=0, max_new_tokens=8))
    start = time.perf_counter()
    out = engine.generate("The capital of France is", sp)
    wall = time.perf_counter() - start
    engine.shutdown()
    n = out["meta_info"]["completion_tokens"]
    print("| what | figure |\n|---|---|")
    print(f"| load from GGUF (dequantize + map), best of 2 | {min(gguf_times):.2f} s |")
    print(f"| load from orbax checkpoint, best of 2 | {min(orbax_times):.2f} s |")
    print(f"| single-request greedy decode, {n} tokens | {n / wall:.1f} tok/s |")


def text_logits(loaded, ids: list[int]) -> np.ndarray:  # [T, V] f32, the text in one prefill step
    model, cfg = loaded.model, loaded.config
    T, S = len(ids), 16
    P = T // S + 2
    kv = tuple(jnp.zeros((P, S, 2 * cfg.num_kv_heads, cfg.head_dim), model.dtype) for _ in range(cfg.num_layers))
    graphdef, params = nnx.split(model)
    attention = get_attention("auto")

    @jax.jit
    def run(params, kv, ids, pos, slots, md):
        m = nnx.merge(graphdef, params)
        hidden, _ = m(ids, pos, slots, kv, md, attention)
        return m.logits(hidden)

    pos = np.arange(T, dtype=np.int32)
    md = AttentionMetadata(np.array([0, T], np.int32), np.array([T], np.int32),
                           np.arange(1, P, dtype=np.int32)[None, :], np.array([1], np.int32))
    return np.asarray(run(params, kv, np.asarray(ids, np.int32), pos, pos + S, md))


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens equal before the first divergence."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def quantizations(modes: list[str], model_path: str | None, tokens: int) -> None:
    rows, ref = [], None
    for mode in modes:
        times = []
        for _ in range(2):
            gguf_file._cached_reader.cache_clear()
            loaded = load_model(model_path, progress=False, quantization=mode)
            times.append(loaded.load_seconds)
        mb = sum(x.on_device_size_in_bytes() for x in jax.tree.leaves(loaded.model.flat_params())) / 2**20
        ids = loaded.tokenizer.encode(TEXT)[:64]
        logits = text_logits(loaded, ids)
        del loaded
        engine = Engine(model_path, quantization=mode, max_running_requests=1, chunked_prefill_size=64,
                        max_total_tokens=4096, context_length=1024, log_level="warning")
        sp = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
        engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=8))
        outs, walls = [], []
        for p in PROMPTS:
            start = time.perf_counter()
            outs.append(engine.generate(p, sp)["output_ids"])
            walls.append(time.perf_counter() - start)
        engine.shutdown()
        tok_s = tokens * len(PROMPTS) / sum(walls)
        if ref is None:
            ref = (logits, outs)
        diff = np.abs(logits - ref[0])
        agree = "/".join(str(agreement(o, r)) for o, r in zip(outs, ref[1], strict=True))
        rows.append(f"| {mode} | {min(times):.2f} s | {mb:.1f} MiB | {tok_s:.1f} | {diff.max():.3f} / "
                    f"{diff.mean():.4f} | {agree} (of {tokens}) |")
        print(rows[-1], flush=True)
    print(f"\n| quantization | load, best of 2 | weights on device | decode tok/s (1 request) | "
          f"logits max / mean abs diff vs {modes[0]} (64 tokens) | greedy agreement, 3 prompts |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", nargs="+", default=None, help="compare these modes (none gguf int8 fp8)")
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--tokens", type=int, default=128, help="greedy tokens per prompt")
    args = ap.parse_args()
    print(f"# on {jax.default_backend()} ({platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind})")
    if args.quantization:
        quantizations(args.quantization, args.model_path, args.tokens)
    else:
        formats()


if __name__ == "__main__":
    main()
