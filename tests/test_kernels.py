"""Pallas attention kernels vs the jnp reference, in interpret mode on CPU.

Every kernel output buffer starts as NaN (interpret mode's ``uninitialized_memory="nan"``), so
an element the kernel never writes fails the comparison; pages no live sequence owns (page 0,
free pages, the pages of padding rows) are NaN too, so a kernel that reads them fails as well.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from jaxradix.engine.batch import shared_prefix
from jaxradix.pallas_kernels import get_attention, write_kv
from jaxradix.pallas_kernels.gathered import ragged_paged_attention_gathered
from jaxradix.pallas_kernels.gpu import ragged_paged_attention as gpu_kernel
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.reference import ragged_paged_attention as reference
from jaxradix.pallas_kernels.tpu import ragged_paged_attention as tpu_kernel

TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
GPU_INTERPRET = plgpu.InterpretGPUParams(uninitialized_memory="nan")
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple[int, ...]  # live sequences' new tokens (1: decode, 0: empty row)
    kv_lens: tuple[int, ...]  # their cached + new tokens
    B: int  # metadata rows; rows past len(q_lens) are padding
    S: int  # page size
    MP: int  # pages per row in the page table
    KH: int
    G: int  # query heads per kv head
    D: int
    sliding_window: int | None = None
    soft_cap: float | None = None
    shared_pages: int = 0  # leading pages shared by every sequence long enough (a radix prefix)
    pad_tokens: int = 3  # ragged tokens past the live ones


CASES = {
    "decode": Case((1, 1, 1, 1, 1), (5, 17, 33, 64, 1), B=6, S=16, MP=4, KH=3, G=3, D=64),
    "extend": Case((20, 9), (50, 9), B=2, S=32, MP=2, KH=4, G=1, D=128, pad_tokens=0),
    "mixed": Case((1, 7, 0, 1, 30), (30, 60, 0, 2, 45), B=8, S=16, MP=4, KH=3, G=3, D=64, shared_pages=1),
    "window_cap": Case(
        (3, 1, 25), (40, 33, 64), B=4, S=16, MP=4, KH=1, G=4, D=128, sliding_window=8, soft_cap=20.0
    ),
    "page1": Case((2, 1, 6), (9, 12, 6), B=3, S=1, MP=16, KH=2, G=2, D=64, sliding_window=5, shared_pages=3),
    "page64": Case((70, 1), (200, 150), B=3, S=64, MP=4, KH=1, G=1, D=64, sliding_window=40, soft_cap=10.0),
    "gqa8": Case((1, 40, 1, 2), (70, 100, 3, 2), B=5, S=16, MP=8, KH=1, G=8, D=128, shared_pages=2),
    # a system prompt of 5 pages: decode and extend rows hold all of it, one row only 2 pages of it
    # (cached 40 tokens), one row is too short to share; soft cap on the shared part too
    "cascade": Case((1, 1, 12, 1, 30, 2, 1), (90, 81, 100, 2, 110, 42, 86), B=8, S=16, MP=8, KH=2, G=3, D=64,
                    shared_pages=5),
    "cascade_cap": Case((1, 1, 12, 1, 30, 2, 1), (90, 81, 100, 2, 110, 42, 86), B=8, S=16, MP=8, KH=2, G=3,
                        D=64, soft_cap=30.0, shared_pages=5),
}


def make_batch(case: Case, dtype, seed: int = 0, share: bool = False):
    """(q, one layer's pool for the kernel with NaN in unowned pages, the same pool with zeros
    there, md). share: md marks the shared prefix as the engine does (batch.shared_prefix)."""
    rng = np.random.default_rng(seed)
    n, S = len(case.q_lens), case.S
    pages = [-(-k // S) for k in case.kv_lens]
    num_pages = 1 + case.shared_pages + sum(pages) + 4  # page 0, a shared prefix, owned, free pages
    fresh = iter(rng.permutation(np.arange(1 + case.shared_pages, num_pages)))
    page_table = np.zeros((case.B, case.MP), np.int32)
    owned = {0}
    for b in range(n):
        for p in range(pages[b]):
            full = (p + 1) * S <= case.kv_lens[b] - case.q_lens[b]  # a cached page, shareable
            page_table[b, p] = 1 + p if p < case.shared_pages and full else next(fresh)
        owned |= set(page_table[b, : pages[b]].tolist())
    free_pages = sorted(set(range(num_pages)) - owned)
    assert free_pages, "the batch needs a free page to poison"
    kv_lens = np.zeros(case.B, np.int32)
    kv_lens[:n] = case.kv_lens
    # Padding rows carry stale metadata that points at free pages: they must read nothing.
    kv_lens[n:] = S
    page_table[n:, 0] = free_pages[0]
    cu = np.zeros(case.B + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(case.q_lens)
    cu[n + 1 :] = cu[n]
    T = int(cu[n]) + case.pad_tokens
    q = rng.standard_normal((T, case.KH * case.G, case.D), np.float32)
    pool = rng.standard_normal((num_pages, S, 2 * case.KH, case.D), np.float32)  # [P, S, 2*KH, D]
    unowned = np.array([p not in owned or p == 0 for p in range(num_pages)])
    clean = np.where(unowned[:, None, None, None], 0.0, pool)
    poisoned = np.where(unowned[:, None, None, None], np.nan, pool)
    md = AttentionMetadata(
        cu_q_lens=jnp.asarray(cu),
        kv_lens=jnp.asarray(kv_lens),
        page_table=jnp.asarray(page_table),
        num_seqs=jnp.asarray([n], jnp.int32),
    )
    if share:
        q_lens = np.zeros(case.B, np.int32)
        q_lens[:n] = case.q_lens
        shared = shared_prefix(page_table, kv_lens - q_lens, S, n)
        md = dataclasses.replace(md, shared_pages=jnp.asarray(shared.pages), shared_lens=jnp.asarray(shared.lens))
    return jnp.asarray(q, dtype), jnp.asarray(poisoned, dtype), jnp.asarray(clean, dtype), md


def check(case_name: str, dtype, attention, *, poison: bool = True, share: bool = False, **kwargs):
    case = CASES[case_name]
    q, poisoned, clean, md = make_batch(case, dtype, share=share)
    params = dict(sm_scale=case.D**-0.5, sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    want = reference(q, clean, md, **params)
    got = attention(q, poisoned if poison else clean, md, **params, **kwargs)
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(want).any()
    np.testing.assert_allclose(got, want, atol=TOL[dtype], rtol=TOL[dtype], equal_nan=False)
    return got


tpu_attention = functools.partial(tpu_kernel.ragged_paged_attention, interpret=TPU_INTERPRET)
gpu_attention = functools.partial(gpu_kernel.ragged_paged_attention, interpret=GPU_INTERPRET)


@pytest.mark.parametrize(
    "case_name, dtype, blocks",
    [
        ("decode", jnp.float32, {}),
        ("decode", jnp.bfloat16, {}),
        ("extend", jnp.float32, {}),
        ("extend", jnp.bfloat16, dict(q_block_tokens=16, kv_block_pages=1)),
        ("mixed", jnp.float32, dict(q_block_tokens=16, kv_block_pages=1)),  # many kv blocks, prefetch
        ("mixed", jnp.bfloat16, {}),
        ("window_cap", jnp.float32, dict(kv_block_pages=1)),
        ("window_cap", jnp.bfloat16, {}),
        ("page1", jnp.float32, dict(kv_block_pages=4)),
    ],
)
def test_tpu_kernel(case_name, dtype, blocks):
    check(case_name, dtype, tpu_attention, **blocks)


@pytest.mark.parametrize(
    "case_name, splits",
    [
        ("decode", dict(num_kv_splits=1, q_f32=True)),  # f32 activations (f32 weights) over a bf16 pool
        ("decode", dict(num_kv_splits=2, kv_block_pages=4)),  # log-sum-exp merge of kv splits
        ("extend", {}),
        ("mixed", dict(kv_block_pages=4)),  # several kv blocks through the two-slot ring
        ("window_cap", dict(num_kv_splits=3, kv_block_pages=4)),
        ("page64", dict(kv_block_pages=1, kv_slots=3)),  # a three-slot ring over four kv blocks
        ("mixed", dict(variant="v1", kv_block_pages=4)),  # the first-measured kernel, kept selectable
    ],
)
def test_gpu_kernel(case_name, splits):
    attention = gpu_attention
    if splits.pop("q_f32", False):

        def attention(q, kv, md, **kwargs):
            out = gpu_attention(q.astype(jnp.float32), kv, md, **kwargs)
            assert out.dtype == jnp.float32
            return out.astype(q.dtype)

    check(case_name, jnp.bfloat16, attention, **splits)


def test_gpu_kernel_rejects_what_wgmma_cannot_take():
    q, poisoned, _, md = make_batch(CASES["decode"], jnp.float32)
    with pytest.raises(NotImplementedError, match="bf16"):
        gpu_attention(q, poisoned, md, sm_scale=1.0)
    q, poisoned, _, md = make_batch(CASES["page1"], jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="page size"):
        gpu_attention(q, poisoned, md, sm_scale=1.0)


def test_dispatch():
    assert jax.default_backend() == "cpu"
    from jaxradix import config
    from jaxradix.pallas_kernels import ATTENTION_BACKENDS
    from jaxradix.pallas_kernels.reference import ragged_paged_attention_blocked

    assert config.ATTENTION_BACKENDS == ATTENTION_BACKENDS  # the flag accepts every backend
    assert get_attention("reference") is ragged_paged_attention_blocked
    # auto on CPU is the gathered path: it never lets an unowned (NaN) page into a sum, which the
    # per-token reference does (it reads page 0 for the masked part of a block).
    check("mixed", jnp.float32, get_attention())
    check("mixed", jnp.float32, get_attention("gathered"))
    with pytest.raises(AssertionError):
        check("mixed", jnp.float32, get_attention("reference"))
    check("decode", jnp.bfloat16, get_attention("pallas"))  # the TPU kernel, interpreted
    check("decode", jnp.bfloat16, get_attention("pallas", interpret="gpu"))
    with pytest.raises(ValueError, match="attention_backend"):
        get_attention("cudnn")
    with pytest.raises(ValueError, match="interpret"):
        get_attention("pallas", interpret="cuda")


def test_gpu_dispatch_falls_back_off_hopper(caplog, monkeypatch):
    """`auto` on a GPU the kernel cannot serve (no sm_90, f32 pool, ...) takes its fallback, here the
    gathered path; on this CPU it finds no compute capability, so its extend tiles skip cuDNN. (The
    Triton kernel between them on sm_80 GPUs: test_kernels_triton.py.)"""
    import jaxradix.pallas_kernels as kernels
    from jaxradix.pallas_kernels import _cudnn_prefill_reason, _gathered, _gpu_kernel

    monkeypatch.setattr(kernels, "_warned", set())

    attention = _gpu_kernel(False, fallback=_gathered("gpu"))  # CPU: not a Hopper GPU
    with caplog.at_level("WARNING"):
        check("mixed", jnp.float32, attention)
    assert ("sm_90" in caplog.text or "bf16" in caplog.text) and "gathered" in caplog.text
    q, poisoned, _, _ = make_batch(CASES["mixed"], jnp.bfloat16)
    assert "compute capability" in _cudnn_prefill_reason(q, poisoned, None, None)


def test_write_kv_then_attend():
    """The writer every backend uses: new K/V land in their slots, padding tokens in page 0."""
    case = CASES["mixed"]
    q, _, clean, md = make_batch(case, jnp.float32)
    T, S = q.shape[0], case.S
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((T, case.KH, case.D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((T, case.KH, case.D)), jnp.float32)
    cu, kv_lens, pt = np.asarray(md.cu_q_lens), np.asarray(md.kv_lens), np.asarray(md.page_table)
    slots = np.zeros(T, np.int32)  # padding tokens write into page 0
    for b in range(len(case.q_lens)):
        for i, t in enumerate(range(cu[b], cu[b + 1])):
            pos = kv_lens[b] - case.q_lens[b] + i
            slots[t] = pt[b, pos // S] * S + pos % S
    pool = write_kv(clean, k, v, jnp.asarray(slots))
    live = slots >= S
    got = pool[slots // S, slots % S]  # [T, 2*KH, D]
    np.testing.assert_array_equal(np.asarray(got[live, : case.KH]), np.asarray(k[live]))
    np.testing.assert_array_equal(np.asarray(got[live, case.KH :]), np.asarray(v[live]))
    check_pool = functools.partial(tpu_attention, q_block_tokens=16)
    want = reference(q, pool, md, sm_scale=0.125)
    got = check_pool(q, pool, md, sm_scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("platform, T", [("cuda", 48), ("cuda", 8), ("tpu", 48)])
def test_kernels_lower_for_hardware(platform, T):
    """The non-interpreted kernels lower on CPU: Mosaic GPU all the way through its layout
    inference for sm_90 (an extend-shaped and a decode-shaped plan), Mosaic TPU to its MLIR (the
    layout passes run in libtpu, not here)."""
    SDS = jax.ShapeDtypeStruct
    B, MP, S, KH, G, D = 8, 16, 16, 8, 4, 128
    q = SDS((T, KH * G, D), jnp.bfloat16)
    pool = SDS((B * MP + 1, S, 2 * KH, D), jnp.bfloat16)
    i32 = jnp.int32
    md = AttentionMetadata(SDS((B + 1,), i32), SDS((B,), i32), SDS((B, MP), i32), SDS((1,), i32))
    kernel = gpu_kernel if platform == "cuda" else tpu_kernel
    fn = functools.partial(kernel.ragged_paged_attention, sm_scale=0.1, sliding_window=100, soft_cap=30.0)
    if platform == "cuda":
        lowered = jax.jit(fn).trace(q, pool, md).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
    else:
        device = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1, platform="tpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(fn).trace(q, pool, md).lower(lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()


def test_gpu_plan():
    """v2 sizes the grid for the GPU: decode at batch 32 (KH 8, D 128) fits two CTAs per SM and
    needs no kv split (nor its merge); a small batch splits kv to fill the SMs; v1 keeps its
    first-measured choices; a requested ring depth that does not fit is refused."""
    plan = gpu_kernel.plan
    v2 = plan(32, 32, 128, 16, 8, 4, 128, 2, 2, sm_count=132)
    assert (v2.num_splits, v2.kv_block_pages, v2.kv_slots, v2.ctas_per_sm) == (1, 4, 2, 2)
    small = plan(4, 4, 128, 16, 8, 4, 128, 2, 2, sm_count=132)
    assert small.num_splits > 1 and small.ctas >= 132 // 8 // 2
    v1 = plan(32, 32, 128, 16, 8, 4, 128, 2, 2, variant="v1")
    assert (v1.num_splits, v1.kv_block_pages, v1.kv_slots) == (2, 8, 2)
    extend = plan(4096, 32, 128, 16, 8, 4, 128, 2, 2, sm_count=132)
    assert extend.kv_block_pages == 8 and extend.num_splits == 1
    with pytest.raises(ValueError, match="variant"):
        plan(32, 32, 128, 16, 8, 4, 128, 2, 2, variant="v3")
    q, poisoned, _, md = make_batch(CASES["decode"], jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        gpu_attention(q, poisoned.astype(jnp.bfloat16), md, sm_scale=1.0, kv_block_pages=16, kv_slots=4)


# Small tiles and kv blocks, so the cases cross several q tiles and kv blocks.
gathered = jax.jit(
    functools.partial(
        ragged_paged_attention_gathered, q_tile=16, kv_block_tokens=32, decode_block_tokens=32, prefix_chunk_tokens=32
    ),
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "prefill", "short_q_tile", "short_kv_block_tokens",
                     "shared_block_tokens"),
)


@pytest.mark.parametrize(
    "case_name, dtype",
    [(name, jnp.float32) for name in sorted(CASES)] + [("mixed", jnp.bfloat16), ("page64", jnp.bfloat16)],
)
def test_gathered(case_name, dtype):
    """The per-sequence gather path (CPU and pre-Hopper GPUs) against the reference; unowned pages
    are NaN, so a path that let them into a sum would fail."""
    check(case_name, dtype, gathered)


@pytest.mark.parametrize("case_name", ["extend", "mixed", "gqa8"])
def test_gathered_dot_product_attention(case_name):
    """Extend tiles through jax.nn.dot_product_attention (XLA here, cuDNN on a GPU): prefix and
    diagonal calls merged by their log-sum-exp."""
    check(case_name, jnp.float32, functools.partial(gathered, prefill="dot_product_attention"))


def test_shared_prefix_marks_the_run_that_saves_most():
    """batch.shared_prefix on the cascade case: 5 shared pages for the 4 rows that cache all of them
    (40 cached tokens hold 2 whole pages: that row is left out, as are the short ones)."""
    case = CASES["cascade"]
    _, _, _, md = make_batch(case, jnp.float32, share=True)
    assert np.asarray(md.shared_pages)[:6].tolist() == [1, 2, 3, 4, 5, 0]
    assert np.asarray(md.shared_lens).tolist() == [80, 80, 80, 0, 80, 0, 80, 0]
    table = np.array([[7, 8, 9], [7, 8, 2], [3, 4, 5]], np.int32)
    two = shared_prefix(table, np.array([48, 48, 48]), 16, 3)  # rows 0, 1 share 2 pages; row 2 none
    assert two.pages.tolist() == [7, 8, 0] and two.lens.tolist() == [32, 32, 0]
    none = shared_prefix(table, np.array([48, 10, 48]), 16, 3)  # row 1 has no whole cached page
    assert not none.lens.any()


@pytest.mark.parametrize("case_name, prefill", [("cascade", "einsum"), ("cascade_cap", "einsum"), ("mixed", "einsum"),
                                                ("gqa8", "einsum"), ("page1", "einsum"),
                                                ("cascade", "dot_product_attention")])
@pytest.mark.parametrize("short_q_tile", [0, 8])
def test_gathered_cascade(case_name, prefill, short_q_tile):
    """Rows that share a prefix read it once, in one block for all of them, merged with their own keys
    by log-sum-exp: the reference's outputs (page1 has a sliding window: the cascade stays off). With
    short_q_tile, rows of <= 8 new tokens take their own loop of 8-token tiles over 16-token kv blocks."""
    attention = functools.partial(gathered, prefill=prefill, short_q_tile=short_q_tile, short_kv_block_tokens=16,
                                  shared_block_tokens=32)
    check(case_name, jnp.float32, attention, share=True)


def test_gathered_cascade_reads_the_shared_pages_once():
    """Sharing rows read the shared range from shared_pages only: with their page-table entries there
    pointing at NaN pages the result is still the reference's, so the per-row path did not read them."""
    case = CASES["cascade_cap"]
    q, poisoned, clean, md = make_batch(case, jnp.float32, share=True)
    params = dict(sm_scale=case.D**-0.5, soft_cap=case.soft_cap)
    want = reference(q, clean, md, **params)
    nan_page = int(np.flatnonzero(np.isnan(np.asarray(poisoned)[:, 0, 0, 0]))[-1])
    table = np.asarray(md.page_table).copy()
    sharing = np.asarray(md.shared_lens) > 0
    table[sharing, :5] = nan_page
    got = gathered(q, poisoned, dataclasses.replace(md, page_table=jnp.asarray(table)), **params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL[jnp.float32], rtol=TOL[jnp.float32])


def test_gathered_rejects_what_it_cannot_take():
    q, poisoned, _, md = make_batch(CASES["window_cap"], jnp.float32)
    with pytest.raises(NotImplementedError, match="sliding window"):
        gathered(q, poisoned, md, sm_scale=1.0, sliding_window=8, prefill="dot_product_attention")
    with pytest.raises(ValueError, match="prefill"):
        gathered(q, poisoned, md, sm_scale=1.0, prefill="flash")
    with pytest.raises(ValueError, match="kv"):
        gathered(q, poisoned[None], md, sm_scale=1.0)  # a stacked [L, ...] pool
