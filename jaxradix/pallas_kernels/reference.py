"""Pure-jnp ragged paged attention: the oracle for the Pallas kernels and the CPU path.

One ragged batch holds B sequences. Sequence b owns query tokens
``q[cu_q_lens[b]:cu_q_lens[b+1]]`` (q_len_b = 1 for decode rows, more for extend rows,
0 for padding rows) and has ``kv_lens[b]`` tokens of K/V in the pool, *including* the new
tokens of this step (they are written to the pool before attention runs). Query token i of
sequence b sits at position ``kv_lens[b] - q_len_b + i`` and attends causally to kv
positions ``<= `` its own (and, with a sliding window W, to positions ``> pos - W``).

KV pool layout, one array per layer: ``[num_pages, page_size, 2 * KH, D]`` with K heads at
``[..., :KH, :]`` and V heads at ``[..., KH:, :]``; every function here takes one layer's array.
Page 0 is reserved for padding writes and never holds real data. ``page_table[b, p]`` is the pool page that holds
tokens ``[p * page_size, (p + 1) * page_size)`` of sequence b.

A layer's pool may be a ``QuantizedKV`` (``--kv-cache-dtype fp8_e4m3|fp8_e5m2|int8``): ``write_kv`` quantizes the
new tokens, and attention dequantizes right after its gather (``read_pages``), so only the pages it reads are ever
expanded, never the pool.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.quantized_kv import QuantizedKV, dequantize, quantize

KVPool = jax.Array | QuantizedKV  # one layer's pool [P, S, 2*KH, D]


def read_pages(kv: KVPool, *index: Any, dtype: Any = jnp.float32) -> jax.Array:
    """kv[index] in `dtype` (dequantized when the pool is quantized): [*index shape, ..., D]."""
    if isinstance(kv, QuantizedKV):
        return dequantize(kv.data[index], kv.scale[index], dtype)
    return kv[index].astype(dtype)


def ragged_paged_attention(
    q: jax.Array,  # [T, NH, D]
    kv: KVPool,  # [P, S, 2*KH, D], one layer's pool
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, NH, D], rows of padding tokens are 0
    T, NH, D = q.shape
    _, S, KH2, _ = kv.shape
    KH = KH2 // 2
    G = NH // KH
    B, MP = md.page_table.shape

    # Each query token finds its sequence by its index in the ragged layout.
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.searchsorted(md.cu_q_lens[1:], t, side="right").astype(jnp.int32)  # [T]
    valid_q = seq < jnp.minimum(md.num_seqs[0], B)
    seq = jnp.minimum(seq, B - 1)
    q_len = md.cu_q_lens[seq + 1] - md.cu_q_lens[seq]  # [T]
    kv_len = md.kv_lens[seq]  # [T]
    q_pos = kv_len - q_len + (t - md.cu_q_lens[seq])  # [T]

    # Gather every sequence's pages: [B, MP * S, 2*KH, D]
    seq_kv = read_pages(kv, md.page_table).reshape(B, MP * S, KH2, D)  # f32
    k = seq_kv[:, :, :KH, :]  # [B, N, KH, D]
    v = seq_kv[:, :, KH:, :]  # [B, N, KH, D]

    qg = q.reshape(T, KH, G, D).astype(jnp.float32)
    kt = k[seq]  # [T, N, KH, D]
    vt = v[seq]  # [T, N, KH, D]
    s = jnp.einsum("tkgd,tnkd->tkgn", qg, kt) * sm_scale  # [T, KH, G, N]
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = jnp.arange(MP * S, dtype=jnp.int32)  # [N]
    mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_len[:, None])
    if sliding_window is not None:
        mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
    mask &= valid_q[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("tkgn,tnkd->tkgd", p, vt) / jnp.where(denom > 0, denom, 1.0)
    return o.reshape(T, NH, D).astype(q.dtype)


def write_kv(
    kv: KVPool,  # [P, S, 2*KH, D], one layer's pool
    k: jax.Array,  # [T, KH, D]
    v: jax.Array,  # [T, KH, D]
    slot_mapping: jax.Array,  # [T] int32, page * S + offset; padding tokens point into page 0
) -> KVPool:  # the pool, updated in place under donation
    S = kv.shape[1]
    page, offset = slot_mapping // S, slot_mapping % S
    new = jnp.concatenate([k, v], axis=1)  # [T, 2*KH, D]
    if isinstance(kv, QuantizedKV):
        data, scale = quantize(new, kv.dtype)  # [T, 2*KH, D], [T, 2*KH]
        return QuantizedKV(kv.data.at[page, offset].set(data), kv.scale.at[page, offset].set(scale))
    return kv.at[page, offset].set(new.astype(kv.dtype))


def ragged_paged_attention_blocked(
    q: jax.Array,  # [T, NH, D]
    kv: KVPool,  # [P, S, 2*KH, D], one layer's pool
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_tokens: int = 128,
) -> jax.Array:  # [T, NH, D]
    """The CPU serving path: the same function as ragged_paged_attention, computed with an online
    softmax over blocks of KV pages, looping only up to the longest live sequence, so the cost
    follows the real context instead of the page table's width."""
    T, NH, D = q.shape
    _, S, KH2, _ = kv.shape
    KH = KH2 // 2
    G = NH // KH
    B, MP = md.page_table.shape
    C = max(1, min(block_tokens // S, MP))  # pages per block
    n_blocks = -(-MP // C)
    page_table = jnp.pad(md.page_table, ((0, 0), (0, n_blocks * C - MP)))  # [B, n_blocks * C]

    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.searchsorted(md.cu_q_lens[1:], t, side="right").astype(jnp.int32)  # [T]
    valid_q = seq < jnp.minimum(md.num_seqs[0], B)
    seq = jnp.minimum(seq, B - 1)
    q_len = md.cu_q_lens[seq + 1] - md.cu_q_lens[seq]
    kv_len = jnp.where(valid_q, md.kv_lens[seq], 0)  # [T]
    q_pos = kv_len - q_len + (t - md.cu_q_lens[seq])  # [T]
    qg = q.reshape(T, KH, G, D).astype(jnp.float32) * sm_scale

    def body(i, carry):
        m, l, acc = carry  # [T, KH, G], [T, KH, G], [T, KH, G, D]
        pages = jax.lax.dynamic_slice_in_dim(page_table, i * C, C, axis=1)[seq]  # [T, C]
        blk = read_pages(kv, pages).reshape(T, C * S, KH2, D)  # [T, C*S, 2*KH, D] f32
        s = jnp.einsum("tkgd,tnkd->tkgn", qg, blk[:, :, :KH])  # [T, KH, G, C*S]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = i * C * S + jnp.arange(C * S, dtype=jnp.int32)
        mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_len[:, None])
        if sliding_window is not None:
            mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = l * alpha + jnp.sum(p, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("tkgn,tnkd->tkgd", p, blk[:, :, KH:])
        return m_new, l, acc

    n_live = -(-jnp.max(kv_len) // (C * S))
    init = (jnp.full((T, KH, G), -jnp.inf, jnp.float32), jnp.zeros((T, KH, G), jnp.float32),
            jnp.zeros((T, KH, G, D), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_live, body, init)
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return o.reshape(T, NH, D).astype(q.dtype)
