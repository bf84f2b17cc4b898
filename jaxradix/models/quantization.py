"""Quantized weights (``--quantization int8|fp8|gguf``): a weight leaf may be a ``QuantizedWeight``
(low-bit values + scales) instead of an array, and every matmul of the model goes through ``dense``.

Quantization is a property of the weight, not a second model: ``models/llama.py`` calls
``dense(x, w)`` and ``embedding_rows(table, ids)`` for every weight, plain or quantized.

Format: ``w = values * scales (+ offsets)``, the scales (and offsets) repeated over groups of
``group`` consecutive entries along the weight's contraction axis ``axis``:

- ``values``  ``[K, N]`` (axis 0, a matmul weight ``x @ w``) or ``[V, H]`` (axis 1, the embedding
  table: rows are gathered, and the tied logits contract over H), in int8, float8_e4m3fn, int4 or uint4;
- ``scales``  f32, the values' shape with the contraction axis cut to ``G = K // group``
  (``G == 1``: one scale per output channel);
- ``offsets`` f32 like scales, or None (symmetric formats).

``--quantization int8|fp8`` quantizes per output channel (symmetric, ``scale = amax / qmax``, qmax 127
for int8 and 448 for float8_e4m3fn) at load, from any source. ``--quantization gguf`` keeps a GGUF
file's blocks as they are: Q8_0 int8 and Q6_K int8 with their 32- / 16-entry group scales, Q4_0 int4,
Q4_1 and Q4_K uint4 with group scales and offsets (exactly ggml's dequantization formula, in f32);
on CPU the 4-bit values are held as int8, which XLA:CPU converts several times faster (device_storage).
On CPU a per-channel int8 weight is held as ``ColumnBlocks`` (its output columns stored by rows, one block
per core; ``cpu_matmul.split_for_threads``), which ``dense`` and ``embedding_rows`` also take.
All scales are f32. Under tensor parallelism the fused columns of values, scales and offsets are
permuted per shard alike (they share the last axis), and a leaf's axis of size 1 is replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxradix.models import cpu_matmul, cpu_native

QUANTIZATIONS = ("none", "int8", "fp8", "gguf")
# --quantization name -> storage dtype of a per-channel quantized weight
CHANNEL_DTYPES: dict[str, Any] = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
# parameters quantized by --quantization int8|fp8 (by short name): every 2-D matmul weight and the
# embedding table (by rows; its rows are the tied logits' output channels)
QUANTIZED_PARAMS = frozenset({"wqkv", "wo", "w_gate_up", "w_down", "lm_head", "embed"})
SCALE_DTYPE = np.float32


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedWeight:
    """A weight as low-bit values and f32 scales (and offsets) per group along its contraction axis."""

    values: Any  # [K, N] (axis 0) or [V, H] (axis 1): int8 | float8_e4m3fn | int4 | uint4
    scales: Any  # values' shape, contraction axis cut to G: f32
    offsets: Any = None  # like scales, or None
    axis: int = field(default=0, metadata=dict(static=True))  # the contraction axis

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def group(self) -> int:
        return self.values.shape[self.axis] // self.scales.shape[self.axis]

    @property
    def nbytes(self) -> int:
        """Device bytes (int4/uint4 values count half a byte, as XLA packs them)."""
        v = self.values
        bits = 4 if jnp.dtype(v.dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else 8 * v.dtype.itemsize
        extra = self.scales.nbytes + (0 if self.offsets is None else self.offsets.nbytes)
        return math.ceil(int(np.prod(v.shape)) * bits / 8) + extra

    @property
    def T(self) -> QuantizedWeight:  # noqa: N802 (numpy's name)
        """The same linear map with its storage transposed (HF [out, in] -> [in, out] at load)."""
        return QuantizedWeight(self.values.T, self.scales.T, None if self.offsets is None else self.offsets.T,
                               1 - self.axis)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The whole weight as a dense array (tests, fallbacks; never on the serving path)."""
        return _dequant(self.values, self.scales, self.offsets, self.axis, dtype)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ColumnBlocks:
    """A quantized matmul weight [K, N] held as blocks of its output columns, each block its own buffer
    stored by rows ([N / n, K], axis 1). CPU only (models/cpu_matmul.split_for_threads).

    XLA:CPU hands each int8 dot to YNNPACK, which reads a weight stored by rows ([N, K]) faster than by
    columns at few tokens and runs one dot on one thread, while its thunk executor runs independent
    dots on separate threads. A decode step's int8 weight dots at T=1 on 2 cores: 11.9 ms as [K, N],
    7.5 ms as [N, K], 6.3 ms as two [N/2, K] blocks (docs/benchmarks.md). Blocks sliced out of one
    array would be copies; separate buffers are not."""

    blocks: tuple[QuantizedWeight, ...]  # the output columns in order; each [N_i, K] axis 1 or [K, N_i] axis 0

    axis = 0  # dense() reads the map as [K, N]

    @property
    def shape(self) -> tuple[int, ...]:  # the linear map's [K, N]
        b = self.blocks[0]
        return (b.shape[b.axis], sum(blk.shape[1 - blk.axis] for blk in self.blocks))

    @property
    def ndim(self) -> int:
        return 2

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:  # [K, N]
        return jnp.concatenate([b.dequantize(dtype) if b.axis == 0 else b.dequantize(dtype).T
                                for b in self.blocks], axis=1)


def row_blocks(w: QuantizedWeight, n: int) -> ColumnBlocks:
    """A per-channel weight as n blocks of its output channels stored by rows: a matmul weight [K, N]
    (axis 0, transposed here) or a table [N, K] (axis 1: the tied logits' embedding) -> n blocks
    [N / n, K] (n divides N). Works on device arrays: each block is a contiguous copy."""
    rows_major = w.axis == 1
    if w.offsets is not None or w.scales.shape[w.axis] != 1 or w.shape[1 - w.axis] % n:
        raise ValueError(f"row_blocks: a per-channel weight with {n} | N, got {w.shape} axis {w.axis}")
    values = jnp.asarray(w.values) if rows_major else jnp.asarray(w.values).T  # [N, K]
    scales = jnp.asarray(w.scales) if rows_major else jnp.asarray(w.scales).T  # [N, 1]
    rows = values.shape[0] // n
    return ColumnBlocks(tuple(QuantizedWeight(jnp.array(values[i * rows:(i + 1) * rows]),
                                              jnp.array(scales[i * rows:(i + 1) * rows]), None, 1)
                              for i in range(n)))


def is_quantized(w: Any) -> bool:
    return isinstance(w, (QuantizedWeight, ColumnBlocks))


def _expand(a: jax.Array, axis: int, group: int) -> jax.Array:
    """Repeat each entry of a scales/offsets array over its group along axis (a broadcast XLA fuses)."""
    if group == 1:
        return a
    shape = list(a.shape)
    b = jnp.expand_dims(a, axis + 1)
    b = jnp.broadcast_to(b, (*shape[:axis + 1], group, *shape[axis + 1:]))
    shape[axis] *= group
    return b.reshape(shape)


_FP8_BITS = jnp.uint8  # float8_e4m3fn values as their bit patterns (XLA:CPU's tiled path)


def _values_f32(values: jax.Array, fp8_bits: bool = False) -> jax.Array:
    if fp8_bits:  # uint8 bit patterns of float8_e4m3fn: a 256-entry table decodes them
        table = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
        return jnp.asarray(table)[values.astype(jnp.int32)]
    return values.astype(jnp.float32)


def _dequant(values: jax.Array, scales: jax.Array, offsets: jax.Array | None, axis: int, dtype: Any,
             fp8_bits: bool = False) -> jax.Array:
    group = values.shape[axis] // scales.shape[axis]
    w = _values_f32(values, fp8_bits) * _expand(scales, axis, group)
    if offsets is not None:
        w = w + _expand(offsets, axis, group)
    return w.astype(dtype)


def dense(x: jax.Array, w: jax.Array | QuantizedWeight) -> jax.Array:
    """x [..., K] times the weight -> [..., N] in x's dtype: THE matmul of the model, for plain and
    quantized weights. A plain w is [K, N]. A QuantizedWeight contracts its own axis: [K, N] (axis 0),
    or an embedding table [N, K] (axis 1: the tied logits, read in place, never transposed)."""
    if not is_quantized(w):
        return x @ w
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)  # [T, K]
    blocks = w.blocks if isinstance(w, ColumnBlocks) else (w,)
    kind = matmul_kind(jax.default_backend(), x2.shape[0], blocks[0])
    ys = [MATMULS[kind](x2, b) for b in blocks]  # each [T, N / n] f32
    y = ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=1)
    return y.astype(x.dtype).reshape(*lead, w.shape[1 - w.axis])


def _contract(x: jax.Array, w: jax.Array, axis: int) -> jax.Array:  # [T, K] . w contracting axis -> [T, N] f32
    return jax.lax.dot_general(x, w, (((1,), (axis,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_dot(x: jax.Array, w: QuantizedWeight) -> jax.Array:  # [T, K] -> [T, N] f32
    """One dot with the weight dequantized in its operand (GPU/TPU: XLA fuses the convert and the scale
    broadcast into the dot). Per-channel scales multiply the dot's output instead."""
    if w.scales.shape[w.axis] == 1 and w.offsets is None:
        scales = w.scales.reshape(-1)  # [N]
        return _contract(x, w.values.astype(x.dtype), w.axis) * scales
    return _contract(x, w.dequantize(x.dtype), w.axis)


def _matmul_tiled(x: jax.Array, w: QuantizedWeight) -> jax.Array:  # [T, K] -> [T, N] f32
    """The product one block of output channels at a time (a loop over blocks of about TILE_BYTES
    dequantized): XLA:CPU cannot fuse the dequantization into its dot and writes the dequantized
    operand first, so each block is written and read back while it is still in cache, never the
    whole weight."""
    out_axis = 1 - w.axis
    K, N = w.values.shape[w.axis], w.values.shape[out_axis]
    cols = tile_columns(K, N)
    full = N // cols
    # XLA:CPU has no f8 arithmetic: it would upcast a whole f8 weight to f16 ahead of the loop, so f8
    # values enter the loop as their bits and a table decodes each block
    fp8_bits = jnp.dtype(w.values.dtype) == jnp.dtype(jnp.float8_e4m3fn)
    values = jax.lax.bitcast_convert_type(w.values, _FP8_BITS) if fp8_bits else w.values

    def block(lo: jax.Array | int, width: int) -> jax.Array:  # [T, width] f32
        def cut(a: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice_in_dim(a, lo, width, axis=out_axis)

        offsets = None if w.offsets is None else cut(w.offsets)
        deq = _dequant(cut(values), cut(w.scales), offsets, w.axis, x.dtype, fp8_bits)
        return _contract(x, deq, w.axis)

    # a loop, also over few blocks: unrolled static slices measured 4x slower (XLA fuses them together)
    y = jax.lax.map(lambda i: block(i * cols, cols), jnp.arange(full, dtype=jnp.int32))  # [full, T, cols]
    y = y.transpose(1, 0, 2).reshape(x.shape[0], full * cols)
    if full * cols < N:
        y = jnp.concatenate([y, block(full * cols, N - full * cols)], axis=1)
    return y


TILE_BYTES = 1 << 20  # a dequantized f32 block of about 1 MiB: in L2 on the CPUs measured (docs/benchmarks.md)


def tile_columns(K: int, N: int) -> int:
    """Columns per block of _matmul_tiled: the widest divisor of N whose f32 block fits TILE_BYTES (at
    least 2 blocks), or that width with one narrower last block when N has no such divisor >= 32."""
    limit = max(8, min(TILE_BYTES // (4 * K), N // 2))
    for c in range(limit, 31, -1):
        if N % c == 0:
            return c
    return limit


def _matmul_int8(x: jax.Array, w: QuantizedWeight) -> jax.Array:  # [T, K] -> [T, N] f32
    """Per-channel int8 weights on CPU: int8 x int8 -> int32 dots that read the int8 weight as it is
    (models/cpu_matmul.py: each activation row as 2 int8 rows, error <= 1.6e-5 of the row's range per
    term). Other formats take the tiled loop."""
    if not int8_channels(w):
        return _matmul_tiled(x, w)
    scales = w.scales.reshape(-1)  # [N]
    if w.axis == 1:  # stored by rows [N, K]: ColumnBlocks' blocks, the tied logits' table
        if x.shape[0] <= cpu_native.MAX_TOKENS and cpu_native.available():
            return cpu_native.int8_rows(x, w.values, scales)  # exact f32 activations, at memory bandwidth
        return cpu_matmul.int8_matmul_rows(x, w.values, scales)
    return cpu_matmul.int8_matmul(x, w.values, scales)


def int8_channels(w: QuantizedWeight) -> bool:
    """int8 values, one scale per output channel, no offsets: the format of the CPU int8 x int8 matmul."""
    return jnp.dtype(w.values.dtype) == jnp.dtype(jnp.int8) and w.offsets is None and w.scales.shape[w.axis] == 1


MATMULS = {"dot": _matmul_dot, "tiled": _matmul_tiled, "int8": _matmul_int8}


def matmul_kind(backend: str, tokens: int, w: QuantizedWeight | None = None) -> str:
    """Which MATMULS entry serves a quantized weight for `tokens` rows on `backend` (static at trace time).
    On CPU, per-channel int8 weights take int8 dots (2x the tiled loop's decode speed), others the loop."""
    if backend != "cpu":
        return "dot"
    return "int8" if w is not None and int8_channels(w) else "tiled"


def embedding_rows(table: jax.Array | QuantizedWeight, ids: jax.Array, dtype: Any) -> jax.Array:
    """table [V, H] rows at ids [T] -> [T, H] in dtype (a quantized table dequantizes only those rows)."""
    if isinstance(table, ColumnBlocks):  # a table in row blocks: each id's row from its block
        rows, lo = jnp.zeros((ids.shape[0], table.shape[0]), dtype), 0
        for b in table.blocks:
            n = b.shape[0]
            mine = (ids >= lo) & (ids < lo + n)
            rows = jnp.where(mine[:, None], embedding_rows(b, jnp.clip(ids - lo, 0, n - 1), dtype), rows)
            lo += n
        return rows
    if not isinstance(table, QuantizedWeight):
        return table[ids]
    if table.axis != 1:
        raise ValueError("embedding_rows: a quantized embedding table groups along its rows (axis 1)")
    offsets = None if table.offsets is None else table.offsets[ids]
    return _dequant(table.values[ids], table.scales[ids], offsets, 1, dtype)


def quantize_channels(w: jax.Array, *, kind: str, axis: int = 0) -> QuantizedWeight:
    """Per-output-channel symmetric quantization (jit-able): w [K, N] (axis 0) or a table [V, H] (axis 1)
    -> values in CHANNEL_DTYPES[kind], one f32 scale per channel (amax / qmax over the contraction axis)."""
    if kind not in CHANNEL_DTYPES:
        raise ValueError(f"quantization {kind!r}: per-channel quantization is one of {sorted(CHANNEL_DTYPES)}")
    dtype = jnp.dtype(CHANNEL_DTYPES[kind])
    qmax = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
    wf = w.astype(jnp.float32)
    scales = jnp.max(jnp.abs(wf), axis=axis, keepdims=True) / qmax  # [1, N] or [V, 1]
    scales = jnp.where(scales > 0, scales, 1.0)
    y = wf / scales
    if dtype == jnp.int8:
        y = jnp.clip(jnp.round(y), -qmax, qmax)
    return QuantizedWeight(y.astype(dtype), scales, None, axis)


def quantizes(name: str, kind: str) -> bool:
    """Whether --quantization `kind` quantizes parameter `name` (flat name) at load, per channel."""
    return kind in CHANNEL_DTYPES and name.rsplit(".", 1)[-1] in QUANTIZED_PARAMS


def channel_axis(name: str) -> int:
    """The contraction axis of a quantized parameter: 1 for the embedding table [V, H], else 0."""
    return 1 if name.rsplit(".", 1)[-1] == "embed" else 0


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not supported; supported: {', '.join(QUANTIZATIONS)}")
    return quantization


# -- host side: fused parameters of a GGUF file's blocks ------------------------------------------
_WIDENED = {np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4), np.dtype(np.int8)}


def concat_columns(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Host QuantizedWeights [K, N_i] (axis 0, numpy) -> one [K, sum N_i] (the fused wqkv / w_gate_up).
    Parts of different formats meet in the finest group, int8 values (int4/uint4 widen exactly), and
    zero offsets where a part has none, so the result dequantizes to exactly the parts' values."""
    if len({p.axis for p in parts}) != 1 or parts[0].axis != 0:
        raise ValueError("concat_columns: parts must be matmul weights (axis 0)")
    group = math.gcd(*(p.group for p in parts))
    dtypes = {np.dtype(p.values.dtype) for p in parts}
    if len(dtypes) > 1 and not dtypes <= _WIDENED:
        raise ValueError(f"concat_columns: cannot fuse weights stored as {sorted(map(str, dtypes))}")
    vdtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.int8)
    with_offsets = any(p.offsets is not None for p in parts)

    def regroup(a: np.ndarray, g: int) -> np.ndarray:
        return np.repeat(a, g // group, axis=0)

    values = np.concatenate([np.asarray(p.values).astype(vdtype) for p in parts], axis=1)
    scales = np.concatenate([regroup(np.asarray(p.scales, SCALE_DTYPE), p.group) for p in parts], axis=1)
    offsets = None
    if with_offsets:
        offsets = np.concatenate([regroup(np.zeros(p.scales.shape, SCALE_DTYPE) if p.offsets is None
                                          else np.asarray(p.offsets, SCALE_DTYPE), p.group) for p in parts], axis=1)
    return QuantizedWeight(values, scales, offsets, 0)


def device_storage(w: QuantizedWeight, platform: str) -> QuantizedWeight:
    """A host QuantizedWeight in the value dtype to hold on `platform`. XLA:CPU converts int4/uint4
    several times slower than int8 (docs/benchmarks.md), so the CPU holds 4-bit values as int8 (exact);
    other platforms hold uint4 as int4: q - 8, with 8 * scale added to the offsets (1-ulp f32 rounding)."""
    dtype = np.dtype(w.values.dtype)
    if platform == "cpu" and dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        return replace(w, values=np.asarray(w.values).astype(np.int8))
    if platform != "cpu" and dtype == np.dtype(ml_dtypes.uint4):
        offsets = (0.0 if w.offsets is None else np.asarray(w.offsets, SCALE_DTYPE)) + 8 * np.asarray(w.scales)
        values = (np.asarray(w.values).astype(np.int8) - 8).astype(ml_dtypes.int4)
        return replace(w, values=values, offsets=offsets.astype(SCALE_DTYPE))
    return w


def host_map(w: QuantizedWeight, fn: Any) -> QuantizedWeight:
    """fn applied to each leaf (values, scales, offsets) of a host QuantizedWeight."""
    return replace(w, values=fn(w.values), scales=fn(w.scales),
                   offsets=None if w.offsets is None else fn(w.offsets))
