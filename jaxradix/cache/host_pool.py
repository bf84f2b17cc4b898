"""The host tier of the KV cache: pages in host memory (numpy), and the jitted page copies to and
from the device pool.

A host page holds one device page of every layer: `data[L, Ph, S, 2*KH, D]` (a quantized pool: a
`QuantizedKV` of `[L, Ph, S, 2*KH, D]` values and `[L, Ph, S, 2*KH]` scales, copied as stored). Copies move whole
pages, padded to a fixed page-count bucket (powers of two up to MAX_BUCKET; longer copies go in
several calls) so nothing compiles while serving once `precompile` ran. Padding entries read and
write the reserved device page 0 and the reserved host page 0.

A save (device -> host, the write-back of pages the device evicts) is dispatched, not waited for: the
gather runs on the device after the step in flight, and its copy to host memory lands in `data` when the
next save, a load, or `poll` (once per engine iteration) finds it done. At most one chunk is in flight,
so the device holds no more copy buffers than a synchronous save did. The device pages can be reused at
once: the gather is ordered before any later step that writes them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.cache.page_allocator import PageAllocator
from jaxradix.cache.page_pool import PagePool
from jaxradix.pallas_kernels.reference import KVPool as Layer  # one layer's device pool [P, S, 2*KH, D]

logger = logging.getLogger(__name__)

MAX_BUCKET = 64  # pages per compiled copy


@dataclass
class HostStats:
    saved_pages: int = 0  # device -> host copies (write-back on device eviction)
    loaded_pages: int = 0  # host -> device copies (a match reaching host-resident nodes)
    save_seconds: float = 0.0  # host wall time of the copies out (dispatch, and waiting for an earlier one)
    load_seconds: float = 0.0  # host wall time to stage and dispatch the copies in (asynchronous)


def host_pages_for(pool: PagePool, size_gb: float, ratio: float) -> int:
    """Host pool size in pages: size_gb GB when > 0, else ratio x the device pool."""
    if size_gb > 0:
        page_bytes = pool.nbytes // pool.num_pages
        return max(int(size_gb * 1e9 // page_bytes), 1)
    return max(int(pool.capacity * ratio), 1)


def _gather(kv: tuple[Layer, ...], pages: jax.Array) -> Layer:
    """kv: L x [P, S, 2*KH, D]; pages: [B] -> [L, B, S, 2*KH, D] (leaf by leaf when quantized)."""
    return jax.tree.map(lambda *layers: jnp.stack([a[pages] for a in layers]), *kv)


def _scatter(kv: tuple[Layer, ...], pages: jax.Array, data: Layer) -> tuple[Layer, ...]:
    """Write data [L, B, S, 2*KH, D] into pages [B] of every layer."""
    return tuple(jax.tree.map(lambda a, d, i=i: a.at[pages].set(d[i].astype(a.dtype)), layer, data)
                 for i, layer in enumerate(kv))


class HostPool(PageAllocator):
    def __init__(self, pool: PagePool, num_pages: int):
        self.pool = pool
        self.page_size = pool.page_size
        super().__init__(num_pages + 1, "host page")  # + the reserved page 0 (padding writes there)
        L = len(pool.kv)
        # [L, Ph, S, 2*KH, D], or a QuantizedKV of host arrays for a quantized pool
        self.data: Any = jax.tree.map(lambda a: np.zeros((L, self.num_pages) + tuple(a.shape[1:]), a.dtype), pool.kv[0])
        self.stats = HostStats()
        self._pending: deque[tuple[np.ndarray, int, Any]] = deque()  # (host pages [k], k, device copy [L, b, ...])
        self._save = jax.jit(_gather)
        # the pool keeps its layout (sharded under TP): the compiled steps take exactly these shardings
        self._load = jax.jit(_scatter, donate_argnums=(0,), out_shardings=jax.tree.map(lambda a: a.sharding, pool.kv))
        self.buckets = [b for b in (1 << i for i in range(MAX_BUCKET.bit_length())) if b <= MAX_BUCKET]
        logger.info("KV host pool: %d pages x %d tokens (%.1f MiB)", self.capacity, self.page_size,
                    self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self.data))

    def _rows(self, pages: np.ndarray) -> Any:
        """Host pages [n] of every layer: [L, n, S, 2*KH, D] (leaf by leaf), every save landed."""
        self._land()
        return jax.tree.map(lambda a: a[:, pages], self.data)

    def _land(self, keep: int = 0, only_ready: bool = False) -> None:
        """Write pending saves into `data`, oldest first, until `keep` remain (only_ready: stop at one the
        device has not finished)."""
        while len(self._pending) > keep:
            pages, k, out = self._pending[0]
            if only_ready and not all(leaf.is_ready() for leaf in jax.tree.leaves(out)):
                return
            self._pending.popleft()
            got = jax.device_get(out)  # [L, b, S, 2*KH, D]
            for host, leaf in zip(jax.tree.leaves(self.data), jax.tree.leaves(got), strict=True):
                host[:, pages] = leaf[:, :k]

    def poll(self) -> None:
        """Land the saves the device has finished (the engine calls it once per iteration)."""
        if self._pending:
            t = time.perf_counter()
            self._land(only_ready=True)
            self.stats.save_seconds += time.perf_counter() - t

    def _chunks(self, n: int) -> list[tuple[int, int, int]]:  # (start, length, bucket)
        out, start = [], 0
        while start < n:
            k = min(n - start, MAX_BUCKET)
            out.append((start, k, next(b for b in self.buckets if b >= k)))
            start += k
        return out

    def save(self, device_pages: np.ndarray, host_pages: np.ndarray) -> None:
        """Copy device pages to host pages: dispatched; the copy lands in `data` later (module docstring)."""
        t = time.perf_counter()
        for start, k, b in self._chunks(len(device_pages)):
            self._land(keep=0)  # one chunk in flight at most
            idx = np.zeros(b, np.int32)
            idx[:k] = device_pages[start:start + k]
            out = self._save(self.pool.kv, idx)  # [L, b, S, 2*KH, D], computed after the step in flight
            for leaf in jax.tree.leaves(out):
                leaf.copy_to_host_async()
            self._pending.append((np.array(host_pages[start:start + k]), k, out))
        self.stats.saved_pages += len(device_pages)
        self.stats.save_seconds += time.perf_counter() - t

    def load(self, host_pages: np.ndarray, device_pages: np.ndarray) -> None:
        """Copy host pages into device pages: dispatched, not waited for; the device runs it before
        any later step, which takes the updated pool."""
        t = time.perf_counter()
        for start, k, b in self._chunks(len(host_pages)):
            idx = np.zeros(b, np.int32)
            idx[:k] = device_pages[start:start + k]
            src = np.zeros(b, np.int32)
            src[:k] = host_pages[start:start + k]
            self.pool.kv = self._load(self.pool.kv, idx, self._rows(src))
        self.stats.loaded_pages += len(host_pages)
        self.stats.load_seconds += time.perf_counter() - t

    def precompile(self) -> None:
        """Compile the copies of every bucket (a load of page 0 onto itself changes nothing kept)."""
        self._land()
        for b in self.buckets:
            idx = np.zeros(b, np.int32)
            jax.device_get(self._save(self.pool.kv, idx))
            self.pool.kv = self._load(self.pool.kv, idx, self._rows(idx))
