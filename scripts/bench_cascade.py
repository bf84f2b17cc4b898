"""The gathered attention path (CPU, pre-Hopper GPUs) with and without its cascade over a shared prefix.

    python scripts/bench_cascade.py                  # SmolLM2-135M shapes, 30 layers chained per call
    python scripts/bench_cascade.py --layers 8 --repeats 5

Batches (page 16, KH 3, NH 9, D 64, f32 pool; one jitted call runs `--layers` layers, as a step does):
  decode 48 x 466-497   48 decode rows whose first 448 tokens (28 pages) are one shared system prompt
  extend 21 x 16-32     21 questions of 16-32 new tokens after the same 448 cached tokens (a prefill chunk)
  prefill 1 x 512       one uncached 512-token prompt (nothing to share: the tiles alone)
  extend 1 x 512+1536   512 new tokens after 1,536 cached ones of the same row

Columns (ms per call):
  before    the gathered path as it was: 128-token q tiles, 512-token kv blocks, 128-token decode blocks
  tiles     the CPU tile sizes (pallas_kernels.CPU_GATHERED_TILES: short rows in their own small tiles)
  cascade   the same with the shared prefix marked in the metadata (engine/batch.shared_prefix), so
            the rows that share it read it once for all their tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.engine.batch import shared_prefix
from jaxradix.pallas_kernels import CPU_GATHERED_TILES
from jaxradix.pallas_kernels.gathered import ragged_paged_attention_gathered
from jaxradix.pallas_kernels.metadata import AttentionMetadata

S, KH, G, D = 16, 3, 3, 64
BEFORE = dict(q_tile=128, kv_block_tokens=512, decode_block_tokens=128)


def batch(rows: list[tuple[int, int]], shared_tokens: int, T: int, B: int, MP: int,
          rng: np.random.Generator) -> tuple[jax.Array, AttentionMetadata, AttentionMetadata]:
    """rows: (new tokens, kv length) per live row; the first shared_tokens of every row are the same
    pages. Returns q [T, NH, D], the metadata without and with the shared prefix marked."""
    shared = list(range(1, 1 + shared_tokens // S))
    nxt = 1 + len(shared)
    page_table = np.zeros((B, MP), np.int32)
    kv_lens = np.zeros(B, np.int32)
    cu = np.zeros(B + 1, np.int32)
    for b, (n, kv_len) in enumerate(rows):
        pages = -(-kv_len // S)
        own = list(range(nxt, nxt + pages - len(shared)))
        nxt += len(own)
        page_table[b, :pages] = shared + own
        kv_lens[b] = kv_len
        cu[b + 1] = cu[b] + n
    cu[len(rows) + 1:] = cu[len(rows)]
    md = AttentionMetadata(jnp.asarray(cu), jnp.asarray(kv_lens), jnp.asarray(page_table),
                           jnp.asarray([len(rows)], jnp.int32))
    found = shared_prefix(page_table, kv_lens - (cu[1:] - cu[:-1]), S, len(rows))
    md_shared = dataclasses.replace(md, shared_pages=jnp.asarray(found.pages), shared_lens=jnp.asarray(found.lens))
    q = jnp.asarray(rng.standard_normal((T, KH * G, D), dtype=np.float32))
    return q, md, md_shared


def time_call(q: jax.Array, pool: jax.Array, md: AttentionMetadata, layers: int, repeats: int, **tiles) -> float:
    fn = jax.jit(lambda q, pool, md: sum(
        ragged_paged_attention_gathered(q + 1e-3 * i, pool, md, sm_scale=D**-0.5, **tiles).sum()
        for i in range(layers)))
    fn(q, pool, md).block_until_ready()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(q, pool, md).block_until_ready()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.standard_normal((1200, S, 2 * KH, D), dtype=np.float32))
    cases = {
        "decode 48 x 466-497": batch([(1, 466 + b % 32) for b in range(48)], 448, 64, 64, 68, rng),
        "extend 21 x 16-32": batch([(16 + b % 17, 448 + 16 + b % 17) for b in range(21)], 448, 512, 64, 68, rng),
        "prefill 1 x 512": batch([(512, 512)], 0, 512, 64, 128, rng),
        "extend 1 x 512+1536": batch([(512, 2048)], 0, 512, 64, 128, rng),
    }
    print(f"# gathered attention, {args.layers} layers per call, median of {args.repeats}; jax {jax.__version__}, "
          f"{jax.devices()[0].device_kind} ({platform.machine()})")
    print("| batch | before ms | tiles ms | cascade ms | before / cascade |")
    print("|---|---|---|---|---|")
    for name, (q, md, md_shared) in cases.items():
        before = time_call(q, pool, md, args.layers, args.repeats, **BEFORE)
        tiles = time_call(q, pool, md, args.layers, args.repeats, **CPU_GATHERED_TILES)
        cascade = time_call(q, pool, md_shared, args.layers, args.repeats, **CPU_GATHERED_TILES)
        print(f"| {name} | {before * 1e3:.1f} | {tiles * 1e3:.1f} | {cascade * 1e3:.1f} | {before / cascade:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
