"""Benchmark the ragged paged attention paths as a fraction of the machine's limits.

    python scripts/bench_kernels.py                 # GPU: the two tables below; CPU: gathered vs reference
    python scripts/bench_kernels.py --batches 64 --contexts 2048 8192 --page-sizes 16
    python scripts/bench_kernels.py --sweep         # GPU: kv splits x ring depth at a few shapes
    python scripts/bench_kernels.py --smoke         # the kernels interpreted on tiny shapes (plumbing only)
    python scripts/bench_kernels.py --parts decode --kv-dtype bfloat16 fp8_e4m3 int8   # quantized KV pools

Decode: batches of sequences with one new token each over 1k-8k cached tokens, KH 8, D 128,
bf16. Attention reads every live KV byte once, so its figure is (KV + Q bytes) / time, shown as
a fraction of the device-to-device copy bandwidth measured here (a 1 GiB ``jnp.copy``, read +
write). Extend: prefill rows ("NxL": N sequences of L new tokens; "NxL+P": after P cached
tokens) in causal TFLOP/s, next to ``jax.nn.dot_product_attention`` (cuDNN on a GPU) on the
same q/k/v laid out contiguously (no prefix). Rows: "pallas-v2" (the Mosaic GPU kernel, or the
TPU kernel), "pallas-v1" (the GPU kernel as first measured, ``--variants``), "triton" (the Triton
kernel that A100/A10/L4 serve with; timed on any NVIDIA GPU, ``--no-triton`` leaves it out),
"gathered" (the per-sequence gather path of T4 and CPU; on a GPU its extend tiles use cuDNN),
"reference" (the per-token gather, ``--reference``). The GPU kernel's plan (tiles, kv
splits NS, pages per kv block PB, ring slots R, resident CTAs per SM) is printed per shape.

``--kv-dtype`` (one or more of bfloat16, float32, fp8_e4m3, fp8_e5m2, int8; default: ``--dtype``)
times each shape on each pool dtype, side by side. A quantized pool (``QuantizedKV``) counts the bytes
it really reads: 1-byte values plus a bf16 scale per token and head (D + 2 bytes per token and head
against 2D for bf16); its max|err| is taken against the gathered path on the dequantized pool.

On CPU (no flags): the gathered path against the reference at SmolLM2-135M's attention shapes
(KH 3, NH 9, D 64, f32), the CPU serving configuration.
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
from jaxradix.pallas_kernels.quantized_kv import (
    QUANTIZED_KV_DTYPES,
    QuantizedKV,
    bytes_per_token_head,
    dequantize_kv,
    quantize,
)
from jaxradix.pallas_kernels.reference import ragged_paged_attention_blocked


@dataclass(frozen=True)
class Batch:
    q: jax.Array  # [T, NH, D]
    pool: jax.Array | QuantizedKV  # [P, S, 2*KH, D], one layer's pool
    md: AttentionMetadata
    kv_bytes: int  # live K/V bytes the attention must read
    causal_flops: float  # 4 * D * (number of unmasked q.k pairs) * NH


def make_batch(
    q_lens: list[int], kv_lens: list[int], *, S: int, KH: int, G: int, D: int, dtype, kv_dtype: str | None = None
) -> Batch:
    """Pages of each sequence scattered over the pool (a shuffled free list), page 0 reserved;
    `kv_dtype` (a --kv-dtype name) quantizes the pool or casts it (default: `dtype`)."""
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
    if kv_dtype in QUANTIZED_KV_DTYPES:
        pool = QuantizedKV(*quantize(pool, QUANTIZED_KV_DTYPES[kv_dtype]))
    elif kv_dtype is not None:
        pool = pool.astype(kv_dtype)
    md = AttentionMetadata(
        cu_q_lens=jnp.asarray(cu),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(page_table),
        num_seqs=jnp.asarray([B], jnp.int32),
    )
    kv_bytes = sum(kv_lens) * 2 * KH * bytes_per_token_head(D, pool.dtype)
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


def run_attention(attention: Callable, batch: Batch, sm_scale: float, layers: int = 1) -> Callable[[], jax.Array]:
    """One jitted call; `layers` > 1: that many calls chained in one jit (each call's output is the
    next one's queries, as layers in the model step), so host dispatch is paid once, not per call."""
    if layers == 1:
        fn = jax.jit(functools.partial(attention, sm_scale=sm_scale))
    else:

        def chained(q, pool, md):
            for _ in range(layers):  # unrolled, like the step's layer loop
                q = attention(q, pool, md, sm_scale=sm_scale)
            return q

        fn = jax.jit(chained)
    return lambda: fn(batch.q, batch.pool, batch.md)


def cudnn_attention(batch: Batch, q_len: int, n_seqs: int, sm_scale: float) -> Callable[[], jax.Array]:
    """dot_product_attention on the same extend rows, as contiguous [B, L, H, D] arrays."""
    T, NH, D = batch.q.shape
    KH = batch.pool.shape[2] // 2
    L = q_len
    q = batch.q.reshape(n_seqs, L, NH, D)
    pool = dequantize_kv(batch.pool, batch.q.dtype) if isinstance(batch.pool, QuantizedKV) else batch.pool
    kv = pool[batch.md.page_table].reshape(n_seqs, -1, 2 * KH, D)[:, :L]  # gathered once, untimed
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


# (kv block tokens, ring slots R, kv splits NS) tried by the sweep part.
SWEEP = [(64, 2, 1), (64, 2, 2), (64, 2, 4), (64, 3, 1), (64, 3, 2), (128, 2, 1), (128, 2, 2), (128, 2, 4)]


def parse_rows(spec: str) -> tuple[list[int], list[int]]:
    """ "NxL" or "NxL+P" -> (q_lens, kv_lens)."""
    rows, _, prefix = spec.partition("+")
    n, L = map(int, rows.split("x"))
    return [L] * n, [L + int(prefix or 0)] * n


def gpu_plan(batch: Batch, variant: str, **overrides) -> str:
    from jaxradix.pallas_kernels.gpu.ragged_paged_attention import plan

    T, NH, D = batch.q.shape
    _, S, KH2, _ = batch.pool.shape
    B, MP = batch.md.page_table.shape
    quantized = isinstance(batch.pool, QuantizedKV)
    p = plan(T, B, MP, S, KH2 // 2, NH // (KH2 // 2), D, batch.pool.dtype.itemsize, batch.q.dtype.itemsize,
             variant=variant, quantized=quantized, **overrides)  # fmt: skip
    return f"NT {p.num_tiles} NS {p.num_splits} PB {p.kv_block_pages} R {p.kv_slots} CTA/SM {p.ctas_per_sm}"


def reference_outputs(batch: Batch, sm_scale: float) -> dict[str, np.ndarray]:
    """{"dequantized": the gathered path on the dequantized pool} for a quantized batch, else {}."""
    if not isinstance(batch.pool, QuantizedKV):
        return {}
    plain = Batch(batch.q, dequantize_kv(batch.pool, batch.q.dtype), batch.md, batch.kv_bytes, batch.causal_flops)
    return {"dequantized": np.asarray(run_attention(get_attention("gathered"), plain, sm_scale)(), np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--page-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--q-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--kv-dtype", nargs="+", default=None, choices=["bfloat16", "float32", *QUANTIZED_KV_DTYPES],
                    help="KV pool dtypes to time side by side (default: --dtype)")  # fmt: skip
    ap.add_argument("--extend", type=str, nargs="+", default=None,
                    help="prefill rows as NxL or NxL+P (N sequences of L new tokens after P cached)")  # fmt: skip
    ap.add_argument("--layers", type=int, default=1,
                    help="decode, N > 1: also time N calls chained in one jit, per call (host dispatch paid "
                         "once, the wrapper's glue per call, as in the model step's layer loop)")  # fmt: skip
    ap.add_argument("--variants", nargs="+", default=["v2", "v1"], help="GPU kernel variants to time")
    ap.add_argument("--no-gathered", action="store_true")
    ap.add_argument("--no-triton", action="store_true", help="GPU: leave out the Triton kernel (sm_80+ path)")
    ap.add_argument("--reference", action="store_true", help="also time the per-token reference (slow)")
    ap.add_argument("--parts", default="decode,extend", help="comma-separated: decode, sweep, extend")
    ap.add_argument("--sweep", action="store_true", help="add the sweep part (GPU: kv splits x ring depth)")
    ap.add_argument("--smoke", action="store_true", help="the kernels interpreted on tiny shapes")
    args = ap.parse_args()
    parts = set(args.parts.split(",")) | ({"sweep"} if args.sweep else set())

    platform = jax.default_backend()
    device = jax.devices()[0]
    on_gpu = platform in ("gpu", "cuda")
    kernels: dict[str, Callable] = {}
    timing: dict = {}
    if args.smoke:  # interpret mode: correctness of the benchmark plumbing only, not speed
        defaults = dict(batches=[2], contexts=[64], page_sizes=[16], extend=["1x64"], kv_heads=2, q_heads=4,
                        head_dim=64, dtype="bfloat16")  # fmt: skip
        timing = dict(warmup=1, iters=1, repeats=1)
        kernels = {"pallas-tpu(interpret)": get_attention("pallas", interpret="tpu"),
                   "pallas-gpu(interpret)": get_attention("pallas", interpret="gpu"),
                   "triton(interpret)": get_attention("pallas", interpret="triton")}  # fmt: skip
    elif platform == "cpu":
        defaults = dict(batches=[32], contexts=[512, 2048], page_sizes=[16], extend=["1x1024", "4x256", "1x256+768"],
                        kv_heads=3, q_heads=9, head_dim=64, dtype="float32")  # fmt: skip
        timing = dict(warmup=1, iters=3, repeats=3)
        args.reference = True
    else:
        defaults = dict(batches=[32, 64], contexts=[1024, 2048, 4096, 8192], page_sizes=[16, 64],
                        extend=["4x2048", "1x8192", "4x1024+1024"], kv_heads=8, q_heads=32, head_dim=128,
                        dtype="bfloat16")  # fmt: skip
        if on_gpu:
            from jaxradix.pallas_kernels.gpu.ragged_paged_attention import ragged_paged_attention as gpu_kernel

            kernels = {f"pallas-{v}": functools.partial(gpu_kernel, variant=v) for v in args.variants}
            if not args.no_triton:
                kernels["triton"] = get_attention("triton")
        else:
            kernels = {"pallas-v2": get_attention("pallas")}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.no_gathered and not args.smoke:
        kernels["gathered"] = get_attention("gathered")
    if args.reference:
        kernels["reference"] = ragged_paged_attention_blocked
    ref_timing = dict(warmup=1, iters=2, repeats=1)  # the reference is slow
    KH, G, D = args.kv_heads, args.q_heads // args.kv_heads, args.head_dim
    dtype = jnp.dtype(args.dtype)
    kv_dtypes = args.kv_dtype or [dtype.name]
    sm_scale = D**-0.5

    print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}")
    copy_bw = copy_bandwidth((1 << 20) if args.smoke else (1 << 30), **timing)
    print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")

    print(f"\ndecode: KH {KH}, NH {KH * G}, D {D}, {dtype.name} queries")
    chain = args.layers > 1  # extra columns: time per call of `layers` calls chained in one jit
    header = f"{'impl':<24}{'kv':>9}{'batch':>6}{'page':>6}{'ctx':>7}{'time us':>10}{'GB/s':>9}{'of copy':>9}"
    header += f"{f'x{args.layers} us':>10}{'of copy':>9}" if chain else ""
    print(f"{header}{'max|err|':>10}  plan")
    decode_shapes = [(B, S, ctx, kv) for B in args.batches for S in args.page_sizes for ctx in args.contexts
                     for kv in kv_dtypes]  # fmt: skip
    for B, S, ctx, kv_dtype in decode_shapes if "decode" in parts else []:
        batch = make_batch([1] * B, [ctx] * B, S=S, KH=KH, G=G, D=D, dtype=dtype, kv_dtype=kv_dtype)
        nbytes = batch.kv_bytes + batch.q.nbytes
        rows, outs = [], reference_outputs(batch, sm_scale)
        for name, attention in kernels.items():
            how = ref_timing if name == "reference" else timing
            fn = run_attention(attention, batch, sm_scale)
            t = try_time(lambda fn=fn: fn, **how)
            t_chain = None
            if t is not None:
                outs[name] = np.asarray(fn(), np.float32)
                if chain and name != "reference":
                    t_chain = try_time(functools.partial(run_attention, attention, batch, sm_scale, args.layers), **how)
                    t_chain = None if t_chain is None else t_chain / args.layers
            note = gpu_plan(batch, name[len("pallas-"):]) if on_gpu and name.startswith("pallas-v") else ""
            rows.append((name, t, t_chain, note))
        # max |error| against the gathered (or reference) output, on the dequantized pool if quantized
        base = next((n for n in ("dequantized", "gathered", "reference") if n in outs), None)
        for name, t, t_chain, note in rows:
            err = None if base is None or name not in outs else float(np.abs(outs[name] - outs[base]).max())
            bw = None if t is None else nbytes / t
            line = f"{name:<24}{kv_dtype:>9}{B:>6}{S:>6}{ctx:>7}{fmt(t, '10.1f', 1e6)}{fmt(bw, '9.1f', 1e-9)}"
            line += fmt(None if bw is None else bw / copy_bw, "9.1%")
            if chain:
                frac_chain = None if t_chain is None else nbytes / t_chain / copy_bw
                line += fmt(t_chain, "10.1f", 1e6) + fmt(frac_chain, "9.1%")
            print(f"{line}{fmt(err, '10.4f')}  {note}", flush=True)

    if "sweep" in parts and on_gpu:
        from jaxradix.pallas_kernels.gpu.ragged_paged_attention import ragged_paged_attention as gpu_kernel

        per = f", time per call of {args.layers} chained in one jit" if args.layers > 1 else ""
        print(f"\ndecode sweep (pallas-v2 with forced kv splits NS, ring slots R, pages per block PB{per})")
        for S in args.page_sizes:
            for ctx in (args.contexts[0], args.contexts[-1]):
                batch = make_batch([1] * args.batches[0], [ctx] * args.batches[0], S=S, KH=KH, G=G, D=D, dtype=dtype,
                                   kv_dtype=kv_dtypes[0])  # fmt: skip
                nbytes = batch.kv_bytes + batch.q.nbytes
                for tokens, R, NS in SWEEP:
                    over = dict(kv_block_pages=max(1, tokens // S), num_kv_splits=NS, kv_slots=R)
                    fn = functools.partial(gpu_kernel, **over)
                    t = try_time(functools.partial(run_attention, fn, batch, sm_scale, args.layers), **timing)
                    t = None if t is None else t / args.layers
                    frac = None if t is None else nbytes / t / copy_bw
                    print(f"{'pallas-v2':<24}{args.batches[0]:>6}{S:>6}{ctx:>7}{fmt(t, '10.1f', 1e6)}"
                          f"{fmt(frac, '9.1%'):>18}  {gpu_plan(batch, 'v2', **over)}", flush=True)  # fmt: skip

    print(f"\nextend (prefill, causal): KH {KH}, NH {KH * G}, D {D}, {dtype.name}, page {args.page_sizes[0]}")
    print(f"{'impl':<24}{'kv':>9}{'rows':>12}{'time us':>10}{'TFLOP/s':>9}{'of dpa':>8}{'max|err|':>10}  plan")
    for spec, kv_dtype in [(spec, kv) for spec in args.extend for kv in kv_dtypes] if "extend" in parts else []:
        q_lens, kv_lens = parse_rows(spec)
        batch = make_batch(q_lens, kv_lens, S=args.page_sizes[0], KH=KH, G=G, D=D, dtype=dtype, kv_dtype=kv_dtype)
        impls = {name: functools.partial(run_attention, a, batch, sm_scale) for name, a in kernels.items()}
        dpa = "cudnn" if on_gpu else "dot_product_attention"
        if q_lens == kv_lens:  # no prefix: the same rows contiguous
            impls[dpa] = functools.partial(cudnn_attention, batch, q_lens[0], len(q_lens), sm_scale)
        times, outs = {}, reference_outputs(batch, sm_scale)
        for name, make in impls.items():
            fn = make() if name in kernels else None
            how = ref_timing if name == "reference" else timing
            times[name] = try_time((lambda fn=fn: fn) if fn else make, **how)
            if fn is not None and times[name] is not None:
                outs[name] = np.asarray(fn(), np.float32)
        base = next((n for n in ("dequantized", "gathered", "reference") if n in outs), None)
        for name, t in times.items():
            tflops = None if t is None else batch.causal_flops / t / 1e12
            rel = None if t is None or times.get(dpa) is None else times[dpa] / t
            err = None if base is None or name not in outs else float(np.abs(outs[name] - outs[base]).max())
            note = gpu_plan(batch, name[len("pallas-"):]) if on_gpu and name.startswith("pallas-v") else ""
            print(f"{name:<24}{kv_dtype:>9}{spec:>12}{fmt(t, '10.1f', 1e6)}{fmt(tflops, '9.2f')}{fmt(rel, '8.0%')}"
                  f"{fmt(err, '10.4f')}  {note}", flush=True)  # fmt: skip

    if args.smoke:
        print("\nsmoke run (tiny shapes, kernels interpreted on CPU): the figures above say nothing about "
              "speed; real figures need a GPU (or TPU).")  # fmt: skip


if __name__ == "__main__":
    main()
