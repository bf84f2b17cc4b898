"""The Triton attention kernel (NVIDIA GPUs of compute capability >= 8.0 without the Mosaic kernel): in
interpret mode against the jnp reference (unowned pages NaN, see test_kernels.py), lowered for an A100 on
CPU, and chosen by `auto` there. Its reason to exist: the GPU step it builds has no XLA control flow,
where the gathered path's loops make the host wait for the device every kv block of every layer."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import random_model
from test_kernels import CASES, check, make_batch
from test_kernels_quantized import check_quantized, quantized_batch

import jaxradix.pallas_kernels as kernels
from jaxradix.cache.page_pool import PagePool
from jaxradix.engine.batch import Bucket, Buckets
from jaxradix.engine.model_runner import ModelRunner
from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels.common import kv_splits
from jaxradix.pallas_kernels.gathered import ragged_paged_attention_gathered
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.quantized_kv import QuantizedKV
from jaxradix.pallas_kernels.triton import ragged_paged_attention as triton

pytestmark = pytest.mark.filterwarnings("ignore:.*Triton backend is deprecated:DeprecationWarning")

CONTROL_FLOW = re.compile(r"stablehlo\.(while|case|if)\b")
def abstract_gpu(kind: str, cores: int = 108) -> jax.sharding.AbstractMesh:
    """A one-device mesh of a GPU this machine does not have: Pallas-Triton lowers for its compute capability."""
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=cores, platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


A100 = abstract_gpu("NVIDIA A100-SXM4-80GB")

# Small kv blocks so the cases cross several of them; `splits` forces FlashDecoding splits (3 leaves some
# empty at short contexts).
interpreted = jax.jit(
    functools.partial(triton.ragged_paged_attention, interpret=True, decode_block_tokens=32, extend_block_tokens=32),
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "splits", "extend_rows"),
)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_triton_kernel_f32(case_name):
    check(case_name, jnp.float32, interpreted)


@pytest.mark.parametrize(
    "case_name, splits, extend_rows",
    [
        ("decode", 3, 64),
        ("mixed", 2, 16),
        ("gqa8", 4, 64),
        ("page64", 1, 32),
        ("page1", 3, 64),
        ("window_cap", 2, 16),
        ("cascade", 3, 64),
    ],
)
def test_triton_kernel_bf16(case_name, splits, extend_rows):
    check(case_name, jnp.bfloat16, interpreted, splits=splits, extend_rows=extend_rows)


def test_decode_splits_fill_the_gpu():
    assert kv_splits(tiles=1, kv_heads=8, max_blocks=64, cores=108) == 16  # capped
    assert kv_splits(tiles=8, kv_heads=8, max_blocks=64, cores=108) == 4
    assert kv_splits(tiles=64, kv_heads=8, max_blocks=64, cores=108) == 1
    assert kv_splits(tiles=1, kv_heads=8, max_blocks=2, cores=108) == 2  # no split without a block


@pytest.mark.parametrize("case_name, kv_dtype, q_dtype, splits", [
    ("decode", "int8", jnp.bfloat16, 2),
    ("mixed", "fp8_e4m3", jnp.bfloat16, None),  # decode and extend rows
    ("page64", "fp8_e5m2", jnp.float32, None),  # window, soft cap
    ("extend", "int8", jnp.float32, None),
])
def test_triton_kernel_on_quantized_pages(case_name, kv_dtype, q_dtype, splits):
    """Quantized pools (1-byte values, bf16 scales; unowned pages' scales NaN) dequantized in the kernel
    into the query's dtype, against the reference on the dequantized pool."""
    check_quantized(case_name, kv_dtype, interpreted, q_dtype=q_dtype, splits=splits)


def test_triton_kernel_rejects_what_it_cannot_take():
    q, poisoned, clean, md = make_batch(CASES["decode"], jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="head dim 48"):
        triton.ragged_paged_attention(q[..., :48], poisoned[..., :48], md, sm_scale=1.0, interpret=True)


def _lower_for_a100(fn, *args) -> str:
    with jax.sharding.use_abstract_mesh(A100):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "T, S, G, D, dtype, window, cap",
    [
        (48, 16, 4, 128, jnp.bfloat16, None, None),  # Llama-3-8B shapes, a mixed bucket
        (8, 16, 4, 128, jnp.bfloat16, 100, 30.0),  # a decode bucket with a window and a soft cap
        (64, 16, 3, 64, jnp.float32, None, None),  # SmolLM2's shapes
        (64, 1, 2, 64, jnp.float16, None, None),  # page size 1
        (64, 64, 8, 128, jnp.bfloat16, None, None),
    ],
)
def test_triton_kernel_lowers_for_an_a100_without_control_flow(T, S, G, D, dtype, window, cap):
    """The kernel lowers to Triton IR for sm_80 on CPU (pow2 tiles, dot sizes, supported primitives), and
    the XLA program around it has no while loop or conditional: its loops run inside the kernel."""
    SDS, i32, B, MP, KH = jax.ShapeDtypeStruct, jnp.int32, 8, 16, 2
    q, pool = SDS((T, KH * G, D), dtype), SDS((B * MP + 1, S, 2 * KH, D), dtype)
    md = AttentionMetadata(SDS((B + 1,), i32), SDS((B,), i32), SDS((B, MP), i32), SDS((1,), i32))
    text = _lower_for_a100(
        functools.partial(triton.ragged_paged_attention, sm_scale=0.1, sliding_window=window, soft_cap=cap), q, pool, md
    )
    assert text.count("xla.gpu.triton") == 2  # the decode and the extend launch
    assert not CONTROL_FLOW.search(text)


@pytest.fixture
def on_an_a100(monkeypatch):
    """Dispatch as on an sm_80 GPU (the device is still this CPU: only what is traced can be checked)."""
    monkeypatch.setattr(kernels, "_compute_capability", lambda: 8.0)
    monkeypatch.setattr(kernels, "_warned", set())


def _auto_on_gpu():
    return kernels._gpu_kernel(False, fallback=kernels._triton_kernel(False, fallback=kernels._gathered("gpu")))


def test_auto_on_an_a100_takes_the_triton_kernel(on_an_a100, caplog):
    q, poisoned, _, md = make_batch(CASES["mixed"], jnp.bfloat16)
    with caplog.at_level(logging.WARNING):
        text = _lower_for_a100(functools.partial(_auto_on_gpu(), sm_scale=0.125), q, poisoned, md)
    assert "xla.gpu.triton" in text and not CONTROL_FLOW.search(text)
    assert "sm_90" in caplog.text and "Triton" in caplog.text


def test_auto_on_an_a100_reads_int8_pages_in_the_kernel_and_sends_fp8_to_the_gathered_path(on_an_a100, caplog):
    """Triton converts fp8 on sm_89+ only: an fp8 pool on an A100 takes the gathered path (with a log
    line); an int8 one stays in the kernel, and so does fp8 on an sm_89 GPU (an L4)."""
    q, _, clean, md = quantized_batch("decode", "int8", jnp.bfloat16)
    text = _lower_for_a100(functools.partial(_auto_on_gpu(), sm_scale=0.125), q, clean, md)
    assert "xla.gpu.triton" in text and not CONTROL_FLOW.search(text)
    q, _, clean, md = quantized_batch("decode", "fp8_e4m3", jnp.bfloat16)
    with caplog.at_level(logging.WARNING):
        got = _auto_on_gpu()(q, clean, md, sm_scale=0.125)
    want = kernels._gathered("gpu")(q, clean, md, sm_scale=0.125)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert "fp8 pool needs compute capability >= 8.9" in caplog.text and "gathered" in caplog.text


def test_fp8_pages_lower_for_an_l4(monkeypatch):
    monkeypatch.setattr(kernels, "_compute_capability", lambda: 8.9)
    q, _, clean, md = quantized_batch("mixed", "fp8_e4m3", jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(abstract_gpu("NVIDIA L4", cores=58)):
        fn = functools.partial(_auto_on_gpu(), sm_scale=0.125)
        text = jax.jit(fn).trace(q, clean, md).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and not CONTROL_FLOW.search(text)


def test_auto_below_sm80_takes_the_gathered_path(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_compute_capability", lambda: 7.5)  # a T4
    monkeypatch.setattr(kernels, "_warned", set())
    with caplog.at_level(logging.WARNING):
        check("mixed", jnp.float32, _auto_on_gpu())
    assert "compute capability >= 8.0, got 7.5" in caplog.text


def test_triton_backend_by_name_runs_interpreted_on_cpu():
    check("mixed", jnp.float32, kernels.get_attention("triton"))
    check("decode", jnp.bfloat16, kernels.get_attention("pallas", interpret="triton"))


# The whole step of an sm_80 GPU: the model's forward with this kernel, lowered for CUDA.
CFG = dict(
    model_type="llama",
    vocab_size=256,
    hidden_size=256,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _runner(attention) -> ModelRunner:
    model = random_model(ModelConfig.from_hf(CFG), dtype=jnp.bfloat16)
    pool = PagePool(model.cfg, 256, 16, jnp.bfloat16)
    return ModelRunner(
        model, pool, Buckets(8, 32, min_rows=8), 16, 8, 256, attention, sampler="split", sampler_warmup=False
    )


def test_a100_step_has_no_control_flow_where_the_gathered_one_has(on_an_a100, monkeypatch):
    """The GPU step with the Triton kernel has no XLA control flow (decode and mixed buckets); the same
    step on the gathered path (the choice on sm_80 GPUs before this kernel) has while loops, each a
    host wait per iteration on a GPU."""
    runner = _runner(kernels._triton_kernel(False, fallback=None))
    monkeypatch.setattr(runner, "_put", lambda tree: tree)  # no eager device_put under the abstract mesh
    for bucket in (Bucket(8, 8), Bucket(32, 8)):
        with jax.sharding.use_abstract_mesh(A100):
            text = runner.lower(bucket, lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text
        assert not CONTROL_FLOW.search(text), (bucket, CONTROL_FLOW.search(text).group())
    gathered = _runner(ragged_paged_attention_gathered).lower(Bucket(8, 8), lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.while" in gathered


# -- compiled by Triton itself for sm_80 / sm_89, without a GPU ----------------------------------------
# The Triton IR the kernel lowers to, handed to upstream Triton (the test extra's wheel) in a subprocess
# (two LLVMs in one process clash): it must compile to a cubin with ptxas for the target, fit the ~99 KB of
# shared memory of an A10/L4 (sm_86/89; an A100 has 163 KB) and spill no registers. Upstream Triton is
# not the one inside XLA, so this catches what the IR asks of any Triton, not a version's quirks.
_COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
out = []
for path, cc, warps, stages in json.loads(sys.argv[1]):
    k = triton.compile(path, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = path + ".ptx"
    open(ptx, "w").write(k.asm["ptx"])
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"  # Triton's Hopper PTX uses wgmma (sm_90a)
    log = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", ptx, "-o", os.devnull], capture_output=True,
                         text=True, check=True).stderr
    spill = re.search(r"(\d+) bytes spill stores", log)
    out.append(dict(smem=k.metadata.shared, spill=int(spill.group(1)) if spill else -1))
print(json.dumps(out))
"""
SMEM_SM86 = 99 * 1024


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs upstream triton (the test extra)")
@pytest.mark.parametrize("T, B, MP, S, KH, G, D, dtype, kv_dtype, device, cc", [
    (256, 64, 32, 16, 8, 4, 128, jnp.bfloat16, None, "NVIDIA A100-SXM4-80GB", 80),  # Llama-3-8B, page 16
    (256, 64, 16, 64, 4, 8, 128, jnp.bfloat16, None, "NVIDIA A100-SXM4-80GB", 80),  # GQA 8, page 64
    (64, 8, 512, 1, 8, 4, 128, jnp.float16, None, "NVIDIA A100-SXM4-80GB", 80),  # page size 1
    (64, 8, 16, 16, 3, 3, 64, jnp.float32, None, "NVIDIA A100-SXM4-80GB", 80),  # SmolLM2, f32 pool
    (256, 64, 16, 64, 8, 4, 128, jnp.bfloat16, jnp.int8, "NVIDIA A100-SXM4-80GB", 80),
    (256, 64, 16, 16, 8, 4, 128, jnp.bfloat16, jnp.float8_e4m3fn, "NVIDIA L4", 89),
    (64, 8, 512, 1, 8, 4, 128, jnp.bfloat16, None, "NVIDIA H100 80GB HBM3", 90),  # Hopper's page size 1
    (256, 16, 16, 16, 4, 2, 256, jnp.bfloat16, None, "NVIDIA A10", 86),  # head dim 256 (Gemma), 99 KB
    (64, 8, 16, 16, 2, 4, 256, jnp.float32, None, "NVIDIA A10", 86),
])
def test_triton_compiles_the_kernel_for_the_gpu(tmp_path, monkeypatch, T, B, MP, S, KH, G, D, dtype, kv_dtype,
                                                device, cc):
    from jax._src.pallas.triton import pallas_call_registration

    lowering = pallas_call_registration.lowering
    modules, real = [], lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = real(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", capture)
    SDS, i32, P = jax.ShapeDtypeStruct, jnp.int32, B * MP + 1
    pool = SDS((P, S, 2 * KH, D), dtype) if kv_dtype is None else QuantizedKV(
        SDS((P, S, 2 * KH, D), kv_dtype), SDS((P, S, 2 * KH), jnp.bfloat16))
    md = AttentionMetadata(SDS((B + 1,), i32), SDS((B,), i32), SDS((B, MP), i32), SDS((1,), i32))
    with jax.sharding.use_abstract_mesh(abstract_gpu(device)):
        text = jax.jit(functools.partial(triton.ragged_paged_attention, sm_scale=0.1)).trace(
            SDS((T, KH * G, D), dtype), pool, md).lower(lowering_platforms=("cuda",)).as_text()
    params = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
    assert len(modules) == len(params) == 2  # decode, extend
    jobs = []
    for i, (module, (stages, warps)) in enumerate(zip(modules, params, strict=True)):
        path = tmp_path / f"kernel{i}.ttir"
        path.write_text(module)
        jobs.append((str(path), cc, int(warps), int(stages)))
    done = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for launch, stats in zip(("decode", "extend"), json.loads(done.stdout.splitlines()[-1]), strict=True):
        assert 0 < stats["smem"] <= SMEM_SM86, (launch, stats)
        assert stats["spill"] == 0, (launch, stats)


PROBE = dict(heads=9, kv_heads=3, head_dim=64, q_dtype=jnp.float32, kv_dtype=jnp.float32, page_size=16)


def test_probe_serves_on_the_gathered_path_when_the_kernel_does_not_compile(on_an_a100, caplog):
    """The engine's start-up probe (`auto` on a GPU): a kernel that fails to compile on this machine (here the
    Triton kernel, whose GPU lowering cannot run on a CPU) is replaced by the gathered path, with a log line."""
    attention = kernels._triton_kernel(False, fallback=None)
    with caplog.at_level(logging.WARNING):
        probed = kernels.probe(attention, **PROBE, platform="gpu")
    assert probed is not attention and probed.label == "the gathered attention"
    assert "does not compile on this GPU" in caplog.text
    check("mixed", jnp.float32, probed)


def test_probe_keeps_a_kernel_that_compiles():
    gathered = kernels._gathered("gpu")
    assert kernels.probe(gathered, **PROBE, platform="gpu") is gathered  # compiled, kept
    quantized = PROBE | dict(kv_dtype=jnp.dtype(jnp.int8), q_dtype=jnp.bfloat16)
    assert kernels.probe(gathered, **quantized, platform="gpu") is gathered
    triton_kernel = kernels._triton_kernel(False, fallback=None)
    assert kernels.probe(triton_kernel, **PROBE, platform="cpu") is triton_kernel  # no probe off a GPU
