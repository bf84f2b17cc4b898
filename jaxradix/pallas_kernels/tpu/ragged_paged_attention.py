"""Ragged paged attention for TPU (Mosaic TPU, pltpu).

Work split. The ragged token axis is cut into q blocks of TQ tokens; grid step i owns tokens
[i*TQ, (i+1)*TQ) for every head. Queries are laid out per kv head, ``[KH, T*G, D]`` with row
``t*G + g`` holding query head ``h*G + g`` of token t, so one q block is a plain 2-D tile
``[TQ*G, D]`` per kv head (GQA heads share the K/V they read). A q block meets one or more
sequences (many for decode rows, one or two for long extend rows); for each of them the
kernel walks the kv pages the block's rows can see (causal, and inside the sliding window)
in kv blocks of PB pages, keeping an online softmax per row.

Data movement. The KV pool stays in HBM (``memory_space=ANY``); the page table, sequence
lengths are scalar-prefetched into SMEM. Each kv block is PB page DMAs
of whole pages ``[S, 2*KH, D]`` (all heads, contiguous) into one of two VMEM slots; the DMAs
of the next kv block, which may belong to the next sequence of the q block, are started
before the current block is computed, so HBM reads overlap compute across sequence
boundaries. Pages past a sequence's range are not fetched, and padding rows fetch nothing.
In VMEM, kv head h of a slot is the sublane-strided view ``kv_buf[slot, :, h, :]`` (K) and
``kv_buf[slot, :, KH + h, :]`` (V), ``[PB*S, D]`` each: no ref reshapes anywhere.

Quantized pools (``QuantizedKV``: int8/fp8 values, a bf16 scale per token and K/V head): the page
DMAs move the 1-byte values (half the bytes of bf16) and, next to them, the page's ``[S, 2*KH]``
scales into a second double buffer; each K/V head tile is dequantized in VMEM (values x its scale
column, in the query's dtype: exactly ``dequantize_kv``) right before its two matmuls.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxradix.pallas_kernels.common import AttentionShape, clean_metadata, round_up
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.quantized_kv import QuantizedKV, is_quantized

_STAT_LANES = 128  # softmax row statistics are kept lane-replicated, one vreg row per query row


class _Span(NamedTuple):
    """Where sequence b meets the current q block (all int32 scalars)."""

    q_start: jax.Array  # b's first token in the ragged axis
    first_pos: jax.Array  # kv position of b's first query token
    t_lo: jax.Array  # b's tokens in this block: [t_lo, t_hi)
    t_hi: jax.Array
    kv_hi: jax.Array  # the block's rows see kv positions < kv_hi ...
    page_lo: jax.Array  # ... held in b's pages [page_lo, page_hi)
    page_hi: jax.Array
    num_blocks: jax.Array  # kv blocks to visit (0: b has no token in this block)


def _kernel(
    # scalar prefetch (SMEM)
    cu_q_lens_ref,  # [B+1]
    kv_lens_ref,  # [B]
    page_table_ref,  # [B*MP], row-major page table
    seq_lo_ref,  # [NQ] first sequence that meets q block i
    seq_hi_ref,  # [NQ] one past the last live sequence that meets q block i
    # inputs
    q_ref,  # [KH, R, D] VMEM block, R = TQ*G
    kv_hbm_ref,  # [P, S, 2*KH, D] HBM, one layer's pool (the values of a quantized one)
    *refs,
    quantized: bool,
    **params,
):
    """Unpacks the quantized operands, if any, around the operands of the plain kernel."""
    if quantized:
        scale_hbm_ref, o_ref, kv_buf, sems, m_ref, l_ref, acc_ref, scale_buf, scale_sems = refs
        quant = (scale_hbm_ref, scale_buf, scale_sems)
    else:
        o_ref, kv_buf, sems, m_ref, l_ref, acc_ref = refs
        quant = None
    _attention_kernel(
        cu_q_lens_ref, kv_lens_ref, page_table_ref, seq_lo_ref, seq_hi_ref, q_ref, kv_hbm_ref, o_ref, kv_buf, sems,
        m_ref, l_ref, acc_ref, quant=quant, **params,
    )  # fmt: skip


def _attention_kernel(
    cu_q_lens_ref,  # [B+1]
    kv_lens_ref,  # [B]
    page_table_ref,  # [B*MP]
    seq_lo_ref,  # [NQ]
    seq_hi_ref,  # [NQ]
    q_ref,  # [KH, R, D] VMEM block, R = TQ*G
    kv_hbm_ref,  # [P, S, 2*KH, D] HBM, one layer's pool
    # outputs
    o_ref,  # [KH, R, D] VMEM block
    # scratch
    kv_buf,  # [2, PB*S, 2*KH, D] VMEM, double-buffered kv block
    sems,  # DMA semaphores [2]
    m_ref,  # [KH, R, 128] f32 running max
    l_ref,  # [KH, R, 128] f32 running denominator
    acc_ref,  # [KH, R, D] f32 running numerator
    *,
    # quantized pools: (scales [P, S, 2*KH] HBM, their buffer [2, PB*S, 2*KH] VMEM, DMA semaphores [2])
    quant: tuple[Any, Any, Any] | None,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    tokens_per_block: int,
    pages_per_block: int,
    group: int,
    pages_per_seq: int,
):
    KH, R, D = q_ref.shape
    S = kv_hbm_ref.shape[1]
    TQ, PB, G, MP = tokens_per_block, pages_per_block, group, pages_per_seq
    NB = PB * S  # kv tokens per kv block
    i = pl.program_id(0)
    blk_start = i * TQ  # first token of this q block
    hi = seq_hi_ref[i]

    def seq_span(b):
        """Scalars of sequence b as seen by this q block."""
        q_start = cu_q_lens_ref[b]
        q_end = cu_q_lens_ref[b + 1]
        kv_len = kv_lens_ref[b]
        t_lo = jnp.maximum(q_start, blk_start)  # block tokens of b: [t_lo, t_hi)
        t_hi = jnp.minimum(q_end, blk_start + TQ)
        first_pos = kv_len - (q_end - q_start)  # position of b's first query token
        kv_hi = first_pos + (t_hi - q_start)  # kv positions the rows may see: [kv_lo, kv_hi)
        kv_lo = 0
        if sliding_window is not None:
            kv_lo = jnp.maximum(first_pos + (t_lo - q_start) - sliding_window + 1, 0)
        page_lo = kv_lo // S
        page_hi = (kv_hi + S - 1) // S
        num_blocks = jnp.where(t_hi > t_lo, (page_hi - page_lo + PB - 1) // PB, 0)
        return _Span(q_start, first_pos, t_lo, t_hi, kv_hi, page_lo, page_hi, num_blocks)

    def first_live_seq(b):
        """The first sequence >= b with kv blocks for this q block (hi if none)."""
        num_rows = kv_lens_ref.shape[0]

        def skip(b):  # the clamp keeps the (unused) lookup of b == hi inside the tables
            return (b < hi) & (seq_span(jnp.minimum(b, num_rows - 1)).num_blocks == 0)

        return lax.while_loop(skip, lambda b: b + 1, b)

    def page_copies(b, p, i_page, slot):
        page = page_table_ref[b * MP + jnp.minimum(p, MP - 1)]
        copies = [
            pltpu.make_async_copy(
                kv_hbm_ref.at[page],  # [S, 2*KH, D]
                kv_buf.at[slot, pl.ds(i_page * S, S)],  # [S, 2*KH, D]
                sems.at[slot],
            )
        ]
        if quant is not None:
            scale_hbm_ref, scale_buf, scale_sems = quant
            copies.append(
                pltpu.make_async_copy(
                    scale_hbm_ref.at[page],  # [S, 2*KH]
                    scale_buf.at[slot, pl.ds(i_page * S, S)],  # [S, 2*KH]
                    scale_sems.at[slot],
                )
            )
        return copies

    def kv_block_copies(b, j, slot, action: str):
        """Starts (or waits for) the page DMAs of kv block j of sequence b."""
        span = seq_span(b)
        first_page = span.page_lo + j * PB

        def one_page(i_page, carry):
            p = first_page + i_page

            @pl.when(p < span.page_hi)
            def _():
                for copy in page_copies(b, p, i_page, slot):
                    if action == "start":
                        copy.start()
                    else:
                        copy.wait()

            return carry

        lax.fori_loop(0, PB, one_page, 0)

    def compute_block(b, j, slot):
        span = seq_span(b)
        kv_start = (span.page_lo + j * PB) * S  # position of the block's first kv token
        row_tok = blk_start + lax.broadcasted_iota(jnp.int32, (R, 1), 0) // G  # [R, 1]
        row_in_seq = (row_tok >= span.t_lo) & (row_tok < span.t_hi)  # [R, 1]
        q_pos = span.first_pos + (row_tok - span.q_start)  # [R, 1]
        kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (1, NB), 1)  # [1, NB]
        mask = row_in_seq & (kv_pos <= q_pos)  # [R, NB]
        if sliding_window is not None:
            mask &= kv_pos > q_pos - sliding_window
        # Tokens past kv_hi may be stale VMEM or unwritten pool slots: zero V so p=0 stays 0.
        v_ok = (kv_start + lax.broadcasted_iota(jnp.int32, (NB, 1), 0)) < span.kv_hi  # [NB, 1]

        @pl.when(j == 0)
        def _():
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        # f32 operands get full f32 MXU passes (the default would round them to bf16).
        precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
        for h in range(KH):
            q = q_ref[h]  # [R, D]
            k = kv_buf[slot, :, h, :]  # [NB, D]
            v = kv_buf[slot, :, KH + h, :]  # [NB, D]
            if quant is not None:  # values x the token's scale, in the query's dtype
                scale_buf = quant[1]
                k_scale = scale_buf[slot, :, pl.ds(h, 1)].astype(jnp.float32)  # [NB, 1]
                v_scale = scale_buf[slot, :, pl.ds(KH + h, 1)].astype(jnp.float32)  # [NB, 1]
                k = (k.astype(jnp.float32) * k_scale).astype(q.dtype)
                v = (v.astype(jnp.float32) * v_scale).astype(q.dtype)
            v = jnp.where(v_ok, v, jnp.zeros_like(v))
            s = lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
            )
            s = s * sm_scale  # [R, NB]
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, -jnp.inf)
            m_prev = m_ref[h][:, :1]  # [R, 1]
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [R, 1]
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows with nothing seen yet
            alpha = jnp.exp(m_prev - m_safe)  # [R, 1]
            p = jnp.exp(s - m_safe)  # [R, NB]
            l_next = alpha * l_ref[h][:, :1] + jnp.sum(p, axis=1, keepdims=True)  # [R, 1]
            pv = jnp.dot(p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
            acc_ref[h] = alpha * acc_ref[h] + pv
            m_ref[h] = jnp.broadcast_to(m_next, (R, _STAT_LANES))
            l_ref[h] = jnp.broadcast_to(l_next, (R, _STAT_LANES))

        @pl.when(j == span.num_blocks - 1)
        def _():
            for h in range(KH):
                l = l_ref[h][:, :1]  # [R, 1]
                out = acc_ref[h] / jnp.where(l > 0.0, l, 1.0)  # [R, D]
                o_ref[h] = jnp.where(row_in_seq, out.astype(o_ref.dtype), o_ref[h])

    # Rows of tokens that belong to no live sequence stay 0.
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    b0 = first_live_seq(seq_lo_ref[i])

    @pl.when(b0 < hi)
    def _():
        kv_block_copies(b0, 0, 0, "start")

    def step(carry):
        b, j, slot = carry
        last = j + 1 >= seq_span(b).num_blocks
        next_b = jnp.where(last, first_live_seq(b + 1), b)
        next_j = jnp.where(last, 0, j + 1)

        @pl.when(next_b < hi)
        def _():
            kv_block_copies(next_b, next_j, 1 - slot, "start")

        kv_block_copies(b, j, slot, "wait")
        compute_block(b, j, slot)
        return next_b, next_j, 1 - slot

    lax.while_loop(lambda c: c[0] < hi, step, (b0, jnp.int32(0), jnp.int32(0)))


def default_block_sizes(shape: AttentionShape) -> tuple[int, int]:
    """(q tokens per block, kv pages per block).

    A q block is computed whole against each of its sequences' kv blocks, so decode-heavy
    batches (T <= 2B) take the smallest block that still tiles (TQ*G a multiple of 16 rows),
    while extend batches take ~128 query rows per step. At least two q blocks once there are
    32 tokens (both TensorCores of a chip get work); ~256 kv tokens per kv block.
    """
    min_tq = 16 // math.gcd(16, shape.G)
    if shape.T <= 2 * shape.B:
        tq = min_tq
    else:
        tq = round_up(max(min_tq, 128 // shape.G), min_tq)
        tq = min(tq, max(min_tq, round_up(shape.T // 2, min_tq)))
    pb = max(1, min(shape.MP, 256 // shape.S))
    return tq, pb


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "soft_cap", "q_block_tokens", "kv_block_pages", "interpret",
    ),
)  # fmt: skip
def ragged_paged_attention(
    q: jax.Array,  # [T, NH, D]
    kv_pool: jax.Array | QuantizedKV,  # [P, S, 2*KH, D], one layer's pool
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    q_block_tokens: int | None = None,
    kv_block_pages: int | None = None,
    interpret: Any = False,
) -> jax.Array:  # [T, NH, D]
    """Same contract as ``reference.ragged_paged_attention``; ``interpret`` is passed to pallas_call."""
    quantized = is_quantized(kv_pool)
    values = kv_pool.data if quantized else kv_pool  # [P, S, 2*KH, D]
    shape = AttentionShape.of(q, values, md)
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if soft_cap is not None and soft_cap == 0.0:
        raise ValueError("soft_cap must be non-zero")
    T, NH, KH, G, D = shape.T, shape.NH, shape.KH, shape.G, shape.D
    tq, pb = default_block_sizes(shape)
    tq = q_block_tokens or tq
    if (tq * G) % 16:
        raise ValueError(f"q block of {tq} tokens x {G} heads must be a multiple of 16 rows")
    pb = min(kv_block_pages or pb, shape.MP)
    T_pad = round_up(T, tq)
    NQ = T_pad // tq
    R = tq * G
    md = clean_metadata(md)

    # Per kv head, query rows (t, g) are contiguous: [KH, T_pad*G, D].
    # A quantized pool is dequantized into the query's dtype (f32 or bf16).
    compute_dtype = q.dtype if quantized else kv_pool.dtype
    q_rows = q.astype(compute_dtype).reshape(T, KH, G, D).transpose(1, 0, 2, 3).reshape(KH, T * G, D)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, (T_pad - T) * G), (0, 0)))
    blk_first = jnp.arange(NQ, dtype=jnp.int32) * tq  # [NQ] first token of each q block
    ends = md.cu_q_lens[1:]  # [B], sorted after clean_metadata
    seq_lo = jnp.searchsorted(ends, blk_first, side="right").astype(jnp.int32)  # [NQ]
    seq_hi = jnp.searchsorted(ends, blk_first + tq - 1, side="right").astype(jnp.int32) + 1  # [NQ]
    seq_hi = jnp.minimum(seq_hi, md.num_seqs[0])  # [NQ]

    kernel = functools.partial(
        _kernel,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        tokens_per_block=tq,
        pages_per_block=pb,
        group=G,
        pages_per_seq=shape.MP,
        quantized=quantized,
    )
    q_spec = pl.BlockSpec((KH, R, D), lambda i, *_: (0, i, 0))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((KH, T_pad * G, D), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(NQ,),
            in_specs=[q_spec, pl.BlockSpec(memory_space=pl.ANY)] + [pl.BlockSpec(memory_space=pl.ANY)] * quantized,
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((2, pb * shape.S, 2 * KH, D), values.dtype),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((KH, R, _STAT_LANES), jnp.float32),
                pltpu.VMEM((KH, R, _STAT_LANES), jnp.float32),
                pltpu.VMEM((KH, R, D), jnp.float32),
                *(
                    [pltpu.VMEM((2, pb * shape.S, 2 * KH), kv_pool.scale.dtype), pltpu.SemaphoreType.DMA((2,))]
                    if quantized
                    else []
                ),
            ],
        ),
        # Grid steps share no state (each starts its own DMA chain), so TensorCores may split them.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(
        md.cu_q_lens,
        md.kv_lens,
        md.page_table.reshape(-1),
        seq_lo,
        seq_hi,
        q_rows,
        values,
        *([kv_pool.scale] if quantized else []),
    )
    out = out[:, : T * G].reshape(KH, T, G, D).transpose(1, 0, 2, 3)  # [T, KH, G, D]
    return out.reshape(T, NH, D)
