"""The paged KV pool: one device array per layer plus a host allocator of their pages.

Page 0 is reserved: padding tokens write there and no sequence ever reads it. With a quantized
``--kv-cache-dtype`` (fp8_e4m3, fp8_e5m2, int8) a layer's pool is a ``QuantizedKV`` (values + per-token-head
scales, pallas_kernels/quantized_kv.py), and the sizer counts its real bytes per token.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.cache.page_allocator import PageAllocator
from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels import quantized_kv
from jaxradix.pallas_kernels.quantized_kv import QUANTIZED_KV_DTYPES, QuantizedKV

if TYPE_CHECKING:  # tensor_parallel allocates its pool shards with empty_layer
    from jaxradix.parallel.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)

# No memory stats on CPU: the pool takes a share of the RAM that is free at start-up, at most a few
# full contexts of the model and at most CPU_POOL_MAX_BYTES.
CPU_POOL_MAX_BYTES = 2 << 30
CPU_POOL_RAM_FRACTION = 0.25
CPU_POOL_CONTEXTS = 4
# On a device with memory stats, what the pool leaves free beyond the measured activations of the
# largest step: this share of them (allocator fragmentation, host-tier copies) plus a fixed floor.
ACTIVATION_MARGIN = 0.2
HEADROOM_FLOOR_BYTES = 256 << 20
PLAIN_KV_DTYPES = ("bfloat16", "float16", "float32")


def kv_dtype(name: str, weights_dtype: jnp.dtype) -> jnp.dtype:
    """A --kv-cache-dtype name -> the pool's storage dtype (auto: the weights' dtype)."""
    if name == "auto":
        return jnp.dtype(weights_dtype)
    if name in QUANTIZED_KV_DTYPES:
        return jnp.dtype(QUANTIZED_KV_DTYPES[name])
    if name in PLAIN_KV_DTYPES:
        return jnp.dtype(name)
    raise ValueError(f"kv_cache_dtype: must be one of {('auto', *PLAIN_KV_DTYPES, *QUANTIZED_KV_DTYPES)}, "
                     f"got {name!r}")


def kv_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype, kv_heads: int | None = None) -> int:
    """Bytes of K and V per token over all layers (scales included), for kv_heads heads (default: the model's)."""
    kv_heads = cfg.num_kv_heads if kv_heads is None else kv_heads
    return cfg.num_layers * 2 * kv_heads * quantized_kv.bytes_per_token_head(cfg.head_dim, dtype)


def empty_layer(shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array | QuantizedKV:
    """One layer's zero pool [P, S, 2*KH, D]: a QuantizedKV for the quantized dtypes."""
    return quantized_kv.zeros(shape, dtype) if quantized_kv.is_quantized_dtype(dtype) else jnp.zeros(shape, dtype)


def available_ram() -> int | None:
    """Bytes of RAM free now (Linux: MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_stats() -> dict[str, int]:
    """This process's first device's memory stats ({} on CPU: it reports none)."""
    return jax.local_devices()[0].memory_stats() or {}


def has_memory_stats() -> bool:
    """Whether this process's device reports its memory (GPU/TPU; not CPU)."""
    return "bytes_limit" in device_memory_stats()


def pool_tokens(cfg: ModelConfig, dtype: jnp.dtype, max_total_tokens: int | None,
                mem_fraction_static: float | None, tp: TensorParallel | None = None,
                activation_bytes: int = 0) -> int:
    """Pool size in tokens: max_total_tokens, or on a device with memory stats what is free after the
    weights (in use) and the headroom of the largest step (activation_bytes measured, plus
    ACTIVATION_MARGIN and HEADROOM_FLOOR_BYTES), capped at mem_fraction_static of the device's memory
    when it is given; on CPU a share of the free RAM (see CPU_POOL_*). Under TP each device holds its
    own KV heads' share. A pool that cannot fit is a MemoryError naming the flag to change, before
    anything is allocated."""
    per_token = kv_bytes_per_token(cfg, dtype, None if tp is None else tp.layout.local_kv_heads)
    stats = device_memory_stats()
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        where = f"{jax.local_devices()[0].device_kind} memory"
    else:
        free = available_ram()
        where = "free RAM"
    if max_total_tokens is not None:
        need = max_total_tokens * per_token
        if free is not None and need > free:
            raise MemoryError(f"--max-total-tokens {max_total_tokens} needs a {need / 2**30:.1f} GiB KV pool "
                              f"({per_token} bytes per token), but only {free / 2**30:.1f} GiB of {where} is "
                              f"available: lower --max-total-tokens (at most {int(free // per_token)})")
        return max_total_tokens
    if "bytes_limit" in stats:
        headroom = int(activation_bytes * (1 + ACTIVATION_MARGIN)) + HEADROOM_FLOOR_BYTES
        budget = free - headroom
        if mem_fraction_static is not None:
            budget = min(budget, stats["bytes_limit"] * mem_fraction_static - stats.get("bytes_in_use", 0))
    else:
        budget = min(CPU_POOL_MAX_BYTES, per_token * CPU_POOL_CONTEXTS * cfg.max_position_embeddings)
        if free is not None:
            budget = min(budget, free * CPU_POOL_RAM_FRACTION)
    if budget < per_token * 256:
        what = "the device's free memory" if mem_fraction_static is None else \
            f"--mem-fraction-static {mem_fraction_static}"
        raise MemoryError(f"{what} leaves {budget / 2**20:.0f} MiB for the KV pool after the weights and "
                          f"{activation_bytes / 2**20:.0f} MiB of activations, too little: set --max-total-tokens, "
                          f"a smaller --kv-cache-dtype (fp8_e4m3), fewer --max-running-requests or a smaller "
                          f"--chunked-prefill-size")
    return int(budget // per_token)


class PagePool(PageAllocator):
    """The device KV arrays and, through PageAllocator, the free list of their pages."""

    def __init__(self, cfg: ModelConfig, num_tokens: int, page_size: int, dtype: jnp.dtype,
                 tp: TensorParallel | None = None):
        self.page_size = page_size
        super().__init__(num_tokens // page_size + 1)  # + the reserved page 0
        if self.num_pages < 2:
            raise ValueError(f"max_total_tokens={num_tokens} holds no page of {page_size} tokens")
        shape = (self.num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
        self.dtype = jnp.dtype(dtype)  # the storage dtype (the values' dtype when quantized)
        # L arrays [P, S, 2*KH, D] (or QuantizedKV); page p of every layer belongs to the same tokens. Under
        # TP each device holds [P, S, 2*KHl, D] of every page (its own heads; the same page ids everywhere).
        self.kv: tuple[jax.Array | QuantizedKV, ...] = (
            tuple(empty_layer(shape, dtype) for _ in range(cfg.num_layers)) if tp is None
            else tp.kv_pool(self.num_pages, page_size, cfg.num_layers, dtype))
        logger.info("KV pool: %d pages x %d tokens, %s (%.1f MiB over %d device(s))", self.num_pages - 1,
                    page_size, self.dtype, self.nbytes / 2**20, 1 if tp is None else tp.tp)

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's pool (values and scales), over all devices."""
        return sum(a.nbytes for a in self.kv)

    @property
    def quantized(self) -> bool:
        return quantized_kv.is_quantized_dtype(self.dtype)

    def free_slots(self, slots: np.ndarray) -> None:
        """Free the pages of token slots handed back by the radix tree (always whole pages)."""
        self.free(np.asarray(slots[:: self.page_size] // self.page_size, np.int32))
