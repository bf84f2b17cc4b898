"""Quantized KV cache (--kv-cache-dtype fp8_e4m3|fp8_e5m2|int8): the write/read round trip, every CPU
attention path on quantized pages, engines per dtype (leak invariant, no compile while serving), TP,
the host tier, the pool sizer's real bytes and the memory report."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import get_engine
from test_kernels import CASES, make_batch

import jaxradix.pallas_kernels as pallas_kernels
from jaxradix import SamplingParams
from jaxradix.cache import page_pool
from jaxradix.cache.page_pool import PagePool, kv_bytes_per_token, kv_dtype, pool_tokens
from jaxradix.config import EngineConfig
from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels import _gathered, _gpu_kernel
from jaxradix.pallas_kernels.gathered import ragged_paged_attention_gathered
from jaxradix.pallas_kernels.quantized_kv import QUANTIZED_KV_DTYPES, QuantizedKV, quantize
from jaxradix.pallas_kernels.reference import (
    ragged_paged_attention,
    ragged_paged_attention_blocked,
    read_pages,
    write_kv,
)

QUANTIZED = list(QUANTIZED_KV_DTYPES)
TINY_DIR = str(Path(__file__).with_name("data") / "tiny-qwen3")  # 8 query heads, 2 KV heads, head_dim 16
# two buckets (decode 1, prefill 17) per engine; a pool of 10 pages of 16 tokens: six 40-token prompts evict each
# other's prefixes to the host tier
TINY = dict(model_path=TINY_DIR, load_format="dummy", max_running_requests=1, chunked_prefill_size=16,
            max_total_tokens=160, context_length=128)
HOST_TIER = dict(enable_hierarchical_cache=True, hicache_ratio=4)
GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)


def _eps(dtype) -> float:
    """The format's relative step: 2^-mantissa bits for fp8, 1/127 (one level of amax) for int8."""
    return 1 / 127 if jnp.dtype(dtype) == jnp.int8 else float(jnp.finfo(dtype).eps)


# == the format on write and read =================================================================
@pytest.mark.parametrize("name", QUANTIZED)
def test_write_kv_quantizes_and_read_pages_dequantizes(name):
    dtype = QUANTIZED_KV_DTYPES[name]
    P, S, KH, D, T = 4, 4, 2, 16, 6
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((T, KH, D)) * np.geomspace(1e-3, 1e3, T)[:, None, None], jnp.float32)
    v = jnp.asarray(rng.standard_normal((T, KH, D)), jnp.float32)
    slots = jnp.asarray([4, 5, 13, 14, 15, 0], jnp.int32)  # pages 1 and 3; the last token is padding (page 0)
    pool = page_pool.empty_layer((P, S, 2 * KH, D), dtype)
    assert isinstance(pool, QuantizedKV) and pool.dtype == dtype and pool.scale.dtype == jnp.bfloat16
    pool = write_kv(pool, k, v, slots)
    assert isinstance(pool, QuantizedKV) and pool.data.dtype == dtype
    got = read_pages(pool, slots // S, slots % S)  # [T, 2*KH, D] f32
    want = jnp.concatenate([k, v], axis=1)
    scale = pool.scale[slots // S, slots % S].astype(jnp.float32)[..., None]  # [T, 2*KH, 1]
    # Every value is rounded once, in range (scale >= amax / qmax): int8 to half a level of its scale, fp8 to half
    # a mantissa step of itself, or half the smallest subnormal step (times the scale) near 0.
    if dtype == jnp.int8:
        bound = scale / 2
    else:
        bound = jnp.abs(want) * _eps(dtype) / 2 + scale * float(jnp.finfo(dtype).smallest_subnormal) / 2
    assert bool(jnp.all(jnp.abs(got - want) <= bound * 1.001)), float(jnp.max(jnp.abs(got - want) - bound))
    assert float(read_pages(pool, jnp.asarray([2])).max()) == 0  # a page nobody wrote stays empty
    # an unquantized pool reads back as written
    plain = write_kv(jnp.zeros((P, S, 2 * KH, D), jnp.float32), k, v, slots)
    np.testing.assert_array_equal(read_pages(plain, slots // S, slots % S), want)


def test_attention_paths_agree_on_quantized_pages():
    """reference, blocked (the "reference" backend) and gathered (CPU "auto") read the same quantized pages and
    agree to f32 rounding (2e-5, as test_kernels.py); the gathered path never reads a page no sequence owns (NaN).
    Against the unquantized pool the error is bounded by the format's step eps (2^-3 e4m3, 2^-2 e5m2, 1/127 int8):
    each K/V element is off by <= eps/2 of itself (int8: of its row's amax); V's error passes through the softmax
    average unchanged, K's moves each score by the same relative order, so the max error stays below 2 eps and the
    mean below eps/4 of the output's magnitude. The case has decode and extend rows, a padding row, a sliding window
    and a soft cap."""
    case = CASES["window_cap"]
    q, poisoned, clean, md = make_batch(case, jnp.float32)
    params = dict(sm_scale=case.D**-0.5, sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    exact = np.asarray(ragged_paged_attention(q, clean, md, **params))
    magnitude = np.abs(exact).max()
    errors = {}
    for name, dtype in QUANTIZED_KV_DTYPES.items():
        qclean, qpoisoned = QuantizedKV(*quantize(clean, dtype)), QuantizedKV(*quantize(poisoned, dtype))
        got = np.asarray(ragged_paged_attention_gathered(q, qpoisoned, md, **params))  # never reads an unowned page
        if name == "fp8_e4m3":  # the paths share read_pages: one dtype shows they agree
            for other in (ragged_paged_attention(q, qclean, md, **params),
                          ragged_paged_attention_blocked(q, qclean, md, **params)):
                np.testing.assert_allclose(np.asarray(other), got, atol=2e-5, rtol=2e-5)
        err = np.abs(got - exact)
        assert err.max() < 2 * _eps(dtype) * magnitude and err.mean() < _eps(dtype) / 4 * magnitude, (name, err.max())
        errors[name] = err.mean()
    assert errors["int8"] < errors["fp8_e4m3"] < errors["fp8_e5m2"]  # 7 bits, 3 mantissa bits, 2


def test_gpu_without_the_kernel_routes_quantized_pages_to_the_gathered_path(caplog, monkeypatch):
    """GPU `auto` where the Mosaic kernel cannot run (here: no sm_90): the gathered path, with a log line.
    (The Mosaic kernels themselves read quantized pages: tests/test_kernels_quantized.py.)"""
    case = CASES["decode"]
    q, _, clean, md = make_batch(case, jnp.bfloat16)
    kv = QuantizedKV(*quantize(clean, jnp.float8_e4m3fn))
    params = dict(sm_scale=case.D**-0.5)
    want = np.asarray(ragged_paged_attention_gathered(q, kv, md, **params), np.float32)

    monkeypatch.setattr(pallas_kernels, "_warned", set())
    with caplog.at_level(logging.WARNING):
        got = _gpu_kernel(False, fallback=_gathered("gpu"))(q, kv, md, **params)  # the GPU route
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    assert "gathered" in caplog.text


# == sizing ======================================================================================
def _smollm_like() -> ModelConfig:
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                    max_position_embeddings=8192))


def test_pool_sizer_counts_real_bytes(monkeypatch):
    mc = _smollm_like()  # head_dim 64: (64 + 2) bytes per token and head in fp8 against 128 in bf16
    assert kv_bytes_per_token(mc, jnp.bfloat16) == 30 * 2 * 3 * 128
    assert kv_bytes_per_token(mc, jnp.float8_e4m3fn) == kv_bytes_per_token(mc, jnp.int8) == 30 * 2 * 3 * 66
    stats = {"bytes_limit": 8 << 30, "bytes_in_use": 1 << 30}  # a device with memory stats: 7 GiB free
    monkeypatch.setattr(page_pool, "device_memory_stats", lambda: stats)
    bf16 = pool_tokens(mc, jnp.bfloat16, None, None)
    for name in QUANTIZED:
        assert 1.93 < pool_tokens(mc, kv_dtype(name, jnp.bfloat16), None, None) / bf16 < 1.95
    per_token = kv_bytes_per_token(mc, jnp.bfloat16)
    assert bf16 == ((7 << 30) - page_pool.HEADROOM_FLOOR_BYTES) // per_token
    # the largest step's measured activations (and their margin) stay free; mem_fraction_static caps the rest
    act = 1 << 30
    with_act = pool_tokens(mc, jnp.bfloat16, None, None, activation_bytes=act)
    assert bf16 - with_act == pytest.approx(act * (1 + page_pool.ACTIVATION_MARGIN) / per_token, abs=1)
    assert pool_tokens(mc, jnp.bfloat16, None, 0.5) == ((4 << 30) - (1 << 30)) // per_token
    with pytest.raises(MemoryError, match="activations"):
        pool_tokens(mc, jnp.bfloat16, None, None, activation_bytes=7 << 30)
    # CPU (no stats): a share of the free RAM, the same 1.94x
    monkeypatch.setattr(page_pool, "device_memory_stats", lambda: {})
    monkeypatch.setattr(page_pool, "available_ram", lambda: 1 << 30)  # under the context cap
    ratio = pool_tokens(mc, jnp.float8_e5m2, None, None) / pool_tokens(mc, jnp.bfloat16, None, None)
    assert 1.93 < ratio < 1.95
    # the allocated pools hold what the sizer counted
    small = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256))
    for dtype in (jnp.bfloat16, jnp.int8):
        pool = PagePool(small, 64, 16, dtype)
        assert pool.nbytes == pool.num_pages * 16 * kv_bytes_per_token(small, dtype)


def test_memory_report_counts_4_bit_weights_at_half_a_byte():
    from jaxradix.engine.memory import bytes_by_dtype

    got = bytes_by_dtype({"w": jnp.zeros((10, 10), jnp.int4), "s": jnp.zeros(4, jnp.float32)})
    assert got == {"int4": 50, "float32": 16}


def test_bad_kv_cache_dtype_names_the_field():
    for bad in ("fp8", "float8_e4m3fn", "int4"):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            EngineConfig(kv_cache_dtype=bad)
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            kv_dtype(bad, jnp.bfloat16)
    assert kv_dtype("auto", jnp.float32) == jnp.float32 and kv_dtype("fp8_e4m3", jnp.float32) == jnp.float8_e4m3fn


# == engines =====================================================================================
def _no_compiles(engine, fn):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    before = engine.runner.num_compiles
    out = fn()
    assert engine.runner.num_compiles == before and compiles == [], "compiled while serving"
    return out


PROMPTS = [list(range(3 + i, 43 + i)) for i in range(6)]  # 40 tokens each, distinct from the first token on


def _serve(engine) -> list:
    """Greedy outputs of a shared-prefix pair (a radix hit) and a sampled request (n=2)."""
    engine.flush_cache()
    first = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    second = engine.generate(input_ids=PROMPTS[0] + [7, 9, 11], sampling_params=GREEDY)
    assert second["meta_info"]["cached_tokens"] == 32  # two pages of the first prompt reused
    sampled = engine.generate(input_ids=PROMPTS[1], sampling_params=SamplingParams(
        temperature=1.0, max_new_tokens=6, n=2, seed=5))
    return [first, second, *sampled]


@pytest.mark.parametrize("name, extra", [("fp8_e4m3", {}), ("int8", HOST_TIER)])
def test_engine_serves_quantized_kv(name, extra):
    engine = get_engine(**TINY, **extra, kv_cache_dtype=name)
    assert all(isinstance(a, QuantizedKV) and a.dtype == QUANTIZED_KV_DTYPES[name] for a in engine.pool.kv)
    outs = _no_compiles(engine, lambda: _serve(engine))
    assert [len(o["output_ids"]) for o in outs] == [8, 8, 6, 6]
    assert all(isinstance(a, QuantizedKV) for a in engine.pool.kv)  # the step returns the pool as it took it
    m = engine.memory
    assert (m.kv_cache_dtype, m.kv_dtype, m.kv_scale_dtype) == (name, str(jnp.dtype(QUANTIZED_KV_DTYPES[name])),
                                                                "bfloat16")
    assert m.kv_bytes == engine.pool.nbytes and m.kv_tokens == 160 and m.kv_bytes_per_token == 2 * 2 * 2 * (16 + 2)
    assert m.weights_bytes > 0 and "KV pool" in m.log_line()


def test_engine_sizes_its_pool_from_measured_activations(monkeypatch, caplog):
    """A device with memory stats (faked on CPU): the largest step is compiled on a one-page pool, its
    memory_analysis() gives the headroom, and the pool takes what is left under mem_fraction_static."""
    limit = 64 << 20
    monkeypatch.setattr(page_pool, "device_memory_stats", lambda: {"bytes_limit": limit, "bytes_in_use": 0})
    monkeypatch.setattr(page_pool, "HEADROOM_FLOOR_BYTES", 1 << 20)
    with caplog.at_level(logging.INFO, logger="jaxradix"):
        engine = get_engine(**TINY | dict(max_total_tokens=None, mem_fraction_static=0.01, kv_cache_dtype="fp8_e5m2"))
    monkeypatch.undo()
    m = engine.memory
    assert m.activation_bytes > 0 and "largest step" in caplog.text and "memory: weights" in caplog.text
    per_token = kv_bytes_per_token(engine.model_config, jnp.float8_e5m2)
    assert m.kv_tokens == int(limit * 0.01 // per_token) // 16 * 16
    outs = _no_compiles(engine, lambda: engine.generate(input_ids=PROMPTS[:2], sampling_params=GREEDY))
    assert [len(o["output_ids"]) for o in outs] == [8, 8]


def test_host_tier_round_trips_a_quantized_prefix():
    engine = get_engine(**TINY, **HOST_TIER, kv_cache_dtype="int8")
    host = engine.host_pool.data
    assert isinstance(host, QuantizedKV) and host.data.dtype == np.int8 and host.scale.dtype == jnp.bfloat16
    follow_up = PROMPTS[0] + [7, 9, 11]
    engine.flush_cache()
    fresh = engine.generate(input_ids=follow_up, sampling_params=GREEDY)["output_ids"]  # nothing cached
    engine.flush_cache()
    for p in PROMPTS:  # each evicts earlier prefixes from the 10-page device pool to the host
        engine.generate(input_ids=p, sampling_params=GREEDY)
    before = engine.cache_stats()
    again = engine.generate(input_ids=follow_up, sampling_params=GREEDY)
    after = engine.cache_stats()
    assert before["host_saved_tokens"] > 0 and after["host_hit_tokens"] - before["host_hit_tokens"] == 32
    assert again["meta_info"]["cached_tokens"] == 32 and again["output_ids"] == fresh


# == tensor parallelism (8 fake CPU devices, conftest) ==============================================
def _tiny_tp_model():
    from model_utils import random_model

    cfg = ModelConfig.from_hf(dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512))
    return cfg, random_model(cfg)


def _int8_logits(cfg: ModelConfig, model, tp, tokens: np.ndarray) -> np.ndarray:
    """Logits at every position, 8 tokens per step through an int8 pool of shuffled pages."""
    from flax import nnx
    from model_utils import forward_fn

    from jaxradix.pallas_kernels.metadata import AttentionMetadata

    S, num_pages = 4, 8
    pages = np.random.default_rng(1).permutation(np.arange(1, num_pages)).astype(np.int32)
    kv = PagePool(cfg, (num_pages - 1) * S, S, jnp.int8, tp).kv
    graphdef, params = nnx.split(model)
    run = forward_fn(graphdef, tp)
    out = []
    for start in range(0, len(tokens), 8):
        pos = np.arange(start, start + 8, dtype=np.int32)
        md = AttentionMetadata(np.array([0, 8], np.int32), np.array([start + 8], np.int32), pages[None],
                               np.array([1], np.int32))
        logits, kv = run(params, kv, tokens[start:start + 8], pos, pages[pos // S] * S + pos % S, md)
        out.append(np.asarray(logits))
    assert all(isinstance(a, QuantizedKV) and a.dtype == jnp.int8 for a in kv)
    if tp is not None:
        for leaf in (kv[0].data, kv[0].scale):  # both leaves split over the head axis: one K + one V head each
            assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")
            assert {s.data.shape[2] for s in leaf.addressable_shards} == {2}
    return np.concatenate(out)


def test_tp2_with_int8_kv_matches_tp1():
    """TP 2 against TP 1 through an int8 pool. Scales are per token and head, so a shard quantizes its heads as one
    device does: only the f32 reduction order differs (the tolerance of test_tensor_parallel's f32 pools, x5)."""
    from jaxradix.models.llama import LlamaForCausalLM
    from jaxradix.parallel.tensor_parallel import TensorParallel

    cfg, model = _tiny_tp_model()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 24).astype(np.int32)
    tp = TensorParallel(cfg, 2)
    sharded = LlamaForCausalLM(cfg, {n: tp.place_device(n, v) for n, v in model.flat_params().items()})
    want, got = _int8_logits(cfg, model, None, tokens), _int8_logits(cfg, sharded, tp, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=5e-5)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_host_tier_under_tp_copies_both_leaves():
    from jaxradix.cache.host_pool import HostPool
    from jaxradix.parallel.tensor_parallel import TensorParallel

    cfg, _ = _tiny_tp_model()
    tp = TensorParallel(cfg, 2)
    pool = PagePool(cfg, 64, 16, jnp.float8_e4m3fn, tp)
    rng = np.random.default_rng(0)
    pool.kv = tuple(QuantizedKV(jax.device_put(jnp.asarray(rng.standard_normal(a.shape), a.dtype), a.data.sharding),
                                jax.device_put(jnp.asarray(rng.random(a.scale.shape), jnp.bfloat16), a.scale.sharding))
                    for a in pool.kv)
    want = jax.device_get(pool.kv)
    host = HostPool(pool, 4)
    host.save(np.array([1, 2], np.int32), np.array([3, 1], np.int32))
    host.load(np.array([3, 1], np.int32), np.array([4, 3], np.int32))  # device pages 1, 2 -> host -> pages 4, 3
    got = jax.device_get(pool.kv)
    for g, w, a in zip(got, want, pool.kv, strict=True):
        for leaf, ref, arr in ((g.data, w.data, a.data), (g.scale, w.scale, a.scale)):
            np.testing.assert_array_equal(leaf[[4, 3]], ref[[1, 2]])
            np.testing.assert_array_equal(leaf[[0, 1, 2]], ref[[0, 1, 2]])  # nothing else moved
            assert arr.sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")  # the layout the steps take
