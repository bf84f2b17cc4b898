"""Which quantized matmul is fastest on XLA:CPU? x[T, K] @ W[K, N] with W stored f32, bf16, int8, int4, fp8.

    python scripts/bench_cpu_matmul.py                       # SmolLM2-135M's shapes, T = 1, 8, 64
    python scripts/bench_cpu_matmul.py --tokens 1 --hlo      # also print what XLA emits per variant
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python scripts/bench_cpu_matmul.py   # without YNNPACK dots

Two measurements per variant and token count:
  model   the matmuls of a whole SmolLM2-135M forward (30 layers of distinct qkv, o, gate_up, down weights, then
          the tied lm_head 576 x 49152) in one jitted function, so the weights do not stay in the caches; the
          figure is ms per forward and the effective weight bandwidth (stored bytes / time).
  lm_head the 576 x 49152 head alone.
With --hlo each variant's optimized HLO is summarised: fusions, dots and their operand types, library calls
(YNNPACK/XNNPACK/oneDNN), and whether an f32/bf16 array of a whole weight's size is materialised outside a fusion.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.models import cpu_matmul

# SmolLM2-135M: H=576, 9 heads, 3 KV heads, head_dim 64, I=1536, 30 layers, vocab 49152 (tied).
H, I, L, V = 576, 1536, 30, 49152
QKV = (9 + 2 * 3) * 64
LAYER_SHAPES = {"wqkv": (H, QKV), "wo": (H, H), "w_gate_up": (H, 2 * I), "w_down": (I, H)}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Stored:
    """One weight in a storage format: values (as stored) and per-output-channel scales (or None)."""

    values: jax.Array  # [K, N] or [N, K] when transposed
    scale: jax.Array | None  # [N] f32


def quantize(w: np.ndarray, fmt: str) -> Stored:  # w [K, N] f32
    if fmt == "f32":
        return Stored(jnp.asarray(w), None)
    if fmt == "bf16":
        return Stored(jnp.asarray(w, jnp.bfloat16), None)
    if fmt in ("int8", "int8t"):
        s = np.abs(w).max(axis=0) / 127.0 + 1e-12
        q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
        return Stored(jnp.asarray(q.T.copy() if fmt == "int8t" else q), jnp.asarray(s, jnp.float32))
    if fmt == "int4":
        s = np.abs(w).max(axis=0) / 7.0 + 1e-12
        q = np.clip(np.round(w / s), -7, 7).astype(np.int8)
        return Stored(jnp.asarray(q, jnp.int4), jnp.asarray(s, jnp.float32))
    if fmt == "fp8":
        s = np.abs(w).max(axis=0) / 448.0 + 1e-12
        return Stored(jnp.asarray(w / s, jnp.float8_e4m3fn), jnp.asarray(s, jnp.float32))
    raise ValueError(fmt)


# variant name -> (storage format, matmul of x [T, K] f32 with a Stored weight -> [T, N] f32)
def _scaled(y: jax.Array, w: Stored) -> jax.Array:
    return y if w.scale is None else y * w.scale


def _dyn_int8(x: jax.Array, w: Stored) -> jax.Array:
    sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 + 1e-12  # [T, 1] per-token activation scale
    xq = jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8)
    acc = jax.lax.dot_general(xq, w.values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sx * w.scale


def _barrier_convert(x: jax.Array, w: Stored) -> jax.Array:
    # the barrier ties the weight's conversion to the activation, so XLA cannot hoist every layer's
    # conversion to the start of the program (where they would all be live at once)
    x, values = jax.lax.optimization_barrier((x, w.values))
    return _scaled(x @ values.astype(jnp.float32), w)


def _chunked(n: int) -> Callable[[jax.Array, Stored], jax.Array]:
    def mm(x: jax.Array, w: Stored) -> jax.Array:
        K, N = w.values.shape
        if N % n or N <= n:
            return _barrier_convert(x, w)

        def body(carry: None, c: jax.Array) -> tuple[None, jax.Array]:
            tile = jax.lax.dynamic_slice_in_dim(w.values, c * n, n, axis=1)  # [K, n], converted in cache
            return carry, x @ tile.astype(jnp.float32)

        _, y = jax.lax.scan(body, None, jnp.arange(N // n))  # [C, T, n]
        return _scaled(y.transpose(1, 0, 2).reshape(x.shape[0], N), w)
    return mm


VARIANTS: dict[str, tuple[str, Callable[[jax.Array, Stored], jax.Array]]] = {
    "f32": ("f32", lambda x, w: x @ w.values),
    "bf16 dot (x->bf16)": ("bf16", lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w.values,
                                                         preferred_element_type=jnp.float32)),
    "bf16 -> f32 convert, f32 dot": ("bf16", lambda x, w: x @ w.values.astype(jnp.float32)),
    "int8 -> f32 convert, f32 dot": ("int8", lambda x, w: _scaled(x @ w.values.astype(jnp.float32), w)),
    "int8 barrier, convert, f32 dot": ("int8", _barrier_convert),
    "int8 scan over 256-column tiles": ("int8", _chunked(256)),
    "int8 scan over 1024-column tiles": ("int8", _chunked(1024)),
    "int4 scan over 1024-column tiles": ("int4", _chunked(1024)),
    "fp8 scan over 1024-column tiles": ("fp8", _chunked(1024)),
    "int8 -> bf16, bf16 dot": ("int8", lambda x, w: _scaled(jnp.dot(
        x.astype(jnp.bfloat16), w.values.astype(jnp.bfloat16), preferred_element_type=jnp.float32), w)),
    "int8 mul+reduce (no dot)": ("int8", lambda x, w: _scaled(
        jnp.sum(x[:, :, None] * w.values.astype(jnp.float32)[None], axis=1), w)),
    "int8 [N,K] mul+reduce (no dot)": ("int8t", lambda x, w: _scaled(
        jnp.sum(x[:, None, :] * w.values.astype(jnp.float32)[None], axis=2), w)),
    "int8 [N,K] convert, dot": ("int8t", lambda x, w: _scaled(jax.lax.dot_general(
        x, w.values.astype(jnp.float32), (((1,), (1,)), ((), ()))), w)),
    "int8 x int8 -> int32 dot (dynamic act. quant)": ("int8", _dyn_int8),
    **{f"int8 x int8, activations in {p} int8 part(s), >= 2 rows": ("int8", functools.partial(
        lambda x, w, p: cpu_matmul.int8_matmul(x, w.values, w.scale, parts=p), p=p)) for p in (1, 2, 3)},
    "int4 -> f32 convert, f32 dot": ("int4", lambda x, w: _scaled(x @ w.values.astype(jnp.float32), w)),
    "int4 -> bf16, bf16 dot": ("int4", lambda x, w: _scaled(jnp.dot(
        x.astype(jnp.bfloat16), w.values.astype(jnp.bfloat16), preferred_element_type=jnp.float32), w)),
    "fp8 e4m3 -> f32 convert, f32 dot": ("fp8", lambda x, w: _scaled(x @ w.values.astype(jnp.float32), w)),
    "fp8 e4m3 -> bf16, bf16 dot": ("fp8", lambda x, w: _scaled(jnp.dot(
        x.astype(jnp.bfloat16), w.values.astype(jnp.bfloat16), preferred_element_type=jnp.float32), w)),
}


def stored_bytes(tree: object) -> int:
    return sum(leaf.size // 2 if leaf.dtype == jnp.int4 else leaf.size * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def model_fn(mm: Callable[[jax.Array, Stored], jax.Array]) -> Callable:
    def forward(layers: list[dict[str, Stored]], head: Stored, x: jax.Array) -> jax.Array:  # x [T, H]
        h = x
        for w in layers:
            a = mm(h, w["wqkv"])[:, :H]  # [T, H]
            h = h + mm(a, w["wo"])
            g = mm(h, w["w_gate_up"])  # [T, 2I]
            h = h + mm(jax.nn.silu(g[:, :I]) * g[:, I:], w["w_down"])
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
        return mm(h, head)  # [T, V]
    return forward


def timeit(fn: Callable, *args: object, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def hlo_summary(compiled: object, weight_shapes: list[tuple[int, int]]) -> str:
    text = compiled.as_text()
    ops = re.findall(r"=\s*(\S+?)\[[^\]]*\][^=]*?\s(fusion|dot|custom-call|convolution)\(", text)
    kinds = sorted({k for _, k in ops})
    dots = sorted(set(re.findall(r"=\s*(\w+\[[\d,]*\])\S*\s+dot\(", text)))
    libs = sorted(set(re.findall(r"__(?:ynn|xnn|onednn)\w*", text)))
    big = set()
    entry = text[text.find("ENTRY"):]
    for k, n in weight_shapes:
        for dt in ("f32", "bf16"):
            for shape in (f"{dt}[{k},{n}]", f"{dt}[{n},{k}]"):
                if re.search(re.escape(shape) + r"\{[^}]*\}\s+(fusion|convert|copy|transpose)\(", entry):
                    big.add(shape)
    return (f"ops {kinds}; XLA dots {dots or 'none'}; library fusions {libs or 'none'}; "
            f"whole weights materialised in f32/bf16: {sorted(big) or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,8,64", help="comma-separated T values")
    ap.add_argument("--variants", default="", help="comma-separated substrings of variant names (default: all)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--hlo", action="store_true", help="print a summary of each variant's optimized HLO")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    wanted = [v for v in args.variants.split(",") if v]
    rng = np.random.default_rng(0)
    master = [{n: rng.standard_normal(s, np.float32) * 0.05 for n, s in LAYER_SHAPES.items()} for _ in range(L)]
    master_head = rng.standard_normal((H, V), np.float32) * 0.05
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    print("| variant | stored MB | " + " | ".join(f"model T={t} ms (GB/s)" for t in tokens)
          + " | " + " | ".join(f"lm_head T={t} ms" for t in tokens) + " |")
    print("|---|---|" + "---|" * (2 * len(tokens)))
    formats: dict[str, tuple[list, Stored]] = {}
    for name, (fmt, mm) in VARIANTS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        if fmt not in formats:
            formats.clear()  # one format's weights at a time keeps the memory small
            formats[fmt] = ([{n: quantize(w, fmt) for n, w in layer.items()} for layer in master],
                            quantize(master_head, fmt))
        layers, head = formats[fmt]
        nbytes = stored_bytes((layers, head))
        fwd = jax.jit(model_fn(mm))
        head_fn = jax.jit(mm)
        cells, head_cells, summary = [], [], ""
        for t in tokens:
            x = jnp.asarray(rng.standard_normal((t, H), np.float32))
            try:
                compiled = fwd.lower(layers, head, x).compile()
                sec = timeit(compiled, layers, head, x, reps=args.reps)
                cells.append(f"{sec * 1e3:.2f} ({nbytes / sec / 1e9:.1f})")
                head_cells.append(f"{timeit(head_fn, x, head, reps=args.reps) * 1e3:.2f}")
                if args.hlo and not summary:
                    shapes = [s for s in LAYER_SHAPES.values()] + [(H, V)]
                    summary = hlo_summary(head_fn.lower(x, head).compile(), shapes)
            except Exception as e:  # a variant XLA:CPU cannot compile is a finding, not a crash
                cells.append(f"error: {type(e).__name__}")
                head_cells.append("-")
        print(f"| {name} | {nbytes / 1e6:.0f} | " + " | ".join(cells) + " | " + " | ".join(head_cells) + " |",
              flush=True)
        if summary:
            print(f"    HLO (lm_head, T={tokens[0]}): {summary}", flush=True)


if __name__ == "__main__":
    main()
