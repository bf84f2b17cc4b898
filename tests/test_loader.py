import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from model_utils import paged_logits
from safetensors.numpy import load_file, save_file

from jaxradix.models.loader import load_model, save_orbax

DATA = Path(__file__).parent / "data" / "parity"


def _params(model):
    return {k: np.asarray(v) for k, v in model.flat_params().items()}


def test_sharded_safetensors_equal_single_file(tmp_path):
    src = DATA / "tiny_qwen3"
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    save_file({n: tensors[n] for n in names[:half]}, d / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, d / "model-00002-of-00002.safetensors")
    a, b = _params(load_model(src, progress=False).model), _params(load_model(d, progress=False).model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_orbax_roundtrip_and_bf16(tmp_path):
    loaded = load_model(DATA / "tiny_llama3", progress=False)
    out = save_orbax(loaded, tmp_path / "ckpt")
    restored = load_model(out)
    assert restored.load_format == "orbax" and restored.config == loaded.config
    a, b = _params(loaded.model), _params(restored.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    bf16 = load_model(DATA / "tiny_llama3", dtype="bfloat16", progress=False)
    assert bf16.model.dtype == jax.numpy.bfloat16
    ref = np.load(DATA / "tiny_llama3" / "reference.npz")
    ids = [int(t) for t in ref["input_ids"]]
    logits = paged_logits(bf16.model, ids, [len(ids)], page_size=16)
    assert (logits.argmax(-1) == ref["logits"].argmax(-1)).mean() > 0.8  # bf16: close, not exact


def test_dummy_weights_from_config_alone(tmp_path):
    cfg = json.loads((DATA / "tiny_qwen2" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path, load_format="dummy")
    assert loaded.tokenizer is None and loaded.config.qkv_bias
    real = _params(load_model(DATA / "tiny_qwen2", progress=False).model)
    dummy = _params(loaded.model)
    assert {k: v.shape for k, v in real.items()} == {k: v.shape for k, v in dummy.items()}


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="load_format"):
        load_model(DATA / "tiny_qwen2", load_format="pickle")
    cfg = json.loads((DATA / "tiny_qwen2" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unsupported architecture.*supported model types"):
        load_model(tmp_path, load_format="dummy")
    with pytest.raises(ValueError, match="dtype"):
        load_model(DATA / "tiny_qwen2", dtype="int3", progress=False)
    # weights that do not fit the config
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"hidden_size": 32}))
    shutil.copy(DATA / "tiny_qwen2" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="has shape"):
        load_model(tmp_path, progress=False)


def test_dtype_defaults_per_platform():
    """auto: the checkpoint's dtype, but f32 (and GGUF, which names none) becomes bf16 on GPU/TPU."""
    from jaxradix.config import EngineConfig
    from jaxradix.models.loader import resolve_dtype

    f32, bf16 = jax.numpy.float32, jax.numpy.bfloat16
    assert resolve_dtype("auto", {}, "float32", platform="cpu") == f32  # the embedded GGUF on CPU
    assert resolve_dtype("auto", {}, "float32", platform="gpu") == bf16
    assert resolve_dtype("auto", {"torch_dtype": "float32"}, platform="tpu") == bf16
    assert resolve_dtype("auto", {"torch_dtype": "float16"}, platform="gpu") == jax.numpy.float16
    assert resolve_dtype("float32", {}, platform="gpu") == f32  # an explicit dtype is obeyed
    # a T4 (sm_75) has no bf16 tensor cores: auto serves f16 there, as vLLM does; explicit bf16 is obeyed
    f16 = jax.numpy.float16
    assert resolve_dtype("auto", {}, "float32", platform="gpu", compute_capability=7.5) == f16
    assert resolve_dtype("auto", {"torch_dtype": "bfloat16"}, platform="gpu", compute_capability=7.5) == f16
    assert resolve_dtype("auto", {"torch_dtype": "bfloat16"}, platform="gpu", compute_capability=8.0) == bf16
    assert resolve_dtype("bfloat16", {}, platform="gpu", compute_capability=7.5) == bf16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="fp8")


def test_kv_cache_dtype_separate_from_weights():
    from conftest import get_engine

    from jaxradix import SamplingParams

    # compiled on demand: only the two buckets this request uses
    engine = get_engine(model_path=str(DATA / "tiny_llama3"), kv_cache_dtype="bfloat16", precompile=False)
    assert engine.loaded.model.dtype == jax.numpy.float32
    assert {a.dtype for a in engine.pool.kv} == {jax.numpy.dtype("bfloat16")}
    ref = np.load(DATA / "tiny_llama3" / "reference.npz")
    n0 = int(ref["greedy_prompt_len"])
    out = engine.generate(input_ids=[int(t) for t in ref["input_ids"][:n0]],
                          sampling_params=SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    assert len(out["output_ids"]) == 4
    assert {a.dtype for a in engine.pool.kv} == {jax.numpy.dtype("bfloat16")}  # the step kept the pool's dtype
