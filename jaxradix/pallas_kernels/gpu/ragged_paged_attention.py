"""Ragged paged attention for NVIDIA Hopper (Mosaic GPU, plgpu).

Work split. Each sequence's query tokens are cut into q tiles of TQ = 64 // G tokens; per kv
head a tile is one 64-row wgmma operand whose row ``r`` is query head ``h*G + r % G`` of token
``tok0 + r // G`` (the G query heads of a kv head share the K/V they read). A decode row is a
tile with G useful rows, an extend row is one or more tiles over its prefix pages and its own
causal block. The CUDA grid is (tile, kv head, kv split): the kv range a tile can see (causal,
inside the sliding window) is cut into NS splits of whole kv blocks, so a long decode context
is spread over NS CTAs (FlashDecoding). Each CTA keeps an online softmax over its kv blocks
and writes its normalised partial output and log-sum-exp; a small jnp pass merges the splits.

Data movement. Tile descriptors (sequence, first token, kv range, kv block count) are built
by the wrapper in jnp and read from GMEM as scalars. The wrapper also gathers each tile's
query rows into a 64-row-aligned ``[KH, NT*64, D]`` array, TMA-loaded once per CTA. K and V
pages are TMA-loaded straight from the layer's pool (``kv[page, :, h, :]`` is a strided
``[S, D]`` box; the pool is never copied) into a ring of R (2 or more) 128B-swizzled kv blocks of
PB pages; blocks j+1..j+R-1 are in flight while block j is in the tensor cores (wgmma QK^T and PV with
f32 accumulators in registers, P fed from registers), and only the blocks on the causal edge
or the sliding-window edge pay for masking. The output leaves through SMEM in TMA stores of
2^k rows, so a tile writes exactly its own rows of the ragged output.

Variants (``variant=``): "v1" is the kernel first measured on an H200 (issue 11): two ring
slots, two kv-split waves over a fixed 132 SMs, binary-search (``lax`` loop) glue. "v2" (the
default) reads the SM count off the device, sizes the kv splits to fill one wave of resident
CTAs (no split, and no merge pass, when the tiles alone fill the GPU), takes a third ring slot
when shared memory allows, and finds tiles and rows with one comparison pass instead of a
binary-search loop. ``plan()`` returns the choices for a shape (the benchmark prints them).

Quantized pools (``QuantizedKV``: int8/fp8 values, a bf16 scale per token and K/V head). The ring
holds the 1-byte pages (half the TMA bytes of bf16) and, per page, its ``[S, 2*KH]`` scale block
(all heads: one contiguous TMA box, read straight from the pool's scales when ``2*KH`` bf16 is a
multiple of 16 bytes; otherwise the wrapper pads the head axis to 8, a copy of the layer's scales).
When a block has landed, the kernel picks its head's scale column in registers and dequantizes the
K (then the V) tile through registers (values x scale, rounded to bf16: exactly
``dequantize_kv(kv, bf16)``) into one bf16 tile that the wgmmas read; the rest is the bf16 kernel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxradix.pallas_kernels.common import AttentionShape, clean_metadata, device_sm_count, kv_splits
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.quantized_kv import SCALE_DTYPE, QuantizedKV, is_quantized, is_quantized_dtype

ROWS = 64  # wgmma M: query rows per tile
_LOG2E = math.log2(math.e)
_NUM_SMS = 132  # H100 SXM: v1's fixed SM count, and v2's when the device does not say
VARIANTS = ("v1", "v2")
_MAX_SMEM = 227 * 1024  # per block on sm_90
# Tile descriptor columns (int32 [NT, _DESC]).
_SEQ, _TOK0, _NTOK, _POS0, _KV_HI, _PAGE_LO, _NBLK, _DESC = range(8)
_QUANT_COMPUTE = jnp.bfloat16  # the wgmma operand dtype of a quantized pool's dequantized tiles


@dataclass(frozen=True)
class _QuantRefs:
    """The extra operands and scratch of a quantized pool (None for a bf16/f16 pool)."""

    scale_ref: Any  # [P, S, C] bf16 GMEM, the pool's scales (C = 2*KH, padded to a multiple of 8)
    scale_smem: Any  # [R, NB, C] bf16 SMEM, scale ring (K and V heads)
    # [NB, D] bf16 SMEM, swizzled: the dequantized K tile, then V tile, that the wgmmas read (V is
    # written after the QK^T wgmma has completed: its scores were read back)
    tile16_smem: Any


def _dequantize_tile(data_smem, scale_smem, column, out_smem) -> None:
    """out = bf16(data * scale[:, column, None]): data [NB, D] int8/fp8 swizzled SMEM, scale
    [NB, C] bf16 SMEM, out [NB, D] bf16 swizzled SMEM."""
    x = plgpu.load(data_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)  # [NB, D]
    scales = plgpu.load(scale_smem, layout=plgpu.Layout.WGMMA).astype(jnp.float32)  # [NB, C]
    col = plgpu.broadcasted_iota(jnp.int32, scales.shape, 1, layout=plgpu.Layout.WGMMA)  # [NB, C]
    scale = jnp.where(col == column, scales, 0.0).sum(axis=1)  # [NB]: a column pick, in row layout
    out_smem[...] = (x * lax.broadcast_in_dim(scale, x.shape, [0])).astype(out_smem.dtype)
    plgpu.commit_smem()  # the async proxy (wgmma) reads what every thread wrote


def _kernel(
    desc_ref,  # [NT, 8] int32 GMEM tile descriptors
    page_table_ref,  # [B, MP] int32 GMEM
    q_ref,  # [KH, NT*64, D] GMEM, query tiles (64-row aligned for the tiled TMA)
    kv_ref,  # [P, S, 2*KH, D] GMEM, one layer's pool (the values of a quantized one)
    *refs,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    pages_per_block: int,
    num_splits: int,
    interpreted: bool,
    quantized: bool,
):
    """Unpacks the quantized operands, if any, around the operands of the bf16 kernel."""
    quant = None
    if quantized:
        scale_ref, *refs = refs
        *refs, scale_smem, tile16_smem = refs
        quant = _QuantRefs(scale_ref, scale_smem, tile16_smem)
    _attention_kernel(
        desc_ref, page_table_ref, q_ref, kv_ref, *refs, quant=quant, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, group=group, pages_per_block=pages_per_block,
        num_splits=num_splits, interpreted=interpreted,
    )  # fmt: skip


def _attention_kernel(
    desc_ref,  # [NT, 8] int32 GMEM tile descriptors
    page_table_ref,  # [B, MP] int32 GMEM
    q_ref,  # [KH, NT*64, D] GMEM, query tiles (64-row aligned for the tiled TMA)
    kv_ref,  # [P, S, 2*KH, D] GMEM, one layer's pool
    o_ref,  # [NS, KH, T*G + 64, D] GMEM partial (final when NS == 1) outputs, rows (t, g)
    lse_ref,  # [NT, NS, KH, 64] f32 GMEM log-sum-exp per tile row (unused when NS == 1)
    q_smem,  # [64, D] SMEM, swizzled
    k_smem,  # [R, NB, D] SMEM, swizzled kv-block ring
    v_smem,  # [R, NB, D] SMEM
    o_smem,  # [64, D] SMEM, plain rows for the ragged TMA store
    lse_smem,  # [64] f32 SMEM
    q_bar,  # barrier
    k_bar,  # [R] barriers, PB arrivals each
    v_bar,  # [R] barriers
    p_smem=None,  # [64, NB] SMEM, swizzled; only when interpreted
    *,
    quant: _QuantRefs | None,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    pages_per_block: int,
    num_splits: int,
    interpreted: bool,
):
    G, PB, NS = group, pages_per_block, num_splits
    assert (p_smem is not None) == interpreted
    R, NB, D = k_smem.shape
    S = kv_ref.shape[1]
    KH = kv_ref.shape[2] // 2
    MP = page_table_ref.shape[1]
    tile = lax.axis_index("tile")
    h = lax.axis_index("head")
    split = lax.axis_index("split")

    seq = desc_ref[tile, _SEQ]
    tok0 = desc_ref[tile, _TOK0]  # first token of the tile in the ragged axis
    ntok = desc_ref[tile, _NTOK]  # tokens in the tile (0: inactive grid point)
    pos0 = desc_ref[tile, _POS0]  # kv position of token tok0
    kv_hi = desc_ref[tile, _KV_HI]  # the tile's rows see kv positions < kv_hi ...
    page_lo = desc_ref[tile, _PAGE_LO]  # ... from page page_lo on (sliding window)
    num_blocks = desc_ref[tile, _NBLK]
    per_split = (num_blocks + NS - 1) // NS
    j_lo = jnp.minimum(split * per_split, num_blocks)  # this split's kv blocks: [j_lo, j_hi)
    j_hi = jnp.minimum(j_lo + per_split, num_blocks)
    last_page = (kv_hi - 1) // S

    def fetch(j, slot):
        """TMA of kv block j into ring slot `slot`: PB K pages and PB V pages (and their scale blocks)."""
        for i in range(PB):
            # Pages past the range re-read the last page (masked), so every block makes
            # exactly PB arrivals per barrier (2*PB on k_bar when quantized: values and scales).
            p = jnp.minimum(jnp.minimum(page_lo + j * PB + i, last_page), MP - 1)
            page = page_table_ref[seq, p]
            rows = pl.ds(i * S, S)
            k_page = kv_ref.at[page, :, h, :]  # [S, D], strided in the pool
            v_page = kv_ref.at[page, :, KH + h, :]  # [S, D]
            plgpu.copy_gmem_to_smem(k_page, k_smem.at[slot, rows], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_page, v_smem.at[slot, rows], v_bar.at[slot])
            if quant is not None:  # [S, C]: the page's scales, every head (V's land before V is read)
                plgpu.copy_gmem_to_smem(quant.scale_ref.at[page], quant.scale_smem.at[slot, rows], k_bar.at[slot])

    def kv_step(j, carry, *, masked: bool):
        acc, m_i, l_i = carry  # [64, D] f32, [64] f32 (log2 units), [64] f32
        slot = lax.rem(j - j_lo, R)
        plgpu.barrier_wait(k_bar.at[slot])
        k_tile, v_tile = k_smem.at[slot], v_smem.at[slot]  # [NB, D] wgmma operands
        if quant is not None:
            _dequantize_tile(k_tile, quant.scale_smem.at[slot], h, quant.tile16_smem)
            k_tile, v_tile = quant.tile16_smem, quant.tile16_smem

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_tile.T)
            return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((ROWS, NB), jnp.float32)) * sm_scale  # [64, NB]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = s * _LOG2E
        if masked:
            # Rows past the tile's ntok*G are never stored, so only positions are masked.
            row = plgpu.broadcasted_iota(jnp.int32, (ROWS, NB), 0, layout=plgpu.Layout.WGMMA)
            col = plgpu.broadcasted_iota(jnp.int32, (ROWS, NB), 1, layout=plgpu.Layout.WGMMA)
            q_pos = pos0 + row // G  # [64, NB]
            kv_pos = (page_lo + j * PB) * S + col  # [64, NB]
            mask = kv_pos <= q_pos
            if sliding_window is not None:
                mask &= kv_pos > q_pos - sliding_window
            s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_i, s.max(axis=1))  # [64]
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # rows with nothing seen yet
        alpha = jnp.exp2(m_i - m_safe)  # [64]
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))  # [64, NB]
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])
        if quant is not None:
            _dequantize_tile(v_smem.at[slot], quant.scale_smem.at[slot], KH + h, quant.tile16_smem)

        p16 = p.astype(v_tile.dtype)
        if p_smem is None:  # P stays in registers, PV accumulates into acc in place

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_tile)

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        else:
            # The GPU interpreter takes wgmma operands from SMEM only and cannot run
            # run_state: P goes through SMEM into a fresh accumulator that is then added.
            p_smem[...] = p16
            plgpu.commit_smem()

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem, v_tile)
                return acc_ref[...]

            acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, D), jnp.float32))

        # The slot's wgmmas have completed (acc was read back): refill it R blocks ahead.
        @pl.when(j + R < j_hi)
        def _():
            fetch(j + R, slot)

        return acc, m_next, l_i

    @pl.when(ntok > 0)
    def _():
        plgpu.copy_gmem_to_smem(q_ref.at[h, pl.ds(tile * ROWS, ROWS)], q_smem, q_bar)
        for d in range(R):  # prologue: fill every ring slot
            pl.when(j_lo + d < j_hi)(functools.partial(fetch, j_lo + d, d))

        plgpu.barrier_wait(q_bar)
        acc = plgpu.layout_cast(jnp.zeros((ROWS, D), jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        # Blocks [j_lo, j_a) reach below some row's sliding window, blocks [j_b, j_hi) reach
        # past the first row's position (causal edge, end of the kv range); only those mask.
        x0 = page_lo * S  # kv position of block 0
        j_a = j_lo
        if sliding_window is not None:
            j_a = jnp.clip((jnp.maximum(kv_hi - sliding_window - x0, 0) + NB - 1) // NB, j_lo, j_hi)
        j_b = jnp.clip((pos0 - x0 + 1) // NB, j_a, j_hi)
        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(j_lo, j_a, functools.partial(kv_step, masked=True), carry)
        carry = lax.fori_loop(j_a, j_b, functools.partial(kv_step, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(j_b, j_hi, functools.partial(kv_step, masked=True), carry)

        l_safe = jnp.where(l_i > 0.0, l_i, 1.0)
        o_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(o_smem.dtype)
        if NS > 1:
            # log-sum-exp in natural-log units; -inf for rows this split saw nothing of.
            lse_smem[...] = jnp.where(l_i > 0.0, (m_i + jnp.log2(l_safe)) / _LOG2E, -jnp.inf)
        plgpu.commit_smem()
        # Store exactly ntok*G rows as a sum of power-of-two row boxes.
        n_rows = ntok * G

        def store_rows(start, size: int):
            dst = o_ref.at[split, h, pl.ds(tok0 * G + start, size)]  # [size, D]
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)], dst)

        start = 0
        for k in reversed(range(ROWS.bit_length())):
            size = 1 << k
            pl.when((n_rows & size) != 0)(functools.partial(store_rows, start, size))
            start = start + (n_rows & size)
        if NS > 1:
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[tile, split, h])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _tile_descriptors(
    md: AttentionMetadata,
    *,
    tokens_per_tile: int,
    num_tiles: int,
    page_size: int,
    pages_per_block: int,
    sliding_window: int | None,
    search: str,
) -> tuple[jax.Array, jax.Array]:  # [NT, 8] int32 descriptors, [B] first tile of each row
    """Cuts every live sequence's query tokens into tiles and finds each tile's kv range."""
    TQ, S, PB = tokens_per_tile, page_size, pages_per_block
    cu, kv_lens = md.cu_q_lens, md.kv_lens
    q_lens = cu[1:] - cu[:-1]  # [B], 0 for padding rows after clean_metadata
    tiles_per_seq = (q_lens + TQ - 1) // TQ  # [B]
    tile_base = jnp.cumsum(tiles_per_seq) - tiles_per_seq  # [B] exclusive prefix sum
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(tile_base + tiles_per_seq, t, side="right", method=search).astype(jnp.int32)  # [NT]
    live = seq < kv_lens.shape[0]
    seq = jnp.minimum(seq, kv_lens.shape[0] - 1)
    local = t - tile_base[seq]
    tok0 = cu[seq] + local * TQ
    ntok = jnp.where(live, jnp.clip(cu[seq + 1] - tok0, 0, TQ), 0)
    pos0 = kv_lens[seq] - q_lens[seq] + local * TQ  # kv position of the tile's first token
    kv_hi = pos0 + ntok
    kv_lo = jnp.zeros_like(pos0)
    if sliding_window is not None:
        kv_lo = jnp.maximum(pos0 - sliding_window + 1, 0)
    page_lo = kv_lo // S
    num_blocks = jnp.where(ntok > 0, ((kv_hi + S - 1) // S - page_lo + PB - 1) // PB, 0)
    zero = jnp.zeros_like(t)
    desc = jnp.stack([seq, tok0, ntok, pos0, kv_hi, page_lo, num_blocks, zero], axis=1)
    return desc.astype(jnp.int32), tile_base.astype(jnp.int32)


def unsupported_reason(q: jax.Array, kv_pool: jax.Array | QuantizedKV) -> str | None:
    """Why this kernel cannot take these operands (None when it can)."""
    D, S = q.shape[-1], kv_pool.shape[1]
    if is_quantized(kv_pool):
        if not is_quantized_dtype(kv_pool.dtype) or kv_pool.scale.dtype != SCALE_DTYPE:
            got = f"{kv_pool.dtype} values and {kv_pool.scale.dtype} scales"
            return f"needs int8/fp8 values with bf16 scales, got {got}"
    elif kv_pool.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs a bf16 or f16 kv pool (wgmma operands), got {kv_pool.dtype}"
    if D not in (64, 128):
        return f"head dim {D} is not 64 or 128"
    if q.shape[1] > ROWS * (kv_pool.shape[2] // 2):
        return f"more than {ROWS} query heads per kv head"
    if S % 8:
        return f"page size {S} is not a multiple of 8 (TMA into 8-row swizzled tiles)"
    return None


_SMEM_MARGIN = 4096  # bytes left for allocation alignment when v2 picks a deeper ring


def _smem_bytes(
    NB: int, D: int, itemsize: int, part_itemsize: int, interpreted: bool, slots: int = 2, scale_cols: int = 0
) -> int:
    """`itemsize`: the ring's (the pool's values); `scale_cols` > 0: a quantized pool, whose ring also
    holds [NB, scale_cols] bf16 scales and whose wgmma operands are bf16."""
    quantized = scale_cols > 0
    op = 2 if quantized else itemsize  # wgmma operand itemsize
    q_tile, kv_ring, out = ROWS * D * op, slots * 2 * NB * D * itemsize, ROWS * D * part_itemsize
    reduction_scratch = 2048  # plgpu.CompilerParams.reduction_scratch_bytes
    # Quantized: the scale blocks of the ring, and the one dequantized (K, then V) tile.
    dequant = slots * NB * scale_cols * 2 + NB * D * op if quantized else 0
    return q_tile + kv_ring + out + ROWS * 4 + (ROWS * NB * op if interpreted else 0) + reduction_scratch + dequant


def default_num_splits(num_tiles: int, kv_heads: int, max_blocks: int) -> int:
    """v1: `kv_splits` for an H100's SM count, whatever the device."""
    return kv_splits(num_tiles, kv_heads, max_blocks, _NUM_SMS)


@dataclass(frozen=True)
class KernelPlan:
    """The static choices the wrapper makes for one shape."""

    variant: str
    num_tiles: int  # NT: 64-row query tiles (grid axis 0)
    num_splits: int  # NS: kv splits per tile (grid axis 2)
    kv_block_pages: int  # PB
    kv_slots: int  # R: ring depth
    smem_bytes: int  # per CTA
    ctas_per_sm: int  # resident CTAs per SM that shared memory allows
    sm_count: int

    @property
    def ctas(self) -> int:
        return self.num_tiles * self.num_splits


def plan(
    T: int, B: int, MP: int, S: int, KH: int, G: int, D: int, itemsize: int, q_itemsize: int, *,
    variant: str = "v2", kv_block_pages: int | None = None, num_kv_splits: int | None = None,
    kv_slots: int | None = None, interpreted: bool = False, sm_count: int | None = None, quantized: bool = False,
) -> KernelPlan:  # fmt: skip
    """The grid, block and ring sizes for a shape (`itemsize`: the pool's values, `q_itemsize`: the
    output's; `quantized`: a QuantizedKV pool); `num_tiles` counts tiles, not tiles x kv heads."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    # Decode-like batches (about a token per row) take kv blocks of 64 tokens in v2, so that two
    # CTAs fit an SM and one's loads overlap the other's math; extend batches keep 128 (fewer,
    # larger wgmmas per byte of softmax work).
    decode_like = variant == "v2" and T <= 2 * B
    # kv blocks are wgmma N (QK^T) and K (PV) operands: a multiple of 64 tokens, <= 256.
    PB = kv_block_pages or max(1, (64 if decode_like else 128) // S)
    if (PB * S) % 64 or PB * S > 256:
        raise ValueError(f"kv block of {PB} pages x {S} tokens must be a multiple of 64 and <= 256")
    TQ = ROWS // G
    NT = min(T, -(-T // TQ) + B)  # every tile holds >= 1 token
    max_blocks = -(-MP // PB)
    sms = _NUM_SMS if variant == "v1" else (sm_count or device_sm_count(_NUM_SMS))

    def smem(ns: int, r: int) -> int:
        part = q_itemsize if ns == 1 else 4
        return _smem_bytes(PB * S, D, itemsize, part, interpreted, slots=r, scale_cols=_scale_cols(KH) * quantized)

    if variant == "v1":
        NS = num_kv_splits or default_num_splits(NT, KH, max_blocks)
        R = kv_slots or 2
    else:
        # A bf16 pool's third slot never fits without costing a resident CTA (kv_slots= tries it); a
        # quantized pool's 1-byte ring takes one when the CTAs per SM stay the same.
        R = kv_slots or 2
        per_sm = max(1, _MAX_SMEM // (smem(2, R) + _SMEM_MARGIN))
        # About one wave of resident CTAs (never a split, nor its merge pass, for a near-full wave).
        NS = num_kv_splits or int(max(1, min(round(sms * per_sm / (NT * KH)), 16, max_blocks)))
        if quantized and kv_slots is None:
            resident = [_MAX_SMEM // (smem(NS, r) + _SMEM_MARGIN) for r in (2, 3)]
            R = 3 if resident[1] >= resident[0] else 2
    nbytes = smem(NS, R)
    return KernelPlan(variant, NT, NS, PB, R, nbytes, max(1, _MAX_SMEM // (nbytes + _SMEM_MARGIN)), sms)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "soft_cap", "kv_block_pages", "num_kv_splits", "kv_slots", "variant",
        "interpret",
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
    kv_block_pages: int | None = None,
    num_kv_splits: int | None = None,
    kv_slots: int | None = None,
    variant: str = "v2",
    interpret: Any = None,
) -> jax.Array:  # [T, NH, D]
    """Same contract as ``reference.ragged_paged_attention``; ``interpret`` goes to plgpu.kernel."""
    quantized = is_quantized(kv_pool)
    values = kv_pool.data if quantized else kv_pool  # [P, S, 2*KH, D]
    shape = AttentionShape.of(q, values, md)
    T, NH, KH, G, D, S, MP = shape.T, shape.NH, shape.KH, shape.G, shape.D, shape.S, shape.MP
    if (why := unsupported_reason(q, kv_pool)) is not None:
        raise NotImplementedError(why)
    op_dtype = _QUANT_COMPUTE if quantized else values.dtype  # wgmma operands
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if soft_cap is not None and soft_cap == 0.0:
        raise ValueError("soft_cap must be non-zero")
    interpreted = interpret is not None and interpret is not False
    p = plan(
        T, shape.B, MP, S, KH, G, D, values.dtype.itemsize, q.dtype.itemsize, variant=variant,
        kv_block_pages=kv_block_pages, num_kv_splits=num_kv_splits, kv_slots=kv_slots, interpreted=interpreted,
        quantized=quantized,
    )  # fmt: skip
    TQ, NT, NS, PB, R = ROWS // G, p.num_tiles, p.num_splits, p.kv_block_pages, p.kv_slots
    part_dtype = q.dtype if NS == 1 else jnp.float32
    if p.smem_bytes > _MAX_SMEM:
        raise ValueError(f"kv block of {PB * S} tokens x {R} slots needs {p.smem_bytes} B of shared memory")
    search = "scan" if variant == "v1" else "compare_all"  # v2: no lax loop (a host round trip per step)
    md = clean_metadata(md)
    desc, tile_base = _tile_descriptors(
        md, tokens_per_tile=TQ, num_tiles=NT, page_size=S, pages_per_block=PB, sliding_window=sliding_window,
        search=search,
    )  # fmt: skip

    # Query tiles: row r of tile i is head h*G + r % G of token tok0_i + r // G.
    r = jnp.arange(ROWS, dtype=jnp.int32)
    tok = jnp.minimum(desc[:, _TOK0, None] + r[None, :] // G, T - 1)  # [NT, 64]
    head = jnp.arange(KH, dtype=jnp.int32)[:, None, None] * G + (r % G)[None, None, :]  # [KH, 1, 64]
    q_tiles = q.astype(op_dtype)[tok[None, :, :], head].reshape(KH, NT * ROWS, D)  # [KH, NT*64, D]
    swizzle = 128  # bytes: a 64-element bf16 row; wgmma operands in 8-row swizzled tiles
    tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(op_dtype).itemsize))
    transforms = (tiling, plgpu.SwizzleTransform(swizzle))
    ring_transforms, extra_in, quant_scratch = transforms, (), ()
    if quantized:
        # The 1-byte ring: rows of D bytes (64-byte swizzle at D=64).
        ring_swizzle = min(128, D * values.dtype.itemsize)
        ring_transforms = (
            plgpu.TilingTransform((8, ring_swizzle // values.dtype.itemsize)),
            plgpu.SwizzleTransform(ring_swizzle),
        )
        C = _scale_cols(KH)
        scales = kv_pool.scale  # [P, S, 2*KH]: TMA needs rows of a multiple of 16 bytes
        extra_in = (scales if C == 2 * KH else jnp.pad(scales, ((0, 0), (0, 0), (0, C - 2 * KH))),)  # [P, S, C]
        quant_scratch = (
            plgpu.SMEM((R, PB * S, C), SCALE_DTYPE),
            plgpu.SMEM((PB * S, D), op_dtype, transforms=transforms),
        )
    kernel = plgpu.kernel(
        functools.partial(
            _kernel,
            sm_scale=float(sm_scale),
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            group=G,
            pages_per_block=PB,
            num_splits=NS,
            interpreted=interpreted,
            quantized=quantized,
        ),
        out_type=(
            jax.ShapeDtypeStruct((NS, KH, T * G + ROWS, D), part_dtype),
            jax.ShapeDtypeStruct((NT if NS > 1 else 1, NS, KH, ROWS), jnp.float32),
        ),
        scratch_types=(
            plgpu.SMEM((ROWS, D), op_dtype, transforms=transforms),
            plgpu.SMEM((R, PB * S, D), values.dtype, transforms=ring_transforms),
            plgpu.SMEM((R, PB * S, D), values.dtype, transforms=ring_transforms),
            plgpu.SMEM((ROWS, D), part_dtype),
            plgpu.SMEM((ROWS,), jnp.float32),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=PB * (1 + quantized), num_barriers=R),  # K values (+ scales)
            plgpu.Barrier(num_arrivals=PB, num_barriers=R),
            *([plgpu.SMEM((ROWS, PB * S), op_dtype, transforms=transforms)] if interpreted else []),
            *quant_scratch,
        ),
        grid=(NT, KH, NS),
        grid_names=("tile", "head", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    o_part, lse = kernel(desc, md.page_table, q_tiles, values, *extra_in)
    o_part = o_part[:, :, : T * G]  # [NS, KH, T*G, D]

    if NS == 1:
        o = o_part[0]  # [KH, T*G, D]
    else:
        o = _merge_splits(o_part, lse, md, tile_base, tokens_per_tile=TQ, group=G, search=search)  # [KH, T*G, D]
    o = o.reshape(KH, T, G, D).transpose(1, 0, 2, 3).reshape(T, NH, D)
    # Padding tokens' rows were never written: they are defined as 0.
    valid = (jnp.arange(T) < md.cu_q_lens[md.num_seqs[0]])[:, None, None]  # [T, 1, 1]
    return jnp.where(valid, o, 0).astype(q.dtype)


def _scale_cols(KH: int) -> int:
    """Columns of a quantized pool's scale block as the kernel reads it: 2*KH, padded to a multiple
    of 8 (a TMA row is a multiple of 16 bytes; a wgmma-layout tile a multiple of 8 columns)."""
    return -(-2 * KH // 8) * 8


def _merge_splits(
    o_part: jax.Array,  # [NS, KH, T*G, D] f32, each split's normalised output
    lse: jax.Array,  # [NT, NS, KH, 64] f32, per tile row; -inf where a split saw no key
    md: AttentionMetadata,
    tile_base: jax.Array,  # [B] first tile of each sequence
    *,
    tokens_per_tile: int,
    group: int,
    search: str,
) -> jax.Array:  # [KH, T*G, D] f32
    """Log-sum-exp weighted sum of the kv splits' outputs."""
    NS, KH, TG, _ = o_part.shape
    NT, TQ, G = lse.shape[0], tokens_per_tile, group
    T = TG // G
    # Row (t, g) of the output is row (t - tok0) * G + g of the tile holding token t.
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.searchsorted(md.cu_q_lens[1:], t, side="right", method=search)
    seq = jnp.minimum(seq, tile_base.shape[0] - 1)  # [T]
    local = t - md.cu_q_lens[seq]  # [T]
    tile = jnp.minimum(tile_base[seq] + local // TQ, NT - 1)  # [T]
    row = (local % TQ)[:, None] * G + jnp.arange(G, dtype=jnp.int32)[None, :]  # [T, G]
    lse_t = lse[tile[:, None], :, :, row]  # [T, G, NS, KH]
    lse_t = lse_t.transpose(2, 3, 0, 1).reshape(NS, KH, TG)  # [NS, KH, T*G]
    lse_max = jnp.max(lse_t, axis=0)  # [KH, T*G]
    w = jnp.exp(lse_t - jnp.where(jnp.isfinite(lse_max), lse_max, 0.0))  # [NS, KH, T*G]
    w = jnp.where(jnp.isfinite(lse_t), w, 0.0)
    return jnp.einsum("skr,skrd->krd", w, o_part) / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[..., None]
