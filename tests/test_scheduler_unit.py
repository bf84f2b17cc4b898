"""Unit tests of the scheduler (admission, chunking, retraction, policy order) and of build_step,
host only: a tiny page pool and radix tree, no model."""

from __future__ import annotations

import numpy as np
import pytest

from jaxradix.cache.page_pool import PagePool
from jaxradix.cache.radix_cache import RadixCache
from jaxradix.engine.batch import Bucket, Buckets, Row, build_step, free_grammar_mask
from jaxradix.engine.engine import decode_min_rows
from jaxradix.engine.request import LogprobOptions, Request, SamplingParams
from jaxradix.engine.scheduler import Scheduler
from jaxradix.models.model_config import ModelConfig

TINY = ModelConfig(model_type="llama", vocab_size=64, hidden_size=8, intermediate_size=8, num_layers=1,
                   num_heads=1, num_kv_heads=1, head_dim=2)
S = 4


def make(policy: str = "fcfs", pages: int = 64, slots: int = 4, chunk: int = 16, ratio: float = 0.0) -> Scheduler:
    pool = PagePool(TINY, pages * S, S, np.float32)
    tree = RadixCache(page_size=S, free_slots=pool.free_slots)
    return Scheduler(pool, tree, num_slots=slots, context_len=256, chunk_size=chunk, policy=policy,
                     new_token_ratio=ratio, min_new_token_ratio=ratio)


def req(rid: str, prompt: list[int], max_new: int = 8) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new))


def step(s: Scheduler, token: int = 1):
    """One scheduled step as the engine runs it: compute the rows, append a token to sampling rows."""
    res = s.schedule()
    s.after_step(res.rows)
    for row in res.rows:
        if row.samples:
            row.req.output_ids.append(token)
    return res


def finish(s: Scheduler, r: Request) -> None:
    s.release(r)


def test_admission_respects_slots_and_the_token_budget():
    s = make(slots=2, chunk=16)
    a, b, c = req("a", range(1, 11)), req("b", range(11, 21)), req("c", range(21, 31))
    for r in (a, b, c):
        s.add(r)
    res = step(s)
    assert [(row.req.rid, row.start, row.n, row.samples) for row in res.rows] == [
        ("a", 0, 10, True), ("b", 0, 6, False)]  # b gets what is left of the 16-token budget
    assert [r.rid for r in s.waiting] == ["c"] and res.new_seqs == 2 and res.new_tokens == 16
    res = step(s)  # a decodes; b's next chunk; no slot for c
    assert [(row.req.rid, row.start, row.n) for row in res.rows] == [("a", 10, 1), ("b", 6, 4)]
    assert [r.rid for r in s.waiting] == ["c"]
    finish(s, a)
    res = step(s)
    assert "c" in [row.req.rid for row in res.rows] and not s.waiting
    for r in list(s.running):
        finish(s, r)
    s.check_integrity()


def test_chunked_prefill_advances_kv_len_and_samples_only_at_the_end():
    s = make(chunk=16)
    r = req("long", range(1, 41))
    s.add(r)
    seen = []
    for _ in range(3):
        res = step(s)
        (row,) = res.rows
        seen.append((row.start, row.n, row.samples))
        assert r.kv_len == row.start + row.n
    assert seen == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert r.output_ids == [1]
    # finished chunks were shared: a second request with the same prompt matches the whole pages
    assert len(s.tree.match_prefix(list(range(1, 41)), touch=False).slots) == 40
    finish(s, r)
    s.check_integrity()


def test_retraction_takes_the_last_admitted_and_requeues_it_first():
    s = make(pages=6, chunk=64, slots=4)  # 6 pages of 4 tokens
    rs = [req(f"r{i}", range(10 * i + 1, 10 * i + 8), max_new=30) for i in range(3)]  # 7 tokens: 2 pages each
    for r in rs:
        s.add(r)
    step(s)
    assert len(s.running) == 3 and s.kv.pool.num_free == 0
    res = step(s)  # each decode needs position 7 (still page 2) -> fits
    assert not res.retracted
    res = step(s)  # position 8 needs a third page each: the pool is full -> retract
    assert res.retracted and res.retracted[0].rid == "r2"  # the last admitted goes first
    assert s.waiting[0].rid == "r2" and rs[2].num_retractions == 1 and rs[2].slot == -1
    assert "r2" not in [row.req.rid for row in res.rows]
    for r in list(s.running):
        finish(s, r)
    s.check_integrity()


def seed_tree(s: Scheduler, prompt: list[int]) -> None:
    r = req(f"seed{prompt[0]}", prompt, max_new=1)
    s.add(r)
    while r.kv_len < len(prompt):
        step(s)
    finish(s, r)


@pytest.mark.parametrize("policy, expected", [
    ("fcfs", ["a", "b", "c"]),  # arrival order
    ("lpm", ["c", "a", "b"]),  # longest cached prefix first: c 16, a 12, b 8
    ("dfs-weight", ["b", "c", "a"]),  # the subtree with most waiting requests (b, c under P) first
])
def test_policies_change_the_admission_order(policy, expected):
    P, Q = list(range(1, 17)), list(range(100, 112))
    s = make(policy=policy, chunk=64)
    seed_tree(s, P)
    seed_tree(s, Q)
    a = req("a", Q + [7, 8, 9])
    b = req("b", P[:8] + list(range(30, 38)))
    c = req("c", P + [50, 51, 52])
    for r in (a, b, c):
        s.add(r)
    assert [r.rid for r in s._order()] == expected
    # with one slot, the policy picks who is served first
    s2 = make(policy=policy, chunk=64, slots=1)
    seed_tree(s2, P)
    seed_tree(s2, Q)
    order = []
    for r in (req("a", a.prompt_ids, 1), req("b", b.prompt_ids, 1), req("c", c.prompt_ids, 1)):
        s2.add(r)
    while s2.waiting or s2.running:
        res = step(s2)
        order += [row.req.rid for row in res.rows if row.new]
        for r in list(s2.running):
            if r.output_ids:
                finish(s2, r)
    assert order[0] == expected[0] and sorted(order) == ["a", "b", "c"]
    s2.check_integrity()


def test_build_step_matches_a_hand_built_batch():
    lp = LogprobOptions(return_logprob=True, logprob_start_len=0)
    dec = Request("dec", [5, 6, 7], SamplingParams(temperature=0.5, top_k=3, top_p=0.9, min_p=0.1, seed=9,
                                                   frequency_penalty=0.5, max_new_tokens=4), seed=9)
    dec.output_ids, dec.pages, dec.slot = [11], np.array([3], np.int32), 2
    ext = Request("ext", [1, 2, 3, 4, 5, 6], SamplingParams(temperature=0), lp, seed=1)
    ext.pages, ext.slot = np.array([5, 8], np.int32), 0
    rows = [Row(dec, 3, 1, samples=True), Row(ext, 2, 4, samples=True, prompt_logprobs=True)]
    inp = build_step(rows, Bucket(8, 4), S, max_pages=3, mask_words=2)
    np.testing.assert_array_equal(inp.input_ids, [11, 3, 4, 5, 6, 0, 0, 0])
    np.testing.assert_array_equal(inp.input_from_slot, [-1] * 8)
    np.testing.assert_array_equal(inp.positions, [3, 2, 3, 4, 5, 0, 0, 0])
    # slot = page * S + offset; padding writes page 0
    np.testing.assert_array_equal(inp.slot_mapping, [3 * 4 + 3, 5 * 4 + 2, 5 * 4 + 3, 8 * 4 + 0, 8 * 4 + 1, 0, 0, 0])
    np.testing.assert_array_equal(inp.attn.cu_q_lens, [0, 1, 5, 5, 5])
    np.testing.assert_array_equal(inp.attn.kv_lens, [4, 6, 0, 0])
    np.testing.assert_array_equal(inp.attn.page_table, [[3, 0, 0], [5, 8, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(inp.attn.num_seqs, [2])
    np.testing.assert_array_equal(inp.logits_indices, [0, 4, 0, 0])
    np.testing.assert_array_equal(inp.lp_targets, [-1, 4, 5, 6, -1, -1, -1, -1])
    sm = inp.sampling
    np.testing.assert_allclose(sm.temperature, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(sm.top_k, [3, 0, 0, 0])
    np.testing.assert_allclose(sm.top_p, [0.9, 1, 1, 1])
    np.testing.assert_allclose(sm.min_p, [0.1, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(sm.frequency_penalty, [0.5, 0, 0, 0])
    np.testing.assert_array_equal(sm.seed, [9, 1, 0, 0])
    np.testing.assert_array_equal(sm.step, [1, 0, 0, 0])
    np.testing.assert_array_equal(sm.slot, [2, 0, 0, 0])
    np.testing.assert_array_equal(sm.use_state, [True, False, False, False])
    np.testing.assert_array_equal(sm.keep, [True, True, False, False])
    assert bool(sm.needs_state)
    assert bool(sm.needs_filter) and not bool(sm.needs_top_logprobs)
    assert (sm.grammar_mask == 0xFFFFFFFF).all()
    # overlap: a token still on the device (pending) is read from the slot's last sampled token
    dec.pending, dec.pages = 1, np.array([3, 9], np.int32)
    inp = build_step([Row(dec, 4, 1, samples=True)], Bucket(1, 1), S, max_pages=3, mask_words=2)
    np.testing.assert_array_equal(inp.input_from_slot, [2])
    np.testing.assert_array_equal(inp.sampling.step, [2])
    dec.pending = 0
    masks = np.array([[1, 0], [2, 3]], np.uint32)
    inp = build_step(rows, Bucket(8, 4), S, max_pages=3, mask_words=2, grammar_masks=masks)
    np.testing.assert_array_equal(inp.sampling.grammar_mask[:2], masks)
    assert (inp.sampling.grammar_mask[2:] == 0xFFFFFFFF).all()
    free = build_step(rows, Bucket(8, 4), S, max_pages=3, mask_words=2).sampling.grammar_mask
    assert free is free_grammar_mask(4, 2) and not free.flags.writeable  # shared: the runner keeps it on device
    assert inp.sampling.grammar_mask is not free and (free == 0xFFFFFFFF).all()
    # a one-token prompt chunk (the last token of a chunked prompt) reads the prompt, not the outputs
    inp = build_step([Row(ext, 5, 1, samples=True), Row(dec, 3, 1, samples=True)], Bucket(2, 2), S, max_pages=3,
                     mask_words=2)
    np.testing.assert_array_equal(inp.input_ids, [6, 11])
    np.testing.assert_array_equal(inp.positions, [5, 3])
    np.testing.assert_array_equal(inp.slot_mapping, [8 * 4 + 1, 3 * 4 + 3])


def test_decode_buckets_start_at_min_rows(monkeypatch):
    b = Buckets(64, 600, min_rows=8)
    assert b.batch_sizes == [8, 16, 32, 64]
    assert b.pick(1, 1) == Bucket(8, 8) and b.pick(9, 9) == Bucket(16, 16)
    assert Buckets(4, 16, min_rows=8).batch_sizes == [4]  # never above max_rows
    assert Buckets(64, 600).batch_sizes[0] == 1
    monkeypatch.setenv("JAXRADIX_MIN_DECODE_ROWS", "4")
    assert decode_min_rows() == 4
    monkeypatch.delenv("JAXRADIX_MIN_DECODE_ROWS")
    assert decode_min_rows() == 1  # CPU
