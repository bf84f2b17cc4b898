"""Ragged paged attention in Pallas's Triton backend: the path of NVIDIA GPUs without the Mosaic kernel.

Hopper runs the Mosaic GPU kernel; A100, A10, L4, L40 and other sm_80+ GPUs run this one. Same contract
as ``reference.ragged_paged_attention`` for one layer's pool array (plain or ``QuantizedKV``).

Why a kernel and not the gathered path there: the gathered path loops over kv blocks with
``lax.fori_loop`` bounds read from the metadata, and XLA's GPU runtime runs a while loop of unknown
trip count by copying its predicate to the host and waiting for the stream every iteration — a
device->host sync per kv block per layer, so the host can never run ahead of the device. Here every
loop whose length depends on the data runs inside the kernel; the step has no XLA control flow.

One kernel body, two launches:
- decode rows (q_len == 1): grid ``(B, KH, splits)``. A program takes one row's G query heads of one
  kv head (padded to Gp >= 16 rows for the tensor-core dot) against a share of the row's kv blocks
  (FlashDecoding splits, sized to the SM count); the shares merge by log-sum-exp outside.
- extend rows: tiles of TQ tokens of one row (TQ * Gp query rows); grid ``(n_tiles, KH, 1)`` with a
  static upper bound on the tile count (the tokens in TQ-sized pieces plus one partial tile per row);
  a tile past the live ones has no tokens and loops zero times. A tile walks kv blocks from its
  window start to its last token, so it never reads keys after that (causal block skipping).

A kv block is C pages (``C * S`` tokens), loaded as one gather of C page ids from the page table. The
metadata of every program (row, first token, live tokens, kv position of the first token, first kv
position it may see) is one ``[n, 5]`` int32 array built with jnp before the launch.

A quantized pool (``QuantizedKV``: int8/fp8 values, a bf16 scale per token and head) is read as its
1-byte pages plus their scales and dequantized in the kernel into the query's dtype, exactly as
``dequantize_kv`` does, right before the dots (fp8 needs an sm_89+ GPU; the dispatcher checks).

Limits (``unsupported_reason``): head dim, page size and the tile shapes are powers of two with the
dot's sides >= 16. ``auto`` sends what this kernel cannot take to the gathered path.
The Triton backend of Pallas is deprecated upstream (jax 0.11 warns; jaxradix pins 0.11.2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxradix.pallas_kernels.common import AttentionShape, clean_metadata, device_sm_count, kv_splits
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.quantized_kv import is_quantized
from jaxradix.pallas_kernels.reference import KVPool

# meta columns
_ROW, _TOK0, _NTOK, _POS0, _LO = range(5)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def unsupported_reason(q: jax.Array, kv) -> str | None:
    """Why this kernel cannot take these operands (None when it can)."""
    D, S = q.shape[-1], kv.shape[1]
    if D != _pow2(D) or D < 16:
        return f"head dim {D} (a power of two >= 16)"
    if S != _pow2(S):
        return f"page size {S} (a power of two)"
    if kv.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32) and not is_quantized(kv):
        return f"kv dtype {kv.dtype}"
    if is_quantized(kv) and q.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"query dtype {q.dtype} with a quantized pool"
    return None


def is_fp8(kv) -> bool:
    return is_quantized(kv) and jnp.issubdtype(kv.dtype, jnp.floating)


def _kernel(
    meta_ref,
    pt_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    tq: int,
    gp: int,
    pages_per_block: int,
    splits: int,
    sliding_window: int | None,
    soft_cap: float | None,
    precision,
    quantized: bool,
):
    # meta_ref [n, 5] int32, pt_ref [B, MPp] int32, q_ref [Tq, Gp, D], k_ref / v_ref [P, S, D] (one kv head),
    # refs: (quantized: ks_ref / vs_ref [P, S] bf16 scales,) o_ref [tq, Gp, D] f32, lse_ref [tq, Gp] f32
    ks_ref, vs_ref, o_ref, lse_ref = refs if quantized else (None, None, *refs)
    t, split = pl.program_id(0), pl.program_id(2)
    row, tok0, ntok = meta_ref[t, _ROW], meta_ref[t, _TOK0], meta_ref[t, _NTOK]
    pos0, lo = meta_ref[t, _POS0], meta_ref[t, _LO]
    _, S, D = k_ref.shape
    C, M = pages_per_block, tq * gp
    N = C * S
    hi = jnp.where(ntok > 0, pos0 + ntok, 0)  # one past the last key any query of the program sees
    b_lo = lax.div(lo, N)
    n_blk = jnp.maximum(lax.div(hi + N - 1, N) - b_lo, 0)
    b0 = b_lo + lax.div(n_blk * split, splits)  # this split's share of the blocks
    b1 = b_lo + lax.div(n_blk * (split + 1), splits)

    q = q_ref[pl.ds(tok0, tq)].reshape(M, D)  # pre-scaled, in the compute dtype (the pool's, or the query's)

    def read(ref, scale_ref, pages):  # [N, D] in the compute dtype, dequantized as dequantize_kv does
        x = ref[pages].reshape(N, D)
        if scale_ref is None:
            return x
        scale = scale_ref[pages].reshape(N).astype(jnp.float32)
        return (x.astype(jnp.float32) * scale[:, None]).astype(q.dtype)

    q_pos = pos0 + lax.div(lax.broadcasted_iota(jnp.int32, (M,), 0), gp)  # [M] kv position of each query row

    def body(j, carry):
        m, l, acc = carry  # [M], [M], [M, D] f32
        pages = pt_ref[row, pl.ds(j * C, C)]  # [C]
        kv_pos = j * N + lax.broadcasted_iota(jnp.int32, (N,), 0)  # [N]
        k = read(k_ref, ks_ref, pages)
        # slots past the context read page 0 (or a stale page): a 0 * NaN there would poison the sum
        v = jnp.where(((kv_pos >= lo) & (kv_pos < hi))[:, None], read(v_ref, vs_ref, pages), 0)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision)  # [M, N]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] >= lo)
        if sliding_window is not None:
            mask &= kv_pos[None, :] > q_pos[:, None] - sliding_window
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with no key yet stays at l = 0
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)  # [M, D]
        return m_new, l * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    init = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32), jnp.zeros((M, D), jnp.float32))
    m, l, acc = lax.fori_loop(b0, b1, body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).reshape(tq, gp, D)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf).reshape(tq, gp)


def _launch(
    meta, page_table, q, kv, *, tq, pages_per_block, splits, sliding_window, soft_cap, interpret, num_warps, num_stages
):
    """q [KH, Tq, Gp, D] -> (out [splits, n, KH, tq, Gp, D] f32, lse [splits, n, KH, tq, Gp] f32)."""
    KH, Tq, Gp, D = q.shape
    P, S, _, _ = kv.shape
    n = meta.shape[0]
    B, MPp = page_table.shape
    quantized = is_quantized(kv)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel,
        tq=tq,
        gp=Gp,
        pages_per_block=pages_per_block,
        splits=splits,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        precision=precision,
        quantized=quantized,
    )
    values = kv.data if quantized else kv
    scale_specs, scales = [], []
    if quantized:
        scale_specs = [pl.BlockSpec((P, S, None), lambda t, h, s: (0, 0, h)),
                       pl.BlockSpec((P, S, None), lambda t, h, s: (0, 0, KH + h))]  # fmt: skip
        scales = [kv.scale, kv.scale]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        compiler_params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return pl.pallas_call(
        kernel,
        grid=(n, KH, splits),
        in_specs=[
            pl.BlockSpec((n, 5), lambda t, h, s: (0, 0)),
            pl.BlockSpec((B, MPp), lambda t, h, s: (0, 0)),
            pl.BlockSpec((None, Tq, Gp, D), lambda t, h, s: (h, 0, 0, 0)),
            pl.BlockSpec((P, S, None, D), lambda t, h, s: (0, 0, h, 0)),  # K of kv head h
            pl.BlockSpec((P, S, None, D), lambda t, h, s: (0, 0, KH + h, 0)),  # V of kv head h
            *scale_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, tq, Gp, D), lambda t, h, s: (s, t, h, 0, 0, 0)),
            pl.BlockSpec((None, None, None, tq, Gp), lambda t, h, s: (s, t, h, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((splits, n, KH, tq, Gp, D), jnp.float32),
            jax.ShapeDtypeStruct((splits, n, KH, tq, Gp), jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="ragged_paged_attention_triton",
    )(meta, page_table, q, values, values, *scales)


@dataclass(frozen=True)
class TilePlan:
    block_tokens: int  # kv tokens per block (decode and extend)
    extend_rows: int  # query rows (tokens x padded heads) per extend tile
    num_stages: int  # Triton's software pipeline depth


def tile_plan(head_dim: int, itemsize: int) -> TilePlan:
    """Tiles whose staged K/V blocks and query tile fit the 99 KB of shared memory of an A10/L4 (sm_86/89)
    and spill no registers (upstream Triton 3.9's ptxas, tests/test_kernels_triton.py): 16-bit rows up to
    D 128 take 64-token blocks, 64-row extend tiles and two stages (<= 72 KB for sm_80); D 256 one stage
    and 32-row tiles. f32 (exact fp32 dots, no tensor cores) one stage and 32-row tiles, 32-token blocks
    and 16-row tiles at D 256."""
    row = head_dim * itemsize
    if itemsize <= 2 and row <= 256:
        return TilePlan(block_tokens=64, extend_rows=64, num_stages=2)
    if row <= 512:
        return TilePlan(block_tokens=64, extend_rows=32, num_stages=1)
    return TilePlan(block_tokens=32, extend_rows=16, num_stages=1)


def ragged_paged_attention(
    q: jax.Array,  # [T, NH, D]
    kv: KVPool,  # [P, S, 2*KH, D] one layer's pool
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    decode_block_tokens: int | None = None,
    extend_rows: int | None = None,
    extend_block_tokens: int | None = None,
    splits: int | None = None,
    interpret: bool = False,
    decode_warps: int = 4,
    extend_warps: int = 8,
    num_stages: int | None = None,
) -> jax.Array:  # [T, NH, D], rows of padding tokens are 0
    """See the module docstring. `extend_rows`: query rows (tokens x padded heads) per extend tile;
    `num_stages`: Triton's software pipeline depth; None: `tile_plan`'s. Extend tiles run 8 warps: their
    [64, D] f32 accumulator spills registers with 4 (upstream Triton 3.9's ptxas for sm_80: 255 registers
    and 168-1,212 B of spills on int8/fp8/f32 pools with 4 warps, none with 8)."""
    why = unsupported_reason(q, kv)
    if why is not None:
        raise NotImplementedError(f"Triton attention kernel: {why}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    shape = AttentionShape.of(q, kv.data if is_quantized(kv) else kv, md)
    T, NH, D, S, KH, G, B, MP = shape.T, shape.NH, shape.D, shape.S, shape.KH, shape.G, shape.B, shape.MP
    md = clean_metadata(md)
    Gp = max(16, _pow2(G))  # decode: the G heads of a kv head are the dot's rows
    compute = q.dtype if is_quantized(kv) else kv.dtype
    plan = tile_plan(D, jnp.dtype(compute).itemsize)
    decode_block_tokens = decode_block_tokens or plan.block_tokens
    extend_block_tokens = extend_block_tokens or plan.block_tokens
    extend_rows = extend_rows or plan.extend_rows
    num_stages = num_stages or plan.num_stages
    CD = max(1, _pow2(decode_block_tokens) // S)
    TQ = max(1, _pow2(extend_rows) // _pow2(G))  # extend: TQ tokens x G' heads
    Ge = max(_pow2(G), 16 // TQ if TQ < 16 else 1)  # extend heads per token, so that TQ * Ge >= 16 dot rows
    CE = max(1, _pow2(extend_block_tokens) // S)
    C = max(CD, CE)
    table = jnp.pad(md.page_table, ((0, 0), (0, -MP % C)))  # [B, MPp]: whole kv blocks
    q_lens = md.cu_q_lens[1:] - md.cu_q_lens[:-1]  # [B]
    pos_last = md.kv_lens - 1  # [B] position of each row's last token
    window_lo = (
        (lambda p: jnp.zeros_like(p)) if sliding_window is None else (lambda p: jnp.maximum(p - sliding_window + 1, 0))
    )
    qs = (q.astype(jnp.float32) * sm_scale).astype(compute).reshape(T, KH, G, D)
    rows = jnp.arange(B, dtype=jnp.int32)
    launch = functools.partial(
        _launch,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        interpret=interpret,
        num_stages=num_stages,
    )

    # Decode rows: one program row per sequence row (live or not), its query token gathered to row b.
    is_decode = (q_lens == 1) & (md.kv_lens > 0)  # [B]
    q_dec = jnp.pad(qs[jnp.minimum(md.cu_q_lens[:-1], T - 1)], ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    meta_dec = jnp.stack([rows, rows, is_decode.astype(jnp.int32), pos_last, window_lo(pos_last)], axis=1)
    n_split = splits or kv_splits(B, KH, table.shape[1] // CD, device_sm_count(108))  # 108: an A100's
    q_dec = q_dec.transpose(1, 0, 2, 3)  # [KH, B, Gp, D]
    o_dec, lse_dec = launch(meta_dec, table, q_dec, kv, tq=1, pages_per_block=CD, splits=n_split,
                            num_warps=decode_warps)  # [splits, B, KH, 1, Gp, D], [splits, B, KH, 1, Gp]
    o_dec, lse_dec = o_dec[:, :, :, 0, :G], lse_dec[:, :, :, 0, :G]  # [splits, B, KH, G, ...]
    m = jnp.max(lse_dec, axis=0)
    w = jnp.exp(lse_dec - jnp.where(m == -jnp.inf, 0.0, m)[None])  # [splits, B, KH, G]
    o_dec = jnp.sum(w[..., None] * o_dec, axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1e-30)[..., None]

    # Extend rows: tiles of TQ tokens; row b owns tiles [tile_end[b] - n_tiles[b], tile_end[b]).
    is_ext = q_lens >= 2  # [B]
    n_tiles = jnp.where(is_ext, (q_lens + TQ - 1) // TQ, 0)  # [B]
    tile_end = jnp.cumsum(n_tiles)  # [B]
    n_max = -(-T // TQ) + min(B, T // 2)  # static bound: whole tiles plus one partial tile per extend row
    tile = jnp.arange(n_max, dtype=jnp.int32)
    b = jnp.minimum(jnp.sum(tile_end[None, :] <= tile[:, None], axis=1), B - 1).astype(jnp.int32)  # [n_max]
    local = tile - (tile_end[b] - n_tiles[b])
    tok0 = md.cu_q_lens[b] + local * TQ
    ntok = jnp.where(tile < tile_end[-1], jnp.clip(md.cu_q_lens[b + 1] - tok0, 0, TQ), 0)
    pos0 = md.kv_lens[b] - q_lens[b] + local * TQ
    meta_ext = jnp.stack([b, jnp.clip(tok0, 0, T), ntok, pos0, window_lo(pos0)], axis=1)
    q_ext = jnp.pad(qs, ((0, TQ), (0, 0), (0, Ge - G), (0, 0))).transpose(1, 0, 2, 3)  # [KH, T+TQ, Ge, D]
    o_ext, _ = launch(meta_ext, table, q_ext, kv, tq=TQ, pages_per_block=CE, splits=1,
                      num_warps=extend_warps)  # [1, n_max, KH, TQ, Ge, D]

    # Each extend token reads its tile's row; decode tokens take the decode output; padding stays 0.
    tok = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.minimum(jnp.sum(md.cu_q_lens[None, 1:] <= tok[:, None], axis=1), B - 1).astype(jnp.int32)  # [T]
    off = tok - md.cu_q_lens[seq]
    t_idx = jnp.clip(tile_end[seq] - n_tiles[seq] + off // TQ, 0, n_max - 1)
    out = o_ext[0, t_idx, :, off % TQ, :G]  # [T, KH, G, D]
    live = (tok < md.cu_q_lens[B]) & is_ext[seq]
    out = jnp.where(live[:, None, None, None], out, 0.0)
    dec_tok = jnp.where(is_decode, md.cu_q_lens[:-1], T)  # [B]
    out = out.at[dec_tok].set(o_dec, mode="drop")
    return out.reshape(T, NH, D).astype(q.dtype)
