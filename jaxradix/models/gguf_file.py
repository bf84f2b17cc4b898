"""Read a GGUF file and present it in Hugging Face terms: an HF config dict, HF tensor names in HF
layout ([out_features, in_features], float32), the tokenizer and the chat template.

GGUF stores dims in ggml `ne` order (fastest first); numpy wants them reversed, which for a
linear weight is exactly HF's [out_features, in_features], so no transpose is ever needed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from jaxradix.models.quantization import QuantizedWeight, host_map
from jaxradix.tokenizer import Tokenizer, tokenizer_from_gguf_reader

Q = GGMLQuantizationType

SUPPORTED_QUANT_TYPES: tuple[GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K,
)

# (elements per block, bytes per block)
_BLOCK: dict[GGMLQuantizationType, tuple[int, int]] = {
    Q.F32: (1, 4), Q.F16: (1, 2), Q.BF16: (1, 2),
    Q.Q8_0: (32, 34), Q.Q4_0: (32, 18), Q.Q4_1: (32, 20),
    Q.Q4_K: (256, 144), Q.Q6_K: (256, 210),
}

SUPPORTED_ARCHS: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp's converter permutes q/k rows only for these (its LlamaModel class).
_PERMUTED_ARCHS = frozenset({"llama", "mistral"})


# ---------------------------------------------------------------------------------------------
# Dequantization (ggml block formats, vectorised over blocks)
# ---------------------------------------------------------------------------------------------


def _f16(b: np.ndarray) -> np.ndarray:
    """[N, 2] little-endian fp16 bytes -> [N] float32."""
    return np.ascontiguousarray(b).view(np.float16)[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n]: all low nibbles first, then all high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# Each decoder: [N, block bytes] -> (q [N, B] integers, scales [N, B/g] f32, offsets [N, B/g] f32 or
# None), B the block's entries and g its group; a value is q * scale (+ offset), all in f32.
Decoded = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def _dec_q8_0(b: np.ndarray) -> Decoded:  # b: [N, 34]
    return np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b[:, 0:2])[:, None], None  # q: [N, 32]


def _dec_q4_0(b: np.ndarray) -> Decoded:  # b: [N, 18]
    q = _nibbles(b[:, 2:]).astype(np.int8) - 8  # [N, 32] in [-8, 7]
    return q.astype(ml_dtypes.int4), _f16(b[:, 0:2])[:, None], None


def _dec_q4_1(b: np.ndarray) -> Decoded:  # b: [N, 20]
    return _nibbles(b[:, 4:]).astype(ml_dtypes.uint4), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q4_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes -> 8 six-bit scales and 8 six-bit mins per super-block ([N, 8] each).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for mins; bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _dec_q4_k(b: np.ndarray) -> Decoded:  # b: [N, 144]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    scales, mins = _q4_k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 32)
    # each 32-byte chunk c gives sub-block 2c (low nibbles) and 2c+1 (high nibbles)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 256)
    return q.astype(ml_dtypes.uint4), d[:, None] * scales, -(dmin[:, None] * mins)  # groups of 32


def _dec_q6_k(b: np.ndarray) -> Decoded:  # b: [N, 210]
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 1, 2, 32)  # [N, half, -, chunk, l]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)  # [N, half, -, l]
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)  # [N, 16]
    d = _f16(b[:, 208:210])
    # within a half, the four 32-value runs are (low nibble, chunk 0), (low, 1), (high, 0), (high, 1),
    # taking their top 2 bits from qh bit pairs 0, 1, 2, 3
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3  # [N, 2, 4, 32]
    q = (low | (high << 4)).astype(np.int8) - 32  # [N, 2, 4, 32] in [-32, 31]
    return q.reshape(n, 256), d[:, None] * scales, None  # one scale per 16 values


_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], Decoded]] = {
    Q.Q8_0: _dec_q8_0, Q.Q4_0: _dec_q4_0, Q.Q4_1: _dec_q4_1, Q.Q4_K: _dec_q4_k, Q.Q6_K: _dec_q6_k,
}


def _apply(q: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """q [N, B], scales/offsets [N, G] -> [N, B] float32 (q * scale + offset per group)."""
    n, g = scales.shape
    y = q.astype(np.float32).reshape(n, g, -1) * scales[:, :, None]
    if offsets is not None:
        y = y + offsets[:, :, None]
    return y.reshape(n, -1)


def _unsupported(name: str, qtype: Any) -> ValueError:
    try:
        tname = GGMLQuantizationType(int(qtype)).name
    except ValueError:
        tname = f"unknown type {int(qtype)}"
    supported = ", ".join(t.name for t in SUPPORTED_QUANT_TYPES)
    return ValueError(
        f"GGUF tensor {name!r} has type {tname}, which jaxradix cannot dequantize. "
        f"Supported types: {supported}. Re-quantize the model to one of these (or use an HF checkpoint)."
    )


def dequantize(
    raw: np.ndarray, qtype: GGMLQuantizationType | int, shape: tuple[int, ...], name: str = "<tensor>"
) -> np.ndarray:
    """Raw tensor data (bytes or typed, any shape) -> float32 array of numpy `shape`."""
    try:
        qt = GGMLQuantizationType(int(qtype))
    except ValueError:
        raise _unsupported(name, qtype) from None
    if qt not in _BLOCK:
        raise _unsupported(name, qt)
    block_elems, block_bytes = _BLOCK[qt]
    n_elems = int(np.prod(shape, dtype=np.int64))
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if n_elems % block_elems or data.size != n_elems // block_elems * block_bytes:
        raise ValueError(
            f"GGUF tensor {name!r} ({qt.name}, shape {tuple(shape)}): expected "
            f"{n_elems // block_elems * block_bytes} bytes, got {data.size}"
        )
    if qt == Q.F32:
        out = data.view(np.float32).copy()
    elif qt == Q.F16:
        out = data.view(np.float16).astype(np.float32)
    elif qt == Q.BF16:
        out = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        out = _apply(*_DECODERS[qt](data.reshape(-1, block_bytes)))
    return out.reshape(shape)


def is_block_quantized(qtype: GGMLQuantizationType | int) -> bool:
    return int(qtype) in {int(q) for q in _DECODERS}


def quantized_weight(raw: np.ndarray, qtype: GGMLQuantizationType | int, shape: tuple[int, int],
                     name: str = "<tensor>") -> QuantizedWeight:
    """A block-quantized 2-D tensor [rows, cols] (HF layout: [out, in]) kept as it is stored: a host
    QuantizedWeight grouped along the columns (axis 1), values [rows, cols] int8/int4/uint4 and f32
    scales (offsets) [rows, cols / group]. dequantize() of the same data gives exactly its values."""
    qt = GGMLQuantizationType(int(qtype))
    if qt not in _DECODERS or len(shape) != 2:
        raise ValueError(f"GGUF tensor {name!r}: {qt.name} {tuple(shape)} is not a block-quantized matrix")
    block_elems, block_bytes = _BLOCK[qt]
    rows, cols = shape
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if cols % block_elems or data.size != rows * cols // block_elems * block_bytes:
        raise ValueError(f"GGUF tensor {name!r} ({qt.name}, shape {tuple(shape)}): expected "
                         f"{rows * cols // block_elems * block_bytes} bytes, got {data.size}")
    q, scales, offsets = _DECODERS[qt](data.reshape(-1, block_bytes))
    groups = cols // block_elems * scales.shape[1]
    return QuantizedWeight(q.reshape(rows, cols), scales.reshape(rows, groups),
                           None if offsets is None else offsets.reshape(rows, groups), axis=1)


# ---------------------------------------------------------------------------------------------
# llama.cpp q/k row permutation
# ---------------------------------------------------------------------------------------------


def permute_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (rotary halves -> interleaved pairs)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_llama_cpp`: GGUF q/k rows -> HF (rotate-half) order."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# Metadata -> HF config
# ---------------------------------------------------------------------------------------------


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _clean_float(x: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; give back the short decimal."""
    return float(str(np.float32(x)))


def gguf_architecture(reader: GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    return arch


def gguf_to_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """An HF-style config.json dict from the GGUF metadata."""
    arch = gguf_architecture(reader)

    def key(k: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{k}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    n_kv = int(n_kv if np.isscalar(n_kv) else n_kv[0])  # some files give one count per layer
    head_dim = int(key("attention.key_length", hidden // n_heads))
    vocab = key("vocab_size")
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    eps = key("attention.layer_norm_rms_epsilon", 1e-6)

    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [SUPPORTED_ARCHS[arch]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _clean_float(eps),
        "rope_theta": _clean_float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "rope_scaling": None,
    }
    if arch in ("llama", "mistral"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    if arch == "qwen3":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    window = key("attention.sliding_window")
    if window:
        config["sliding_window"] = int(window)

    scaling_type = key("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        rope_scaling: dict[str, Any] = {"rope_type": scaling_type}
        factor = key("rope.scaling.factor")
        if factor is not None:
            rope_scaling["factor"] = _clean_float(factor)
        orig = key("rope.scaling.original_context_length")
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = int(orig)
        config["rope_scaling"] = rope_scaling
    if "rope_freqs.weight" in tensors:
        # Llama 3.x: llama.cpp stores the rope scaling as per-frequency divisors, not HF parameters;
        # the model divides its inverse frequencies by these.
        t = tensors["rope_freqs.weight"]
        factors = dequantize(t.data, t.tensor_type, (int(t.n_elements),), t.name)
        config["rope_freq_factors"] = [float(x) for x in factors]
    return config


# ---------------------------------------------------------------------------------------------
# Tensor names and streaming
# ---------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# tensors that carry no HF weight (folded into the config instead)
_NON_WEIGHTS = frozenset({"rope_freqs.weight"})


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name; ValueError for a tensor this loader does not know."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face equivalent known to jaxradix")


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int) -> GGUFReader:
    return GGUFReader(path)


def open_gguf(path: str | Path) -> GGUFReader:
    """A memory-mapped reader, shared within the process (parsing the metadata of a large
    vocabulary takes seconds; weights and tokenizer are usually read from the same file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    st = p.stat()
    return _cached_reader(str(p.resolve()), st.st_mtime_ns, st.st_size)


def check_tensor_types(reader: GGUFReader) -> None:
    """Fail early, before any weight is read, on a tensor type we cannot dequantize."""
    for t in reader.tensors:
        if t.tensor_type not in _BLOCK:
            raise _unsupported(t.name, t.tensor_type)


def _iter_reader(reader: GGUFReader, config: dict[str, Any],
                 keep_quantized: bool = False) -> Iterator[tuple[str, np.ndarray | QuantizedWeight]]:
    permuted = config["model_type"] in _PERMUTED_ARCHS
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for t in reader.tensors:
        if t.name in _NON_WEIGHTS:
            continue
        name = hf_tensor_name(t.name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w: np.ndarray | QuantizedWeight
        if keep_quantized and len(shape) == 2 and is_block_quantized(t.tensor_type):
            w = quantized_weight(t.data, t.tensor_type, shape, t.name)  # rows stay rows: unpermuted alike
        else:
            w = dequantize(t.data, t.tensor_type, shape, t.name)
        if permuted and ".self_attn.q_proj." in name:
            w = _unpermute(w, n_heads)
        elif permuted and ".self_attn.k_proj." in name:
            w = _unpermute(w, n_kv)
        yield name, w


def _unpermute(w: np.ndarray | QuantizedWeight, n_heads: int) -> np.ndarray | QuantizedWeight:
    if isinstance(w, QuantizedWeight):
        return host_map(w, lambda a: unpermute_llama_cpp(a, n_heads))
    return unpermute_llama_cpp(w, n_heads)


def iter_hf_tensors(path: str | Path | GGUFReader) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF layout), one tensor at a time; the file stays memory-mapped."""
    reader = path if isinstance(path, GGUFReader) else open_gguf(path)
    check_tensor_types(reader)
    yield from _iter_reader(reader, gguf_to_hf_config(reader))


@dataclass
class GGUFModel:
    path: Path
    config: dict[str, Any]
    # each call streams the tensors anew: (HF name, float32 array)
    tensors: Callable[[bool], Iterator[tuple[str, np.ndarray | QuantizedWeight]]]
    tokenizer: Tokenizer
    chat_template: str | None
    num_tensors: int  # how many (name, array) pairs `tensors()` yields

    def iter_tensors(self, keep_quantized: bool = False) -> Iterator[tuple[str, np.ndarray | QuantizedWeight]]:
        """(HF name, float32 array); with keep_quantized, block-quantized matrices come as host
        QuantizedWeights in HF layout (grouped along axis 1) instead."""
        return self.tensors(keep_quantized)


def read_gguf(path: str | Path) -> GGUFModel:
    reader = open_gguf(path)
    config = gguf_to_hf_config(reader)
    check_tensor_types(reader)
    return GGUFModel(
        path=Path(path),
        config=config,
        tensors=lambda keep=False: _iter_reader(reader, config, keep),
        tokenizer=tokenizer_from_gguf_reader(reader),
        chat_template=_field(reader, "tokenizer.chat_template"),
        num_tensors=sum(t.name not in _NON_WEIGHTS for t in reader.tensors),
    )
