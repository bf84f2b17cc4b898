"""Load time of the embedded model from its GGUF vs from its orbax checkpoint, and single-request
greedy decode speed.

    python scripts/bench_load.py
"""

from __future__ import annotations

import platform
import tempfile
import time

import jax

from jaxradix import Engine, SamplingParams
from jaxradix.models import gguf_file
from jaxradix.models.loader import load_model, save_orbax


def main() -> None:
    print(f"# on {jax.default_backend()} ({platform.processor() or platform.machine()})")
    gguf_times = []
    for _ in range(2):
        gguf_file._cached_reader.cache_clear()  # measure the whole parse, not the in-process cache
        gguf_times.append(load_model(None, progress=False).load_seconds)
    with tempfile.TemporaryDirectory() as d:
        save_orbax(load_model(None, progress=False), d + "/ckpt")
        orbax_times = [load_model(d + "/ckpt").load_seconds for _ in range(2)]
    engine = Engine(None, max_running_requests=1, chunked_prefill_size=64, max_total_tokens=4096,
                    context_length=1024, log_level="warning")
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


if __name__ == "__main__":
    main()
