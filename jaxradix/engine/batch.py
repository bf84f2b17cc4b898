"""Host -> device: the one metadata pytree of a step, built in numpy and padded to a bucket.

A step runs B rows (sequences) and T tokens. Decode-only steps use T = B from the batch-size
buckets; steps with any extend row use a token bucket with B = the largest batch bucket. Padding
tokens write their K/V into page 0 and padding rows have q_len = kv_len = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jaxradix.engine.request import Request
from jaxradix.engine.sampler import SamplerPlan, SamplingMetadata
from jaxradix.pallas_kernels.metadata import AttentionMetadata


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInput:
    input_ids: jax.Array  # [T] int32
    input_from_slot: jax.Array  # [T] int32, >= 0: the input is the token last sampled for this request slot
    positions: jax.Array  # [T] int32
    slot_mapping: jax.Array  # [T] int32, pool slot (page * S + offset) where each token's K/V goes
    attn: AttentionMetadata
    logits_indices: jax.Array  # [B] int32, the token whose logits row b samples from
    sampling: SamplingMetadata
    lp_targets: jax.Array  # [T] int32, next prompt token at each position (-1: no prompt logprob)


@dataclass(frozen=True)
class Bucket:
    tokens: int  # T
    rows: int  # B


def _pow2_sizes(lo: int, hi: int) -> list[int]:
    sizes, s = [], lo
    while s < hi:
        sizes.append(s)
        s *= 2
    return sizes + [hi]


class Buckets:
    """The static shapes the step is compiled for. min_rows: the smallest decode bucket (a GPU runs an
    8-row decode step faster than a 1-row one, see engine.decode_min_rows)."""

    def __init__(self, max_rows: int, max_tokens: int, min_tokens: int = 32, min_rows: int = 1):
        self.batch_sizes = _pow2_sizes(min(min_rows, max_rows), max_rows)
        self.max_rows = max_rows
        self.token_sizes = _pow2_sizes(min(min_tokens, max_tokens), max(max_tokens, max_rows))

    def all(self) -> list[Bucket]:
        return [Bucket(b, b) for b in self.batch_sizes] + [Bucket(t, self.max_rows) for t in self.token_sizes]

    def pick(self, num_rows: int, num_tokens: int) -> Bucket:
        if num_tokens == num_rows:  # decode only
            return Bucket(*(2 * [next(b for b in self.batch_sizes if b >= num_rows)]))
        t = next((t for t in self.token_sizes if t >= num_tokens), None)
        if t is None:
            raise ValueError(f"{num_tokens} tokens exceed the largest bucket {self.token_sizes[-1]}")
        return Bucket(t, self.max_rows)


@dataclass
class Row:
    req: Request
    start: int  # kv_len before the step: tokens [start, start + n) are computed now
    n: int
    samples: bool  # the step reaches the end of the sequence, so row's sampled token is kept
    prompt_logprobs: bool = False
    new: bool = False  # admitted this step


_FREE_MASKS: dict[tuple[int, int], np.ndarray] = {}


def free_grammar_mask(rows: int, words: int) -> np.ndarray:
    """The all-ones grammar mask [rows, words] uint32 of a step without grammars: one shared read-only
    array per shape, which the runner recognises and replaces by its device-resident copy, so a step
    without grammars uploads no mask (B x V/32 words: 2 MiB at B=128 and a 128k vocabulary)."""
    mask = _FREE_MASKS.get((rows, words))
    if mask is None:
        mask = np.full((rows, words), 0xFFFFFFFF, np.uint32)
        mask.flags.writeable = False
        _FREE_MASKS[(rows, words)] = mask
    return mask


@dataclass(frozen=True)
class SharedPrefix:
    pages: np.ndarray  # [MP] int32, the shared prefix's pages, 0-padded
    lens: np.ndarray  # [B] int32, tokens of it in each row: 0 or L (AttentionMetadata's invariant)


def shared_prefix(page_table: np.ndarray, cached: np.ndarray, page_size: int, num_rows: int) -> SharedPrefix:
    """The page run that saves the most reads when several rows attend to it once (cascade attention):
    among the live rows whose cached pages start with the most common first page, the prefix length L
    (pages) maximising the reads saved, L x (rows that hold all of it - 1). Only whole cached pages
    count. page_table [B, MP], cached [B] tokens already in the pool before this step."""
    B, MP = page_table.shape
    pages = np.zeros(MP, np.int32)
    lens = np.zeros(B, np.int32)
    full = cached[:num_rows] // page_size  # [n] whole cached pages per live row
    cand = np.flatnonzero(full > 0)
    if len(cand) < 2:
        return SharedPrefix(pages, lens)
    first = page_table[cand, 0]
    values, counts = np.unique(first, return_counts=True)
    if counts.max() < 2:
        return SharedPrefix(pages, lens)
    group = cand[first == values[counts.argmax()]]
    leader = group[np.argmax(full[group])]
    width = int(full[leader])
    same = page_table[group, :width] == page_table[leader, :width]  # [G, width]
    match = np.minimum(np.cumprod(same, axis=1).sum(axis=1), full[group])  # [G] pages shared with the leader
    order = np.sort(match)[::-1]  # L = order[i] is held by at least i + 1 rows
    saved = order * np.arange(len(order))  # [G] page reads saved by sharing L = order[i]
    best = int(np.argmax(saved))
    if saved[best] == 0:
        return SharedPrefix(pages, lens)
    L = int(order[best])
    pages[:L] = page_table[leader, :L]
    lens[group[match >= L]] = L * page_size
    return SharedPrefix(pages, lens)


def build_step(rows: list[Row], bucket: Bucket, page_size: int, max_pages: int,
               mask_words: int, grammar_masks: np.ndarray | None = None, share_prefix: bool = False) -> StepInput:
    """Numpy arrays for one step; grammar_masks is [len(rows), mask_words] uint32 or None. share_prefix:
    find a prefix several rows share (for an attention that reads it once; else none is marked).
    Per-row fields are gathered as Python lists and converted once per field (the host's time per decode
    step grows with the batch: ~5 us per row when every row wrote ~20 numpy scalars)."""
    T, B, S = bucket.tokens, bucket.rows, page_size
    n_rows = len(rows)
    input_ids = np.zeros(T, np.int32)
    from_slot = np.full(T, -1, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.zeros(T, np.int32)  # padding -> page 0
    lp_targets = np.full(T, -1, np.int32)
    cu = np.zeros(B + 1, np.int32)
    kv_lens = np.zeros(B, np.int32)
    page_table = np.zeros((B, max_pages), np.int32)
    logits_idx = np.zeros(B, np.int32)

    def column(values: list, dtype: Any, pad: Any) -> np.ndarray:  # [B]: the rows' values, then padding
        out = np.full(B, pad, dtype)
        out[:n_rows] = values
        return out

    reqs = [row.req for row in rows]
    params = [r.params for r in reqs]
    greedy = [p.greedy for p in params]
    temperature = column([0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                         np.float32, 0.0)
    top_p = column([p.top_p for p in params], np.float32, 1.0)
    top_k = column([max(p.top_k, 0) for p in params], np.int32, 0)
    min_p = column([p.min_p for p in params], np.float32, 0.0)
    freq = column([p.frequency_penalty for p in params], np.float32, 0.0)
    pres = column([p.presence_penalty for p in params], np.float32, 0.0)
    rep = column([p.repetition_penalty for p in params], np.float32, 1.0)
    seed = column([r.seed & 0xFFFFFFFF for r in reqs], np.uint32, 0)
    step = column([len(r.output_ids) + r.pending for r in reqs], np.int32, 0)
    slot = column([r.slot for r in reqs], np.int32, 0)
    keep = column([row.samples for row in rows], bool, False)
    use_state = column([p.needs_state for p in params], bool, False) & keep
    mask = free_grammar_mask(B, mask_words)
    if grammar_masks is not None:
        mask = mask.copy()
        mask[:n_rows] = grammar_masks[:n_rows]
    plan = SamplerPlan.needed(temperature, top_k, top_p, min_p, use_state,
                              any(r.logprobs.top_logprobs_num > 0 for r in reqs))

    ns = np.array([row.n for row in rows], np.int32)
    starts = np.array([row.start for row in rows], np.int32)
    cu[1:n_rows + 1] = np.cumsum(ns)
    t = int(cu[n_rows])
    cu[n_rows + 1:] = t
    kv_lens[:n_rows] = starts + ns
    logits_idx[:n_rows] = cu[1:n_rows + 1] - 1
    for b, row in enumerate(rows):
        r, t0 = row.req, int(cu[b])
        page_table[b, :len(r.pages)] = r.pages
        n_prompt = len(r.prompt_ids)
        end = row.start + row.n
        if row.n == 1:  # decode (or a one-token chunk)
            if row.start >= r.seq_len:  # overlap: the token is still on the device
                from_slot[t0] = r.slot
            elif row.start >= n_prompt:
                input_ids[t0] = r.output_ids[row.start - n_prompt]
            else:
                input_ids[t0] = r.prompt_ids[row.start]
            positions[t0] = row.start
            slot_mapping[t0] = r.pages[row.start // S] * S + row.start % S
        else:
            input_ids[t0:t0 + row.n] = (r.prompt_ids[row.start:end] if end <= n_prompt
                                        else r.all_ids[row.start:end])
            pos = np.arange(row.start, end, dtype=np.int32)
            positions[t0:t0 + row.n] = pos
            slot_mapping[t0:t0 + row.n] = r.pages[pos // S] * S + pos % S
        if row.prompt_logprobs:
            lp_targets[t0:t0 + row.n] = r.all_ids[row.start + 1:end + 1] + [-1] * (end + 1 - r.seq_len)
    if share_prefix:
        shared = shared_prefix(page_table, kv_lens - (cu[1:] - cu[:-1]), page_size, len(rows))
    else:
        shared = SharedPrefix(np.zeros(max_pages, np.int32), np.zeros(B, np.int32))
    return StepInput(
        input_ids=input_ids, input_from_slot=from_slot, positions=positions, slot_mapping=slot_mapping,
        attn=AttentionMetadata(cu_q_lens=cu, kv_lens=kv_lens, page_table=page_table,
                               num_seqs=np.array([len(rows)], np.int32), shared_pages=shared.pages,
                               shared_lens=shared.lens),
        logits_indices=logits_idx,
        sampling=SamplingMetadata(
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=freq,
            presence_penalty=pres, repetition_penalty=rep, seed=seed, step=step, slot=slot,
            use_state=use_state, keep=keep, grammar_mask=mask, needs_filter=np.array(plan.filters),
            needs_top_logprobs=np.array(plan.top_logprobs), needs_state=np.array(plan.penalties)),
        lp_targets=lp_targets,
    )
