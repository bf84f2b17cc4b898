"""Quantized weights (models/quantization.py, --quantization): per-channel int8/fp8 error bounds, GGUF
blocks kept exactly, the one matmul helper's paths, fused parameters of mixed formats, tensor
parallelism over quantized weights (tp=2 on fake CPU devices), an engine serving a kept-quantized GGUF,
and bad values named in the error."""

from __future__ import annotations

from pathlib import Path

import gguf
import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from model_utils import paged_logits, random_model
from test_gguf import VOCAB, _hf_weights, _raw_for, _write_tiny
from test_tensor_parallel import _logits, tiny

from jaxradix import SamplingParams
from jaxradix.config import EngineConfig
from jaxradix.models import cpu_native
from jaxradix.models.gguf_file import dequantize, quantized_weight
from jaxradix.models.llama import LlamaForCausalLM
from jaxradix.models.loader import load_model
from jaxradix.models.model_config import ModelConfig
from jaxradix.models.quantization import (
    MATMULS,
    ColumnBlocks,
    QuantizedWeight,
    channel_axis,
    concat_columns,
    dense,
    device_storage,
    embedding_rows,
    quantize_channels,
    quantizes,
)

BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)


def _quantized_model(model: LlamaForCausalLM, kind: str) -> LlamaForCausalLM:
    return LlamaForCausalLM(model.cfg, {n: quantize_channels(w, kind=kind, axis=channel_axis(n)) if quantizes(n, kind)
                                        else w for n, w in model.flat_params().items()})


# -- the format ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_channel_quantization_error_bound(kind):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)) * np.linspace(0.01, 3, 48), jnp.float32)
    q = quantize_channels(w, kind=kind)
    assert q.values.dtype == (jnp.int8 if kind == "int8" else jnp.float8_e4m3fn) and q.scales.shape == (1, 48)
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    scale = np.asarray(q.scales)
    if kind == "int8":  # round to nearest of 255 levels per column: half a step
        bound = scale / 2 * (1 + 1e-5)
    else:  # e4m3 keeps 3 mantissa bits: relative 2^-4, or half the smallest subnormal step (2^-10) of the scale
        bound = np.maximum(np.abs(np.asarray(w)) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-5)
    assert (err <= bound).all(), float((err - bound).max())
    # the table form (embedding rows, one scale per row) is the transpose
    t = quantize_channels(w.T, kind=kind, axis=1)
    np.testing.assert_array_equal(np.asarray(t.values), np.asarray(q.values).T)


@pytest.mark.parametrize("impl", sorted(MATMULS))
@pytest.mark.parametrize("fmt", ["channel", "group", "group+offsets", "int4", "fp8"])
def test_matmuls_equal_the_dequantized_product(impl, fmt):
    rng = np.random.default_rng(1)
    K, N, G = 64, 27, 2  # N = 2 blocks of 13 columns + 1 (tiled_columns)
    scales = jnp.asarray(rng.uniform(0.01, 0.1, (1 if fmt in ("channel", "fp8") else G, N)), jnp.float32)
    offsets = jnp.asarray(rng.uniform(-0.1, 0.1, (G, N)), jnp.float32) if fmt == "group+offsets" else None
    values = jnp.asarray(rng.integers(-8, 8, (K, N)), jnp.int4 if fmt == "int4" else jnp.int8)
    if fmt == "fp8":
        values = jnp.asarray(rng.standard_normal((K, N)) * 100, jnp.float8_e4m3fn)
    w = QuantizedWeight(values, scales, offsets)
    x = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
    want = np.asarray(x) @ np.asarray(w.dequantize())
    # The CPU int8 path (per-channel int8 only) writes each activation row as 2 int8 rows: each term
    # errs by at most |w| * amax(x) / (2 * 127 * 254), the bound it is held to here.
    int8_bound = (np.abs(np.asarray(x)).max(axis=1, keepdims=True) / (2 * 127 * 254)  # [T, 1]
                  * np.abs(np.asarray(w.dequantize())).sum(axis=0) + 1e-5 * (1 + np.abs(want)))  # [T, N]
    int8_format = fmt == "channel"

    def check(got: jax.Array, int8_path: bool) -> None:
        if int8_path and int8_format:
            assert (np.abs(np.asarray(got) - want) <= int8_bound).all()
        else:
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

    cpu = jax.default_backend() == "cpu"
    check(MATMULS[impl](x, w), impl == "int8")
    check(dense(x, w), cpu)
    table = w.T  # [N, K] rows: an embedding table grouped along its rows
    np.testing.assert_array_equal(np.asarray(embedding_rows(table, jnp.array([5, 0, 5]), jnp.float32)),
                                  np.asarray(w.dequantize()).T[[5, 0, 5]])
    check(dense(x, table), cpu)  # contracts in place
    check(MATMULS[impl](x, table), impl == "int8")


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_gguf_blocks_kept_dequantize_exactly(qtype):
    raw = _raw_for(qtype, np.random.default_rng(int(qtype)))
    rows, cols = 6, 512
    q = quantized_weight(raw, qtype, (rows, cols))
    want = {Q.Q8_0: "int8", Q.Q6_K: "int8", Q.Q4_0: "int4", Q.Q4_1: "uint4", Q.Q4_K: "uint4"}[qtype]
    assert q.values.dtype == np.dtype(want) and q.axis == 1 and q.values.shape == (rows, cols)
    assert q.group == (16 if qtype == Q.Q6_K else 32)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), dequantize(raw, qtype, (rows, cols)))


def test_device_storage_of_4_bit_values():
    q = quantized_weight(_raw_for(Q.Q4_1, np.random.default_rng(3)), Q.Q4_1, (6, 512))
    cpu, gpu = device_storage(q, "cpu"), device_storage(q, "gpu")
    assert q.values.dtype == np.dtype("uint4") and cpu.values.dtype == np.int8 and gpu.values.dtype == np.dtype("int4")
    np.testing.assert_array_equal(np.asarray(cpu.dequantize()), np.asarray(q.dequantize()))
    np.testing.assert_allclose(np.asarray(gpu.dequantize()), np.asarray(q.dequantize()), rtol=1e-6, atol=1e-6)


def test_fused_parameter_of_mixed_formats_dequantizes_to_its_parts():
    rng = np.random.default_rng(2)
    parts = [quantized_weight(_raw_for(t, rng), t, (6, 512)).T for t in (Q.Q4_1, Q.Q8_0, Q.Q6_K)]  # [512, 6] each
    fused = concat_columns(parts)
    assert fused.values.dtype == np.int8 and fused.group == 16 and fused.offsets is not None
    np.testing.assert_array_equal(np.asarray(fused.dequantize()),
                                  np.concatenate([np.asarray(p.dequantize()) for p in parts], axis=1))


# -- models ----------------------------------------------------------------------------------------
def test_int8_fp8_logits_close_to_unquantized():
    """A tiny random Llama (2 layers, tied embedding quantized by rows), 32 positions. int8 keeps each
    weight within 1/254 of its channel's largest, fp8 e4m3 within 2^-4 of itself, so fp8's logits move
    ~4x further. Measured over 3 seeds x {llama, qwen3} (in units of the logits' std): mean |diff| int8
    0.015-0.020, fp8 0.059-0.078; max |diff| int8 0.07-0.13, fp8 0.31-0.58; greedy agreement int8
    0.88-1.0, fp8 0.72-0.94 (random tiny models have flat logits). Asserted: mean < 0.03 / 0.12, max <
    0.2 / 0.8, agreement >= 0.85 / 0.6."""
    cfg = ModelConfig.from_hf(tiny("llama", 8))
    model = random_model(cfg)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 32)]
    ref = _logits(model, None, tokens, 16)
    for kind, mean_tol, max_tol, agree in (("int8", 0.03, 0.2, 0.85), ("fp8", 0.12, 0.8, 0.6)):
        got = _logits(_quantized_model(model, kind), None, tokens, 16)
        diff = np.abs(got - ref) / ref.std()
        assert diff.mean() < mean_tol and diff.max() < max_tol, (kind, diff.mean(), diff.max())
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= agree, kind


TYPES = {"blk.0.attn_q.weight": Q.Q8_0, "blk.0.attn_k.weight": Q.Q4_0, "blk.0.attn_v.weight": Q.Q4_1,
         "blk.0.attn_output.weight": Q.Q4_1, "blk.0.ffn_gate.weight": Q.Q4_1, "blk.0.ffn_down.weight": Q.Q8_0,
         "token_embd.weight": Q.Q8_0, "output.weight": Q.Q4_0}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 1-layer Llama GGUF of mixed block types (q Q8_0, k Q4_0, v Q4_1: one fused wqkv of three
    formats; up F16 beside a Q4_1 gate), with a tokenizer so that an engine can serve it."""
    hf = _hf_weights(np.random.default_rng(0))
    stored = {n: gguf.quants.quantize(w, TYPES[n]) if n in TYPES else w for n, w in hf.items()}
    stored["blk.0.ffn_up.weight"] = hf["blk.0.ffn_up.weight"].astype(np.float16)
    path = tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf"
    _write_tiny(path, "llama", stored, raw_types=TYPES, tokens=[chr(ord("a") + i) for i in range(VOCAB)])
    return path


def test_gguf_kept_quantized_equals_dequantized_and_shards_over_tp2(tiny_gguf, monkeypatch):
    # one arithmetic on both sides of the TP comparison: XLA's int8 dots (the native decode gemv, exact
    # f32 activations, serves single-device decode only; tests/test_cpu_matmul.py checks it)
    monkeypatch.setattr(cpu_native, "available", lambda: False)
    dense_model = load_model(tiny_gguf, progress=False).model
    kept = load_model(tiny_gguf, progress=False, quantization="gguf")
    params = kept.model.flat_params()
    assert isinstance(params["layers.0.wqkv"], QuantizedWeight) and params["layers.0.wqkv"].values.dtype == jnp.int8
    # per-channel int8 weights on CPU are row blocks (models/cpu_matmul.split_for_threads)
    for name in ("layers.0.wo", "lm_head"):
        w = params[name]
        blocks = w.blocks if isinstance(w, ColumnBlocks) else (w,)
        assert all(b.values.dtype == jnp.int8 for b in blocks), name
    assert not isinstance(params["layers.0.w_gate_up"], QuantizedWeight)  # an F16 part: dense
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, VOCAB, 16)]
    ref = _logits(dense_model, None, tokens, 8)
    got = _logits(kept.model, None, tokens, 8)
    # the same f32 weights: float noise only, except on CPU, where a symmetric block format with one group
    # per channel (here Q4_0/Q8_0 over K = 32) is per-channel int8 and takes the int8 dots (activation
    # rows as 2 int8 rows: error up to 1.6e-5 of the row's range per term, ~5e-4 on these logits)
    np.testing.assert_allclose(got, ref, atol=1e-3 if jax.default_backend() == "cpu" else 1e-4, rtol=1e-4)
    for quantization in ("gguf", "int8"):
        one = got if quantization == "gguf" else _logits(
            load_model(tiny_gguf, progress=False, quantization=quantization).model, None, tokens, 8)
        two = load_model(tiny_gguf, progress=False, quantization=quantization, tp_size=2)
        wqkv = two.model.layers[0].wqkv.get_value()
        assert wqkv.values.sharding.spec == wqkv.scales.sharding.spec == jax.sharding.PartitionSpec(None, "tp")
        sharded = _logits(two.model, two.tp, tokens, 8)
        # On CPU, int8 weights take int8 dots with each activation row as 2 int8 rows (error up to 1.6e-5
        # of the row's range per term), and a shard of a row-split weight scales its own columns of the
        # row: the two layouts round differently, within twice that bound (~5e-4 on these logits).
        atol = 1e-3 if jax.default_backend() == "cpu" else 2e-4
        np.testing.assert_allclose(sharded, one, atol=atol, rtol=1e-4, err_msg=quantization)
        assert (sharded.argmax(-1) == one.argmax(-1)).all(), quantization


def test_engine_serves_quantized_weights_without_compiles(tiny_gguf):
    """An engine on the GGUF kept quantized: every bucket compiled at start-up, no leak, and the greedy
    tokens of the same file dequantized at load (computed here through the paged pool, no engine)."""
    from jaxradix import Engine

    prompt = [3, 5, 7, 9, 11] * 4
    want = paged_logits(load_model(tiny_gguf, progress=False).model, prompt, [16, 4], 16, greedy_new=6)
    engine = Engine(str(tiny_gguf), quantization="gguf", max_running_requests=1, chunked_prefill_size=16,
                    max_total_tokens=256, context_length=64, log_level="warning")
    try:
        assert engine.loaded.quantization == "gguf"
        before = engine.runner.num_compiles
        out = engine.generate(input_ids=prompt, sampling_params=SamplingParams(temperature=0, max_new_tokens=6,
                                                                               ignore_eos=True))
        assert engine.runner.num_compiles == before
        assert out["output_ids"] == list(want)
        engine.wait_idle(timeout=60)
        engine.check_integrity()
    finally:
        engine.shutdown()


def test_bad_quantization_names_the_field(tiny_gguf):
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="quantization 'awq' is not supported"):
        load_model(tiny_gguf, progress=False, quantization="awq")
    src = Path(__file__).with_name("data") / "parity" / "tiny_llama3"
    with pytest.raises(ValueError, match="quantization 'gguf' keeps a GGUF file's quantized blocks"):
        load_model(src, progress=False, quantization="gguf")
    from jaxradix.launch_server import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quantization", "int4"])
