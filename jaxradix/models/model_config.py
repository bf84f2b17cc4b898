"""ModelConfig: the part of a Hugging Face config.json the Llama-family model needs, validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# model_type -> (qkv bias, o bias, q/k RMSNorm) defaults; a config's own fields override them.
SUPPORTED_MODEL_TYPES: dict[str, tuple[bool, bool, bool]] = {
    "llama": (False, False, False),
    "mistral": (False, False, False),
    "qwen2": (True, False, False),
    "qwen3": (False, False, True),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # llama.cpp's rope_freqs: divisors of inv_freq
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be a positive integer, got {getattr(self, name)!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            positive(name)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"model config: rope_scaling type {rope_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture: model_type {model_type!r} "
                             f"(architectures {hf.get('architectures')}); supported model types: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        qkv_bias, o_bias, qk_norm = SUPPORTED_MODEL_TYPES[model_type]
        if hf.get("attention_bias"):  # Llama/Qwen3 attention_bias puts a bias on q, k, v and o
            qkv_bias, o_bias = True, model_type != "qwen2"
        if hf.get("mlp_bias"):
            raise ValueError("model config: mlp_bias=True is not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"model config: hidden_act {act!r} is not supported; supported: silu")
        # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older configs
        # write rope_theta and rope_scaling {type|rope_type, ...}.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_scaling = rope if rope["rope_type"] != "default" else None
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        heads = hf["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=qk_norm,
            sliding_window=sliding,
            rope_freq_factors=tuple(hf["rope_freq_factors"]) if hf.get("rope_freq_factors") else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
