"""Ragged paged attention that gathers K/V once per sequence, not once per query token.

The CPU serving path and the path of GPUs without the Mosaic kernel (A100, L4, T4). Same
contract as ``reference.ragged_paged_attention`` for one layer's pool array.

Decode rows (q_len == 1) are computed together: an online softmax over kv blocks of C pages,
each block gathered once per row (``kv[page_table[:, block]]``, ``[B, C*S, 2*KH, D]``), the G
query heads of a kv head sharing it. A page past a row's context (or before its sliding window,
or of a row that is not a decode row) is read as page 0 instead, so the bytes gathered follow
the live context of each row and not the page table's width.

Extend rows (q_len >= 2) are cut into tiles of up to TQ query tokens of one sequence. A loop
over the live tiles (a dynamic trip count: no work for a decode-only batch) walks each tile's kv
range, [window start, last token of the tile], in blocks of C pages: K/V traffic is
O(tiles x context) instead of the O(tokens x context) of a per-token gather, and the causal
edge bounds the range, so a tile never reads keys after its last token. With
``prefill="dot_product_attention"`` (cuDNN on a GPU) a tile is two calls of
``jax.nn.dot_product_attention`` with their log-sum-exp: its cached prefix (no mask, keys up to
the tile's first position, in chunks of 4k keys) and its own diagonal block (causal, top-left
aligned), merged.

Short extend rows (at most ``short_q_tile`` tokens, e.g. questions after a shared system prompt)
take their own loop of small tiles over small kv blocks, so they do not pay for a long row's tile.

The cascade: when the metadata marks a prefix several rows share (``shared_pages``/``shared_lens``,
``engine/batch.shared_prefix``), those rows' per-row passes start after it, and every token of
theirs attends to it in one pass that gathers each block of the prefix once for all of them (per kv
head a ``[T*G, D] x [D, C*S]`` matmul, where per-row attention reads the prefix once per row); the
two partial results merge by log-sum-exp. Off with a sliding window; with cuDNN extend tiles only
decode rows use it.

A quantized pool (``QuantizedKV``) is dequantized right after each gather (``read_pages``): only the
blocks a row reads are expanded, to f32 (to the query dtype for cuDNN tiles).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxradix.pallas_kernels.common import clean_metadata
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.quantized_kv import is_quantized
from jaxradix.pallas_kernels.reference import KVPool, read_pages

PREFILL_IMPLS = ("einsum", "dot_product_attention")


def _pad_pages(pages: jax.Array, c: int) -> jax.Array:
    """Page ids [..., n] padded with page 0 to [..., ceil(n / c) * c]: whole blocks of c pages."""
    n = pages.shape[-1]
    return jnp.pad(pages, [(0, 0)] * (pages.ndim - 1) + [(0, -(-n // c) * c - n)])


def _softmax_step(carry, s, v):
    """One online-softmax step: `s` [..., N] f32 scores (-inf masked), `v` values, einsum-ready."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + v(p)


def _decode_rows(
    q: jax.Array,  # [T, NH, D]
    kv: KVPool,  # [P, S, 2*KH, D]
    md: AttentionMetadata,  # cleaned
    page_table: jax.Array,  # [B, NB*C], padded with page 0
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    pages_per_block: int,
    shared_lens: jax.Array,  # [B] int32, leading tokens of each row the cascade part reads instead
) -> tuple[jax.Array, jax.Array, jax.Array]:  # [B, NH, D] f32 outputs, [B, NH] their lse, [B] bool: decode row
    T, NH, D = q.shape
    _, S, KH2, _ = kv.shape
    KH, C = KH2 // 2, pages_per_block
    G = NH // KH
    B = md.kv_lens.shape[0]
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]  # [B]
    is_decode = (q_lens == 1) & (md.kv_lens > 0)  # [B]
    kv_len = jnp.where(is_decode, md.kv_lens, 0)  # [B]
    pos = kv_len - 1  # [B] position of the row's query token
    lo = jnp.zeros_like(kv_len) if sliding_window is None else jnp.maximum(pos - sliding_window + 1, 0)
    lo = jnp.maximum(lo, shared_lens)
    qd = q[jnp.minimum(md.cu_q_lens[:-1], T - 1)].reshape(B, KH, G, D).astype(jnp.float32) * sm_scale

    def body(i, carry):
        page_pos = (i * C + jnp.arange(C, dtype=jnp.int32)) * S  # [C] first position of each page
        pages = lax.dynamic_slice_in_dim(page_table, i * C, C, axis=1)  # [B, C]
        live = (page_pos[None, :] < kv_len[:, None]) & (page_pos[None, :] + S > lo[:, None])  # [B, C]
        blk = read_pages(kv, jnp.where(live, pages, 0))  # [B, C, S, 2*KH, D] f32
        blk = jnp.where(live[:, :, None, None, None], blk, 0.0).reshape(B, C * S, KH2, D)
        s = jnp.einsum("bkgd,bnkd->bkgn", qd, blk[:, :, :KH])  # [B, KH, G, C*S]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = i * C * S + jnp.arange(C * S, dtype=jnp.int32)  # [C*S]
        mask = (kv_pos[None, :] < kv_len[:, None]) & (kv_pos[None, :] >= lo[:, None])  # [B, C*S]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        return _softmax_step(carry, s, lambda p: jnp.einsum("bkgn,bnkd->bkgd", p, blk[:, :, KH:]))

    first = jnp.min(jnp.where(is_decode, lo, jnp.iinfo(jnp.int32).max)) // (C * S)
    last = (jnp.max(kv_len) + C * S - 1) // (C * S)  # 0 when there is no decode row
    init = (jnp.full((B, KH, G), -jnp.inf, jnp.float32), jnp.zeros((B, KH, G), jnp.float32),
            jnp.zeros((B, KH, G, D), jnp.float32))  # fmt: skip
    m, l, acc = lax.fori_loop(jnp.minimum(first, last), last, body, init)
    o, lse = _finish(m, l, acc)
    return o.reshape(B, NH, D), lse.reshape(B, NH), is_decode


def _finish(m: jax.Array, l: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Online-softmax state -> (output, log-sum-exp; -inf where no key was seen)."""
    o = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return o, jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


def _shared_prefix_part(
    q: jax.Array,  # [T, NH, D]
    kv: KVPool,  # [P, S, 2*KH, D]
    shared_pages: jax.Array,  # [NB*C] the shared prefix's pages, padded with page 0
    tok_len: jax.Array,  # [T] int32, shared tokens each query token attends to (0: none)
    *,
    sm_scale: float,
    soft_cap: float | None,
    pages_per_block: int,
) -> tuple[jax.Array, jax.Array]:  # [T, NH, D] f32, [T, NH] lse
    """The cascade part: every token of every row that holds the shared prefix against its keys, each
    block of C pages gathered once for all of them ([T*G, D] x [D, C*S] per kv head, a real matmul,
    where per-row attention would read the prefix once per row). The prefix is all cached (before
    every query position), so no causal mask; a token's own length masks rows that do not share."""
    T, NH, D = q.shape
    _, S, KH2, _ = kv.shape
    KH, C = KH2 // 2, pages_per_block
    G = NH // KH
    # kv head leading ([KH, T*G, ...]): each block is KH plain matmuls, with no transposes of scores
    qs = (q.reshape(T, KH, G, D).astype(jnp.float32) * sm_scale).transpose(1, 0, 2, 3).reshape(KH, T * G, D)
    tok_len_g = jnp.repeat(tok_len, G)  # [T*G]
    L = jnp.max(tok_len)

    def body(i, carry):
        page_pos = (i * C + jnp.arange(C, dtype=jnp.int32)) * S  # [C]
        live = page_pos < L
        blk = read_pages(kv, jnp.where(live, lax.dynamic_slice_in_dim(shared_pages, i * C, C), 0))  # [C, S, 2*KH, D]
        blk = jnp.where(live[:, None, None, None], blk, 0.0).reshape(C * S, KH2, D).transpose(1, 0, 2)  # [2*KH, N, D]
        s = jnp.einsum("kqd,knd->kqn", qs, blk[:KH])  # [KH, T*G, C*S]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = i * C * S + jnp.arange(C * S, dtype=jnp.int32)
        s = jnp.where((kv_pos[None, :] < tok_len_g[:, None])[None], s, -jnp.inf)
        return _softmax_step(carry, s, lambda p: jnp.einsum("kqn,knd->kqd", p, blk[KH:]))

    init = (jnp.full((KH, T * G), -jnp.inf, jnp.float32), jnp.zeros((KH, T * G), jnp.float32),
            jnp.zeros((KH, T * G, D), jnp.float32))  # fmt: skip
    o, lse = _finish(*lax.fori_loop(0, (L + C * S - 1) // (C * S), body, init))  # [KH, T*G, D], [KH, T*G]
    o = o.reshape(KH, T, G, D).transpose(1, 0, 2, 3)
    lse = lse.reshape(KH, T, G).transpose(1, 0, 2)
    return o.reshape(T, NH, D), lse.reshape(T, NH)


def _tile_einsum(
    qt: jax.Array,  # [TQ, KH, G, D] f32, scaled
    kv: KVPool,  # [P, S, 2*KH, D]
    pages: jax.Array,  # [NB*C] the tile's sequence's page-table row, padded with page 0
    q_pos0: jax.Array,  # kv position of the tile's first token
    kv_lo: jax.Array,  # first kv position any row of the tile sees (sliding window)
    kv_hi: jax.Array,  # one past the last kv position the tile sees
    *,
    sliding_window: int | None,
    soft_cap: float | None,
    pages_per_block: int,
) -> tuple[jax.Array, jax.Array]:  # [TQ, KH, G, D] f32, [TQ, KH, G] lse
    TQ, KH, G, D = qt.shape
    _, S, KH2, _ = kv.shape
    C = pages_per_block
    q_pos = q_pos0 + jnp.arange(TQ, dtype=jnp.int32)  # [TQ]

    def body(i, carry):
        blk_pages = lax.dynamic_slice_in_dim(pages, i * C, C)  # [C]
        page_pos = (i * C + jnp.arange(C, dtype=jnp.int32)) * S
        live = (page_pos < kv_hi) & (page_pos + S > kv_lo)
        blk = read_pages(kv, jnp.where(live, blk_pages, 0))  # [C, S, 2*KH, D] f32
        blk = jnp.where(live[:, None, None, None], blk, 0.0).reshape(C * S, KH2, D)
        s = jnp.einsum("tkgd,nkd->tkgn", qt, blk[:, :KH])  # [TQ, KH, G, C*S]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = i * C * S + jnp.arange(C * S, dtype=jnp.int32)
        mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] >= kv_lo)  # [TQ, C*S]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        return _softmax_step(carry, s, lambda p: jnp.einsum("tkgn,nkd->tkgd", p, blk[:, KH:]))

    init = (jnp.full((TQ, KH, G), -jnp.inf, jnp.float32), jnp.zeros((TQ, KH, G), jnp.float32),
            jnp.zeros((TQ, KH, G, D), jnp.float32))  # fmt: skip
    return _finish(*lax.fori_loop(kv_lo // (C * S), (kv_hi + C * S - 1) // (C * S), body, init))


def _merge(o_a, lse_a, o_b, lse_b):
    """Two partial softmax outputs [TQ, NH, D] with their log-sum-exp [TQ, NH] (-inf: no keys)."""
    m = jnp.maximum(lse_a, lse_b)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w_a, w_b = jnp.exp(lse_a - m_safe), jnp.exp(lse_b - m_safe)  # [TQ, NH]
    w = w_a + w_b
    o = (w_a[..., None] * o_a + w_b[..., None] * o_b) / jnp.where(w > 0, w, 1.0)[..., None]
    return o, jnp.where(w > 0, m_safe + jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def _tile_dot_product_attention(
    qt: jax.Array,  # [TQ, NH, D] in the pool dtype
    kv: KVPool,  # [P, S, 2*KH, D]
    pages: jax.Array,  # [NB*C] the tile's sequence's page-table row, padded with page 0
    q_pos0: jax.Array,
    ntok: jax.Array,  # live tokens of the tile
    *,
    sm_scale: float,
    implementation: str | None,
    prefix_chunk_tokens: int,
) -> jax.Array:  # [TQ, NH, D] f32
    """Prefix (keys [0, q_pos0), every row; in chunks) and diagonal (the tile's own keys, causal)."""
    TQ, NH, D = qt.shape
    _, S, KH2, _ = kv.shape
    KH = KH2 // 2
    CP = max(1, min(prefix_chunk_tokens // S, pages.shape[0]))  # pages per prefix chunk
    pages = _pad_pages(pages, CP)
    N = pages.shape[0] * S
    n = jnp.reshape(ntok, (1,)).astype(jnp.int32)
    attend = functools.partial(
        jax.nn.dot_product_attention, scale=sm_scale, implementation=implementation, return_residual=True
    )

    def prefix_chunk(c, carry):
        page_pos = (c * CP + jnp.arange(CP, dtype=jnp.int32)) * S
        chunk = lax.dynamic_slice_in_dim(pages, c * CP, CP)  # [CP]
        live = page_pos < q_pos0
        blk = read_pages(kv, jnp.where(live, chunk, 0), dtype=qt.dtype)  # [CP, S, 2*KH, D]
        blk = jnp.where(live[:, None, None, None], blk, 0).reshape(CP * S, KH2, D)
        n_kv = jnp.clip(q_pos0 - c * CP * S, 1, CP * S).reshape(1).astype(jnp.int32)
        o, lse = attend(qt[None], blk[None, :, :KH], blk[None, :, KH:], query_seq_lengths=n, key_value_seq_lengths=n_kv)
        return _merge(*carry, o[0].astype(jnp.float32), lse[0].astype(jnp.float32))

    init = (jnp.zeros((TQ, NH, D), jnp.float32), jnp.full((TQ, NH), -jnp.inf, jnp.float32))
    o_p, lse_p = lax.fori_loop(0, (q_pos0 + CP * S - 1) // (CP * S), prefix_chunk, init)
    # The diagonal keys [q_pos0, q_pos0 + TQ): gathered slot by slot (a tile need not start on a page).
    pos = jnp.minimum(q_pos0 + jnp.arange(TQ, dtype=jnp.int32), N - 1)  # [TQ]
    diag = read_pages(kv, pages[pos // S], pos % S, dtype=qt.dtype)  # [TQ, 2*KH, D]
    diag = jnp.where((jnp.arange(TQ) < ntok)[:, None, None], diag, 0)
    o_d, lse_d = attend(qt[None], diag[None, :, :KH], diag[None, :, KH:], is_causal=True,
                        query_seq_lengths=n, key_value_seq_lengths=n)  # fmt: skip
    o, _ = _merge(o_p, lse_p, o_d[0].astype(jnp.float32), lse_d[0].astype(jnp.float32))
    return o


def ragged_paged_attention_gathered(
    q: jax.Array,  # [T, NH, D]
    kv: KVPool,  # [P, S, 2*KH, D] one layer's pool
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    q_tile: int = 128,
    kv_block_tokens: int = 512,
    decode_block_tokens: int = 128,
    short_q_tile: int = 0,
    short_kv_block_tokens: int = 128,
    shared_block_tokens: int = 512,
    prefix_chunk_tokens: int = 4096,
    prefill: str = "einsum",
    implementation: str | None = None,
) -> jax.Array:  # [T, NH, D], rows of padding tokens are 0
    """See the module docstring. `prefill` picks the extend tiles' inner computation; with
    "dot_product_attention", `implementation` goes to ``jax.nn.dot_product_attention`` and
    sliding windows and soft caps are not supported."""
    if prefill not in PREFILL_IMPLS:
        raise ValueError(f"prefill must be one of {PREFILL_IMPLS}, got {prefill!r}")
    if prefill == "dot_product_attention" and (sliding_window is not None or soft_cap is not None):
        raise NotImplementedError("prefill='dot_product_attention' takes no sliding window or soft cap")
    if len(kv.shape) != 4 or kv.shape[-1] != q.shape[-1] or kv.shape[2] % 2 or q.shape[1] % (kv.shape[2] // 2):
        raise ValueError(f"kv {kv.shape} must be [P, S, 2*KH, D] matching q {q.shape}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    T, NH, D = q.shape
    _, S, KH2, _ = kv.shape
    KH = KH2 // 2
    G = NH // KH
    md = clean_metadata(md)
    B, MP = md.page_table.shape
    C = max(1, min(kv_block_tokens // S, MP))  # pages per kv block
    TQ = max(1, min(q_tile, T))
    CD = max(1, min(decode_block_tokens // S, MP))  # pages per decode kv block
    dec_table = _pad_pages(md.page_table, CD)
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]  # [B]
    # The cascade: rows' shared prefix read once for all of them (not with a sliding window, whose
    # per-token key range the shared part would have to mask; cuDNN extend tiles read their own keys)
    cascade = md.shared_lens is not None and md.shared_pages is not None and sliding_window is None and B > 1
    shared_lens = md.shared_lens if cascade else jnp.zeros((B,), jnp.int32)  # [B]
    if cascade and prefill != "einsum":
        shared_lens = jnp.where(q_lens == 1, shared_lens, 0)

    o_dec, lse_dec, is_decode = _decode_rows(
        q, kv, md, dec_table, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        pages_per_block=CD, shared_lens=shared_lens,
    )  # fmt: skip

    # Extend rows in tiles of up to TQ tokens of one row: rows of at most short_q_tile tokens (e.g. a
    # question after a shared system prompt) in tiles of that size with kv blocks of
    # short_kv_block_tokens, the others in tiles of q_tile with kv blocks of kv_block_tokens, so a short
    # row does not pay for a long tile and a long one not for many small ones.
    short = 2 <= short_q_tile < TQ
    q_pad = jnp.pad(q, ((0, TQ), (0, 0), (0, 0)))  # [T+TQ, NH, D]: a tile slice never clips

    def tiles(carry, serve, tq, c):  # serve [B] bool: the extend rows this loop computes
        n_tiles = jnp.where(serve, (q_lens + tq - 1) // tq, 0)  # [B]; row b owns tiles [end - n, end)
        tile_end = jnp.cumsum(n_tiles)  # [B]
        table = _pad_pages(md.page_table, c)

        def tile_body(i, carry):  # out [T+TQ, NH, D] f32, lse [T+TQ, NH]
            out, lse = carry
            b = jnp.minimum(jnp.sum(tile_end <= i), B - 1).astype(jnp.int32)  # the row tile i belongs to
            local = i - (tile_end[b] - n_tiles[b])
            tok0 = md.cu_q_lens[b] + local * tq
            ntok = jnp.minimum(md.cu_q_lens[b + 1] - tok0, tq)
            pos0 = md.kv_lens[b] - q_lens[b] + local * tq  # kv position of token tok0
            qt = lax.dynamic_slice_in_dim(q_pad, tok0, tq)  # [tq, NH, D]
            if prefill == "einsum":
                kv_lo = 0 if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
                ot, lt = _tile_einsum(
                    qt.reshape(tq, KH, G, D).astype(jnp.float32) * sm_scale, kv, table[b], pos0,
                    jnp.maximum(kv_lo, shared_lens[b]), pos0 + ntok, sliding_window=sliding_window,
                    soft_cap=soft_cap, pages_per_block=c,
                )  # fmt: skip
                ot, lt = ot.reshape(tq, NH, D), lt.reshape(tq, NH)
            else:
                ot = _tile_dot_product_attention(
                    qt.astype(q.dtype if is_quantized(kv) else kv.dtype), kv, table[b], pos0, ntok,
                    sm_scale=sm_scale, implementation=implementation, prefix_chunk_tokens=prefix_chunk_tokens,
                )  # fmt: skip
                lt = jnp.zeros((tq, NH), jnp.float32)  # no shared part to merge with (shared_lens 0 here)
            rows = jnp.arange(tq)[:, None] < ntok  # [tq, 1]
            old_o, old_l = lax.dynamic_slice_in_dim(out, tok0, tq), lax.dynamic_slice_in_dim(lse, tok0, tq)
            return (lax.dynamic_update_slice_in_dim(out, jnp.where(rows[..., None], ot, old_o), tok0, axis=0),
                    lax.dynamic_update_slice_in_dim(lse, jnp.where(rows, lt, old_l), tok0, axis=0))

        return lax.fori_loop(0, tile_end[-1], tile_body, carry)

    carry = (jnp.zeros((T + TQ, NH, D), jnp.float32), jnp.full((T + TQ, NH), -jnp.inf, jnp.float32))
    if short:
        CQ = max(1, min(short_kv_block_tokens // S, MP))
        carry = tiles(carry, (q_lens >= 2) & (q_lens <= short_q_tile), short_q_tile, CQ)
        carry = tiles(carry, q_lens > short_q_tile, TQ, C)
    else:
        carry = tiles(carry, q_lens >= 2, TQ, C)
    out, lse = carry
    out, lse = out[:T], lse[:T]  # [T, NH, D], [T, NH]
    # Decode rows' outputs go to their token; padding tokens stay 0.
    dec_tok = jnp.where(is_decode, md.cu_q_lens[:-1], T)  # [B]
    out = out.at[dec_tok].set(o_dec, mode="drop")
    if cascade:
        lse = lse.at[dec_tok].set(lse_dec, mode="drop")
        tok = jnp.arange(T, dtype=jnp.int32)
        tok_row = jnp.minimum(jnp.sum(md.cu_q_lens[None, 1:] <= tok[:, None], axis=1), B - 1)  # [T]
        tok_len = jnp.where(tok < md.cu_q_lens[B], shared_lens[tok_row], 0)  # [T]
        CS = max(1, min(shared_block_tokens // S, MP))  # pages per block of the shared prefix
        shared_pages = _pad_pages(md.shared_pages, CS)

        def with_shared(out):
            o_sh, lse_sh = _shared_prefix_part(q, kv, shared_pages, tok_len, sm_scale=sm_scale, soft_cap=soft_cap,
                                               pages_per_block=CS)
            return jnp.where((tok_len > 0)[:, None, None], _merge(out, lse, o_sh, lse_sh)[0], out)

        out = lax.cond(jnp.any(tok_len > 0), with_shared, lambda out: out, out)  # most steps share nothing
    return out.astype(q.dtype)
