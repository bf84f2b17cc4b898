"""Multi-turn chats whose working set is several times the device KV pool: with vs without the host tier.

    python scripts/bench_multiturn.py                                  # CPU-sized defaults
    python scripts/bench_multiturn.py --chats 64 --turns 6 --user-len 128 --pool-tokens 8192   # a GPU

Each chat's turn t is its whole history (every earlier user message and answer) plus a new user
message. Turns go round robin over the chats, `--concurrency` chats at a time, so by the time a chat
comes back its history was evicted from the device pool: without the host tier it is recomputed,
with it (--enable-hierarchical-cache) it loads back from host memory.
Prints one JSON line per configuration: prefill tokens computed, device/host hit rates, TTFT, throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from jaxradix import Engine, SamplingParams


def run(engine: Engine, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    vocab = engine.tokenizer.vocab_size if engine.tokenizer else engine.model_config.vocab_size
    history: list[list[int]] = [[] for _ in range(args.chats)]
    sp = SamplingParams(temperature=0, max_new_tokens=args.out_len, ignore_eos=True)
    engine.flush_cache()
    engine.stats["prefill_tokens"] = 0
    metas, outputs = [], []
    start = time.perf_counter()
    for _ in range(args.turns):
        for c0 in range(0, args.chats, args.concurrency):
            group = list(range(c0, min(c0 + args.concurrency, args.chats)))
            for c in group:
                history[c] = history[c] + rng.integers(100, vocab - 1, args.user_len).tolist()
            outs = engine.generate(input_ids=[history[c] for c in group], sampling_params=sp)
            for c, o in zip(group, outs, strict=True):
                history[c] = history[c] + o["output_ids"]
                metas.append(o["meta_info"])
                outputs.append(o["output_ids"])
    wall = time.perf_counter() - start
    engine.check_integrity()
    st = engine.cache_stats()
    prompt = sum(m["prompt_tokens"] for m in metas)
    out = sum(m["completion_tokens"] for m in metas)
    return {
        "host_tier": engine.host_pool is not None, "device_pool_tokens": engine.pool.capacity * engine.pool.page_size,
        "working_set_tokens": sum(len(h) for h in history), "requests": len(metas), "wall_s": round(wall, 2),
        "prefill_tokens_computed": engine.stats["prefill_tokens"], "prompt_tokens": prompt,
        "device_hit_rate": round(st["device_hit_tokens"] / prompt, 3),
        "host_hit_rate": round(st["host_hit_tokens"] / prompt, 3),
        "mean_ttft_s": round(float(np.mean([m["ttft"] for m in metas])), 4),
        "total_tok_per_s": round((prompt + out) / wall, 1), "output_tok_per_s": round(out / wall, 1),
        "host_load_gbps": round(st.get("host_load_gbps", 0.0), 3),
        "host_save_gbps": round(st.get("host_save_gbps", 0.0), 3),
        "outputs": outputs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--chats", type=int, default=24)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--user-len", type=int, default=48, help="tokens of each new user message")
    ap.add_argument("--out-len", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4, help="chats sent at once")
    ap.add_argument("--pool-tokens", type=int, default=1024, help="device KV pool (max_total_tokens)")
    ap.add_argument("--hicache-ratio", type=float, default=16.0)
    ap.add_argument("--only", choices=["with", "without"], default=None)
    args = ap.parse_args()
    common = dict(max_total_tokens=args.pool_tokens, max_running_requests=8, chunked_prefill_size=256,
                  page_size=16, log_level="warning")
    results = {}
    for name, extra in (("without", {}), ("with", dict(enable_hierarchical_cache=True,
                                                        hicache_ratio=args.hicache_ratio))):
        if args.only not in (None, name):
            continue
        with Engine(args.model_path, **common, **extra) as engine:
            run(engine, argparse.Namespace(**{**vars(args), "chats": 2, "turns": 1}))  # warm up
            results[name] = r = run(engine, args)
        print(json.dumps({"config": name, **{k: v for k, v in r.items() if k != "outputs"},
                          "backend": jax.default_backend(), "machine": platform.processor() or platform.machine()}),
              flush=True)
    if len(results) == 2:
        a, b = results["without"], results["with"]
        fewer = a["prefill_tokens_computed"] / max(b["prefill_tokens_computed"], 1)
        print(json.dumps({"same_outputs": a["outputs"] == b["outputs"], "prefill_reduction": round(fewer, 2),
                          "throughput_ratio": round(b["total_tok_per_s"] / a["total_tok_per_s"], 2)}), flush=True)


if __name__ == "__main__":
    main()
