"""Decode step device time against its memory roofline, per batch, decode bucket and quantization.

A short device check (no bucket is compiled but the ones timed): for each configuration (weights
quantization x KV cache dtype) one engine with dummy weights, and for each batch the bare compiled
decode step timed back to back (bench_step.device_step_seconds), in the bucket the engine picks and,
for batches under 8, also in an 8-row bucket (the GPU default, engine.decode_min_rows) and a 1-row one.

    python scripts/bench_decode.py --model-path scripts/configs/llama-3.1-8b --load-format dummy \\
        --batches 1,8,64 --configs none/auto,int8/auto,none/fp8_e4m3
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import tempfile
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import copy_bandwidth, device_step_seconds, step_bytes  # noqa: E402

from jaxradix import Engine  # noqa: E402
from jaxradix.engine.batch import Buckets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M GGUF")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--configs", default="none/auto", help="comma list of QUANTIZATION/KV_CACHE_DTYPE")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth(args.copy_mib)
    dev = jax.devices()[0]
    print(f"# decode step on {jax.default_backend()} ({dev.device_kind}; {platform.processor() or platform.machine()}),"
          f" jax {jax.__version__}, copy bandwidth {bw / 1e9:.1f} GB/s, context {args.context}", flush=True)
    print("\n| weights / KV | batch | bucket rows | device ms | roofline ms | ratio | tok/s |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    cache = tempfile.mkdtemp(prefix="jaxradix-bench-decode-")
    for config in args.configs.split(","):
        quant, kv_dtype = config.split("/")
        kw = dict(load_format=args.load_format, max_running_requests=max(batches), precompile=False,
                  context_length=args.context + 16, max_total_tokens=(max(batches) + 1) * (args.context + 64),
                  kv_cache_dtype=kv_dtype, compilation_cache_dir=cache, log_level="warning")
        if quant != "none":
            kw["quantization"] = quant
        try:
            engine = Engine(args.model_path, **kw)
        except (TypeError, ValueError) as e:
            print(f"| {config} | - | - | not run: {str(e)[:100]} | | | |", flush=True)
            continue
        chunk = engine.buckets.token_sizes[-1]
        for b in batches:
            rows_options = sorted({1, 8} | {engine.buckets.pick(b, b).rows}) if b < 8 else [None]
            for min_rows in rows_options:
                if min_rows is not None:
                    engine.buckets = Buckets(max(batches), chunk, min_rows=min_rows)
                rows = engine.buckets.pick(b, b).rows
                if min_rows is not None and rows < b:
                    continue
                dev_s = device_step_seconds(engine, b, args.context, iters=args.iters)
                floor = step_bytes(engine, b, args.context) / bw
                print(f"| {config} | {b} | {rows} | {dev_s * 1e3:.2f} | {floor * 1e3:.2f} | {dev_s / floor:.2f}x | "
                      f"{b / dev_s:.0f} |", flush=True)
        engine.shutdown()
        del engine
        gc.collect()


if __name__ == "__main__":
    main()
