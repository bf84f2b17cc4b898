"""Tensor parallelism on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS): TP = 2, 4, 8 (and 3
for the embedded model) give TP = 1's greedy ids and logits, KV heads replicated when TP > KV heads."""

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import get_engine
from flax import nnx
from jax.sharding import PartitionSpec as P
from model_utils import forward_fn, random_model

from jaxradix import SamplingParams
from jaxradix.models.llama import LlamaForCausalLM
from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.parallel.tensor_parallel import TensorParallel, TPLayout, check_tp

GREEDY = SamplingParams(temperature=0, max_new_tokens=8)


def tiny(model_type: str, kv_heads: int, **kw) -> dict:
    return dict(model_type=model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=512,
                tie_word_embeddings=model_type == "llama", **kw)


def test_layout_blocks_are_q_k_v_per_shard_and_replicate_kv_heads():
    # 4 query heads, 2 KV heads, head_dim 1, tp 4: each KV head serves two shards
    lay = TPLayout(tp=4, num_heads=4, num_kv_heads=2, head_dim=1, intermediate=4, vocab=8)
    assert lay.local_heads == 1 and lay.local_kv_heads == 1
    # logical columns: q 0..3, k 4..5, v 6..7
    assert lay.qkv_columns().tolist() == [0, 4, 6, 1, 4, 6, 2, 5, 7, 3, 5, 7]
    assert lay.gate_up_columns().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    lay2 = TPLayout(tp=2, num_heads=4, num_kv_heads=2, head_dim=2, intermediate=4, vocab=8)
    assert lay2.qkv_columns().tolist() == [0, 1, 2, 3, 8, 9, 12, 13, 4, 5, 6, 7, 10, 11, 14, 15]


def test_tp_that_does_not_divide_the_heads_is_a_clear_error():
    cfg = ModelConfig.from_hf(tiny("qwen3", 2))
    with pytest.raises(ValueError, match="tp_size=3: does not divide the model's 8 query heads"):
        check_tp(cfg, 3)
    with pytest.raises(ValueError, match="tp_size=4: must divide the model's 6 KV heads"):
        check_tp(ModelConfig.from_hf(tiny("qwen3", 6) | {"num_attention_heads": 12}), 4)
    with pytest.raises(ValueError, match="tp_size=16 needs 16 devices"):
        TensorParallel(ModelConfig.from_hf(tiny("qwen3", 2) | {"num_attention_heads": 16}), 16)


def _logits(model: LlamaForCausalLM, tp: TensorParallel | None, tokens: list[int], chunk: int) -> np.ndarray:
    """Logits at every position, the sequence fed through a paged pool in equal chunks (one compile)."""
    cfg, S = model.cfg, 4
    num_pages = len(tokens) // S + 2
    pages = np.random.default_rng(1).permutation(np.arange(1, num_pages)).astype(np.int32)
    shape = (num_pages, S, 2 * cfg.num_kv_heads, cfg.head_dim)
    kv = tp.kv_pool(num_pages, S, cfg.num_layers, model.dtype) if tp else \
        tuple(jax.numpy.zeros(shape, model.dtype) for _ in range(cfg.num_layers))
    graphdef, params = nnx.split(model)

    run = forward_fn(graphdef, tp)
    out = []
    for start in range(0, len(tokens), chunk):
        pos = np.arange(start, start + chunk, dtype=np.int32)
        md = AttentionMetadata(np.array([0, chunk], np.int32), np.array([start + chunk], np.int32), pages[None],
                               np.array([1], np.int32))
        logits, kv = run(params, kv, np.asarray(tokens[start:start + chunk], np.int32), pos,
                         pages[pos // S] * S + pos % S, md)
        out.append(np.asarray(logits))
    if tp is not None:
        assert kv[0].sharding.spec == P(None, None, "tp")
        assert kv[0].addressable_shards[0].data.shape == (num_pages, S, 2 * tp.layout.local_kv_heads, cfg.head_dim)
    return np.concatenate(out)


@pytest.mark.parametrize("model_type,kv_heads", [("llama", 8), ("qwen2", 4), ("qwen3", 2)])
def test_tp_2_4_8_match_tp_1(model_type, kv_heads):
    cfg = ModelConfig.from_hf(tiny(model_type, kv_heads))
    model = random_model(cfg)
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 24)]
    ref = _logits(model, None, tokens, 8)
    for tp_size in (2, 4, 8):
        tp = TensorParallel(cfg, tp_size)
        sharded = LlamaForCausalLM(cfg, {n: tp.place_device(n, v) for n, v in model.flat_params().items()})
        layer = sharded.layers[0]
        assert layer.wqkv[...].sharding.spec == P(None, "tp") and layer.wo[...].sharding.spec == P("tp", None)
        assert layer.wqkv[...].addressable_shards[0].data.shape == \
            (64, (8 // tp_size + 2 * max(kv_heads // tp_size, 1)) * 16)
        assert sharded.embed[...].sharding.spec == P("tp", None)
        got = _logits(sharded, tp, tokens, 8)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5, err_msg=f"tp={tp_size}")
        assert (got.argmax(-1) == ref.argmax(-1)).all()


# -- engines --------------------------------------------------------------------------------------
TINY_ENGINE = dict(max_running_requests=1, chunked_prefill_size=16, max_total_tokens=1024, context_length=256,
                   load_format="dummy")


# a tiny random Qwen3 (8 query heads, 2 KV heads), shared with tests/test_multihost.py
TINY_DIR = str(Path(__file__).with_name("data") / "tiny-qwen3")


def _run(engine) -> list:
    prompts = [list(range(3, 43)), list(range(3, 43)) + [7, 9, 11], [5] * 20]  # 40 tokens: chunked; a radix hit
    greedy = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    sampled = engine.generate(input_ids=prompts[2], sampling_params=SamplingParams(
        temperature=1.0, max_new_tokens=6, n=2, seed=5))
    assert greedy[1]["meta_info"]["cached_tokens"] == 32  # two pages of prompt 0 reused
    return greedy + sampled


def test_tiny_engine_tp8_replicated_kv_heads_matches_tp1():
    ref = _run(get_engine(model_path=TINY_DIR, **TINY_ENGINE))
    engine = get_engine(model_path=TINY_DIR, tp_size=8, **TINY_ENGINE)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)
    before = engine.runner.num_compiles
    got = _run(engine)
    assert engine.runner.num_compiles == before and compiles == []  # no compile while serving
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in ref]
    for a, b in zip(got[:3], ref[:3], strict=True):
        np.testing.assert_allclose([x for x, _ in a["meta_info"]["output_token_logprobs"]],
                                   [x for x, _ in b["meta_info"]["output_token_logprobs"]], atol=1e-4)
    # 8 query heads, 2 KV heads: every shard holds one KV head (K and V), each KV head on 4 devices
    kv = engine.pool.kv[0]
    assert kv.shape[2] == 16 and kv.sharding.spec == P(None, None, "tp")
    assert {s.data.shape[2] for s in kv.addressable_shards} == {2}
    assert len(kv.sharding.device_set) == 8


def test_tiny_engine_tp8_split_sampler_matches_tp1():
    """TP with the GPU's split sampler: the forward's replicated logits feed a sampler executable."""
    ref = _run(get_engine(model_path=TINY_DIR, **TINY_ENGINE))
    engine = get_engine(model_path=TINY_DIR, tp_size=8, sampler_mode="split", sampler_warmup=False, **TINY_ENGINE)
    assert engine.runner.split
    before = engine.runner.num_compiles
    got = _run(engine)
    assert engine.runner.num_compiles == before  # greedy and plain sampling: compiled at start-up
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in ref]



def test_embedded_model_tp3(tmp_path):
    with pytest.raises(ValueError, match="tp_size=2: does not divide the model's 9 query heads"):
        get_engine(tp_size=2)
    ref = get_engine()
    engine = get_engine(tp_size=3, max_running_requests=1, chunked_prefill_size=16)
    wqkv = engine.loaded.model.layers[0].wqkv.get_value()  # the GGUF kept quantized on CPU: values + scales
    wqkv = getattr(wqkv, "values", wqkv)
    assert wqkv.sharding.spec == P(None, "tp") and wqkv.addressable_shards[0].data.shape == (576, (3 + 2) * 64)
    prompts = ["The capital of France is", "The capital of France is a city where"]
    got = engine.generate(prompts, GREEDY, return_logprob=True)
    want = ref.generate(prompts, GREEDY, return_logprob=True)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    np.testing.assert_allclose([x for x, _ in got[0]["meta_info"]["output_token_logprobs"]],
                               [x for x, _ in want[0]["meta_info"]["output_token_logprobs"]], atol=2e-3)
    out = engine.generate("Pick a number:", SamplingParams(temperature=1.0, max_new_tokens=8, regex="[0-9]{3}"))
    assert len(out["text"]) == 3 and out["text"].isdigit(), out["text"]


def test_safetensors_and_orbax_load_straight_into_shards(tmp_path):
    from jaxradix.models.loader import load_model, save_orbax

    src = Path(__file__).with_name("data") / "parity" / "tiny_llama3"  # 4 query heads, 2 KV heads
    one = load_model(src, progress=False)
    ckpt = save_orbax(one, tmp_path / "ckpt")
    for loaded in (load_model(src, progress=False, tp_size=4), load_model(ckpt, tp_size=4)):
        tp = loaded.tp
        want = {n: np.asarray(tp.place_device(n, v)) for n, v in one.model.flat_params().items()}
        got = loaded.model.flat_params()
        for name, value in got.items():
            assert value.sharding == tp.sharding(name), name
            np.testing.assert_array_equal(np.asarray(value), want[name], err_msg=name)
    with pytest.raises(ValueError, match="tp_size=1"):
        save_orbax(loaded, tmp_path / "again")


def test_launch_flags_map_onto_the_config():
    from jaxradix.config import EngineConfig
    from jaxradix.launch_server import build_parser, engine_kwargs

    args = build_parser().parse_args(["--tp-size", "8", "--nnodes", "2", "--node-rank", "1",
                                      "--dist-init-addr", "127.0.0.1:5000"])
    kw = engine_kwargs(args)
    assert {k: kw[k] for k in ("tp_size", "nnodes", "node_rank", "dist_init_addr")} == \
        {"tp_size": 8, "nnodes": 2, "node_rank": 1, "dist_init_addr": "127.0.0.1:5000"}
    assert engine_kwargs(build_parser().parse_args(["--tp", "2"]))["tp_size"] == 2
    with pytest.raises(ValueError, match="dist_init_addr"):
        EngineConfig(nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        EngineConfig(nnodes=2, node_rank=2, dist_init_addr="127.0.0.1:5000")
    with pytest.raises(ValueError, match="tp_size"):
        EngineConfig(tp_size=0)
