"""Attention implementations behind one signature, picked by backend.

Every implementation is ``f(q, kv, md, *, sm_scale, sliding_window=None, soft_cap=None)
-> [T, NH, D]`` with the semantics of ``reference.ragged_paged_attention``; ``kv`` is one
layer's pool array ``[P, S, 2*KH, D]`` (the pool is a tuple of them, one per layer).

- ``get_attention("auto")``: the Mosaic GPU kernel on NVIDIA GPUs, the Mosaic TPU kernel on
  TPUs, the jnp reference (its blocked form, the CPU serving path) elsewhere.
- ``get_attention("pallas")``: a Pallas kernel; on CPU it runs in interpret mode, the TPU kernel
  unless ``interpret="gpu"``.
- ``get_attention("reference")``: the jnp reference everywhere.

``interpret`` ("tpu" or "gpu") forces that kernel in interpret mode on any backend (debugging).
The KV writer is the reference scatter (``write_kv``) for every backend: one XLA scatter, done
in place under donation, before attention runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax

from jaxradix.pallas_kernels import reference
from jaxradix.pallas_kernels.reference import ragged_paged_attention_blocked, write_kv

ATTENTION_BACKENDS = ("auto", "pallas", "reference")
INTERPRET_MODES = ("tpu", "gpu")

AttentionFn = Callable[..., jax.Array]
_log = logging.getLogger(__name__)


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

    def attention(q, kv, md, **kwargs) -> jax.Array:
        why = gpu.unsupported_reason(q, kv)
        if why is None and not interpret and not _is_hopper():
            why = "needs an sm_90 (Hopper) GPU for wgmma"
        if why is None:
            return gpu.ragged_paged_attention(q, kv, md, interpret=params, **kwargs)
        if fallback is None:
            raise NotImplementedError(f"Mosaic GPU attention kernel: {why}")
        _log.warning("Mosaic GPU attention kernel: %s; using the reference attention", why)
        return fallback(q, kv, md, **kwargs)

    return attention


def _is_hopper() -> bool:
    return getattr(jax.devices()[0], "compute_capability", None) == "9.0"


def get_attention(backend: str = "auto", interpret: str | None = None) -> AttentionFn:
    """The attention function for `backend` (see the module docstring)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if interpret is not None and interpret not in INTERPRET_MODES:
        raise ValueError(f"attention interpret must be one of {INTERPRET_MODES} or None, got {interpret!r}")
    if backend == "reference":
        return ragged_paged_attention_blocked
    if interpret is not None:
        return _tpu_kernel(True) if interpret == "tpu" else _gpu_kernel(True, fallback=None)
    platform = jax.default_backend()
    if platform == "tpu":
        return _tpu_kernel(False)
    if platform in ("gpu", "cuda"):
        return _gpu_kernel(False, fallback=ragged_paged_attention_blocked if backend == "auto" else None)
    if backend == "pallas":  # CPU (or a platform without a kernel): interpret the TPU kernel
        return _tpu_kernel(True)
    return ragged_paged_attention_blocked


__all__ = [
    "ATTENTION_BACKENDS",
    "INTERPRET_MODES",
    "get_attention",
    "reference",
    "write_kv",
]
