"""Weight loading: HF safetensors directories, GGUF files, orbax checkpoints, dummy weights.

Every source is reduced to Hugging Face tensor names first (GGUF via gguf_file.py), then mapped
onto the model's per-layer parameters one tensor at a time (q/k/v into the fused ``wqkv``, gate/up
into ``w_gate_up``), so host memory holds one copy of the model in the target dtype and nothing more.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxradix.models import cpu_matmul
from jaxradix.models.llama import LlamaForCausalLM, fused_parts, param_shapes
from jaxradix.models.model_config import ModelConfig
from jaxradix.models.quantization import (
    QuantizedWeight,
    channel_axis,
    check_quantization,
    concat_columns,
    device_storage,
    quantize_channels,
    quantizes,
)
from jaxradix.pallas_kernels.common import compute_capability as device_compute_capability
from jaxradix.parallel.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ACCELERATOR_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
ORBAX_MARKER = "jaxradix_orbax.json"

# HF name (with the layer number removed) -> (parameter, transpose, part of a fused parameter)
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm", False, None),
    "self_attn.q_proj.weight": ("wqkv", True, 0),
    "self_attn.k_proj.weight": ("wqkv", True, 1),
    "self_attn.v_proj.weight": ("wqkv", True, 2),
    "self_attn.o_proj.weight": ("wo", True, None),
    "self_attn.q_proj.bias": ("bqkv", False, 0),
    "self_attn.k_proj.bias": ("bqkv", False, 1),
    "self_attn.v_proj.bias": ("bqkv", False, 2),
    "self_attn.o_proj.bias": ("bo", False, None),
    "self_attn.q_norm.weight": ("q_norm", False, None),
    "self_attn.k_norm.weight": ("k_norm", False, None),
    "post_attention_layernorm.weight": ("mlp_norm", False, None),
    "mlp.gate_proj.weight": ("w_gate_up", True, 0),
    "mlp.up_proj.weight": ("w_gate_up", True, 1),
    "mlp.down_proj.weight": ("w_down", True, None),
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": ("embed", False, None),
    "model.norm.weight": ("final_norm", False, None),
    "lm_head.weight": ("lm_head", True, None),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class LoadedModel:
    config: ModelConfig
    hf_config: dict[str, Any]
    model: LlamaForCausalLM
    tokenizer: Any  # jaxradix.tokenizer.Tokenizer, or None for a dummy model without tokenizer files
    source: str
    load_format: str
    load_seconds: float
    tp: TensorParallel | None = None  # the mesh and layout the weights are sharded with (tp_size > 1)
    quantization: str = "none"  # how the weights are stored on the device (models/quantization.py)


def resolve_dtype(dtype: str, hf_config: dict[str, Any], default: str = "float32",
                  platform: str | None = None, compute_capability: float | None = None) -> Any:
    """The weight dtype. "auto": the checkpoint's own dtype (`default` when it names none, e.g. GGUF),
    except that an f32 checkpoint serves in bf16 on an accelerator (half the bytes per step, and the
    Mosaic GPU attention kernel needs a 16-bit KV pool), and bf16 becomes f16 on an NVIDIA GPU older
    than sm_80 (a T4: no bf16 tensor cores, so XLA would run its matmuls in f32; vLLM does the same);
    an explicit dtype is always taken as is. compute_capability: the GPU's (default: the device's)."""
    if dtype == "auto":
        dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or default
        platform = platform or jax.default_backend()
        if dtype == "float32" and platform in ACCELERATOR_PLATFORMS:
            dtype = "bfloat16"
        if compute_capability is None and platform in ("gpu", "cuda"):
            compute_capability = device_compute_capability()
        cc = compute_capability
        if dtype == "bfloat16" and cc is not None and cc < 8.0:
            logger.warning("bf16 needs compute capability >= 8.0 (this GPU: %s); serving in float16 "
                           "(--dtype bfloat16 keeps bf16)", cc)
            dtype = "float16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def detect_format(path: Path) -> str:
    if path.suffix == ".gguf":
        return "gguf"
    if (path / ORBAX_MARKER).exists():
        return "orbax"
    if (path / "config.json").exists():
        return "safetensors"
    raise ValueError(f"cannot tell the format of {path}: expected a .gguf file, an HF directory with "
                     f"config.json and *.safetensors, or an orbax checkpoint made by scripts/convert.py")


def resolve_quantization(quantization: str | None, load_format: str) -> str:
    """None: "none", dense weights (a GGUF file dequantized at load). Keeping a GGUF's blocks ("gguf")
    is exact and decodes one request 1.4x faster on CPU, but compiles each step ~1.8x longer and
    prefills no faster (docs/benchmarks.md), so it is asked for, not the default. "gguf" needs a GGUF
    file; "int8"/"fp8" quantize any source per output channel at load."""
    if quantization is None:
        return "none"
    check_quantization(quantization)
    if quantization == "gguf" and load_format != "gguf":
        raise ValueError(f"quantization 'gguf' keeps a GGUF file's quantized blocks; this model loads as "
                         f"{load_format!r} (use int8, fp8 or none)")
    return quantization


def load_model(model_path: str | Path | None = None, *, load_format: str = "auto", dtype: str = "auto",
               seed: int = 0, progress: bool = True, tp_size: int = 1,
               quantization: str | None = None) -> LoadedModel:
    """Load a model and its tokenizer. model_path None means the embedded SmolLM2-135M-Instruct.
    tp_size > 1: every weight goes straight into its shards on a mesh of tp_size devices.
    quantization: one of QUANTIZATIONS, or None ("none"): see resolve_quantization."""
    from jaxradix.models.embedded import embedded_model_path
    from jaxradix.models.hub import is_hub_id, resolve_model_path

    start = time.perf_counter()
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported; supported: {', '.join(LOAD_FORMATS)}")
    if model_path is not None and is_hub_id(str(model_path)):
        model_path = resolve_model_path(str(model_path))
    path = Path(model_path) if model_path is not None else embedded_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (expected an HF directory, "
                                f"a .gguf file or an orbax checkpoint directory; HF hub ids need the "
                                f"weights downloaded first)")
    fmt = load_format
    if fmt == "auto":
        fmt = detect_format(path)
    quant = resolve_quantization(quantization, fmt)
    if fmt == "gguf":
        loaded = _load_gguf(path, dtype, progress, tp_size, quant)
    elif fmt == "orbax":
        loaded = _load_orbax(path, tp_size, quant)
    elif fmt == "safetensors":
        loaded = _load_safetensors(path, dtype, progress, tp_size, quant)
    else:
        loaded = _load_dummy(path, dtype, seed, tp_size, quant)
    loaded.quantization = quant
    if tp_size == 1 and jax.default_backend() == "cpu" and quant != "none":
        # int8 weights as one column block per core: XLA:CPU runs one int8 dot on one thread
        loaded.model = LlamaForCausalLM(loaded.config, cpu_matmul.split_for_threads(loaded.model.flat_params()))
    loaded.load_seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, quantization %s) in %.2f s", path, fmt, quant, loaded.load_seconds)
    return loaded


_QUANTIZE_JIT = jax.jit(quantize_channels, static_argnames=("kind", "axis"))


def _quantized(name: str, w: Any, quantization: str, tp: TensorParallel | None) -> Any:
    """A placed weight as served under `quantization`: int8/fp8 quantize the matmul weights and the
    embedding table per channel on the device (sharded like the weight); the rest is unchanged."""
    if not quantizes(name, quantization) or isinstance(w, QuantizedWeight):
        return w
    kw = dict(kind=quantization, axis=channel_axis(name))
    return tp.transform(name, quantize_channels, w, **kw) if tp is not None else _QUANTIZE_JIT(w, **kw)


def _hf_config_of(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json" if path.is_dir() else path
    if not cfg_path.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    return json.loads(cfg_path.read_text())


def _try_tokenizer(path: Path) -> Any:
    from jaxradix.tokenizer import load_tokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if path.is_dir() and any((path / f).exists() for f in files):
        return load_tokenizer(path)
    return None


class _ParamBuilder:
    """Host buffers of the target dtype, filled one HF tensor at a time (fused parameters part by part).
    A GGUF kept quantized hands in host QuantizedWeights instead, held as they are until build()."""

    def __init__(self, cfg: ModelConfig, dtype: Any, tp: TensorParallel | None = None, quantization: str = "none"):
        self.cfg = cfg
        self.tp = tp
        self.quantization = quantization
        self.np_dtype = np.dtype(dtype)
        # np.zeros takes no memory until written: a buffer a quantized tensor replaces costs nothing
        self.buffers = {n: np.zeros(s, self.np_dtype) for n, s in param_shapes(cfg).items()}
        self.quantized: dict[str, dict[int, QuantizedWeight]] = {}  # flat name -> part -> [K, N_part] or table
        self.parts = fused_parts(cfg)
        self.filled: set[tuple[str, int]] = set()  # (flat name, part)

    def add(self, hf_name: str, tensor: np.ndarray | QuantizedWeight) -> None:
        if "rotary_emb" in hf_name:
            return
        if hf_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return
        m = _LAYER_RE.match(hf_name)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if rest not in _LAYER_NAMES or layer >= self.cfg.num_layers:
                raise ValueError(f"unexpected tensor {hf_name!r} for this {self.cfg.model_type} config")
            param, transpose, part = _LAYER_NAMES[rest]
            name = f"layers.{layer}.{param}"
        elif hf_name in _GLOBAL_NAMES:
            param, transpose, part = _GLOBAL_NAMES[hf_name]
            name = param
        else:
            raise ValueError(f"unexpected tensor {hf_name!r} for this {self.cfg.model_type} config")
        if name not in self.buffers:
            raise ValueError(f"tensor {hf_name!r} has no place in a {self.cfg.model_type} model with this "
                             f"config (e.g. a bias the config does not declare)")
        value = tensor.T if transpose else tensor
        target = self.buffers[name]
        if part is not None:  # columns [lo, hi) of the fused parameter
            widths = self.parts[param]
            lo = sum(widths[:part])
            target = target[..., lo:lo + widths[part]]
        if tuple(value.shape) != target.shape:
            raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, the config implies "
                             f"{target.shape[::-1] if transpose else target.shape}")
        if isinstance(value, QuantizedWeight):
            self.quantized.setdefault(name, {})[part or 0] = value
        else:
            target[...] = value.astype(self.np_dtype)
        self.filled.add((name, part or 0))

    def _host_value(self, name: str) -> np.ndarray | QuantizedWeight:
        """The parameter's host value: a QuantizedWeight when every part of it came quantized, else the
        dense buffer (quantized parts of a partly dense fused parameter dequantized into it)."""
        parts = self.quantized.pop(name, {})
        n_parts = len(self.parts.get(name.rsplit(".", 1)[-1], (0,)))
        if len(parts) == n_parts:
            q = parts[0] if n_parts == 1 else concat_columns([parts[i] for i in range(n_parts)])
            return device_storage(q, jax.default_backend())
        buf = self.buffers[name]
        widths = self.parts.get(name.rsplit(".", 1)[-1], (buf.shape[-1],))
        for i, q in parts.items():
            lo = sum(widths[:i])
            buf[..., lo:lo + widths[i]] = np.asarray(q.dequantize(jnp.float32)).astype(self.np_dtype)
        return buf

    def build(self) -> dict[str, Any]:
        for name in self.buffers:
            param = name.rsplit(".", 1)[-1]
            for part in range(len(self.parts.get(param, (0,)))):
                if (name, part) not in self.filled:
                    raise ValueError(f"weights incomplete: parameter {name!r} (part {part}) got no tensor")

        def place(name: str, value: np.ndarray | QuantizedWeight) -> Any:
            if self.tp is not None:
                return self.tp.place_host(name, value)
            return jax.tree.map(jnp.asarray, value)

        params = {}
        for name in list(self.buffers):  # one parameter at a time: placed, quantized, its host copy freed
            params[name] = _quantized(name, place(name, self._host_value(name)), self.quantization, self.tp)
            del self.buffers[name]
        return params


def _tp(cfg: ModelConfig, tp_size: int) -> TensorParallel | None:
    """The mesh for tp_size > 1, made (and the model's heads checked against it) before any weight loads."""
    return TensorParallel(cfg, tp_size) if tp_size > 1 else None


def _fill(cfg: ModelConfig, dtype: Any, tensors: Iterator[tuple[str, Any]], total: int,
          progress: bool, what: str, tp: TensorParallel | None, quantization: str = "none") -> LlamaForCausalLM:
    builder = _ParamBuilder(cfg, dtype, tp, quantization)
    for name, t in tqdm(tensors, total=total, desc=f"loading {what}", disable=not progress, unit="tensor"):
        builder.add(name, t)
    return LlamaForCausalLM(cfg, builder.build())


def _load_safetensors(path: Path, dtype: str, progress: bool, tp_size: int, quantization: str) -> LoadedModel:
    from safetensors import safe_open

    hf = _hf_config_of(path)
    cfg = ModelConfig.from_hf(hf)
    tp = _tp(cfg, tp_size)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for f in files:
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)

    total = 0
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            total += len(list(st.keys()))
    model = _fill(cfg, resolve_dtype(dtype, hf), tensors(), total, progress, path.name, tp, quantization)
    return LoadedModel(cfg, hf, model, _try_tokenizer(path), str(path), "safetensors", 0.0, tp)


def _load_gguf(path: Path, dtype: str, progress: bool, tp_size: int, quantization: str) -> LoadedModel:
    from jaxradix.models.gguf_file import read_gguf

    g = read_gguf(path)
    cfg = ModelConfig.from_hf(g.config)
    tp = _tp(cfg, tp_size)
    model = _fill(cfg, resolve_dtype(dtype, {}, "float32"), g.iter_tensors(keep_quantized=quantization == "gguf"),
                  g.num_tensors, progress, path.name, tp, quantization)
    return LoadedModel(cfg, g.config, model, g.tokenizer, str(path), "gguf", 0.0, tp)


def _random_param(key: jax.Array, *, shape: tuple[int, ...], dtype: Any, norm: bool) -> jax.Array:
    if norm:
        return jnp.ones(shape, dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _load_dummy(path: Path, dtype: str, seed: int, tp_size: int, quantization: str) -> LoadedModel:
    hf = _hf_config_of(path)
    cfg = ModelConfig.from_hf(hf)
    tp = _tp(cfg, tp_size)
    jdtype = resolve_dtype(dtype, hf)
    keys = jax.random.split(jax.random.key(seed), len(param_shapes(cfg)))
    params = {}
    for key, (name, shape) in zip(keys, sorted(param_shapes(cfg).items()), strict=True):
        kw = dict(shape=shape, dtype=jdtype, norm="norm" in name)
        # under TP each device draws its own shard (the same values as unsharded)
        params[name] = _random_param(key, **kw) if tp is None else tp.generate(name, _random_param, key, **kw)
        params[name] = _quantized(name, params[name], quantization, tp)
    return LoadedModel(cfg, hf, LlamaForCausalLM(cfg, params), _try_tokenizer(path) if path.is_dir() else None,
                       str(path), "dummy", 0.0, tp)


def save_orbax(loaded: LoadedModel, out_dir: str | Path) -> Path:
    """Save converted params (and config, tokenizer) so later loads skip conversion."""
    import orbax.checkpoint as ocp

    if loaded.tp is not None:
        raise ValueError("save_orbax: load the model with tp_size=1 to convert it (checkpoints hold the "
                         "unsharded layout)")
    if loaded.quantization != "none":
        raise ValueError(f"save_orbax: load the model with quantization='none' to convert it (checkpoints "
                         f"hold dense weights; quantization {loaded.quantization!r} is applied at load)")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    state = _nest(loaded.model.flat_params())
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / "params", state, force=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.hf.save_pretrained(out / "tokenizer")
    meta = {"config": loaded.hf_config, "source": loaded.source, "load_format": loaded.load_format,
            "dtype": str(loaded.model.dtype)}
    (out / ORBAX_MARKER).write_text(json.dumps(meta, indent=1))
    return out


def _load_orbax(path: Path, tp_size: int = 1, quantization: str = "none") -> LoadedModel:
    import orbax.checkpoint as ocp

    from jaxradix.tokenizer import load_tokenizer

    meta = json.loads((path / ORBAX_MARKER).read_text())
    cfg = ModelConfig.from_hf(meta["config"])
    tp = _tp(cfg, tp_size)
    dtype = jnp.dtype(meta["dtype"])
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Under TP orbax restores each array straight into its target shards (fused q/k/v and gate/up
    # split by rows first, then relaid out to their per-shard column blocks on the mesh).
    target = {n: jax.ShapeDtypeStruct(s, dtype, sharding=single if tp is None else tp.restore_sharding(n, s))
              for n, s in param_shapes(cfg).items()}
    with ocp.StandardCheckpointer() as ckpt:
        restored = _flatten(ckpt.restore(path.absolute() / "params", _nest(target)))
    if tp is not None:
        restored = {n: tp.place_device(n, a) for n, a in restored.items()}
    restored = {n: _quantized(n, a, quantization, tp) for n, a in restored.items()}
    tok_dir = path / "tokenizer"
    tokenizer = load_tokenizer(tok_dir) if tok_dir.exists() else None
    return LoadedModel(cfg, meta["config"], LlamaForCausalLM(cfg, restored), tokenizer, str(path), "orbax", 0.0,
                       tp)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"layers.0.wqkv": x} -> {"layers": {"0": {"wqkv": x}}}: the tree an orbax checkpoint holds."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
