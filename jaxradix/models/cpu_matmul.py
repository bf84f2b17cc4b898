"""The CPU implementation of ``quantization.dense`` for int8 weights, and the CPU form of the tied logits.

Findings behind it (``scripts/bench_cpu_matmul.py``, jax 0.11.2, XLA:CPU, 2 threads):

- XLA:CPU never fuses a convert into a dot: ``x @ w.astype(f32)`` (int8, int4, fp8 or bf16 ``w``) first
  writes a dequantized copy of the whole weight, which is slower than reading an f32 weight.
- A dot of int8 x int8 -> int32 goes to YNNPACK (``__ynn_fusion``), which reads the int8 weight as it
  is, but only when both matrix sides have >= 2 rows (YNNPACK takes no matrix-vector products); with
  one row XLA's own int8 dot is ~100x slower. So each activation row is written as PARTS int8 rows
  (one f32 scale per token; part p holds the rounding residual of parts < p, times 254): the dot has
  >= 2 rows even for one token, reads the weight once for all parts, and the result is the int8
  weight's product with the activations up to ~1e-7 of their range (one part alone, as llama.cpp
  quantizes its activations, errs by ~0.4%).
- A plain weight used transposed (the tied logits ``h @ embed.T``) with one row is a slow dot
  (~15x a plain gemv on the 49152 x 576 head); ``embed @ h.T`` reads the same bytes as a fast gemv.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

MIN_ROWS = 2  # YNNPACK takes dots whose both sides have at least 2 rows
PARTS = 2  # int8 parts of each activation row: the rounding error is 1/(2*127*254) (~1.6e-5) of the row's range
RADIX = 254.0  # each part carries the previous part's rounding residual ([-0.5, 0.5]) times RADIX


def quantize_parts(x: jax.Array, parts: int = PARTS) -> tuple[jax.Array, jax.Array]:
    """x [T, K] -> int8 [parts*T, K] (part p of every row, part-major) and f32 [T, 1] scales, so that
    x ~= scale * sum_p q[p] / RADIX**p. One part alone is a per-row int8 quantization of x."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    r = xf / scale  # [T, K] in [-127, 127]
    qs = []
    for _ in range(parts):
        q = jnp.clip(jnp.round(r), -127, 127)
        qs.append(q.astype(jnp.int8))
        r = (r - q) * RADIX
    return jnp.concatenate(qs, axis=0), scale


def _combine(acc: jax.Array, T: int, parts: int) -> jax.Array:  # [parts*T, N] int32 -> [T, N] f32
    acc = acc.astype(jnp.float32).reshape(parts, T, -1)
    return sum(acc[p] / RADIX**p for p in range(parts))


def _parts_for(T: int, parts: int) -> int:
    return max(parts, -(-MIN_ROWS // T))


def int8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, parts: int = PARTS) -> jax.Array:
    """x [T, K] @ (values [K, N] int8 * scales [N]) -> [T, N] f32, as int8 x int8 -> int32 dots."""
    T, parts = x.shape[0], _parts_for(x.shape[0], parts)
    xq, sx = quantize_parts(x, parts)  # [parts*T, K] int8, [T, 1]
    acc = jax.lax.dot_general(xq, values, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return _combine(acc, T, parts) * sx * scales


def int8_matmul_rows(x: jax.Array, values: jax.Array, scales: jax.Array, parts: int = PARTS) -> jax.Array:
    """x [T, K] against a table stored by rows (values [N, K] int8 * scales [N]) -> [T, N] f32 (tied logits)."""
    T, parts = x.shape[0], _parts_for(x.shape[0], parts)
    xq, sx = quantize_parts(x, parts)  # [parts*T, K] int8, [T, 1]
    acc = jax.lax.dot_general(xq, values, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)  # [pT, N]
    return _combine(acc, T, parts) * sx * scales


def matmul_rows(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [T, K] against a plain table stored by rows, table [N, K] -> [T, N], as table @ x.T (a gemv)."""
    return (table @ x.T).T


SPLIT_PARAMS = ("wqkv", "wo", "w_gate_up", "w_down", "lm_head", "embed")  # matmul weights [K, N], the table [V, H]
MIN_BLOCK_COLUMNS = 128


def column_blocks(n_columns: int, threads: int | None = None) -> int:
    """Output-column blocks for an int8 weight of n_columns on this CPU: one per core (at most 4), of
    equal width, each at least MIN_BLOCK_COLUMNS; 1 when no such split exists."""
    threads = threads or len(os.sched_getaffinity(0))
    for n in range(min(threads, 4), 1, -1):
        if n_columns % n == 0 and n_columns // n >= MIN_BLOCK_COLUMNS:
            return n
    return 1


def split_for_threads(params: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """params by flat name, each per-channel int8 matmul weight [K, N] (and an int8 embedding table, the
    tied logits' weight) held as ColumnBlocks: stored by rows ([N, K]: YNNPACK reads it faster at few
    tokens), in one block per core (XLA:CPU runs independent dots on separate threads). Other leaves
    are returned as they are."""
    from jaxradix.models.quantization import QuantizedWeight, int8_channels, row_blocks

    out = {}
    for name, w in params.items():
        if name.rsplit(".", 1)[-1] in SPLIT_PARAMS and isinstance(w, QuantizedWeight) and int8_channels(w):
            w = row_blocks(w, column_blocks(w.shape[1 - w.axis], threads))
        out[name] = w
    return out
