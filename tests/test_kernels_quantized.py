"""The Pallas attention kernels on quantized KV pools (int8 / fp8 values, bf16 scales), interpreted
on CPU, against the jnp reference on the dequantized pool.

The batches are test_kernels' (decode, mixed ragged with a shared prefix, page 64 with a sliding
window and soft cap). Pages no live sequence owns get NaN scales, so a kernel that reads them fails;
the reference sees those pages as zeros. The kernels dequantize into the query's dtype exactly as
``dequantize_kv`` does, so the tolerance is test_kernels' for that dtype (bf16: 2e-2, f32: 2e-5):
only the attention arithmetic differs, not the values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import CASES, TOL, gpu_attention, make_batch, tpu_attention

from jaxradix.pallas_kernels import get_attention
from jaxradix.pallas_kernels.gpu import ragged_paged_attention as gpu_kernel
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.quantized_kv import QUANTIZED_KV_DTYPES, QuantizedKV, dequantize_kv, quantize
from jaxradix.pallas_kernels.reference import ragged_paged_attention as reference


def quantized_batch(case_name: str, kv_dtype: str, q_dtype, share: bool = False):
    """(q, poisoned quantized pool, clean quantized pool, md)."""
    q, poisoned, _, md = make_batch(CASES[case_name], jnp.float32, share=share)
    unowned = jnp.isnan(poisoned[:, 0, 0, 0])[:, None, None]  # [P, 1, 1]
    data, scale = quantize(jnp.nan_to_num(poisoned), QUANTIZED_KV_DTYPES[kv_dtype])
    bad = QuantizedKV(data, jnp.where(unowned, jnp.nan, scale).astype(scale.dtype))
    clean = QuantizedKV(data, jnp.where(unowned, 0.0, scale).astype(scale.dtype))
    return q.astype(q_dtype), bad, clean, md


def check_quantized(case_name: str, kv_dtype: str, attention, *, q_dtype=jnp.bfloat16, share: bool = False, **kw):
    case = CASES[case_name]
    q, poisoned, clean, md = quantized_batch(case_name, kv_dtype, q_dtype, share)
    params = dict(sm_scale=case.D**-0.5, sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    want = reference(q, dequantize_kv(clean, q_dtype), md, **params)
    got = attention(q, poisoned, md, **params, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(want).any()
    np.testing.assert_allclose(got, want, atol=TOL[q_dtype], rtol=TOL[q_dtype])


@pytest.mark.parametrize(
    "case_name, kv_dtype, kw",
    [
        # KH 3: the scale blocks' head axis is padded to 8 for TMA; kv splits (one empty) and their merge
        ("decode", "int8", dict(num_kv_splits=2, kv_block_pages=4)),
        ("mixed", "fp8_e4m3", dict(kv_block_pages=4)),  # decode and extend rows, a shared prefix page
        # page 64, window, soft cap; four kv blocks through a three-slot ring (refills)
        ("page64", "fp8_e5m2", dict(kv_block_pages=1, kv_slots=3)),
        ("extend", "int8", {}),  # KH 4: scale blocks TMA-read straight from the pool's scales
    ],
)
def test_gpu_kernel_quantized(case_name, kv_dtype, kw):
    check_quantized(case_name, kv_dtype, gpu_attention, **kw)


@pytest.mark.parametrize(
    "case_name, kv_dtype, kw",
    [
        ("decode", "fp8_e5m2", {}),
        ("mixed", "int8", dict(q_block_tokens=16, kv_block_pages=1)),  # many kv blocks, prefetch
        ("page64", "fp8_e4m3", {}),
        ("decode", "int8", dict(q_dtype=jnp.float32)),  # f32 activations: dequantized into f32
    ],
)
def test_tpu_kernel_quantized(case_name, kv_dtype, kw):
    check_quantized(case_name, kv_dtype, tpu_attention, **kw)


def test_dispatch_quantized():
    """`pallas` (interpreted) takes a QuantizedKV with the plain signature; the GPU kernel refuses
    scales it was not built for, by name."""
    check_quantized("decode", "fp8_e4m3", get_attention("pallas", interpret="gpu"))
    q, poisoned, _, md = quantized_batch("decode", "int8", jnp.bfloat16)
    f32_scales = QuantizedKV(poisoned.data, poisoned.scale.astype(jnp.float32))
    assert "scales" in gpu_kernel.unsupported_reason(q, f32_scales)
    with pytest.raises(NotImplementedError, match="scales"):
        gpu_attention(q, f32_scales, md, sm_scale=1.0)


def test_auto_takes_quantized_pages(monkeypatch):
    """`auto` hands a quantized pool to the platform's kernel as it is: on a TPU the Mosaic TPU kernel
    (no gathered detour; here interpreted, with the platform faked), on CPU the gathered path."""
    import jaxradix.pallas_kernels as pk

    seen = []

    def tpu_kernel(interpret: bool):
        def attention(q, kv, md, **kwargs):
            seen.append(type(kv))
            return tpu_attention(q, kv, md, **kwargs)

        return attention

    check_quantized("mixed", "fp8_e4m3", get_attention("auto"))  # CPU: gathered
    monkeypatch.setattr(pk, "_tpu_kernel", tpu_kernel)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    check_quantized("mixed", "int8", get_attention("auto"), q_block_tokens=16)
    assert seen == [QuantizedKV]


def test_gpu_plan_quantized():
    """A quantized pool's ring holds 1-byte pages plus [NB, 2*KH] bf16 scale blocks, and the kernel
    adds one dequantized bf16 tile (K, then V): at decode, batch 32 (KH 8, D 128), that leaves room
    for a third ring slot while two CTAs still fit an SM (a bf16 pool keeps two slots)."""
    bf16 = gpu_kernel.plan(32, 32, 128, 16, 8, 4, 128, 2, 2, sm_count=132)
    quant = gpu_kernel.plan(32, 32, 128, 16, 8, 4, 128, 1, 2, sm_count=132, quantized=True)
    assert (bf16.kv_slots, bf16.ctas_per_sm) == (2, 2)
    assert (quant.num_splits, quant.kv_block_pages, quant.kv_slots, quant.ctas_per_sm) == (bf16.num_splits, 4, 3, 2)
    NB, D, C = 64, 128, 16  # C: the scale block's columns (2*KH)
    quant_ring = 3 * (2 * NB * D + NB * C * 2) + NB * D * 2  # 3 slots of K, V pages and scales; one bf16 tile
    assert quant.smem_bytes - bf16.smem_bytes == quant_ring - 2 * 2 * NB * D * 2
    assert gpu_kernel.plan(32, 32, 128, 16, 8, 4, 128, 1, 2, kv_slots=2, quantized=True).kv_slots == 2


@pytest.mark.parametrize(
    "platform, kv_dtype, KH", [("cuda", "int8", 8), ("cuda", "fp8_e4m3", 3), ("tpu", "int8", 8)]
)
def test_quantized_kernels_lower_for_hardware(platform, kv_dtype, KH):
    """The non-interpreted kernels lower on CPU for a quantized pool: Mosaic GPU through its layout
    inference for sm_90 (the int8/fp8 tile loaded from swizzled SMEM, upcast and scaled in
    registers, stored for the wgmma; scale blocks read from the pool at KH 8, padded at KH 3),
    Mosaic TPU to its MLIR."""
    SDS = jax.ShapeDtypeStruct
    T, B, MP, S, G, D = 8, 8, 16, 16, 4, 128
    q = SDS((T, KH * G, D), jnp.bfloat16)
    P = B * MP + 1
    pool = QuantizedKV(SDS((P, S, 2 * KH, D), QUANTIZED_KV_DTYPES[kv_dtype]), SDS((P, S, 2 * KH), jnp.bfloat16))
    i32 = jnp.int32
    md = AttentionMetadata(SDS((B + 1,), i32), SDS((B,), i32), SDS((B, MP), i32), SDS((1,), i32))
    if platform == "cuda":
        fn = functools.partial(gpu_kernel.ragged_paged_attention, sm_scale=0.1, sliding_window=100, soft_cap=30.0)
        lowered = jax.jit(fn).trace(q, pool, md).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
    else:
        from jaxradix.pallas_kernels.tpu import ragged_paged_attention as tpu_kernel

        fn = functools.partial(tpu_kernel.ragged_paged_attention, sm_scale=0.1, sliding_window=100, soft_cap=30.0)
        device = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1, platform="tpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(fn).trace(q, pool, md).lower(lowering_platforms=("tpu",))
        assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8_e4m3"])
def test_gathered_cascade_quantized(kv_dtype):
    """The CPU path's cascade (a shared prefix read once for all rows) dequantizes the shared blocks as
    the per-row blocks: the reference on the dequantized pool."""
    check_quantized("cascade_cap", kv_dtype, get_attention("gathered"), q_dtype=jnp.float32, share=True)
