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

from jaxradix.cache.host_pool import HostPool
from jaxradix.cache.page_pool import PagePool
from jaxradix.cache.radix_cache import RadixCache, TokenIds, TreeNode
from jaxradix.engine.request import Request


@dataclass
class PrefixMatch:
    length: int  # matched tokens on the device, a multiple of page_size
    pages: np.ndarray  # int32 [length // page_size] tree pages holding them
    node: TreeNode  # deepest matched device node; admit locks it
    host_nodes: list[TreeNode]  # host-only nodes matched after node (empty without a host tier)
    host_length: int = 0  # tokens in host_nodes: admit loads them back into device pages

    @property
    def total(self) -> int:
        return self.length + self.host_length


@dataclass
class HitStats:
    device_hit_tokens: int = 0  # prefix tokens of admitted requests found on the device
    host_hit_tokens: int = 0  # prefix tokens of admitted requests loaded back from the host


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVManager:
    def __init__(self, pool: PagePool, tree: RadixCache, host: HostPool | None = None):
        self.pool = pool
        self.tree = tree
        self.host = host  # the host tier, also held by the tree (it writes evicted nodes back)
        self.page_size = pool.page_size
        self.hits = HitStats()

    # -- queries --------------------------------------------------------------------------------
    def match(self, tokens: TokenIds, extra_key: str | None, touch: bool = True) -> PrefixMatch:
        """The longest cached prefix of tokens; touch=False peeks (no LRU or hit-count update)."""
        m = self.tree.match_prefix(tokens, extra_key, touch=touch)
        host_nodes = m.host_nodes if self.host is not None else []
        return PrefixMatch(len(m.slots), (m.slots[::self.page_size] // self.page_size).astype(np.int32), m.node,
                           host_nodes, sum(len(n.key) for n in host_nodes))

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
        """Give req the matched prefix (locked; its host part loaded back into fresh device pages)
        and pages for positions [0, upto); False (and req untouched) when the pool cannot hold them."""
        self.tree.lock(match.node)
        node, pages = match.node, match.pages.copy()
        if match.host_nodes:
            loaded = self._load(match)
            if loaded is None:
                self.tree.unlock(match.node)
                return False
            node, pages = match.host_nodes[-1], np.concatenate([pages, loaded])
            self.tree.lock(node)
            self.tree.unlock(match.node)
        req.pages = pages
        req.prefix_len = req.kv_len = match.total
        req.last_node = node
        if not self.grow(req, upto):
            self.tree.unlock(node)
            req.pages, req.prefix_len, req.kv_len, req.last_node = np.zeros(0, np.int32), 0, 0, None
            return False
        self.hits.device_hit_tokens += match.length
        self.hits.host_hit_tokens += match.host_length
        return True

    def _load(self, match: PrefixMatch) -> np.ndarray | None:
        """Device pages [host_length // S] now holding the match's host part (attached to the tree),
        or None when the device pool cannot make room."""
        assert self.host is not None
        for n in match.host_nodes:
            n.pinned = True  # making room may write nodes back to the host: keep these copies
        got = self._alloc(match.host_length // self.page_size)
        for n in match.host_nodes:
            n.pinned = False
        if got is None:
            return None
        host_pages = np.concatenate([n.host for n in match.host_nodes])
        self.host.load(host_pages, got)
        S = self.page_size
        self.tree.attach(match.host_nodes, (got[:, None] * S + np.arange(S, dtype=np.int32)).reshape(-1))
        return got

    def grow(self, req: Request, upto: int) -> bool:
        """Give req pages for positions [0, upto), evicting from the tree if needed."""
        need = cdiv(upto, self.page_size) - len(req.pages)
        if need <= 0:  # most decode steps
            return True
        got = self._alloc(need)
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
        if self.host is not None:
            self.host.reset()
        self.hits = HitStats()

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
        self._check_tiers()

    def _check_tiers(self) -> None:
        """Host free + used == host pool, each host page in one place; every node holds a tier it
        claims; device nodes have device parents."""
        host_pages: set[int] = set()
        host_tokens = 0
        for n in self.tree.nodes():
            assert n.on_device or n.host is not None, "a node on neither tier"
            assert not n.pinned, "a node left pinned"
            assert n.parent is not None
            assert not n.on_device or n.parent.parent is None or n.parent.on_device, "device node under a host node"
            if n.host is not None:
                assert len(n.host) * self.page_size == len(n.key)
                own = set(n.host.tolist())
                assert not own & host_pages, "host pages shared by two nodes"
                host_pages |= own
                host_tokens += len(n.key)
        assert host_tokens == self.tree.host_size, "host token count drifted"
        if self.host is None:
            assert not host_pages, "host copies without a host tier"
            return
        free = self.host.free_pages_set()
        assert not free & host_pages, "host pages both free and in the tree"
        assert free | host_pages == set(range(1, self.host.num_pages)), (
            f"host page leak: {self.host.capacity - len(free | host_pages)} pages unaccounted")
