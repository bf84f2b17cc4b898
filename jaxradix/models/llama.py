"""The Llama family in one Flax NNX module: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Layer weights are stacked on a leading layer axis and the forward scans over layers, so the
step compiles once per shape however deep the model is. The KV pool is one array for all
layers, carried through the scan and updated in place by one scatter per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.reference import ragged_paged_attention, write_kv

AttentionFn = Callable[..., jax.Array]


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:  # [D/2] f32
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_freq_factors is not None:  # GGUF Llama 3.x: the scaling is baked into per-frequency factors
        return inv_freq / jnp.asarray(cfg.rope_freq_factors, jnp.float32)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x: [T, H, D]; cos/sin: [T, 1, D/2]. Rotary pairs are (i, i + D/2) as in HF's rotate_half.
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model by name; layer parameters carry a leading [L] axis."""
    L, H, I = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    NH, KH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "embed": (cfg.vocab_size, H),
        "final_norm": (H,),
        "attn_norm": (L, H),
        "wq": (L, H, NH * D),
        "wk": (L, H, KH * D),
        "wv": (L, H, KH * D),
        "wo": (L, NH * D, H),
        "mlp_norm": (L, H),
        "w_gate": (L, H, I),
        "w_up": (L, H, I),
        "w_down": (L, I, H),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (H, cfg.vocab_size)
    if cfg.qkv_bias:
        shapes |= {"bq": (L, NH * D), "bk": (L, KH * D), "bv": (L, KH * D)}
    if cfg.o_bias:
        shapes["bo"] = (L, H)
    if cfg.qk_norm:
        shapes |= {"q_norm": (L, D), "k_norm": (L, D)}
    return shapes


LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down",
                "bq", "bk", "bv", "bo", "q_norm", "k_norm")


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, params: dict[str, jax.Array]):
        missing = set(param_shapes(cfg)) - set(params)
        if missing:
            raise ValueError(f"model parameters missing: {sorted(missing)}")
        self.cfg = cfg
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    @property
    def dtype(self) -> Any:
        return self.embed[...].dtype

    def __call__(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        slot_mapping: jax.Array,  # [T] int32, where each token's K/V is written
        kv_pool: jax.Array,  # [L, P, S, 2*KH, D]
        md: AttentionMetadata,
        attention_fn: AttentionFn = ragged_paged_attention,
    ) -> tuple[jax.Array, jax.Array]:  # hidden [T, H] after the final norm, updated kv_pool
        cfg = self.cfg
        T = input_ids.shape[0]
        NH, KH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = self.embed[...][input_ids]  # [T, H]
        angles = positions.astype(jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]  # [T, D/2]
        cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
        layer_params = {n: getattr(self, n)[...] for n in LAYER_PARAMS if hasattr(self, n)}
        sm_scale = 1.0 / math.sqrt(D)

        def layer(carry, xs):
            h, kv_pool = carry
            p, idx = xs
            x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
            q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
            if cfg.qkv_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            q, k, v = q.reshape(T, NH, D), k.reshape(T, KH, D), v.reshape(T, KH, D)
            if cfg.qk_norm:
                q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv_pool = write_kv(kv_pool, idx, k, v, slot_mapping)
            o = attention_fn(q, kv_pool, idx, md, sm_scale=sm_scale, sliding_window=cfg.sliding_window)
            o = o.reshape(T, NH * D) @ p["wo"]
            if cfg.o_bias:
                o = o + p["bo"]
            h = h + o
            x = rms_norm(h, p["mlp_norm"], cfg.rms_norm_eps)
            h = h + (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]
            return (h, kv_pool), None

        idx = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (h, kv_pool), _ = jax.lax.scan(layer, (h, kv_pool), (layer_params, idx))
        return rms_norm(h, self.final_norm[...], cfg.rms_norm_eps), kv_pool

    def logits(self, hidden: jax.Array) -> jax.Array:  # [N, H] -> [N, V] f32
        w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return (hidden @ w).astype(jnp.float32)
