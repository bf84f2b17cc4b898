"""The CPU int8 matmul behind quantization.dense and the CPU form of the tied logits (models/cpu_matmul.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxradix.models import cpu_matmul, cpu_native
from jaxradix.models.quantization import dense, quantize_channels

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU matmul path")


def _rand(shape: tuple[int, ...], seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("tokens", [1, 2, 7])
def test_int8_dense_matches_dequantized_weight(tokens):
    x, w = _rand((tokens, 96), 0), _rand((96, 160), 1)
    q = quantize_channels(w, kind="int8")
    ref = x @ q.dequantize()  # [T, N]: the same weight, f32 activations
    y = dense(x, q)
    assert y.shape == (tokens, 160) and y.dtype == x.dtype
    # PARTS int8 parts per activation row: each term errs by at most |w| * amax(x) / (2 * 127 * 254^(PARTS-1))
    bound = (jnp.max(jnp.abs(x), axis=1, keepdims=True) / (2 * 127 * cpu_matmul.RADIX ** (cpu_matmul.PARTS - 1))
             * jnp.sum(jnp.abs(q.dequantize()), axis=0) + 1e-5 * (1 + jnp.abs(ref)))  # [T, N]
    assert bool(jnp.all(jnp.abs(y - ref) <= bound))
    assert float(jnp.max(jnp.abs(y - ref))) < 1e-3 * float(jnp.max(jnp.abs(ref)))



@pytest.mark.parametrize("parts", [1, 2, 3])
def test_activation_parts_reconstruct_the_row(parts):
    x = _rand((4, 200), 8) * jnp.array([[1.0], [1e-3], [1e3], [0.0]])  # rows of very different ranges
    q, s = cpu_matmul.quantize_parts(x, parts)
    assert q.dtype == jnp.int8 and q.shape == (parts * 4, 200) and s.shape == (4, 1)
    back = s * sum(q[p * 4:(p + 1) * 4].astype(jnp.float32) / cpu_matmul.RADIX**p for p in range(parts))
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    bound = amax / (2 * 127 * cpu_matmul.RADIX ** (parts - 1)) + 1e-6 * amax
    assert bool(jnp.all(jnp.abs(back - x) <= bound))


def test_int8_dense_keeps_leading_axes_and_zero_rows():
    x, w = _rand((2, 3, 64), 2), _rand((64, 32), 3)
    x = x.at[0, 1].set(0.0)  # an all-zero row: scale 1, output exactly 0
    q = quantize_channels(w, kind="int8")
    y = dense(x, q)
    assert y.shape == (2, 3, 32)
    assert float(jnp.max(jnp.abs(y[0, 1]))) == 0.0
    np.testing.assert_allclose(y.reshape(6, 32), dense(x.reshape(6, 64), q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 3])
def test_tied_logits_rows(tokens):
    x, table = _rand((tokens, 64), 4), _rand((200, 64), 5)  # table [V, H]
    np.testing.assert_allclose(cpu_matmul.matmul_rows(x, table), x @ table.T, rtol=1e-5, atol=1e-4)
    q = quantize_channels(table, kind="int8", axis=1)  # one scale per row (vocab entry), contracted in place
    ref = x @ q.dequantize().T
    y = dense(x, q)
    assert y.shape == (tokens, 200)
    assert float(jnp.max(jnp.abs(y - ref))) < 1e-3 * float(jnp.max(jnp.abs(ref)))
    text = jax.jit(dense).lower(x, q).compile().as_text()
    assert "f32[200,64]" not in text and "f32[64,200]" not in text  # no dequantized table
    assert "s32[" in text or cpu_native.TARGET in text  # XLA's int8 dot, or the native gemv


def test_int8_dot_reads_the_int8_weight():
    """What XLA:CPU compiles: an s8 x s8 -> s32 dot (YNNPACK) and no f32 copy of the weight."""
    x, w = _rand((1, 576), 6), _rand((576, 960), 7)
    q = quantize_channels(w, kind="int8")
    text = jax.jit(dense).lower(x, q).compile().as_text()
    assert "f32[576,960]" not in text and "f32[960,576]" not in text  # no dequantized weight
    # one row as PARTS int8 rows: the int32 accumulator of one int8 dot (YNNPACK needs >= 2 rows)
    assert f"s32[{cpu_matmul.PARTS},960]" in text and cpu_matmul.PARTS >= cpu_matmul.MIN_ROWS



@pytest.mark.parametrize("tokens", [1, 5])
def test_row_blocks_give_the_same_products(tokens, monkeypatch):
    """ColumnBlocks (one block per core, stored by rows) is a layout, not new arithmetic: through XLA's
    int8 dots (native gemv off) int32 sums are exact, so each output column equals the unsplit weight's
    bit for bit."""
    from jaxradix.models.quantization import ColumnBlocks, embedding_rows

    monkeypatch.setattr(cpu_native, "available", lambda: False)

    x, w, table = _rand((tokens, 96), 6), _rand((96, 512), 7), _rand((512, 96), 8)
    q, qt = quantize_channels(w, kind="int8"), quantize_channels(table, kind="int8", axis=1)
    norm = w[0]
    params = cpu_matmul.split_for_threads({"layers.0.wqkv": q, "embed": qt, "final_norm": norm}, threads=2)
    blocks, tblocks = params["layers.0.wqkv"], params["embed"]
    assert isinstance(blocks, ColumnBlocks) and len(blocks.blocks) == 2 and blocks.shape == (96, 512)
    assert all(b.axis == 1 and b.values.shape == (256, 96) for b in blocks.blocks)  # stored by rows
    assert params["final_norm"] is norm
    np.testing.assert_array_equal(blocks.dequantize(), q.dequantize())
    np.testing.assert_array_equal(dense(x, blocks), dense(x, q))
    np.testing.assert_array_equal(dense(x, tblocks), dense(x, qt))  # the tied logits
    ids = jnp.array([0, 255, 256, 511, 7], jnp.int32)
    np.testing.assert_array_equal(embedding_rows(tblocks, ids, jnp.float32), embedding_rows(qt, ids, jnp.float32))
    assert cpu_matmul.column_blocks(512, threads=1) == 1 and cpu_matmul.column_blocks(200, threads=2) == 1
    assert cpu_matmul.column_blocks(960, threads=8) == 4


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_native_int8_gemv_matches_the_dequantized_weight(tokens):
    """The C++ gemv (models/int8_gemv.cc, an XLA FFI call) against x @ dequantized weight: exact f32
    activations, so only f32 summation order differs. Skipped where no C++ compiler builds it."""
    if not cpu_native.available():
        pytest.skip("native CPU gemv not built here (no C++ compiler?)")
    x, table = _rand((tokens, 200), 9), _rand((300, 200), 10)
    q = quantize_channels(table, kind="int8", axis=1)  # [N, K] rows, one scale per row
    want = x @ q.dequantize().T
    got = jax.jit(cpu_native.int8_rows)(x, q.values, q.scales)
    assert got.shape == (tokens, 300) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_decode_matmuls_take_the_native_gemv_and_prefill_the_int8_dots():
    """dense() on row blocks: up to MAX_TOKENS rows the compiled product is the FFI call (no YNNPACK
    fusion), beyond it YNNPACK's int8 dot; both equal the unsplit weight's product."""
    if not cpu_native.available():
        pytest.skip("native CPU gemv not built here (no C++ compiler?)")
    w = quantize_channels(_rand((96, 512), 11), kind="int8")
    blocks = cpu_matmul.split_for_threads({"layers.0.wo": w}, threads=2)["layers.0.wo"]
    for tokens, native in ((1, True), (cpu_native.MAX_TOKENS, True), (cpu_native.MAX_TOKENS + 1, False)):
        x = _rand((tokens, 96), 12)
        hlo = jax.jit(dense).lower(x, blocks).compile().as_text()
        assert (cpu_native.TARGET in hlo) == native and ("__ynn_fusion" in hlo) == (not native), tokens
        np.testing.assert_allclose(dense(x, blocks), x @ w.dequantize(), rtol=1e-3, atol=2e-3)


def test_stale_native_builds_are_pruned(tmp_path):
    import os
    import time

    keep, stale, recent = (tmp_path / f"int8_gemv-{k}.so" for k in ("keep", "stale", "recent"))
    other = tmp_path / "unrelated.so"
    for f in (keep, stale, recent, other):
        f.write_bytes(b"x")
    old = time.time() - (cpu_native.STALE_DAYS + 1) * 86400
    for f in (keep, stale, other):
        os.utime(f, (old, old))
    cpu_native._prune(keep)
    assert keep.exists() and recent.exists() and other.exists() and not stale.exists()
