"""Overlap scheduling on and off: host time per decode step and the device's idle gap between steps.

    python scripts/bench_overlap.py                                  # the embedded model on CPU
    python scripts/bench_overlap.py --model-path scripts/configs/llama-3.1-8b --load-format dummy \\
        --running 64 --input-len 512 --output-len 256               # a GPU

One engine runs the same decode-heavy workload (random prompts, ignore_eos) with overlap on and
off (the engine's `overlap` switch, flipped while idle), after a warm-up run. From the engine's
stats: output tokens/s, wall ms per decode step, host ms per decode step (scheduling, batch
building and reading results, not the dispatch call: `decode_host_seconds`), and the exposed gap per decode
step (`decode_gap_seconds`: device idle time between consecutive steps as the host saw it, an
upper bound resolved to the host's phases).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxradix import Engine, SamplingParams

STATS = ("decode_steps", "decode_host_seconds", "decode_gap_seconds", "generated_tokens", "overlapped_steps")


def measure(engine: Engine, prompts: list[list[int]], out_len: int) -> dict[str, float]:
    engine.flush_cache()
    before = {k: engine.stats[k] for k in STATS}
    sp = SamplingParams(temperature=0, max_new_tokens=out_len, ignore_eos=True)
    t = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=sp)
    wall = time.perf_counter() - t
    d = {k: engine.stats[k] - before[k] for k in STATS}
    steps = max(d["decode_steps"], 1)
    return {"output tok/s": d["generated_tokens"] / wall, "decode steps": d["decode_steps"],
            "wall ms/step": 1e3 * wall / steps, "host ms/decode step": 1e3 * d["decode_host_seconds"] / steps,
            "gap ms/decode step": 1e3 * d["decode_gap_seconds"] / steps,
            "overlapped steps": d["overlapped_steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--running", type=int, default=16, help="requests decoding at once")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-total-tokens", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="alternate off/on this many times (noisy machines)")
    args = ap.parse_args()
    engine = Engine(args.model_path, load_format=args.load_format, max_running_requests=args.running,
                    max_total_tokens=args.max_total_tokens, log_level="warning")
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, engine.model_config.vocab_size - 1, (args.running, args.input_len)).tolist()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), model {engine.loaded.source}, "
          f"{args.running} running, input {args.input_len}, output {args.output_len}")
    measure(engine, prompts, 4)  # warm-up
    rows = {}
    for i in range(args.repeat):
        for overlap in (False, True) if i % 2 == 0 else (True, False):
            engine.overlap = overlap
            name = ("overlap on" if overlap else "overlap off") + (f" ({i + 1})" if args.repeat > 1 else "")
            rows[name] = measure(engine, prompts, args.output_len)
    keys = list(next(iter(rows.values())))
    print("\n| | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    engine.shutdown()


if __name__ == "__main__":
    main()
