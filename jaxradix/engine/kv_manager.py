"""The KV ledger: which pages each running request owns, which the radix tree holds, which are free.

Host only (numpy, no JAX). The scheduler decides who runs; this module is the one place that moves
pages between the free list, the tree and requests.

Ownership: a running request owns ``pages[prefix_len // S:]``; its first prefix_len tokens live in
tree pages it keeps locked through ``last_node``. Committing (a finished prefill chunk) inserts the
computed tokens into the tree, frees the request's duplicates and re-points the request at the tree's
pages; freeing (finished, aborted or retracted) does the same, then frees the rest and unlocks. With
the radix cache disabled nothing is shared and everything is freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxradix.cache.page_pool import PagePool
from jaxradix.cache.radix_cache import RadixCache, TokenIds, TreeNode
from jaxradix.engine.request import Request


@dataclass
class PrefixMatch:
    length: int  # matched tokens on the device, a multiple of page_size
    pages: np.ndarray  # int32 [length // page_size] tree pages holding them
    node: TreeNode  # deepest matched node; admit locks it


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVManager:
    def __init__(self, pool: PagePool, tree: RadixCache):
        self.pool = pool
        self.tree = tree
        self.page_size = pool.page_size

    # -- queries --------------------------------------------------------------------------------
    def match(self, tokens: TokenIds, extra_key: str | None, touch: bool = True) -> PrefixMatch:
        """The longest cached prefix of tokens; touch=False peeks (no LRU or hit-count update)."""
        m = self.tree.match_prefix(tokens, extra_key, touch=touch)
        return PrefixMatch(len(m.slots), (m.slots[::self.page_size] // self.page_size).astype(np.int32), m.node)

    def available(self, keep: PrefixMatch | None = None) -> int:
        """Pages a new allocation can get: free now plus evictable from the tree, not counting
        the pages of `keep` (a prefix about to be admitted)."""
        if keep is None:
            return self.pool.num_free + self.tree.evictable_size // self.page_size
        self.tree.lock(keep.node)
        n = self.pool.num_free + self.tree.evictable_size // self.page_size
        self.tree.unlock(keep.node)
        return n

    def usage(self) -> float:
        return 1 - self.available() / self.pool.capacity

    def slots(self, req: Request, n: int) -> np.ndarray:  # int32 [n] token slots of req's first n tokens
        S = self.page_size
        pos = np.arange(n, dtype=np.int32)
        return req.pages[pos // S] * S + pos % S

    # -- moves ----------------------------------------------------------------------------------
    def admit(self, req: Request, match: PrefixMatch, upto: int) -> bool:
        """Give req the matched prefix (locked) and pages for positions [0, upto); False (and req
        untouched) when the pool cannot hold them."""
        self.tree.lock(match.node)
        req.pages = match.pages.copy()
        req.prefix_len = req.kv_len = match.length
        req.last_node = match.node
        if not self.grow(req, upto):
            self.tree.unlock(match.node)
            req.pages, req.prefix_len, req.kv_len, req.last_node = np.zeros(0, np.int32), 0, 0, None
            return False
        return True

    def grow(self, req: Request, upto: int) -> bool:
        """Give req pages for positions [0, upto), evicting from the tree if needed."""
        got = self._alloc(cdiv(upto, self.page_size) - len(req.pages))
        if got is None:
            return False
        if len(got):
            req.pages = np.concatenate([req.pages, got])
        return True

    def commit(self, req: Request) -> None:
        """Share req's computed whole pages through the tree; req keeps running on the tree's pages."""
        self._cache(req, finished=False)

    def free(self, req: Request) -> None:
        """req leaves (finished, aborted or retracted): cache what it computed, free the rest."""
        self._cache(req, finished=True)
        req.pages, req.kv_len, req.prefix_len, req.last_node = np.zeros(0, np.int32), 0, 0, None

    def reset(self) -> None:
        self.tree.reset()
        self.pool.reset()

    def _alloc(self, n: int) -> np.ndarray | None:
        if n <= 0:
            return np.zeros(0, np.int32)
        pages = self.pool.alloc(n)
        if pages is None:
            self.tree.evict((n - self.pool.num_free) * self.page_size)
            pages = self.pool.alloc(n)
        return pages

    def _cache(self, req: Request, finished: bool) -> None:
        S = self.page_size
        aligned = min(req.kv_len, req.seq_len) // S * S  # a launched step may compute an unread token
        if self.tree.disable or aligned <= req.prefix_len:
            if finished:
                self.pool.free(req.pages[req.prefix_len // S:])
                if req.last_node is not None:
                    self.tree.unlock(req.last_node)
            return
        tokens = req.all_ids[:aligned]
        present = self.tree.insert(tokens, self.slots(req, aligned), req.extra_key)
        self.pool.free(req.pages[req.prefix_len // S:present // S])  # duplicates of tree pages
        if finished:
            self.pool.free(req.pages[aligned // S:])
            self.tree.unlock(req.last_node)
            return
        match = self.tree.match_prefix(tokens, req.extra_key, touch=False)
        assert len(match.slots) == aligned
        req.pages[:aligned // S] = match.slots[::S] // S
        self.tree.lock(match.node)
        self.tree.unlock(req.last_node)
        req.last_node, req.prefix_len = match.node, aligned

    # -- checks ---------------------------------------------------------------------------------
    def check_integrity(self, running: list[Request]) -> None:
        """free + evictable + locked + owned == pool pages, each page in exactly one place; nothing
        locked when no request runs."""
        S = self.page_size
        free = self.pool.free_pages_set()
        tree_pages = set((np.asarray(self.tree.all_slots(), np.int64) // S).tolist())
        owned: set[int] = set()
        for r in running:
            own = set(r.pages[r.prefix_len // S:].tolist())
            assert not own & owned, f"request {r.rid} shares pages with another request"
            owned |= own
        assert not free & tree_pages, "pages both free and in the tree"
        assert not free & owned, "pages both free and owned by a request"
        assert not tree_pages & owned, "pages both in the tree and owned by a request"
        every = free | tree_pages | owned
        assert every == set(range(1, self.pool.num_pages)), (
            f"page leak: {self.pool.capacity - len(every)} pages unaccounted")
        assert self.pool.num_free + (self.tree.evictable_size + self.tree.protected_size) // S + len(owned) \
            == self.pool.capacity
        if not running:
            assert self.tree.protected_size == 0, f"{self.tree.protected_size} tokens locked while idle"
