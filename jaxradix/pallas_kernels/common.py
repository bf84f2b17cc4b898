"""Shape checks and metadata clean-up shared by the Pallas attention kernels."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxradix.pallas_kernels.metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionShape:
    T: int  # ragged query tokens
    NH: int  # query heads
    KH: int  # kv heads
    G: int  # query heads per kv head
    D: int  # head dim
    S: int  # page size
    B: int  # sequence rows (live + padding)
    MP: int  # pages per sequence row

    @staticmethod
    def of(q: jax.Array, kv_pool: jax.Array, md: AttentionMetadata) -> AttentionShape:
        T, NH, D = q.shape
        if kv_pool.ndim != 4:
            raise ValueError(f"kv_pool must be one layer's [P, S, 2*KH, D], got {kv_pool.shape}")
        _, S, KH2, Dk = kv_pool.shape
        if KH2 % 2 or Dk != D:
            raise ValueError(f"kv_pool {kv_pool.shape} does not match q {q.shape}")
        KH = KH2 // 2
        if NH % KH:
            raise ValueError(f"query heads {NH} must be a multiple of kv heads {KH}")
        B, MP = md.page_table.shape
        if md.cu_q_lens.shape != (B + 1,) or md.kv_lens.shape != (B,) or md.num_seqs.shape != (1,):
            raise ValueError("metadata shapes must be cu_q_lens [B+1], kv_lens [B], num_seqs [1]")
        return AttentionShape(T=T, NH=NH, KH=KH, G=NH // KH, D=D, S=S, B=B, MP=MP)


def clean_metadata(md: AttentionMetadata) -> AttentionMetadata:
    """Gives padding rows (>= num_seqs) an empty query range and no kv, so kernels skip them.

    The reference treats every token of a row >= num_seqs as padding; making those rows empty
    (their cu_q_lens repeat the live total) keeps cu_q_lens sorted even when the batch builder
    leaves stale values there, so a block can find its sequences by binary search.
    """
    B = md.kv_lens.shape[0]
    n = jnp.clip(md.num_seqs[0], 0, B).astype(jnp.int32)
    rows = jnp.arange(B + 1, dtype=jnp.int32)
    cu = md.cu_q_lens.astype(jnp.int32)
    cu = jnp.where(rows <= n, cu, cu[n])  # [B+1]
    kv_lens = jnp.where(rows[:B] < n, md.kv_lens.astype(jnp.int32), 0)  # [B]
    shared_lens = None if md.shared_lens is None else jnp.where(rows[:B] < n, md.shared_lens.astype(jnp.int32), 0)
    return AttentionMetadata(
        cu_q_lens=cu,
        kv_lens=kv_lens,
        page_table=md.page_table.astype(jnp.int32),
        num_seqs=n.reshape(1),
        shared_pages=md.shared_pages,
        shared_lens=shared_lens,
    )


def compute_capability() -> float | None:
    """The default device's NVIDIA compute capability, e.g. 8.0 (None on CPU, TPU and ROCm, whose is "gfx...")."""
    try:
        return float(getattr(jax.devices()[0], "compute_capability", None))
    except (TypeError, ValueError):
        return None


def device_sm_count(default: int) -> int:
    """Streaming multiprocessors of the default device (`default` when it does not say: CPU, interpret)."""
    device = jax.devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(count) if count else default


def kv_splits(tiles: int, kv_heads: int, max_blocks: int, cores: int) -> int:
    """FlashDecoding kv splits: enough programs for about two waves over the GPU's `cores` SMs, at most 16
    and never more than the kv blocks to split."""
    want = -(-2 * cores // max(1, tiles * kv_heads))
    return int(max(1, min(want, 16, max_blocks)))


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m
