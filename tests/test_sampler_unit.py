"""Unit tests of the on-device sampler against numpy references: each filter (top-k, top-p, min-p),
penalties and logit bias, the grammar mask, logprobs and the per-slot state update."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxradix.engine.sampler import SamplerState, SamplingMetadata, init_slot, sample

V = 32  # >= MAX_TOP_LOGPROBS; one mask word
N = 2048  # rows of one batch used as independent draws


def metadata(B: int, **fields) -> SamplingMetadata:
    f = dict(temperature=np.zeros(B, np.float32), top_p=np.ones(B, np.float32), top_k=np.zeros(B, np.int32),
             min_p=np.zeros(B, np.float32), frequency_penalty=np.zeros(B, np.float32),
             presence_penalty=np.zeros(B, np.float32), repetition_penalty=np.ones(B, np.float32),
             seed=np.arange(B, dtype=np.uint32), step=np.zeros(B, np.int32), slot=np.zeros(B, np.int32),
             use_state=np.zeros(B, bool), keep=np.ones(B, bool),
             grammar_mask=np.full((B, 1), 0xFFFFFFFF, np.uint32))
    for k, v in fields.items():
        f[k] = np.broadcast_to(np.asarray(v, f[k].dtype), f[k].shape).copy()
    needs_filter = bool(((f["top_k"] > 0) | (f["top_p"] < 1) | (f["min_p"] > 0)).any())
    return SamplingMetadata(**f, needs_filter=np.array(needs_filter), needs_top_logprobs=np.array(True),
                            needs_state=np.array(bool(f["use_state"].any())))


run = jax.jit(sample)


def logits_row(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, V).astype(np.float32)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def support_top_k(x: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-x)[:k].tolist())


def support_top_p(x: np.ndarray, p: float) -> set[int]:
    order = np.argsort(-x)
    probs = np_softmax(x)[order]
    before = np.cumsum(probs) - probs
    return set(order[before < p].tolist())


def support_min_p(x: np.ndarray, min_p: float) -> set[int]:
    probs = np_softmax(x)
    return set(np.nonzero(probs >= min_p * probs.max())[0].tolist())


def draws(x: np.ndarray, temperature: float = 1.0, **fields) -> np.ndarray:
    logits = np.tile(x, (N, 1))
    out, _ = run(logits, metadata(N, temperature=temperature, **fields), SamplerState.zeros(1, V))
    return np.asarray(out.tokens)


@pytest.mark.parametrize("name, fields, support", [
    ("top_k", {"top_k": 3}, lambda x: support_top_k(x, 3)),
    ("top_p", {"top_p": 0.6}, lambda x: support_top_p(x, 0.6)),
    ("min_p", {"min_p": 0.05}, lambda x: support_min_p(x, 0.05)),
])
def test_each_filter_samples_exactly_the_numpy_support(name, fields, support):
    x = logits_row(1)
    want = support(x)
    assert 1 < len(want) < V, f"{name}: the test logits must make the filter matter"
    got = draws(x, **fields)
    assert set(got.tolist()) == want
    # and in proportion to the renormalized probabilities
    p = np_softmax(x)[sorted(want)]
    p /= p.sum()
    freq = np.array([(got == t).mean() for t in sorted(want)])
    np.testing.assert_allclose(freq, p, atol=0.05)


def test_filters_combine_as_the_tightest_cut():
    x = logits_row(2)
    want = support_top_k(x, 4) & support_top_p(x, 0.7) & support_min_p(x, 0.05)
    assert set(draws(x, top_k=4, top_p=0.7, min_p=0.05).tolist()) == want


def test_temperature_sharpens_and_flattens():
    x = logits_row(3)
    top = int(np.argmax(x))
    cold, hot = (draws(x, temperature=t) for t in (0.2, 2.0))
    assert (cold == top).mean() > (draws(x) == top).mean() > (hot == top).mean()
    np.testing.assert_allclose((hot == top).mean(), np_softmax(x / 2.0)[top], atol=0.04)


def test_greedy_rows_take_the_argmax_and_logprobs_are_raw():
    x = np.random.default_rng(4).normal(0, 2, (4, V)).astype(np.float32)
    out, _ = run(x, metadata(4), SamplerState.zeros(4, V))
    np.testing.assert_array_equal(out.tokens, x.argmax(-1))
    ref = x - np.log(np.exp(x).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs, ref[np.arange(4), x.argmax(-1)], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.top_ids)[:, 0], x.argmax(-1))
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[:, :3], -np.sort(-ref, -1)[:, :3], atol=1e-5)


def np_penalized(x: np.ndarray, counts: np.ndarray, seen: np.ndarray, bias: np.ndarray, rep: float,
                 freq: float, pres: float) -> np.ndarray:
    y = x + bias
    y = np.where(seen, np.where(y > 0, y / rep, y * rep), y)
    return y - freq * counts - pres * (counts > 0)


@pytest.mark.parametrize("rep, freq, pres", [(1.8, 0, 0), (1, 1.5, 0), (1, 0, 1.5), (1.3, 0.7, 0.4), (1, -1.5, 0)])
def test_penalties_and_bias_match_numpy(rep, freq, pres):
    rng = np.random.default_rng(5)
    R = 4
    x = rng.normal(0, 2, (R, V)).astype(np.float32)
    prompt = np.full(8, -1, np.int32)
    state = SamplerState.zeros(R, V)
    counts_np, seen_np, bias_np = np.zeros((R, V)), np.zeros((R, V), bool), np.zeros((R, V), np.float32)
    for r in range(R):  # each slot has seen its two best tokens (prompt / output), plus one bias
        best = np.argsort(-x[r])[:2]
        prompt[:1] = best[0]
        out_ids = np.array([best[1], best[1], -1, -1], np.int32)
        bias_id = int(np.argsort(-x[r])[5])
        state = init_slot(state, r, jnp.asarray(prompt), jnp.asarray(out_ids), jnp.asarray([bias_id, -1]),
                          jnp.asarray([3.0, 0.0], jnp.float32))
        counts_np[r, best[1]] = 2
        seen_np[r, best] = True
        bias_np[r, bias_id] = 3.0
    md = metadata(R, slot=np.arange(R), use_state=True, repetition_penalty=rep, frequency_penalty=freq,
                  presence_penalty=pres)
    out, new = run(x, md, state)
    want = np_penalized(x, counts_np, seen_np, bias_np, rep, freq, pres).argmax(-1)
    np.testing.assert_array_equal(out.tokens, want)
    if freq > 0 or pres > 0 or rep > 1:
        assert (want != x.argmax(-1)).any(), "the penalty must change some choice for the test to bite"
    # the sampled token is counted in its slot and kept as the slot's last token (the next input)
    np.testing.assert_array_equal(np.asarray(new.last), want)
    c = np.asarray(new.counts)
    np.testing.assert_array_equal(c[np.arange(R), want], counts_np[np.arange(R), want] + 1)
    # rows without use_state ignore the state entirely
    out2, new2 = run(x, metadata(R, slot=np.arange(R), repetition_penalty=rep, frequency_penalty=freq,
                                 presence_penalty=pres), state)
    np.testing.assert_array_equal(out2.tokens, x.argmax(-1))
    np.testing.assert_array_equal(np.asarray(new2.counts), np.asarray(state.counts))


def test_grammar_mask_allows_only_its_bits():
    x = logits_row(6)
    allowed = [1, 7, 12]
    word = np.uint32(sum(1 << t for t in allowed))
    got = draws(x, grammar_mask=word)
    assert set(got.tolist()) == set(allowed)
    out, _ = run(np.tile(x, (4, 1)), metadata(4, grammar_mask=word), SamplerState.zeros(4, V))
    assert int(out.tokens[0]) == allowed[int(np.argmax(x[allowed]))]


def test_a_draw_depends_only_on_seed_and_step():
    x = np.tile(logits_row(7), (4, 1))  # one batch shape for every small case: one compile
    a, _ = run(x, metadata(4, temperature=1.0, seed=[5, 5, 6, 7], step=[2, 2, 2, 2]), SamplerState.zeros(4, V))
    assert int(a.tokens[0]) == int(a.tokens[1])
    b, _ = run(x, metadata(4, temperature=1.0, seed=[9, 5, 9, 9], step=[0, 2, 0, 0]), SamplerState.zeros(4, V))
    assert int(b.tokens[1]) == int(a.tokens[0])


@pytest.mark.parametrize("case", ["greedy", "draw", "filters", "penalties"])
def test_a_plan_samples_exactly_what_the_conditionals_sample(case):
    """The split sampler (static SamplerPlan, no lax.cond) against the fused one on the same rows."""
    from jaxradix.engine.sampler import SamplerPlan

    R = 8
    rng = np.random.default_rng(11)
    x = rng.normal(0, 2, (R, V)).astype(np.float32)
    state = SamplerState.zeros(R, V)
    fields = dict(slot=np.arange(R), seed=np.arange(R) + 3, step=np.arange(R))
    if case != "greedy":
        fields["temperature"] = [0, 0.7, 1.0, 1.3, 0.9, 1.0, 0, 1.0]
    if case in ("filters", "penalties"):
        fields |= dict(top_k=[0, 3, 0, 0, 5, 0, 2, 0], top_p=[1, 1, 0.6, 1, 0.8, 1, 0.5, 1],
                       min_p=[0, 0, 0, 0.1, 0, 0, 0, 0])
    if case == "penalties":
        for r in range(R):
            state = init_slot(state, r, jnp.asarray([int(x[r].argmax())] + [-1] * 3, jnp.int32),
                              jnp.asarray([int(np.argsort(-x[r])[1])] * 2 + [-1] * 2, jnp.int32),
                              jnp.asarray([4, -1]), jnp.asarray([2.0, 0.0], jnp.float32))
        fields |= dict(use_state=[1, 1, 0, 1, 1, 0, 1, 0], repetition_penalty=1.5, frequency_penalty=0.5)
    md = metadata(R, **fields)
    plan = SamplerPlan.of(md)
    assert plan.draw == (case != "greedy") and plan.filters == (case in ("filters", "penalties"))
    assert plan.penalties == (case == "penalties") and plan.top_logprobs
    fused_out, fused_state = run(x, md, state)
    split_out, split_state = jax.jit(sample, static_argnums=3)(x, md, state, plan)
    for a, b in zip(jax.tree.leaves((fused_out, fused_state)), jax.tree.leaves((split_out, split_state)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if case == "penalties":  # the plan's penalties change the choice: a plan without them would differ
        no_pen, _ = jax.jit(sample, static_argnums=3)(x, md, state, dataclasses.replace(plan, penalties=False))
        assert (np.asarray(no_pen.tokens) != np.asarray(split_out.tokens)).any()
