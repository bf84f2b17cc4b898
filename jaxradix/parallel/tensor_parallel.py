"""Tensor parallelism over a 1-D device mesh (axis "tp"), Megatron style, on JAX's own SPMD runtime.

Layout on the mesh (each shard's local view is exactly the single-device layout with fewer heads):

- ``wqkv [H, tp * (NHl + 2*KHl) * D]``: columns permuted at load time so shard s holds
  ``[q heads of s | k heads of s | v heads of s]``, then split over "tp"; ``bqkv`` likewise.
  ``w_gate_up [H, 2I]``: shard s holds ``[gate_s | up_s]``. ``wo``, ``w_down``: split by rows.
- KV heads: shard s owns KH/tp of them, or (tp > KH) one KV head replicated over tp/KH shards
  (as SGLang does); the pool's global head axis is ordered [K_s0, V_s0, K_s1, V_s1, ...].
- ``embed`` / ``lm_head``: vocab-parallel when tp divides the vocabulary, else replicated.
- A quantized weight (models/quantization.py) is placed leaf by leaf with its parameter's spec:
  values, scales and offsets share the last axis, so fused columns are permuted alike; an axis of
  size 1 (one scale per output channel of a row-split ``wo``) is replicated.
- The forward runs inside one ``jax.shard_map``: one psum after attention (o-proj) and one after
  the MLP (down-proj) per layer, one for the vocab-parallel embedding lookup; the logits are
  gathered to every device and sampled there (the sampler sees the full vocabulary).

Page ids are global: every shard holds the same pages, each with its own heads, so the host
side (radix tree, allocator, scheduler) is one copy and does not know about the mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxradix.cache.page_pool import empty_layer
from jaxradix.models.model_config import ModelConfig
from jaxradix.models.quantization import QuantizedWeight

AXIS = "tp"


@dataclass(frozen=True)
class TPLayout:
    """How one model's heads and columns divide over tp shards."""

    tp: int
    num_heads: int  # NH, global
    num_kv_heads: int  # KH, global (before replication)
    head_dim: int  # D
    intermediate: int  # I
    vocab: int  # V

    @property
    def local_heads(self) -> int:  # NHl
        return self.num_heads // self.tp

    @property
    def local_kv_heads(self) -> int:  # KHl: 1 when a KV head is replicated over several shards
        return max(self.num_kv_heads // self.tp, 1)

    @property
    def vocab_sharded(self) -> bool:
        return self.vocab % self.tp == 0

    def kv_heads_of(self, s: int) -> range:
        """The global KV heads shard s holds (its query heads use exactly these)."""
        if self.num_kv_heads >= self.tp:
            return range(s * self.local_kv_heads, (s + 1) * self.local_kv_heads)
        return range(s * self.num_kv_heads // self.tp, s * self.num_kv_heads // self.tp + 1)

    def qkv_columns(self) -> np.ndarray:  # [tp * (NHl + 2*KHl) * D] int: logical column of each global column
        NH, KH, D, NHl = self.num_heads, self.num_kv_heads, self.head_dim, self.local_heads

        def heads(base: int, hs: range) -> np.ndarray:
            return np.concatenate([base + h * D + np.arange(D) for h in hs])

        return np.concatenate([np.concatenate([heads(0, range(s * NHl, (s + 1) * NHl)),
                                               heads(NH * D, self.kv_heads_of(s)),
                                               heads((NH + KH) * D, self.kv_heads_of(s))])
                               for s in range(self.tp)])

    def gate_up_columns(self) -> np.ndarray:  # [2I] int
        I, Il = self.intermediate, self.intermediate // self.tp
        return np.concatenate([np.r_[s * Il:(s + 1) * Il, I + s * Il:I + (s + 1) * Il] for s in range(self.tp)])

    def columns(self, param: str) -> np.ndarray | None:
        """The column permutation (and replication) of a fused parameter, None for the others."""
        if param in ("wqkv", "bqkv"):
            return self.qkv_columns()
        if param == "w_gate_up":
            return self.gate_up_columns()
        return None

    def spec(self, param: str) -> P:
        """The PartitionSpec of a parameter (by its short name) on the mesh."""
        if param in ("wqkv", "w_gate_up"):
            return P(None, AXIS)
        if param == "bqkv":
            return P(AXIS)
        if param in ("wo", "w_down"):
            return P(AXIS, None)
        if param == "embed" and self.vocab_sharded:
            return P(AXIS, None)
        if param == "lm_head" and self.vocab_sharded:
            return P(None, AXIS)
        return P()  # norms, biases added after the all-reduce, a vocabulary tp does not divide


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError naming tp_size when the model's heads or sizes do not divide over tp shards."""
    def fail(why: str) -> None:
        raise ValueError(f"tp_size={tp}: {why}")

    if tp < 1:
        fail("must be >= 1")
    if cfg.num_heads % tp:
        fail(f"does not divide the model's {cfg.num_heads} query heads")
    KH = cfg.num_kv_heads
    if KH % tp and tp % KH:
        fail(f"must divide the model's {KH} KV heads or be a multiple of them (to replicate them)")
    if cfg.intermediate_size % tp:
        fail(f"does not divide the MLP width {cfg.intermediate_size}")


def make_mesh(tp: int) -> Mesh:
    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(f"tp_size={tp} needs {tp} devices, JAX sees {len(devices)} "
                         f"({jax.default_backend()}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count")
    return Mesh(np.asarray(devices[:tp]), (AXIS,))


class TensorParallel:
    """One model's mesh and layout: places weights and the KV pool, runs the sharded forward."""

    def __init__(self, cfg: ModelConfig, tp: int, mesh: Mesh | None = None):
        check_tp(cfg, tp)
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else make_mesh(tp)
        self.layout = TPLayout(tp, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                               cfg.vocab_size)
        self.replicated = NamedSharding(self.mesh, P())
        # the head axis (2) of every pool leaf: [P, S, 2*KH, D] values and, when quantized, [P, S, 2*KH] scales
        self.kv_sharding = NamedSharding(self.mesh, P(None, None, AXIS))
        self._jits: dict[tuple, Any] = {}

    @property
    def tp(self) -> int:
        return self.layout.tp

    # -- placement ---------------------------------------------------------------------------------
    def sharding(self, name: str, shape: tuple[int, ...] | None = None) -> NamedSharding:
        """The sharding of parameter `name`; with `shape` (a leaf of a quantized weight), of that leaf."""
        return NamedSharding(self.mesh, self.leaf_spec(name, shape))

    def leaf_spec(self, name: str, shape: tuple[int, ...] | None = None) -> P:
        """The parameter's spec, with the axes of size 1 of a leaf of this shape replicated."""
        spec = self.layout.spec(name.rsplit(".", 1)[-1])
        if shape is None:
            return spec
        axes = [None if shape[i] == 1 else a for i, a in enumerate(spec)]
        for i, a in enumerate(axes):
            if a is not None and shape[i] % self.tp:
                raise ValueError(f"tp_size={self.tp}: parameter {name!r} has {shape[i]} entries along the axis "
                                 f"that tp splits (shape {tuple(shape)}), not a multiple of {self.tp}; for a "
                                 f"GGUF kept quantized its scale groups must split evenly too (try "
                                 f"--quantization int8 or none)")
        return P(*axes)

    def global_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        cols = self.layout.columns(name.rsplit(".", 1)[-1])
        return shape if cols is None else (*shape[:-1], len(cols))

    def place_host(self, name: str, value: Any) -> Any:
        """A host array (or QuantizedWeight of host arrays) in the logical layout -> its global array,
        each device given only its shard."""
        if isinstance(value, QuantizedWeight):
            return jax.tree.map(lambda leaf: self.place_host(name, leaf), value)
        cols = self.layout.columns(name.rsplit(".", 1)[-1])

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            if cols is None:
                return value[index]
            return value[(*index[:-1], cols[index[-1]])]

        return jax.make_array_from_callback(self.global_shape(name, value.shape),
                                            self.sharding(name, value.shape), shard)

    def place_device(self, name: str, value: Any) -> Any:
        """A device array (or QuantizedWeight) in the logical layout -> its global array (permuted by one
        jitted gather)."""
        if isinstance(value, QuantizedWeight):
            return jax.tree.map(lambda leaf: self.place_device(name, leaf), value)
        if self.layout.columns(name.rsplit(".", 1)[-1]) is None:
            return jax.device_put(value, self.sharding(name, value.shape))
        return self.generate(name, _identity, value)

    def generate(self, name: str, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
        """fn(*args, **static) (logical layout) traced under jit with the target sharding, so each
        device computes its own shard; random weights get the values they have unsharded (the
        PRNG is partitionable). One jit per (fn, parameter kind, static args, argument shapes)."""
        return self._jit(name, fn, True, args, static)

    def transform(self, name: str, fn: Callable[..., Any], *args: Any, **static: Any) -> Any:
        """fn(*args, **static) on placed (already permuted) arrays, the result (an array or a
        QuantizedWeight, e.g. a weight quantized per column) placed with the parameter's sharding."""
        return self._jit(name, fn, False, args, static)

    def _jit(self, name: str, fn: Callable[..., Any], permute: bool, args: tuple, static: dict) -> Any:
        short = name.rsplit(".", 1)[-1]
        shapes = tuple((getattr(a, "shape", None), str(getattr(a, "dtype", ""))) for a in args)
        key = (fn, short, permute, tuple(sorted(static.items())), shapes)
        jitted = self._jits.get(key)
        if jitted is None:
            cols = self.layout.columns(short) if permute else None

            def build(*args: Any) -> Any:
                x = fn(*args, **static)
                return x if cols is None else jax.tree.map(lambda a: jnp.take(a, jnp.asarray(cols), axis=-1), x)

            out = jax.eval_shape(build, *args)
            shardings = jax.tree.map(lambda leaf: self.sharding(name, leaf.shape), out)
            jitted = self._jits[key] = jax.jit(build, out_shardings=shardings)
        return jitted(*args)

    def restore_sharding(self, name: str, shape: tuple[int, ...]) -> NamedSharding:
        """The sharding to restore a logical checkpoint array with: the target one, or for fused
        (permuted) parameters an even split of rows, relaid out by place_device afterwards."""
        if self.layout.columns(name.rsplit(".", 1)[-1]) is None:
            return self.sharding(name)
        if len(shape) == 2 and shape[0] % self.tp == 0:
            return NamedSharding(self.mesh, P(AXIS, None))
        return self.replicated

    def kv_pool(self, num_pages: int, page_size: int, num_layers: int, dtype: Any) -> tuple[Any, ...]:
        """L zero pools [P, S, tp * 2*KHl, D] (arrays, or QuantizedKV for a quantized dtype), each device
        holding its [P, S, 2*KHl, D] shard."""
        shape = (num_pages, page_size, self.tp * 2 * self.layout.local_kv_heads, self.cfg.head_dim)
        zeros = jax.jit(lambda: empty_layer(shape, dtype), out_shardings=self.kv_sharding)
        return tuple(zeros() for _ in range(num_layers))

    def replicate(self, tree: Any) -> Any:
        return jax.device_put(tree, self.replicated)

    # -- the sharded forward (traced inside the runner's jitted step) -------------------------------
    def param_specs(self, params: nnx.State) -> Any:
        """A tree of PartitionSpecs matching params (by each leaf's parameter name and shape)."""
        def spec(path: tuple, leaf: Any) -> P:
            name = next(k.key for k in reversed(path) if isinstance(getattr(k, "key", None), str))
            return self.leaf_spec(name, leaf.shape)

        return jax.tree_util.tree_map_with_path(spec, params)

    def forward(self, graphdef: Any, params: nnx.State, kv: tuple[jax.Array, ...], input_ids: jax.Array,
                positions: jax.Array, slot_mapping: jax.Array, md: Any,
                attention_fn: Callable[..., jax.Array]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """The model forward per shard: hidden [T, H] (replicated) and the updated sharded pool."""
        def local(params, kv, input_ids, positions, slot_mapping, md):
            model = nnx.merge(graphdef, params)
            return model(input_ids, positions, slot_mapping, kv, md, attention_fn, tp_axis=AXIS)

        kv_spec = P(None, None, AXIS)  # every leaf of every layer's pool
        fn = jax.shard_map(local, mesh=self.mesh, out_specs=(P(), kv_spec), check_vma=False,
                           in_specs=(self.param_specs(params), kv_spec, P(), P(), P(), P()))
        return fn(params, kv, input_ids, positions, slot_mapping, md)

    def logits(self, graphdef: Any, params: nnx.State, hidden: jax.Array) -> jax.Array:  # [N, H] -> [N, V] f32
        """Vocab-parallel logits, gathered so that every device holds the full rows."""
        out_spec = P(None, AXIS) if self.layout.vocab_sharded else P()
        fn = jax.shard_map(functools.partial(_local_logits, graphdef), mesh=self.mesh, out_specs=out_spec,
                           in_specs=(self.param_specs(params), P()), check_vma=False)
        return jax.lax.with_sharding_constraint(fn(params, hidden), self.replicated)


def _identity(x: jax.Array) -> jax.Array:
    return x


def _local_logits(graphdef: Any, params: nnx.State, hidden: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params).logits(hidden)
