"""The scheduler: which requests run in the next step (policy only; pages belong to KVManager).

Host only (numpy, no JAX). Every step is one ragged batch: one decode row per running request
that has its history computed, the next chunk of every request still prefilling, then newly
admitted requests in policy order while the token budget and the KV budget allow.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from jaxradix.cache.host_pool import HostPool
from jaxradix.cache.page_pool import PagePool
from jaxradix.cache.radix_cache import RadixCache
from jaxradix.engine.batch import Row
from jaxradix.engine.kv_manager import KVManager, cdiv
from jaxradix.engine.request import Request

logger = logging.getLogger(__name__)

IN_BATCH_SHARE_THRESHOLD = 32  # tokens of uncached shared prefix that make a request wait for a seeder


@dataclass
class ScheduleResult:
    rows: list[Row]
    new_seqs: int = 0
    new_tokens: int = 0  # extend tokens computed this step
    cached_tokens: int = 0  # prefix tokens of newly admitted requests served from the tree
    host_tokens: int = 0  # of which loaded back from the host tier
    retracted: list[Request] = field(default_factory=list)
    exhausted: list[Request] = field(default_factory=list)  # cannot fit even alone: finish with length


class Scheduler:
    def __init__(self, pool: PagePool, tree: RadixCache, *, num_slots: int, context_len: int,
                 chunk_size: int, policy: str, new_token_ratio: float, min_new_token_ratio: float,
                 host: HostPool | None = None):
        self.kv = KVManager(pool, tree, host)  # every page move goes through it
        self.tree = tree  # read only here: ordering and the disable flag
        self.S = pool.page_size
        self.context_len = context_len
        self.chunk_size = chunk_size
        self.policy = policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.num_slots = num_slots
        self.init_ratio = new_token_ratio
        self.min_ratio = min_new_token_ratio
        self.ratio = new_token_ratio
        self._admit_counter = 0

    # -- queue ----------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def abort(self, rid: str) -> Request | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return req
        for req in self.running:
            if req.rid == rid:
                self.release(req)
                return req
        return None

    # -- memory ---------------------------------------------------------------------------------
    def release(self, req: Request) -> None:
        """A running request leaves (finished, aborted or retracted): cache it and free the rest."""
        self.kv.free(req)
        self.running.remove(req)
        self.free_slots.append(req.slot)
        req.slot = -1

    def _retract(self, keep: Request) -> Request | None:
        victims = [r for r in self.running if r is not keep]
        if not victims:
            return None
        victim = max(victims, key=lambda r: (r.admit_seq, r.rid))
        self.release(victim)
        victim.num_retractions += 1
        self.waiting.appendleft(victim)
        self.ratio = min(1.0, self.ratio + 0.1)
        return victim

    def _reserved_pages(self) -> int:
        total = 0
        for r in self.running:
            left = min(r.params.max_new_tokens - len(r.output_ids) - r.pending, self.context_len - r.known_len)
            total += cdiv(int(max(left, 0) * self.ratio), self.S)
        return total

    # -- scheduling -----------------------------------------------------------------------------
    def schedule(self) -> ScheduleResult:
        res = ScheduleResult(rows=[])
        budget = self.chunk_size if self.chunk_size > 0 else self.context_len
        # 1. decode rows; retract when the pool cannot hold one more token
        for req in list(self.running):
            if req.slot < 0 or req.known_len - req.kv_len != 1 or not (req.output_ids or req.pending):
                continue
            if self._done_when_read(req):
                continue
            while not self.kv.grow(req, req.kv_len + 1):
                victim = self._retract(keep=req)
                if victim is None:
                    res.exhausted.append(req)
                    break
                res.retracted.append(victim)
                res.rows = [r for r in res.rows if r.req is not victim]
            else:
                res.rows.append(Row(req, req.kv_len, 1, samples=True, prompt_logprobs=self._wants_lp(req)))
        if res.rows:
            self.ratio = max(self.min_ratio, self.ratio - (self.init_ratio - self.min_ratio) / 500)
        # 2. the next chunk of requests still prefilling
        decoding = {id(r.req) for r in res.rows}
        for req in self.running:
            if budget <= 0:
                break
            left = req.known_len - req.kv_len
            if req.slot < 0 or left <= 0 or (left == 1 and (req.output_ids or req.pending)) or id(req) in decoding:
                continue
            n = min(left, budget)
            if not self.kv.grow(req, req.kv_len + n):
                continue
            res.rows.append(Row(req, req.kv_len, n, samples=n == left, prompt_logprobs=self._wants_lp(req)))
            res.new_tokens += n
            budget -= n
        # 3. admit waiting requests
        batch_tree = RadixCache(page_size=1) if self.policy == "lpm" and not self.tree.disable else None
        for req in self._order():
            if budget <= 0 or not self.free_slots:
                break
            if req.pending:  # retracted while its last step runs: admitted once its token is read
                continue
            host_before = self.kv.hits.host_hit_tokens
            got = self._admit(req, budget, batch_tree)
            res.host_tokens += self.kv.hits.host_hit_tokens - host_before
            if got is None:
                continue
            if got == 0:
                break
            res.rows.append(got)
            res.new_seqs += 1
            res.new_tokens += got.n
            res.cached_tokens += got.start
            budget -= got.n
        return res

    def after_step(self, rows: list[Row]) -> None:
        """The step computed the rows' tokens: advance kv_len and share finished prefill chunks."""
        for row in rows:
            req = row.req
            if req.slot < 0:
                continue
            req.kv_len = row.start + row.n
            if row.n > 1:
                self.kv.commit(req)

    def _done_when_read(self, req: Request) -> bool:
        """The token still on the device ends the request (length), so it needs no further step."""
        return req.pending > 0 and (req.will_finish or req.known_len >= self.context_len)

    def _wants_lp(self, req: Request) -> bool:
        return req.logprobs.logprob_start_len >= 0 and req.kv_len < len(req.prompt_ids)

    def _max_match(self, req: Request) -> int:
        n = req.seq_len - 1  # at least one token is computed, to sample from
        if req.logprobs.logprob_start_len >= 0:
            n = min(n, max(req.logprobs.logprob_start_len - 1, 0))
        return n

    def _admit(self, req: Request, budget: int, batch_tree: RadixCache | None) -> Row | None | int:
        """A row for req, None to skip it this step, 0 to stop admitting."""
        tokens = req.all_ids
        match = self.kv.match(tokens[:self._max_match(req)], req.extra_key)
        prefix = match.total  # the device part plus a host part that admission loads back
        if batch_tree is not None:
            shared = len(batch_tree.match_prefix(tokens).slots)
            gain = min(shared, self._max_match(req)) // self.S * self.S - prefix  # tokens to reuse by waiting
            if gain > 0 and (gain >= IN_BATCH_SHARE_THRESHOLD or shared >= len(tokens) - 1):
                return None  # another request of this batch computes that prefix (or the same prompt: n > 1)
        n = min(req.seq_len - prefix, budget)
        left = min(req.params.max_new_tokens - len(req.output_ids), self.context_len - req.seq_len)
        need = cdiv(prefix + n, self.S) - match.length // self.S + cdiv(int(left * self.ratio), self.S)
        if need + self._reserved_pages() > self.kv.available(keep=match) and self.running:
            return 0
        if not self.kv.admit(req, match, prefix + n):
            return 0
        self.waiting.remove(req)
        req.slot = self.free_slots.pop()
        self._admit_counter += 1
        req.admit_seq = self._admit_counter
        if not req.admitted_once:
            req.cached_tokens = prefix
            req.admitted_once = True
        self.running.append(req)
        if batch_tree is not None:
            batch_tree.insert(tokens, np.arange(len(tokens), dtype=np.int32))
        return Row(req, prefix, n, samples=prefix + n == req.seq_len, prompt_logprobs=self._wants_lp(req),
                   new=True)

    def _order(self) -> list[Request]:
        waiting = list(self.waiting)
        if self.policy == "fcfs" or self.tree.disable or len(waiting) <= 1:
            return waiting
        if self.policy == "lpm":
            lens = {id(r): self.kv.match(r.all_ids[:self._max_match(r)], r.extra_key, touch=False).length
                    for r in waiting}
            return sorted(waiting, key=lambda r: -lens[id(r)])
        return self._dfs_weight_order(waiting)

    def _dfs_weight_order(self, waiting: list[Request]) -> list[Request]:
        """SGLang's dfs-weight: walk the tree, heaviest subtree (most waiting requests) first."""
        at_node: dict[int, list[Request]] = {}
        weight: dict[int, int] = {}
        nodes = {}
        for r in waiting:
            node = self.kv.match(r.all_ids[:self._max_match(r)], r.extra_key, touch=False).node
            at_node.setdefault(id(node), []).append(r)
            while node is not None:
                weight[id(node)] = weight.get(id(node), 0) + 1
                nodes[id(node)] = node
                node = node.parent
        order: list[Request] = []
        stack = [self.tree.root(None)]
        while stack:
            node = stack.pop()
            order.extend(at_node.get(id(node), []))
            kids = [c for c in node.children.values() if id(c) in weight]
            stack.extend(sorted(kids, key=lambda c: weight[id(c)]))  # heaviest popped first
        return order

    # -- checks ---------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.kv.check_integrity(self.running)
        if not self.running:
            assert len(self.free_slots) == self.num_slots, "request slots leaked"
