"""Attention implementations behind one signature, picked by backend.

Every implementation is ``f(q, kv, md, *, sm_scale, sliding_window=None, soft_cap=None)
-> [T, NH, D]`` with the semantics of ``reference.ragged_paged_attention``; ``kv`` is one
layer's pool array ``[P, S, 2*KH, D]`` (the pool is a tuple of them, one per layer), or a
quantized ``QuantizedKV`` (int8/fp8 values + bf16 scales) that every implementation also takes.

- ``get_attention("auto")``: the Mosaic GPU kernel on Hopper GPUs, the Mosaic TPU kernel on
  TPUs, the Triton kernel (``triton/``) on other NVIDIA GPUs of compute capability >= 8.0 (A100,
  A10, L4, L40), the per-sequence gather path (``gathered.py``) on CPU, on older GPUs (T4) and
  wherever the chosen kernel cannot take the operands (with a log line; e.g. an fp8 pool on an
  A100). All three kernels read quantized pages and dequantize them in the kernel.
- ``get_attention("pallas")``: a Pallas kernel; on CPU it runs in interpret mode, the TPU kernel
  unless ``interpret="gpu"``.
- ``get_attention("triton")``: the Triton kernel (interpret mode on CPU).
- ``get_attention("gathered")``: the per-sequence gather path everywhere. On a GPU of compute
  capability >= 8.0 its extend tiles go through cuDNN (``jax.nn.dot_product_attention``) when the
  operands allow it (bf16/f16 pool, head dim <= 128, no sliding window or soft cap).
- ``get_attention("reference")``: the blocked jnp reference (a per-token gather) everywhere.

``interpret`` ("tpu" or "gpu") forces that kernel in interpret mode on any backend (debugging).
The KV writer is the reference scatter (``write_kv``) for every backend: one XLA scatter, done
in place under donation, before attention runs.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxradix.pallas_kernels import metadata, reference
from jaxradix.pallas_kernels.common import compute_capability
from jaxradix.pallas_kernels.gathered import ragged_paged_attention_gathered
from jaxradix.pallas_kernels.reference import ragged_paged_attention_blocked, write_kv

ATTENTION_BACKENDS = ("auto", "pallas", "triton", "gathered", "reference")
INTERPRET_MODES = ("tpu", "gpu", "triton")

AttentionFn = Callable[..., jax.Array]
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A fallback is decided while tracing, once per layer and bucket: say it once per process."""
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


def _tpu_kernel(interpret: bool) -> AttentionFn:
    from jax.experimental.pallas import tpu as pltpu

    from jaxradix.pallas_kernels.tpu.ragged_paged_attention import ragged_paged_attention

    params = pltpu.InterpretParams(uninitialized_memory="nan") if interpret else False
    return functools.partial(ragged_paged_attention, interpret=params)


def _gpu_kernel(interpret: bool, *, fallback: AttentionFn | None) -> AttentionFn:
    """The Mosaic GPU kernel; shapes or dtypes it does not cover go to `fallback` (or raise)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from jaxradix.pallas_kernels.gpu import ragged_paged_attention as gpu

    params = plgpu.InterpretGPUParams(uninitialized_memory="nan") if interpret else None
    variant = os.environ.get("JAXRADIX_GPU_ATTENTION_VARIANT", "v2")
    if variant not in gpu.VARIANTS:
        raise ValueError(f"JAXRADIX_GPU_ATTENTION_VARIANT must be one of {gpu.VARIANTS}, got {variant!r}")

    def attention(q, kv, md, **kwargs) -> jax.Array:
        why = gpu.unsupported_reason(q, kv)
        if why is None and not interpret and not _is_hopper():
            why = "needs an sm_90 (Hopper) GPU for wgmma"
        if why is None:
            return gpu.ragged_paged_attention(q, kv, md, interpret=params, variant=variant, **kwargs)
        if fallback is None:
            raise NotImplementedError(f"Mosaic GPU attention kernel: {why}")
        _warn_once(f"Mosaic GPU attention kernel: {why}; using {getattr(fallback, 'label', 'a fallback')}")
        return fallback(q, kv, md, **kwargs)

    return attention


def _triton_kernel(interpret: bool, *, fallback: AttentionFn | None) -> AttentionFn:
    """The Triton kernel (sm_80+); operands it does not take go to `fallback` (or raise)."""
    from jaxradix.pallas_kernels.triton import ragged_paged_attention as triton

    def attention(q, kv, md, **kwargs) -> jax.Array:
        why = triton.unsupported_reason(q, kv)
        cc = _compute_capability()
        if why is None and not interpret and (cc is None or cc < 8.0):  # XLA compiles no Triton below sm_80
            why = f"needs compute capability >= 8.0, got {cc}"
        if why is None and not interpret and triton.is_fp8(kv) and cc < 8.9:
            why = f"an fp8 pool needs compute capability >= 8.9 in Triton, got {cc}"
        if why is None:
            return triton.ragged_paged_attention(q, kv, md, interpret=interpret, **kwargs)
        if fallback is None:
            raise NotImplementedError(f"Triton attention kernel: {why}")
        _warn_once(f"Triton attention kernel: {why}; using {getattr(fallback, 'label', 'a fallback')}")
        return fallback(q, kv, md, **kwargs)

    attention.label = "the Triton attention kernel"
    return attention


def _compute_capability() -> float | None:  # one name to patch in tests
    return compute_capability()


def _is_hopper() -> bool:
    return _compute_capability() == 9.0


def _cudnn_prefill_reason(q: jax.Array, kv: jax.Array, sliding_window, soft_cap) -> str | None:
    """Why cuDNN flash attention cannot take the extend tiles (None when it can)."""
    cc = _compute_capability()
    if cc is None or cc < 8.0:
        return f"cuDNN flash attention needs compute capability >= 8.0, got {cc}"
    if kv.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs a bf16/f16 kv pool, got {kv.dtype}"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head dim {q.shape[-1]}"
    if sliding_window is not None or soft_cap is not None:
        return "sliding window or soft cap"
    return None


# Tile sizes of the gathered path on CPU (docs/benchmarks.md, SmolLM2 shapes on 2 cores): 512-token
# prefills are fastest in 128-token tiles over 256-token kv blocks, short rows after a shared prefix in
# 32-token tiles over 128-token blocks, decode rows' own pages in 64-token blocks, the shared prefix
# in 128-token blocks.
CPU_GATHERED_TILES = dict(q_tile=128, kv_block_tokens=256, decode_block_tokens=64, short_q_tile=32,
                          short_kv_block_tokens=128, shared_block_tokens=128)


def _gathered(platform: str) -> AttentionFn:
    """The per-sequence gather path; on a GPU its extend tiles use cuDNN where it applies."""

    def attention(q, kv, md, *, sm_scale, sliding_window=None, soft_cap=None) -> jax.Array:
        params = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        if platform == "cpu":
            params |= CPU_GATHERED_TILES
        if platform in ("gpu", "cuda") and _cudnn_prefill_reason(q, kv, sliding_window, soft_cap) is None:
            try:
                return ragged_paged_attention_gathered(
                    q, kv, md, prefill="dot_product_attention", implementation="cudnn", **params
                )
            except NotImplementedError as e:  # cuDNN's own shape checks, raised while tracing
                _log.warning("cuDNN prefill: %s; extend tiles use the einsum path", e)
        return ragged_paged_attention_gathered(q, kv, md, **params)

    attention.reads_shared_prefix = True  # the engine marks a shared prefix for its cascade (gathered.py)
    attention.label = "the gathered attention"
    return attention


def probe(attention: AttentionFn, *, heads: int, kv_heads: int, head_dim: int, q_dtype, kv_dtype, page_size: int,
          sliding_window: int | None = None, platform: str | None = None) -> AttentionFn:
    """`auto` on a GPU: lower `attention` once on a small batch with a decode and an extend row, at the
    model's shapes and dtypes (a shard's heads under tensor parallelism), and compile it when it runs the
    Triton kernel. If that fails on this GPU (XLA has not yet compiled the Triton kernel on a real GPU),
    serve with the gathered path instead, with a log line, rather than fail at start-up."""
    platform = platform or jax.default_backend()
    if platform not in ("gpu", "cuda"):
        return attention
    from jaxradix.pallas_kernels.quantized_kv import SCALE_DTYPE, is_quantized_dtype

    SDS, i32, S, B, T = jax.ShapeDtypeStruct, jnp.int32, page_size, 2, 8  # rows: 1 decode token, 7 extend tokens
    pages = 1 + B * max(1, -(-64 // S))
    shape = (pages, S, 2 * kv_heads, head_dim)
    kv = SDS(shape, kv_dtype)
    if is_quantized_dtype(kv_dtype):
        from jaxradix.pallas_kernels.quantized_kv import QuantizedKV

        kv = QuantizedKV(SDS(shape, kv_dtype), SDS(shape[:-1], SCALE_DTYPE))
    md = metadata.AttentionMetadata(SDS((B + 1,), i32), SDS((B,), i32), SDS((B, (pages - 1) // B), i32),
                                    SDS((1,), i32))
    fn = functools.partial(attention, sm_scale=head_dim**-0.5, sliding_window=sliding_window)
    try:
        lowered = jax.jit(fn).trace(SDS((T, heads, head_dim), q_dtype), kv, md).lower()
        if "xla.gpu.triton" in lowered.as_text():  # the Mosaic GPU kernel has run on H200s: not probed
            lowered.compile()
    except Exception as e:  # any compile failure of a kernel: keep serving on the gathered path
        _log.warning("attention: the kernel auto picked does not compile on this GPU (%s: %s); serving with the "
                     "gathered attention (--attention-backend gathered)", type(e).__name__, str(e).split("\n")[0][:300])
        return _gathered(platform)
    return attention


def get_attention(backend: str = "auto", interpret: str | None = None) -> AttentionFn:
    """The attention function for `backend` (see the module docstring)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if interpret is not None and interpret not in INTERPRET_MODES:
        raise ValueError(f"attention interpret must be one of {INTERPRET_MODES} or None, got {interpret!r}")
    if backend == "reference":
        return ragged_paged_attention_blocked
    platform = jax.default_backend()
    if backend == "gathered":
        return _gathered(platform)
    if interpret is not None:
        if interpret == "triton":
            return _triton_kernel(True, fallback=None)
        return _tpu_kernel(True) if interpret == "tpu" else _gpu_kernel(True, fallback=None)
    if backend == "triton":
        return _triton_kernel(platform == "cpu", fallback=None)
    if platform == "tpu":
        return _tpu_kernel(False)
    if platform in ("gpu", "cuda"):
        if backend == "pallas":
            return _gpu_kernel(False, fallback=None)
        return _gpu_kernel(False, fallback=_triton_kernel(False, fallback=_gathered(platform)))
    if backend == "pallas":  # CPU (or a platform without a kernel): interpret the TPU kernel
        return _tpu_kernel(True)
    return _gathered(platform)


__all__ = [
    "ATTENTION_BACKENDS",
    "INTERPRET_MODES",
    "get_attention",
    "reference",
    "write_kv",
]
