"""The GPU step has no data-dependent control flow: XLA's GPU runtime runs a conditional by copying its
predicate to the host and blocking until the stream reaches it (and a while loop with an unknown trip
count does the same every iteration), which stalls the dispatching thread inside every step and so
serialises host and device. The split sampler (sampler_mode="split", the default on a GPU) decides on the
host what to run; these tests lower the whole GPU step for CUDA on CPU, Mosaic GPU kernel included, and
read its StableHLO."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import random_model

from jaxradix.cache.page_pool import PagePool
from jaxradix.engine.batch import Bucket, Buckets
from jaxradix.engine.model_runner import ModelRunner, all_plans
from jaxradix.engine.sampler import SamplerPlan, SamplingMetadata
from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels.gpu import ragged_paged_attention as gpu_kernel

# Mosaic GPU kernel shapes: head dim 64, 2 query heads per kv head, bf16 pool, page 16
CFG = dict(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
           max_position_embeddings=256, tie_word_embeddings=False)
CONTROL_FLOW = re.compile(r"stablehlo\.(while|case|if)\b")


@pytest.fixture(scope="module")
def model():
    return random_model(ModelConfig.from_hf(CFG), dtype=jnp.bfloat16)


def _runner(model, sampler: str) -> ModelRunner:
    pool = PagePool(model.cfg, 256, 16, jnp.bfloat16)
    return ModelRunner(model, pool, Buckets(8, 32, min_rows=8), 16, 8, 256, gpu_kernel.ragged_paged_attention,
                       sampler=sampler, sampler_warmup=False)


def _cuda_text(lowered) -> str:
    text = lowered.as_text()
    assert "mosaic_gpu" in text  # the real kernel, not a fallback
    return text


def test_split_gpu_step_has_no_control_flow(model):
    runner = _runner(model, "split")
    assert runner.split
    for bucket in (Bucket(8, 8), Bucket(32, 8)):  # decode, mixed
        for lp in (False, True):
            text = _cuda_text(runner.lower(bucket, lp, lowering_platforms=("cuda",)))
            assert not CONTROL_FLOW.search(text), (bucket, lp, CONTROL_FLOW.search(text).group())
    for plan in all_plans():
        text = runner.lower_sampler(8, plan, lowering_platforms=("cuda",)).as_text()
        assert not CONTROL_FLOW.search(text), plan


def test_fused_step_has_the_conditionals_the_split_one_removes(model):
    """Control: the detector sees the fused sampler's lax.conds."""
    text = _cuda_text(_runner(model, "fused").lower(Bucket(8, 8), lowering_platforms=("cuda",)))
    assert CONTROL_FLOW.search(text)


def test_all_plans_are_distinct_and_round_trip():
    plans = all_plans()
    assert len(plans) == len(set(plans)) == 36
    assert plans[0] == SamplerPlan() and plans[-1] == SamplerPlan(*[True] * 6)
    for p in plans:
        assert SamplerPlan.from_bits(p.bits()) == p
        assert p.draw or not p.filters


def _md(**rows) -> SamplingMetadata:
    B = 4
    f = dict(temperature=np.zeros(B, np.float32), top_p=np.ones(B, np.float32), top_k=np.zeros(B, np.int32),
             min_p=np.zeros(B, np.float32))
    for k, v in rows.items():
        f[k] = np.asarray(v, f[k].dtype)
    z = np.zeros(B, np.float32)
    return SamplingMetadata(**f, frequency_penalty=z, presence_penalty=z, repetition_penalty=z + 1,
                            seed=np.zeros(B, np.uint32), step=np.zeros(B, np.int32), slot=np.zeros(B, np.int32),
                            use_state=np.zeros(B, bool), keep=np.ones(B, bool),
                            grammar_mask=np.zeros((B, 1), np.uint32), needs_filter=np.array(False),
                            needs_top_logprobs=np.array(False), needs_state=np.array(False))


def test_plan_of_a_step_asks_for_what_its_rows_use():
    assert SamplerPlan.of(_md()) == SamplerPlan()
    assert SamplerPlan.of(_md(temperature=[0, 1, 0, 0])) == SamplerPlan(draw=True)
    # a greedy row's filters are ignored (the sampler takes its argmax)
    assert SamplerPlan.of(_md(top_p=[0.5, 1, 1, 1], top_k=[5, 0, 0, 0])) == SamplerPlan()
    assert SamplerPlan.of(_md(temperature=[0, 1, 1, 0], top_p=[0.5, 1, 0.9, 1], min_p=[0, 0, 0.1, 0])) == \
        SamplerPlan(draw=True, top_p=True, min_p=True)
    assert SamplerPlan.of(_md(temperature=[1, 0, 0, 0], top_k=[3, 0, 0, 0])) == SamplerPlan(draw=True, top_k=True)


def test_warmup_thread_compiles_every_plan_once(model):
    from jaxradix.pallas_kernels.reference import ragged_paged_attention_blocked

    pool = PagePool(model.cfg, 256, 16, jnp.bfloat16)
    runner = ModelRunner(model, pool, Buckets(8, 32, min_rows=8), 16, 8, 256, ragged_paged_attention_blocked,
                         sampler="split", sampler_warmup=True)
    runner.precompile(progress=False)
    assert runner.wait_warm(timeout=600)
    rows = {b.rows for b in runner.buckets.all()}
    assert set(runner._samplers) == {(r, p) for r in rows for p in all_plans()}
    assert runner.num_compiles == len(runner._compiled) + len(runner._samplers) + 1
    runner.stop_warmup()  # after the end: a no-op
