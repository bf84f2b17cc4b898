"""The storage format of a quantized KV pool (``--kv-cache-dtype fp8_e4m3|fp8_e5m2|int8``).

One layer's quantized pool is a ``QuantizedKV`` pytree of two arrays with the same leading axes:

- ``data  [P, S, 2*KH, D]`` in the storage dtype (float8_e4m3fn, float8_e5m2 or int8), K heads at
  ``[..., :KH, :]`` and V heads at ``[..., KH:, :]`` exactly as an unquantized pool;
- ``scale [P, S, 2*KH]`` bf16: one scale per token per K/V head, so the value is
  ``data.astype(f32) * scale[..., None]``.

Scales are per token and head (chosen on write from that token's own K or V head vector, so a page
never needs re-quantizing as it fills, and an outlier head does not coarsen the others). A scale is
``amax / qmax`` rounded *up* to bf16 before the values are divided by it: the stored bf16 scale is
exactly the one the values were quantized with, so bf16 adds no error of its own, and no value
exceeds the format's range. Bytes per token and head: ``D + 2`` against ``2 * D`` for bf16 (1.94x
the tokens per byte at D=64, 1.97x at D=128).

Because both arrays share the leading ``[P, S, 2*KH]`` axes, page gathers/scatters
(``jax.tree.map(lambda a: a[pages], kv)``) and head-axis sharding (axis 2) apply to both leaves alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# --kv-cache-dtype names (SGLang's) of the quantized formats -> storage dtype
QUANTIZED_KV_DTYPES: dict[str, Any] = {
    "fp8_e4m3": jnp.float8_e4m3fn,
    "fp8_e5m2": jnp.float8_e5m2,
    "int8": jnp.int8,
}
SCALE_DTYPE = jnp.bfloat16
_BF16_ROUND_UP = 1.0 + 2.0**-7  # > 1 + bf16's half-ulp: rounding to nearest after it never rounds below


def qmax(dtype: Any) -> float:
    """The largest magnitude the storage dtype holds (127 for int8: symmetric)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return 127.0
    return float(jnp.finfo(dtype).max)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedKV:
    """One layer's quantized KV pool (or a gathered slice of it: any shared leading axes)."""

    data: jax.Array  # [P, S, 2*KH, D] int8 / float8
    scale: jax.Array  # [P, S, 2*KH] bf16

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes


def is_quantized(kv: Any) -> bool:
    return isinstance(kv, QuantizedKV)


def quantize(x: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """x: [..., D] -> (values [..., D] in `dtype`, scale [...] bf16) with values * scale ~= x."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)  # [...]
    scale = (jnp.maximum(amax, 1e-30) / qmax(dtype) * _BF16_ROUND_UP).astype(SCALE_DTYPE)
    y = xf / scale.astype(jnp.float32)[..., None]
    if jnp.dtype(dtype) == jnp.int8:
        y = jnp.clip(jnp.round(y), -127.0, 127.0)
    return y.astype(dtype), scale


def dequantize(data: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """(values [..., D], scale [...]) -> [..., D] in `dtype`."""
    return (data.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)


def dequantize_kv(kv: QuantizedKV, dtype: Any = jnp.float32) -> jax.Array:
    return dequantize(kv.data, kv.scale, dtype)


def zeros(shape: tuple[int, ...], dtype: Any) -> QuantizedKV:
    """An empty quantized pool: shape [P, S, 2*KH, D], values in `dtype`, scales 0."""
    return QuantizedKV(jnp.zeros(shape, dtype), jnp.zeros(shape[:-1], SCALE_DTYPE))


def bytes_per_token_head(head_dim: int, dtype: Any) -> int:
    """Pool bytes one token takes per K or V head: D values, plus the scale when quantized."""
    dtype = jnp.dtype(dtype)
    if is_quantized_dtype(dtype):
        return head_dim * dtype.itemsize + np.dtype(SCALE_DTYPE).itemsize
    return head_dim * dtype.itemsize


def is_quantized_dtype(dtype: Any) -> bool:
    return jnp.dtype(dtype) in {jnp.dtype(d) for d in QUANTIZED_KV_DTYPES.values()}
