"""Offline engine benchmarks: what the radix cache buys, on the embedded model by default.

    python scripts/bench_offline.py                      # every part, CPU-sized defaults
    python scripts/bench_offline.py --parts shared,concurrency --num-requests 64 --system-len 1024

Parts:
  shared       64 requests = one shared system prompt + unique questions; radix vs --disable-radix-cache:
               prefill tokens computed, throughput, mean TTFT, hit rate.
  concurrency  the seed article's table on a fixed KV pool: the most requests held at once without
               retraction, throughput, and mean latency at concurrency 32, radix vs no radix; with
               --kv-dtypes, for each KV cache dtype, and with --pool-bytes the pool is a fixed number of
               bytes (so a quantized dtype holds more tokens in it) instead of --pool-tokens.
  overhead     host time per decode step (scheduling + batch building) at 64 running requests.
  naive        one request at a time with no cache vs the batched radix engine: throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import numpy as np

from jaxradix import Engine, SamplingParams
from jaxradix.cache.page_pool import kv_bytes_per_token, kv_dtype


def shared_prefix_prompts(engine: Engine, n: int, system_len: int, q_min: int, q_max: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    vocab = engine.tokenizer.vocab_size if engine.tokenizer else engine.model_config.vocab_size
    low = 100  # skip the special tokens at the start of the vocabulary
    system = rng.integers(low, vocab - 1, system_len).tolist()
    return [system + rng.integers(low, vocab - 1, int(rng.integers(q_min, q_max + 1))).tolist() for _ in range(n)]


def run(engine: Engine, prompts: list, out_len: int) -> dict:
    engine.flush_cache()
    for k in ("prefill_tokens", "max_running", "retractions", "generated_tokens", "decode_steps",
              "decode_host_seconds"):
        engine.stats[k] = 0 if k != "decode_host_seconds" else 0.0
    sp = SamplingParams(temperature=0, max_new_tokens=out_len, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=sp)
    wall = time.perf_counter() - start
    metas = [o["meta_info"] for o in outs]
    prompt_tokens = sum(m["prompt_tokens"] for m in metas)
    cached = sum(m["cached_tokens"] for m in metas)
    out_tokens = sum(m["completion_tokens"] for m in metas)
    engine.check_integrity()
    return {
        "requests": len(prompts), "wall_s": wall, "req_per_s": len(prompts) / wall,
        "total_tok_per_s": (prompt_tokens + out_tokens) / wall, "output_tok_per_s": out_tokens / wall,
        "prefill_tokens_computed": engine.stats["prefill_tokens"], "hit_rate": cached / prompt_tokens,
        "mean_ttft_s": float(np.mean([m["ttft"] for m in metas])),
        "mean_latency_s": float(np.mean([m["e2e_latency"] for m in metas])),
        "max_running": engine.stats["max_running"], "retractions": engine.stats["retractions"],
        "host_ms_per_decode_step": 1e3 * engine.stats["decode_host_seconds"] / max(engine.stats["decode_steps"], 1),
        "outputs": [o["output_ids"] for o in outs],
    }


class Report(list):
    """Prints each part as soon as it is measured."""

    def append(self, text: str) -> None:
        super().append(text)
        print(text, flush=True)


def table(title: str, rows: dict[str, dict], keys: list[str]) -> str:
    lines = [f"\n## {title}", "", "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--parts", default="shared,concurrency,overhead,naive")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--question-len", default="32,64")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--pool-tokens", type=int, default=16384, help="the fixed KV pool of the concurrency part")
    ap.add_argument("--chunked-prefill-size", type=int, default=512)
    ap.add_argument("--naive-requests", type=int, default=8)
    ap.add_argument("--concurrency-requests", type=int, default=128)
    ap.add_argument("--concurrency-system-len", type=int, default=None, help="default: --system-len")
    ap.add_argument("--kv-dtypes", default="auto", help="concurrency: comma-separated --kv-cache-dtype values")
    ap.add_argument("--pool-bytes", type=float, default=None,
                    help="concurrency: a fixed KV pool in bytes for every dtype (default: --pool-tokens tokens)")
    ap.add_argument("--concurrency-latency", action=argparse.BooleanOptionalAction, default=True,
                    help="concurrency: also measure mean latency at concurrency 32 (one more engine per row)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    parts = args.parts.split(",")
    q_min, q_max = map(int, args.question_len.split(","))
    common = dict(chunked_prefill_size=args.chunked_prefill_size, context_length=args.system_len + q_max +
                  args.output_len + 64, log_level="warning")
    print(f"# jaxradix offline benchmark on {jax.default_backend()} ({jax.devices()[0].device_kind}, "
          f"{platform.processor() or platform.machine()}), model {args.model_path or 'embedded SmolLM2-135M'}")
    results: dict = {}
    report = Report()

    if "shared" in parts:
        rows = {}
        for radix in (True, False):
            e = Engine(args.model_path, max_running_requests=64, max_total_tokens=args.pool_tokens * 4,
                       disable_radix_cache=not radix, **common)
            prompts = shared_prefix_prompts(e, args.num_requests, args.system_len, q_min, q_max)
            rows["radix" if radix else "no radix"] = run(e, prompts, args.output_len)
            e.shutdown()
        if rows:
            assert rows["radix"]["outputs"] == rows["no radix"]["outputs"], "radix changed greedy outputs"
            rows["ratio"] = {k: rows["radix"][k] / rows["no radix"][k] for k in
                             ("total_tok_per_s", "prefill_tokens_computed", "mean_ttft_s", "hit_rate")
                             if rows["no radix"][k]}
            report.append(table(f"Shared prefix: {args.num_requests} requests x ({args.system_len} shared + "
                                f"{q_min}-{q_max} unique tokens), {args.output_len} output tokens",
                                {k: v for k, v in rows.items() if k != "ratio"},
                                ["prefill_tokens_computed", "total_tok_per_s", "mean_ttft_s", "hit_rate", "wall_s"]))
            report.append("\nradix / no radix: " + ", ".join(f"{k} {v:.2f}x" for k, v in rows["ratio"].items()))
            results["shared"] = {k: {kk: vv for kk, vv in v.items() if kk != "outputs"} for k, v in rows.items()}

    if "concurrency" in parts:
        rows = {}
        system_len = args.concurrency_system_len or args.system_len
        dtypes = args.kv_dtypes.split(",")
        per_token = {}  # KV bytes per token of each dtype, for --pool-bytes
        if args.pool_bytes is not None:
            from jaxradix.models.loader import load_model

            loaded = load_model(args.model_path)
            per_token = {d: kv_bytes_per_token(loaded.config, kv_dtype(d, loaded.model.dtype)) for d in dtypes}
            del loaded
        for dtype_name in dtypes:
            tokens = args.pool_tokens if args.pool_bytes is None else int(args.pool_bytes // per_token[dtype_name])
            for radix in (True, False):
                name = ("radix" if radix else "no radix") + ("" if dtypes == ["auto"] else f", {dtype_name} KV")
                row: dict = {}
                for cap in (128, 32) if args.concurrency_latency else (128,):
                    cap = min(cap, args.concurrency_requests)
                    e = Engine(args.model_path, max_running_requests=cap, max_total_tokens=tokens,
                               kv_cache_dtype=dtype_name, disable_radix_cache=not radix, new_token_ratio=1.0,
                               min_new_token_ratio=1.0, **common)
                    n = args.concurrency_requests if len(row) == 0 else min(args.concurrency_requests, 64)
                    prompts = shared_prefix_prompts(e, n, system_len, q_min, q_max)
                    r = run(e, prompts, args.output_len)
                    if not row:
                        row |= {"kv_dtype": e.memory.kv_dtype, "pool_tokens": e.memory.kv_tokens,
                                "pool_MB": e.memory.kv_bytes / 1e6,
                                "tokens_per_GB": e.memory.kv_tokens / (e.memory.kv_bytes / 1e9),
                                "max_concurrent_requests": r["max_running"], "retractions": r["retractions"],
                                "output_tok_per_s": r["output_tok_per_s"], "total_tok_per_s": r["total_tok_per_s"],
                                "outputs": r["outputs"]}
                    else:
                        row["mean_latency_s_at_32"] = r["mean_latency_s"]
                    e.shutdown()
                rows[name] = row
                print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items() if k != "outputs"), flush=True)
        first = {radix: next(r["outputs"] for k, r in rows.items() if k.startswith(radix))
                 for radix in ("radix", "no radix")}
        for name, row in rows.items():  # greedy agreement with the first dtype's run, position by position
            ref = first["radix" if name.startswith("radix") else "no radix"]
            same = [a == b for x, y in zip(row.pop("outputs"), ref, strict=True) for a, b in zip(x, y, strict=True)]
            row["greedy_tokens_same_as_first"] = sum(same) / len(same)
        keys = ["pool_tokens", "pool_MB", "tokens_per_GB", "max_concurrent_requests", "retractions",
                "output_tok_per_s", "total_tok_per_s", "greedy_tokens_same_as_first"]
        if args.concurrency_latency:
            keys.append("mean_latency_s_at_32")
        pool = f"{args.pool_bytes / 1e6:.1f} MB" if args.pool_bytes is not None else f"{args.pool_tokens} tokens"
        report.append(table(f"Fixed KV pool of {pool}, {args.concurrency_requests} requests with a {system_len}-token "
                            f"shared prefix: concurrency without retraction (admission reserves the full output)",
                            rows, keys))
        if len(dtypes) > 1:
            base, best = rows[f"no radix, {dtypes[0]} KV"], rows[f"radix, {dtypes[-1]} KV"]
            report.append(f"\n{dtypes[-1]} KV vs {dtypes[0]} KV: {best['tokens_per_GB'] / base['tokens_per_GB']:.2f}x "
                          f"tokens per GB; {dtypes[-1]} KV + radix vs {dtypes[0]} KV without radix: "
                          f"{best['max_concurrent_requests'] / base['max_concurrent_requests']:.2f}x concurrency")
        results["concurrency"] = rows

    if "overhead" in parts:
        e = Engine(args.model_path, max_running_requests=64, max_total_tokens=65536, **common)
        prompts = shared_prefix_prompts(e, 64, 64, 8, 16)
        r = run(e, prompts, 64)
        e.shutdown()
        report.append(f"\n## Host overhead\n\nscheduling + batch building per decode step at 64 running requests: "
                      f"{r['host_ms_per_decode_step']:.3f} ms (target <= 2 ms)")
        results["overhead_ms"] = r["host_ms_per_decode_step"]

    if "naive" in parts:
        n = args.naive_requests
        e = Engine(args.model_path, max_running_requests=1, disable_radix_cache=True, max_total_tokens=8192,
                   **common)
        prompts = shared_prefix_prompts(e, n, args.system_len, q_min, q_max)
        start = time.perf_counter()
        naive_out = [e.generate(input_ids=p, sampling_params=SamplingParams(
            temperature=0, max_new_tokens=args.output_len, ignore_eos=True))["output_ids"] for p in prompts]
        naive_wall = time.perf_counter() - start
        e.shutdown()
        e = Engine(args.model_path, max_running_requests=64, max_total_tokens=65536, **common)
        r = run(e, prompts, args.output_len)
        e.shutdown()
        assert r["outputs"] == naive_out, "batched radix engine changed greedy outputs"
        report.append(f"\n## Against a naive baseline\n\n{n} shared-prefix requests: one at a time without cache "
                      f"{naive_wall:.1f} s, jaxradix (batched, radix) {r['wall_s']:.1f} s: "
                      f"{naive_wall / r['wall_s']:.2f}x throughput")
        results["naive"] = {"naive_s": naive_wall, "jaxradix_s": r["wall_s"], "ratio": naive_wall / r["wall_s"]}

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
