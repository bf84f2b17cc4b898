"""Test helpers: run a model over one sequence through the paged pool, in chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxradix.models.llama import LlamaForCausalLM
from jaxradix.models.model_config import ModelConfig
from jaxradix.pallas_kernels.metadata import AttentionMetadata
from jaxradix.pallas_kernels.reference import ragged_paged_attention, ragged_paged_attention_blocked


def random_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.float32) -> LlamaForCausalLM:
    from jaxradix.models.llama import param_shapes

    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if "norm" in name:
            params[name] = jnp.asarray(1 + 0.1 * rng.standard_normal(shape), dtype)
        else:
            params[name] = jnp.asarray(0.1 * rng.standard_normal(shape), dtype)
    return LlamaForCausalLM(cfg, params)


def paged_logits(model: LlamaForCausalLM, tokens: list[int], chunks: list[int], page_size: int,
                 attention_fn=ragged_paged_attention, greedy_new: int = 0) -> np.ndarray:
    """Logits at every position, computing the sequence chunk by chunk through a paged pool.
    Pages are handed out in a shuffled order so a wrong page lookup shows. With greedy_new > 0,
    then decodes that many greedy tokens one at a time and returns them instead."""
    cfg = model.cfg
    tokens = list(tokens)
    n = len(tokens) + greedy_new
    assert sum(chunks) == len(tokens)
    num_pages = n // page_size + 3
    rng = np.random.default_rng(1)
    pages = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    kv = tuple(jnp.zeros((num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim), model.dtype)
               for _ in range(cfg.num_layers))  # L x [P, S, 2*KH, D]

    @jax.jit
    def run(kv, ids, pos, slots, md):
        hidden, kv = model(ids, pos, slots, kv, md, attention_fn)
        return model.logits(hidden), kv

    out, start = [], 0
    for c in chunks:
        pos = np.arange(start, start + c, dtype=np.int32)
        slots = pages[pos // page_size] * page_size + pos % page_size
        md = AttentionMetadata(cu_q_lens=np.array([0, c], np.int32), kv_lens=np.array([start + c], np.int32),
                               page_table=pages[None, :], num_seqs=np.array([1], np.int32))
        logits, kv = run(kv, np.asarray(tokens[start:start + c], np.int32), pos, slots, md)
        out.append(np.asarray(logits))
        start += c
    if greedy_new:
        new = []
        for _ in range(greedy_new):
            new.append(int(out[-1][-1].argmax()))
            tokens.append(new[-1])
            pos = np.array([start], np.int32)
            md = AttentionMetadata(cu_q_lens=np.array([0, 1], np.int32), kv_lens=np.array([start + 1], np.int32),
                                   page_table=pages[None, :], num_seqs=np.array([1], np.int32))
            logits, kv = run(kv, np.asarray(new[-1:], np.int32), pos,
                             pages[pos // page_size] * page_size + pos % page_size, md)
            out.append(np.asarray(logits))
            start += 1
        return np.array(new)
    return np.concatenate(out)


def forward_fn(graphdef, tp=None):
    """A jitted (params, kv, ids, pos, slots, md) -> (logits, kv) of an nnx-split model: whole, or per
    shard under tensor parallelism (tp: a parallel.TensorParallel)."""
    from flax import nnx

    @jax.jit
    def run(params, kv, ids, pos, slots, md):
        if tp is None:
            m = nnx.merge(graphdef, params)
            hidden, kv = m(ids, pos, slots, kv, md, ragged_paged_attention_blocked)
            return m.logits(hidden), kv
        hidden, kv = tp.forward(graphdef, params, kv, ids, pos, slots, md, ragged_paged_attention_blocked)
        return tp.logits(graphdef, params, hidden), kv

    return run
