"""Pure-jnp ragged paged attention: the oracle for the Pallas kernels and the CPU path.

One ragged batch holds B sequences. Sequence b owns query tokens
``q[cu_q_lens[b]:cu_q_lens[b+1]]`` (q_len_b = 1 for decode rows, more for extend rows,
0 for padding rows) and has ``kv_lens[b]`` tokens of K/V in the pool, *including* the new
tokens of this step (they are written to the pool before attention runs). Query token i of
sequence b sits at position ``kv_lens[b] - q_len_b + i`` and attends causally to kv
positions ``<= `` its own (and, with a sliding window W, to positions ``> pos - W``).

KV pool layout, one array for all layers: ``[L, num_pages, page_size, 2 * KH, D]`` with
K heads at ``[..., :KH, :]`` and V heads at ``[..., KH:, :]``. Page 0 is reserved for
padding writes and never holds real data. ``page_table[b, p]`` is the pool page that holds
tokens ``[p * page_size, (p + 1) * page_size)`` of sequence b.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxradix.pallas_kernels.metadata import AttentionMetadata


def ragged_paged_attention(
    q: jax.Array,  # [T, NH, D]
    kv_pool: jax.Array,  # [L, P, S, 2*KH, D]
    layer: jax.Array | int,  # scalar int32: which layer of the pool
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, NH, D], rows of padding tokens are 0
    T, NH, D = q.shape
    _, _, S, KH2, _ = kv_pool.shape
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

    layer_kv = jax.lax.dynamic_index_in_dim(kv_pool, layer, axis=0, keepdims=False)
    # Gather every sequence's pages: [B, MP * S, 2*KH, D]
    seq_kv = layer_kv[md.page_table].reshape(B, MP * S, KH2, D)
    k = seq_kv[:, :, :KH, :]  # [B, N, KH, D]
    v = seq_kv[:, :, KH:, :]  # [B, N, KH, D]

    qg = q.reshape(T, KH, G, D).astype(jnp.float32)
    kt = k[seq].astype(jnp.float32)  # [T, N, KH, D]
    vt = v[seq].astype(jnp.float32)  # [T, N, KH, D]
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
    kv_pool: jax.Array,  # [L, P, S, 2*KH, D]
    layer: jax.Array | int,
    k: jax.Array,  # [T, KH, D]
    v: jax.Array,  # [T, KH, D]
    slot_mapping: jax.Array,  # [T] int32, page * S + offset; padding tokens point into page 0
) -> jax.Array:  # the pool, updated in place under donation
    S = kv_pool.shape[2]
    kv = jnp.concatenate([k, v], axis=1).astype(kv_pool.dtype)  # [T, 2*KH, D]
    return kv_pool.at[layer, slot_mapping // S, slot_mapping % S].set(kv)
