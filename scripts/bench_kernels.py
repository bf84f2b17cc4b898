"""Benchmark the ragged paged attention kernels as a fraction of the machine's limits.

    python scripts/bench_kernels.py              # GPU/TPU: the real table; CPU: a tiny smoke run
    python scripts/bench_kernels.py --batch 64 --contexts 2048 8192 --page-sizes 16

Decode: batch >= 32 sequences of one new token each over 2k/4k/8k cached tokens, KH 8, D 128,
bf16. The kernel reads every live KV byte once, so its figure is (KV + Q bytes) / time, shown
as a fraction of the device-to-device copy bandwidth measured here (a 1 GiB ``jnp.copy``,
read + write). Extend: prefill rows (no cached prefix) through the kernel, in causal TFLOP/s,
next to ``jax.nn.dot_product_attention(implementation="cudnn")`` on the same q/k/v laid out
contiguously. The reference (the jnp CPU serving path) runs on the same shapes.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.pallas_kernels import get_attention
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.reference import ragged_paged_attention_blocked


@dataclass(frozen=True)
class Batch:
    q: jax.Array  # [T, NH, D]
    pool: jax.Array  # [P, S, 2*KH, D], one layer's pool
    md: AttentionMetadata
    kv_bytes: int  # live K/V bytes the attention must read
    causal_flops: float  # 4 * D * (number of unmasked q.k pairs) * NH


def make_batch(q_lens: list[int], kv_lens: list[int], *, S: int, KH: int, G: int, D: int, dtype) -> Batch:
    """Pages of each sequence scattered over the pool (a shuffled free list), page 0 reserved."""
    B = len(q_lens)
    pages = [-(-k // S) for k in kv_lens]
    MP = max(pages)
    num_pages = 1 + sum(pages)
    perm = np.random.default_rng(0).permutation(np.arange(1, num_pages)).astype(np.int32)
    page_table = np.zeros((B, MP), np.int32)
    start = 0
    for b, n in enumerate(pages):
        page_table[b, :n] = perm[start : start + n]
        start += n
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kq, kp = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (int(cu[-1]), KH * G, D), dtype)
    pool = jax.random.normal(kp, (num_pages, S, 2 * KH, D), dtype)
    md = AttentionMetadata(
        cu_q_lens=jnp.asarray(cu),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(page_table),
        num_seqs=jnp.asarray([B], jnp.int32),
    )
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = sum(kv_lens) * 2 * KH * D * itemsize
    # Query i of a row with q_len n and kv_len k sees k - n + i + 1 keys.
    pairs = sum(q * (k - q) + q * (q + 1) / 2 for q, k in zip(q_lens, kv_lens, strict=True))
    return Batch(q, pool, md, kv_bytes, 4.0 * D * pairs * KH * G)


def time_fn(fn: Callable[[], jax.Array], *, warmup: int = 2, iters: int = 10, repeats: int = 3) -> float:
    """Median seconds per call over `repeats` timed loops of `iters` calls, after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int, **timing) -> float:
    """Device-to-device copy bandwidth in bytes/s (each byte read once and written once)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(jnp.copy)  # the output may not alias the (undonated) input: XLA emits a real copy
    return 2 * x.nbytes / time_fn(lambda: copy(x), **timing)


def run_attention(attention: Callable, batch: Batch, sm_scale: float) -> Callable[[], jax.Array]:
    fn = jax.jit(functools.partial(attention, sm_scale=sm_scale))
    return lambda: fn(batch.q, batch.pool, batch.md)


def cudnn_attention(batch: Batch, q_len: int, n_seqs: int, sm_scale: float) -> Callable[[], jax.Array]:
    """dot_product_attention on the same extend rows, as contiguous [B, L, H, D] arrays."""
    T, NH, D = batch.q.shape
    KH = batch.pool.shape[2] // 2
    L = q_len
    q = batch.q.reshape(n_seqs, L, NH, D)
    kv = batch.pool[batch.md.page_table].reshape(n_seqs, -1, 2 * KH, D)[:, :L]  # gathered once, untimed
    k, v = kv[:, :, :KH], kv[:, :, KH:]
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    fn = jax.jit(
        functools.partial(jax.nn.dot_product_attention, scale=sm_scale, is_causal=True, implementation=impl)
    )
    return lambda: fn(q, k, v)


def fmt(x: float | None, spec: str, scale: float = 1.0) -> str:
    return format("n/a", f">{spec.split('.')[0]}") if x is None else format(x * scale, spec)


def try_time(make: Callable[[], Callable[[], jax.Array]], **timing) -> float | None:
    try:
        return time_fn(make(), **timing)
    except Exception as e:  # e.g. the reference running out of memory on the largest shapes
        print(f"  (skipped: {type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--page-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--extend", type=str, nargs="+", default=["4x2048", "1x8192"],
                    help="prefill rows as NxL (N sequences of L new tokens)")  # fmt: skip
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the tiny CPU configuration, on any device")
    args = ap.parse_args()

    platform = jax.default_backend()
    device = jax.devices()[0]
    smoke = args.smoke or platform == "cpu"
    if smoke:
        # Interpret mode on CPU: correctness of the benchmark plumbing only, not speed.
        args.batch, args.contexts, args.page_sizes, args.extend = 2, [64], [16], ["1x64"]
        args.kv_heads, args.q_heads, args.head_dim = 2, 4, 64
        timing = dict(warmup=1, iters=1, repeats=1)
        kernels = {"pallas-tpu(interpret)": get_attention("pallas", interpret="tpu"),
                   "pallas-gpu(interpret)": get_attention("pallas", interpret="gpu")}  # fmt: skip
    else:
        timing = {}
        kernels = {"pallas": get_attention("pallas")}
    ref_timing = dict(warmup=1, iters=2, repeats=1) if not smoke else timing  # the reference is slow
    KH, G, D = args.kv_heads, args.q_heads // args.kv_heads, args.head_dim
    dtype = jnp.bfloat16
    sm_scale = D**-0.5

    print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}")
    copy_bw = copy_bandwidth((1 << 20) if smoke else (1 << 30), **timing)
    print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")

    print(f"\ndecode: batch {args.batch}, KH {KH}, NH {KH * G}, D {D}, bf16")
    print(f"{'impl':<24}{'page':>6}{'ctx':>7}{'time us':>10}{'GB/s':>9}{'of copy':>9}")
    for S in args.page_sizes:
        for ctx in args.contexts:
            batch = make_batch([1] * args.batch, [ctx] * args.batch, S=S, KH=KH, G=G, D=D, dtype=dtype)
            nbytes = batch.kv_bytes + batch.q.nbytes
            impls = dict(kernels)
            if not args.no_reference:
                impls["reference"] = ragged_paged_attention_blocked
            for name, attention in impls.items():
                how = ref_timing if name == "reference" else timing
                t = try_time(functools.partial(run_attention, attention, batch, sm_scale), **how)
                bw = None if t is None else nbytes / t
                frac = None if bw is None else bw / copy_bw
                print(f"{name:<24}{S:>6}{ctx:>7}{fmt(t, '10.1f', 1e6)}{fmt(bw, '9.1f', 1e-9)}{fmt(frac, '9.1%')}")

    print(f"\nextend (prefill, causal): KH {KH}, NH {KH * G}, D {D}, bf16, page {args.page_sizes[0]}")
    print(f"{'impl':<24}{'rows':>10}{'time us':>10}{'TFLOP/s':>9}")
    for spec in args.extend:
        n, L = map(int, spec.split("x"))
        batch = make_batch([L] * n, [L] * n, S=args.page_sizes[0], KH=KH, G=G, D=D, dtype=dtype)
        impls = {name: functools.partial(run_attention, a, batch, sm_scale) for name, a in kernels.items()}
        impls["cudnn" if platform == "gpu" else "dot_product_attention"] = functools.partial(
            cudnn_attention, batch, L, n, sm_scale
        )
        if not args.no_reference:
            reference = ragged_paged_attention_blocked
            impls["reference"] = functools.partial(run_attention, reference, batch, sm_scale)
        for name, make in impls.items():
            t = try_time(make, **(ref_timing if name == "reference" else timing))
            tflops = None if t is None else batch.causal_flops / t / 1e12
            print(f"{name:<24}{spec:>10}{fmt(t, '10.1f', 1e6)}{fmt(tflops, '9.2f')}")

    if smoke:
        print("\nsmoke run (tiny shapes, kernels interpreted on CPU): the figures above say nothing about "
              "speed; real figures need a GPU (or TPU).")  # fmt: skip


if __name__ == "__main__":
    main()
