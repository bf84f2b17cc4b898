"""Sampler micro-benchmark: ms per call of each top-k/top-p/min-p cut and of the whole sampler.

    python scripts/bench_sampler.py                      # B=64, V=128256 (Llama-3 vocab) on the default device
    python scripts/bench_sampler.py --batch 8 --vocab 49152 --iters 5   # a quick CPU run

Each cut is checked against the full sort (rows whose kept set differs are counted). Candidates:
`sort` (a full sort over V: what the sampler did before), `search-W` (the sampler's exact threshold
search, W thresholds per pass over [B, V]), `top_k-K` and `approx_max_k-K` (a bounded prefix of K
candidates, sorted: inexact whenever a row keeps more than K tokens, e.g. top_p = 0.95 on a flat
distribution). Then `sample()` end to end for greedy, plain temperature, filtered and penalized
batches, fused (optional parts behind lax.cond: a host sync each on a GPU) and split (a SamplerPlan
decided on the host, no control flow), each timed per call (dispatch, wait) and per call of 10 dispatched
back to back (what a pipelined engine sees: a sync stalls the dispatching thread there).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.engine.sampler import (
    SamplerPlan,
    SamplerState,
    SamplingMetadata,
    filter_logits,
    filter_logits_sorted,
    sample,
)


def prefix_filter(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array, K: int,
                  approx: bool) -> jax.Array:
    """The cut computed on the K largest values only (a bounded prefix)."""
    vals = jax.lax.approx_max_k(scaled, K)[0] if approx else jax.lax.top_k(scaled, K)[0]  # [B, K] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, K), K)
    kth = jnp.take_along_axis(vals, (k - 1)[:, None], axis=-1)
    lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)  # the mass is that of the whole distribution
    probs = jnp.exp(vals - lse)
    before = jnp.cumsum(probs, axis=-1) - probs
    p_cut = jnp.min(jnp.where(before < top_p[:, None], vals, jnp.inf), axis=-1, keepdims=True)
    p_cut = jnp.where(top_p[:, None] < 1, p_cut, -jnp.inf)
    cut = jnp.maximum(jnp.maximum(kth, p_cut), vals[:, :1] + jnp.log(min_p[:, None]))
    return jnp.where(scaled >= cut, scaled, -jnp.inf)


def timeit(fn: Callable[..., Any], args: tuple, iters: int, chain: int = 1) -> float:
    """Median ms per call; chain > 1: per call of `chain` calls dispatched back to back, then one wait."""
    jax.block_until_ready(fn(*args))  # compile + warm
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        outs = [fn(*args) for _ in range(chain)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t) / chain)
    return 1e3 * float(np.median(times))


def metadata(B: int, V: int, temperature: float, top_k: int, top_p: float, min_p: float, penalty: bool,
             rng: np.random.Generator) -> SamplingMetadata:
    f = lambda v: jnp.full(B, v, jnp.float32)  # noqa: E731
    return SamplingMetadata(
        temperature=f(temperature), top_p=f(top_p), top_k=jnp.full(B, top_k, jnp.int32), min_p=f(min_p),
        frequency_penalty=f(0.5 if penalty else 0.0), presence_penalty=f(0.0),
        repetition_penalty=f(1.2 if penalty else 1.0), seed=jnp.asarray(rng.integers(0, 1 << 31, B), jnp.uint32),
        step=jnp.zeros(B, jnp.int32), slot=jnp.arange(B, dtype=jnp.int32), use_state=jnp.full(B, penalty),
        keep=jnp.ones(B, bool), grammar_mask=jnp.full((B, (V + 31) // 32), 0xFFFFFFFF, jnp.uint32),
        needs_filter=jnp.array(temperature > 0 and (top_k > 0 or top_p < 1 or min_p > 0)),
        needs_top_logprobs=jnp.array(False), needs_state=jnp.array(penalty))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--prefix", type=int, default=256, help="K of the bounded-prefix candidates")
    args = ap.parse_args()
    B, V, K = args.batch, args.vocab, args.prefix
    rng = np.random.default_rng(0)
    # logits shaped like a model's: a few likely tokens over a long tail
    logits = jnp.asarray(rng.standard_normal((B, V)).astype(np.float32) * 2.0
                         + 8.0 * (rng.random((B, V)) < 20 / V))
    top_k = jnp.asarray(np.where(np.arange(B) % 2 == 0, 50, 0), jnp.int32)
    top_p = jnp.asarray(np.where(np.arange(B) % 3 == 0, 1.0, 0.9), jnp.float32)
    min_p = jnp.asarray(np.where(np.arange(B) % 4 == 0, 0.05, 0.0), jnp.float32)
    fargs = (logits, top_k, top_p, min_p)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), B={B}, V={V}, jax {jax.__version__}")
    ref = np.isfinite(np.asarray(jax.jit(filter_logits_sorted)(*fargs)))
    cands: dict[str, Callable[..., Any]] = {"sort": filter_logits_sorted}
    for w in (4, 16, 32):
        cands[f"search-{w}"] = lambda *a, w=w: filter_logits(*a, ways=w)
    cands[f"top_k-{K}"] = lambda *a: prefix_filter(*a, K=K, approx=False)
    cands[f"approx_max_k-{K}"] = lambda *a: prefix_filter(*a, K=K, approx=True)
    print(f"{'cut':<20} {'ms/call':>9} {'rows differing from sort':>26}")
    for name, fn in cands.items():
        jf = jax.jit(fn)
        ms = timeit(jf, fargs, args.iters)
        differ = int((np.isfinite(np.asarray(jf(*fargs))) != ref).any(axis=1).sum())
        print(f"{name:<20} {ms:9.3f} {differ:>26}")

    state = SamplerState.zeros(B, V)
    fused = jax.jit(sample)
    split = jax.jit(sample, static_argnums=3)
    print(f"\n{'sample() batch':<50} {'fused ms':>9} {'split ms':>9} {'fused x10':>9} {'split x10':>9}")
    for name, kw in [("greedy", dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, penalty=False)),
                     ("temperature 0.8, no filter", dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0,
                                                         penalty=False)),
                     ("temperature 0.8, top_p 0.9", dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0,
                                                         penalty=False)),
                     ("temperature 0.8, top_k 50, top_p 0.9, min_p 0.05",
                      dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, penalty=False)),
                     ("greedy + penalties", dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, penalty=True))]:
        md = metadata(B, V, rng=rng, **kw)
        plan = SamplerPlan.of(md)
        f_args, s_args = (logits, md, state), (logits, md, state, plan)
        ms = [timeit(fused, f_args, args.iters), timeit(split, s_args, args.iters),
              timeit(fused, f_args, args.iters, chain=10), timeit(split, s_args, args.iters, chain=10)]
        print(f"{name:<50} " + " ".join(f"{m:9.3f}" for m in ms), flush=True)


if __name__ == "__main__":
    main()
