"""The Llama family in one Flax NNX module: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2.

Each layer owns its weights (no stacked [L] axis) and the forward is a Python loop over layers,
unrolled inside the one jitted step, so every weight byte is read once per step and no slice of a
stacked weight is ever materialised. Q/K/V are one fused matmul (``wqkv``) and gate/up another
(``w_gate_up``), fused at load time. The KV pool is a tuple of per-layer arrays, each updated in
place (donated) by one scatter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxradix.models import cpu_matmul
from jaxradix.models.model_config import ModelConfig
from jaxradix.models.quantization import dense, embedding_rows, is_quantized
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


def layer_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """One decoder layer's parameters. Q/K/V are fused column-wise [q | k | v], gate/up [gate | up]."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    NH, KH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "attn_norm": (H,),
        "wqkv": (H, (NH + 2 * KH) * D),
        "wo": (NH * D, H),
        "mlp_norm": (H,),
        "w_gate_up": (H, 2 * I),
        "w_down": (I, H),
    }
    if cfg.qkv_bias:
        shapes["bqkv"] = ((NH + 2 * KH) * D,)
    if cfg.o_bias:
        shapes["bo"] = (H,)
    if cfg.qk_norm:
        shapes |= {"q_norm": (D,), "k_norm": (D,)}
    return shapes


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model by flat name: globals, then ``layers.{i}.{name}`` per layer."""
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    for i in range(cfg.num_layers):
        shapes |= {f"layers.{i}.{n}": s for n, s in layer_param_shapes(cfg).items()}
    return shapes


def fused_parts(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Column widths of the parts of each fused parameter, in order ([q, k, v], [gate, up])."""
    NH, KH, D, I = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    qkv = (NH * D, KH * D, KH * D)
    return {"wqkv": qkv, "bqkv": qkv, "w_gate_up": (I, I)}


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, params: dict[str, jax.Array]):
        self.cfg = cfg
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def __call__(
        self,
        h: jax.Array,  # [T, H]
        kv: jax.Array,  # [P, S, 2*KH, D], this layer's pool
        cos: jax.Array,  # [T, 1, D/2]
        sin: jax.Array,  # [T, 1, D/2]
        slot_mapping: jax.Array,  # [T] int32
        md: AttentionMetadata,
        attention_fn: AttentionFn,
        tp_axis: str | None = None,
    ) -> tuple[jax.Array, jax.Array]:  # h [T, H], updated kv
        cfg = self.cfg
        T = h.shape[0]
        # Head counts and widths come from the arrays: under tensor parallelism (inside shard_map,
        # tp_axis set) this layer sees its shard's heads and columns, and sums partial outputs.
        D = cfg.head_dim
        wqkv, wo, w_gate_up, w_down = (self.wqkv.get_value(), self.wo.get_value(), self.w_gate_up.get_value(),
                                       self.w_down.get_value())  # arrays, or QuantizedWeights
        NH, KH, I = wo.shape[0] // D, kv.shape[2] // 2, w_down.shape[0]
        reduce = (lambda y: jax.lax.psum(y, tp_axis)) if tp_axis else (lambda y: y)
        x = rms_norm(h, self.attn_norm[...], cfg.rms_norm_eps)
        qkv = dense(x, wqkv)  # [T, (NH + 2*KH) * D]
        if cfg.qkv_bias:
            qkv = qkv + self.bqkv[...]
        q = qkv[:, : NH * D].reshape(T, NH, D)
        k = qkv[:, NH * D : (NH + KH) * D].reshape(T, KH, D)
        v = qkv[:, (NH + KH) * D :].reshape(T, KH, D)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv = write_kv(kv, k, v, slot_mapping)
        o = attention_fn(q, kv, md, sm_scale=1.0 / math.sqrt(D), sliding_window=cfg.sliding_window)
        o = reduce(dense(o.reshape(T, NH * D), wo))  # [T, H]
        if cfg.o_bias:
            o = o + self.bo[...]
        h = h + o
        x = rms_norm(h, self.mlp_norm[...], cfg.rms_norm_eps)
        gate_up = dense(x, w_gate_up)  # [T, 2*I]
        h = h + reduce(dense(jax.nn.silu(gate_up[:, :I]) * gate_up[:, I:], w_down))
        return h, kv


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, params: dict[str, jax.Array]):
        """params by the flat names of param_shapes(cfg)."""
        expected = param_shapes(cfg)
        missing = set(expected) - set(params)
        if missing:
            raise ValueError(f"model parameters missing: {sorted(missing)[:8]}")
        unexpected = set(params) - set(expected)
        if unexpected:
            raise ValueError(f"unexpected model parameters: {sorted(unexpected)[:8]}")
        self.cfg = cfg
        self.embed = nnx.Param(params["embed"])
        self.final_norm = nnx.Param(params["final_norm"])
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])
        names = layer_param_shapes(cfg)
        self.layers = nnx.List(
            [LlamaLayer(cfg, {n: params[f"layers.{i}.{n}"] for n in names}) for i in range(cfg.num_layers)])

    @property
    def dtype(self) -> Any:  # the activations' (and unquantized weights') dtype
        return self.final_norm[...].dtype

    def flat_params(self) -> dict[str, Any]:
        """The parameters by the flat names of param_shapes (the inverse of the constructor): arrays, or
        QuantizedWeights for quantized weights."""
        out = {"embed": self.embed.get_value(), "final_norm": self.final_norm.get_value()}
        if not self.cfg.tie_word_embeddings:
            out["lm_head"] = self.lm_head.get_value()
        for i, layer in enumerate(self.layers):
            out |= {f"layers.{i}.{n}": getattr(layer, n).get_value() for n in layer_param_shapes(self.cfg)}
        return out

    def __call__(
        self,
        input_ids: jax.Array,  # [T] int32
        positions: jax.Array,  # [T] int32
        slot_mapping: jax.Array,  # [T] int32, where each token's K/V is written
        kv: tuple[jax.Array, ...],  # L x [P, S, 2*KH, D]
        md: AttentionMetadata,
        attention_fn: AttentionFn = ragged_paged_attention,
        tp_axis: str | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:  # hidden [T, H] after the final norm, updated kv
        """tp_axis: the mesh axis when called per shard inside shard_map (parallel/tensor_parallel.py)."""
        cfg = self.cfg
        if len(kv) != cfg.num_layers:
            raise ValueError(f"kv pool has {len(kv)} layer arrays, the model has {cfg.num_layers} layers")
        h = self.embed_tokens(input_ids, tp_axis)  # [T, H]
        angles = positions.astype(jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]  # [T, D/2]
        cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
        new_kv = []
        # Unrolled at trace time: each layer reads its own weight arrays, never a slice of a stack.
        for layer, layer_kv in zip(self.layers, kv, strict=True):
            h, layer_kv = layer(h, layer_kv, cos, sin, slot_mapping, md, attention_fn, tp_axis)
            new_kv.append(layer_kv)
        return rms_norm(h, self.final_norm[...], cfg.rms_norm_eps), tuple(new_kv)

    def embed_tokens(self, input_ids: jax.Array, tp_axis: str | None) -> jax.Array:  # [T] -> [T, H]
        table = self.embed.get_value()  # [V, H], or this shard's [V/tp, H] rows (vocab-parallel)
        if tp_axis is None or table.shape[0] == self.cfg.vocab_size:
            return embedding_rows(table, input_ids, self.dtype)
        local = input_ids - jax.lax.axis_index(tp_axis) * table.shape[0]
        mine = (local >= 0) & (local < table.shape[0])
        rows = embedding_rows(table, jnp.clip(local, 0, table.shape[0] - 1), self.dtype)
        return jax.lax.psum(jnp.where(mine[:, None], rows, jnp.zeros_like(rows)), tp_axis)

    def logits(self, hidden: jax.Array) -> jax.Array:  # [N, H] -> [N, V] f32 (per shard: [N, V/tp])
        if not self.cfg.tie_word_embeddings:
            return dense(hidden, self.lm_head.get_value()).astype(jnp.float32)
        table = self.embed.get_value()  # [V, H]; a QuantizedWeight table contracts its H axis in place
        if is_quantized(table):
            return dense(hidden, table).astype(jnp.float32)
        if jax.default_backend() == "cpu":  # table @ h.T is a gemv; h @ table.T ~15x slower for one row
            return cpu_matmul.matmul_rows(hidden, table).astype(jnp.float32)
        return dense(hidden, table.T).astype(jnp.float32)
