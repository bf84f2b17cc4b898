"""Radix cache: unit tests and a property test against a naive prefix -> slot reference model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxradix.cache.radix_cache import RadixCache, TreeNode


def arange(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


def dump(cache: RadixCache) -> dict[tuple, tuple[int, ...]]:
    """(extra_key, token prefix ending at a page boundary) -> slots of that last page, for every page held."""
    ps, out = cache.page_size, {}
    for extra_key, root in cache._roots.items():
        stack: list[tuple[TreeNode, tuple[int, ...]]] = [(c, ()) for c in root.children.values()]
        while stack:
            node, prefix = stack.pop()
            for i in range(0, len(node.key), ps):
                prefix = (*prefix, *node.key[i : i + ps].tolist())
                out[(extra_key, prefix)] = tuple(node.slots[i : i + ps].tolist())
            stack.extend((c, prefix) for c in node.children.values())
    return out


def check_invariants(cache: RadixCache) -> None:
    nodes = [n for n in cache.nodes() if n.on_device]
    assert cache.evictable_size + cache.protected_size == cache.total_size
    assert cache.total_size == sum(len(n.key) for n in nodes)
    assert cache.protected_size == sum(len(n.key) for n in nodes if n.lock_ref > 0)
    slots = cache.all_slots()
    assert len(np.unique(slots)) == len(slots) == cache.total_size
    for n in nodes:
        assert len(n.key) > 0 and len(n.key) % cache.page_size == 0 and len(n.key) == len(n.slots)
        assert n.parent.children[cache._page_key(n.key)] is n
        if n.parent.parent is not None:
            assert n.parent.lock_ref >= n.lock_ref >= 0


# ---------------------------------------------------------------------------------------------
# Unit tests


def test_basic_match_insert():
    cache = RadixCache()
    assert cache.match_prefix([1, 2, 3]).slots.size == 0
    assert cache.insert([1, 2, 3], arange(10, 3)) == 0
    r = cache.match_prefix([1, 2, 3, 4])
    assert r.slots.tolist() == [10, 11, 12] and r.slots.dtype == np.int32
    assert cache.insert([1, 2, 3, 4, 5], arange(20, 5)) == 3  # slots 20..22 are the caller's duplicates
    assert cache.match_prefix([1, 2, 3, 4, 5]).slots.tolist() == [10, 11, 12, 23, 24]
    assert cache.insert([1, 2, 9], arange(30, 3)) == 2  # splits [1,2,3] at 2
    assert cache.match_prefix([1, 2, 9]).slots.tolist() == [10, 11, 32]
    assert cache.match_prefix(np.array([1, 2, 7])).slots.tolist() == [10, 11]
    assert cache.insert([1, 2], arange(40, 2)) == 2  # fully present: nothing taken
    assert cache.total_size == 6 and cache.evictable_size == 6 and cache.protected_size == 0
    assert sorted(cache.all_slots().tolist()) == [10, 11, 12, 23, 24, 32]
    st_ = cache.stats()
    assert (st_.total_tokens, st_.num_nodes) == (6, 4)
    assert st_.shared_prefixes == 4  # every node was matched at least once
    check_invariants(cache)


def test_insert_copies_caller_arrays():
    cache = RadixCache()
    toks, slots = np.array([1, 2, 3]), arange(0, 3)
    cache.insert(toks, slots)
    toks[:] = 9
    slots[:] = 99
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [0, 1, 2]


def test_insert_length_mismatch():
    with pytest.raises(ValueError):
        RadixCache().insert([1, 2, 3], arange(0, 2))


def test_split_keeps_lock_count():
    cache = RadixCache()
    cache.insert([1, 2, 3, 4], arange(0, 4))
    r = cache.match_prefix([1, 2, 3, 4])
    cache.lock(r.node)
    cache.lock(r.node)
    assert cache.protected_size == 4 and cache.evictable_size == 0
    r2 = cache.match_prefix([1, 2, 9])  # ends inside the locked node: split
    assert r2.slots.tolist() == [0, 1]
    assert r2.node is r.node.parent and r2.node.lock_ref == 2 and r.node.lock_ref == 2
    assert cache.protected_size == 4
    check_invariants(cache)
    cache.unlock(r.node)
    assert cache.protected_size == 4
    cache.unlock(r.node)
    assert cache.protected_size == 0 and cache.evictable_size == 4
    assert r2.node.lock_ref == 0
    with pytest.raises(ValueError):
        cache.unlock(r.node)
    check_invariants(cache)


def test_page_size_alignment():
    cache = RadixCache(page_size=4)
    # only the first 8 tokens are cached; the tail (2 tokens) stays the caller's
    assert cache.insert(list(range(10)), arange(100, 10)) == 0
    assert cache.total_size == 8
    assert cache.match_prefix(list(range(10))).slots.tolist() == list(range(100, 108))
    # a mismatch inside the second page matches only the first page
    r = cache.match_prefix([0, 1, 2, 3, 4, 5, 9, 7])
    assert r.slots.tolist() == [100, 101, 102, 103]
    assert len(r.node.key) == 4  # split at the page boundary
    # a mismatch inside the first page matches nothing
    assert cache.match_prefix([0, 9, 2, 3]).slots.size == 0
    # fewer than a page of tokens never matches
    assert cache.match_prefix([0, 1, 2]).slots.size == 0
    assert cache.insert([0, 1, 2, 3, 4, 5, 9, 7, 8], arange(200, 9)) == 4
    r = cache.match_prefix([0, 1, 2, 3, 4, 5, 9, 7])
    assert r.slots.tolist() == [100, 101, 102, 103, 204, 205, 206, 207]
    assert cache.insert([0, 1, 2], arange(0, 3)) == 0 and cache.total_size == 12
    check_invariants(cache)
    freed: list[np.ndarray] = []
    cache._free_slots = freed.append
    assert cache.evict(1) == 4  # a whole node (one page here) goes at once
    assert len(freed[0]) == 4


def test_evict_lru_order_and_locks():
    freed: list[list[int]] = []
    cache = RadixCache(free_slots=lambda s: freed.append(s.tolist()))
    cache.insert([1, 1], arange(0, 2))
    cache.insert([2, 2], arange(10, 2))
    cache.insert([3, 3], arange(20, 2))
    cache.match_prefix([1, 1])  # [1,1] is now the most recent; [2,2] the least
    locked = cache.match_prefix([3, 3]).node
    cache.lock(locked)
    assert cache.evictable_size == 4 and cache.protected_size == 2
    assert cache.evict(1) == 2
    assert freed == [[10, 11]]
    assert cache.evict(100) == 2  # only [1,1] is evictable
    assert freed == [[10, 11], [0, 1]]
    assert cache.evict(100) == 0 and len(freed) == 2  # no callback when nothing is freed
    assert cache.match_prefix([3, 3]).slots.tolist() == [20, 21]
    cache.unlock(locked)
    assert cache.evict(1) == 2 and freed[-1] == [20, 21]
    assert cache.total_size == 0
    with pytest.raises(ValueError):
        cache.lock(locked)  # evicted
    check_invariants(cache)


def test_evict_parent_becomes_leaf():
    freed: list[np.ndarray] = []
    cache = RadixCache(free_slots=freed.append)
    cache.insert([1, 2, 3], arange(0, 3))
    cache.insert([1, 2, 4], arange(10, 3))  # tree: [1,2] -> {[3], [4]}
    cache.insert([5], arange(20, 1))
    cache.match_prefix([5])  # [5] is the most recent leaf
    assert cache.evict(3) == 4  # [3], [4], then their parent [1,2] (older than [5])
    assert sorted(np.concatenate(freed).tolist()) == [0, 1, 2, 12]
    assert len(freed) == 1  # one callback per evict call
    assert cache.match_prefix([5]).slots.tolist() == [20]
    check_invariants(cache)


def test_locked_child_protects_ancestors():
    cache = RadixCache()
    cache.insert([1, 2, 3], arange(0, 3))
    cache.insert([1, 2, 4], arange(10, 3))
    cache.lock(cache.match_prefix([1, 2, 3]).node)
    assert cache.protected_size == 3 and cache.evictable_size == 1
    assert cache.evict(100) == 1  # only [4]
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [0, 1, 2]
    check_invariants(cache)


def test_extra_key_isolation():
    cache = RadixCache()
    cache.insert([1, 2, 3], arange(0, 3))
    cache.insert([1, 2, 3], arange(10, 3), extra_key="lora-a")
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [0, 1, 2]
    assert cache.match_prefix([1, 2, 3], extra_key="lora-a").slots.tolist() == [10, 11, 12]
    r = cache.match_prefix([1, 2, 3], extra_key="lora-b")
    assert r.slots.size == 0 and r.node is cache.root("lora-b")
    assert cache.insert([1, 2, 3, 4], arange(20, 4), extra_key="lora-a") == 3
    assert cache.total_size == 7
    check_invariants(cache)


def test_disable():
    freed: list[np.ndarray] = []
    cache = RadixCache(disable=True, free_slots=freed.append)
    assert cache.insert([1, 2, 3], arange(0, 3)) == 0
    r = cache.match_prefix([1, 2, 3])
    assert r.slots.size == 0 and r.node is cache.root()
    cache.lock(r.node)
    cache.unlock(r.node)
    assert cache.evict(10) == 0 and not freed
    assert cache.total_size == cache.evictable_size == cache.protected_size == 0
    assert cache.all_slots().size == 0 and cache.stats().num_nodes == 0


def test_reset():
    freed: list[np.ndarray] = []
    cache = RadixCache(free_slots=freed.append)
    cache.insert([1, 2, 3], arange(0, 3))
    cache.lock(cache.match_prefix([1, 2]).node)
    cache.reset()
    assert not freed
    assert cache.total_size == cache.evictable_size == cache.protected_size == 0
    assert cache.match_prefix([1, 2, 3]).slots.size == 0 and cache.all_slots().size == 0
    cache.insert([1, 2, 3], arange(5, 3))
    assert cache.match_prefix([1, 2, 3]).slots.tolist() == [5, 6, 7]



def test_snapshot_nodes_locks_and_namespaces():
    cache = RadixCache(page_size=2)
    cache.insert([1, 2, 3, 4], arange(10, 4))
    cache.insert([1, 2, 5, 6, 7], arange(20, 5))  # splits [1,2,3,4] at 2; token 7 is not a whole page
    cache.insert([1, 2], arange(30, 2), extra_key="other")
    cache.lock(cache.match_prefix([1, 2, 5, 6]).node)
    views = cache.snapshot()
    assert len(views) == cache.stats().num_nodes == 4
    assert [v.index for v in views] == list(range(4))
    by_ids = {(v.extra_key, v.token_ids): v for v in views}
    shared, left, right = by_ids[(None, (1, 2))], by_ids[(None, (3, 4))], by_ids[(None, (5, 6))]
    assert shared.parent is None and left.parent == right.parent == shared.index
    assert all(v.parent is None or v.parent < v.index for v in views)  # parents first
    assert (shared.lock_ref, left.lock_ref, right.lock_ref) == (1, 0, 1)
    assert right.hit_count == 1 and left.hit_count == 0
    assert by_ids[("other", (1, 2))].parent is None
    with pytest.raises(AttributeError):
        shared.lock_ref = 0  # a copy: the tree is never changed through it

# ---------------------------------------------------------------------------------------------
# Property test: the tree against a naive model that maps every cached page-aligned token prefix to
# the slots of its last page (pages are atomic: [1, 0] and [1, 1] share no slot when page_size is 2).

token_lists = st.lists(st.integers(0, 2), max_size=12)
extra_keys = st.sampled_from([None, None, "x"])


@st.composite
def shared_prefix_tokens(draw: st.DrawFn, seen: list[list[int]]) -> list[int]:
    """Mostly a cut of an earlier sequence plus a random tail, so matches end inside existing nodes."""
    if not seen or draw(st.integers(0, 3)) == 0:
        return draw(token_lists)
    base = draw(st.sampled_from(seen))
    return base[: draw(st.integers(0, len(base)))] + draw(st.lists(st.integers(0, 2), max_size=6))


class RadixMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 4]))
    def setup(self, page_size: int) -> None:
        self.evicted: list[int] = []
        self.cache = RadixCache(page_size=page_size, free_slots=lambda s: self.evicted.extend(s.tolist()))
        self.ps = page_size
        self.ref: dict[tuple, tuple[int, ...]] = {}  # (extra_key, tokens[:k]) -> slots[k - ps:k]
        self.handed_in: list[int] = []  # every slot ever passed to insert
        self.caller_freed: list[int] = []  # duplicates and tails the caller frees itself
        self.locks: list[tuple[TreeNode, str | None, tuple[int, ...]]] = []
        self.next_slot = 0
        self.seen: list[list[int]] = []

    def draw_tokens(self, data: st.DataObject) -> list[int]:
        tokens = data.draw(shared_prefix_tokens(self.seen))
        self.seen.append(tokens)
        return tokens

    def fresh(self, n: int) -> np.ndarray:
        out = arange(self.next_slot, n)
        self.next_slot += n
        self.handed_in.extend(out.tolist())
        return out

    def pages(self, tokens: list[int] | tuple[int, ...]) -> range:
        """End offsets k of the whole pages of tokens."""
        return range(self.ps, len(tokens) // self.ps * self.ps + 1, self.ps)

    def expected_match(self, tokens: list[int], extra_key: str | None) -> list[int]:
        out: list[int] = []
        for k in self.pages(tokens):
            page = self.ref.get((extra_key, tuple(tokens[:k])))
            if page is None:
                break
            out.extend(page)
        return out

    @rule(data=st.data(), extra_key=extra_keys, reuse_match=st.booleans())
    def insert(self, data: st.DataObject, extra_key: str | None, reuse_match: bool) -> None:
        # reuse_match: the engine's pattern (match, then insert prompt+output with the matched slots
        # in front); otherwise every slot is fresh and slots[:count] are all duplicates.
        tokens, m = self.draw_tokens(data), 0
        if reuse_match:
            prefix = self.cache.match_prefix(tokens, extra_key).slots
            m = len(prefix)
            slots = np.concatenate([prefix, self.fresh(len(tokens) - m)])
        else:
            slots = self.fresh(len(tokens))
        expected = len(self.expected_match(tokens, extra_key))
        n = len(tokens) // self.ps * self.ps
        count = self.cache.insert(tokens, slots, extra_key)
        assert count == expected and count >= m and count % self.ps == 0
        self.caller_freed.extend(slots[m:count].tolist())
        self.caller_freed.extend(slots[n:].tolist())
        for k in self.pages(tokens):
            if k > count:
                self.ref[(extra_key, tuple(tokens[:k]))] = tuple(slots[k - self.ps : k].tolist())

    @rule(data=st.data(), extra_key=extra_keys, lock=st.booleans())
    def match(self, data: st.DataObject, extra_key: str | None, lock: bool) -> None:
        tokens = self.draw_tokens(data)
        r = self.cache.match_prefix(tokens, extra_key)
        assert r.slots.tolist() == self.expected_match(tokens, extra_key)
        if lock:
            self.cache.lock(r.node)
            self.locks.append((r.node, extra_key, tuple(tokens[: len(r.slots)])))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, _, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.cache.unlock(node)

    @rule(num_tokens=st.integers(0, 16))
    def evict(self, num_tokens: int) -> None:
        before = len(self.evicted)
        freed = self.cache.evict(num_tokens)
        new = set(self.evicted[before:])
        assert freed == len(self.evicted) - before == len(new)
        assert freed >= num_tokens or self.cache.evictable_size == 0
        assert freed % self.ps == 0
        self.ref = {k: page for k, page in self.ref.items() if page[0] not in new}
        assert len(self.ref) * self.ps == self.cache.total_size

    @invariant()
    def tree_matches_reference(self) -> None:
        check_invariants(self.cache)
        assert dump(self.cache) == self.ref
        # prefix-closed: eviction only ever removes leaves
        for ek, prefix in self.ref:
            assert len(prefix) == self.ps or (ek, prefix[: -self.ps]) in self.ref

    @invariant()
    def locked_paths_are_present_and_protected(self) -> None:
        protected = {(ek, p[:k]) for _, ek, p in self.locks for k in self.pages(p)}
        assert protected <= self.ref.keys()
        assert self.cache.protected_size == len(protected) * self.ps
        assert self.cache.evictable_size == (len(self.ref) - len(protected)) * self.ps

    @invariant()
    def no_leak_no_double_free(self) -> None:
        accounted = self.evicted + self.caller_freed + self.cache.all_slots().tolist()
        assert sorted(accounted) == sorted(self.handed_in)

    def teardown(self) -> None:
        for node, _, _ in self.locks:
            self.cache.unlock(node)
        self.cache.evict(10**9)
        assert self.cache.total_size == 0 and self.cache.stats().num_nodes == 0
        assert sorted(self.evicted + self.caller_freed) == sorted(self.handed_in)


RadixMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_radix_against_reference = RadixMachine.TestCase


# ---------------------------------------------------------------------------------------------
# The tiered tree (hierarchical cache): device eviction writes nodes back to a host store, matches
# continue into host-only nodes, the caller loads them back. The naive model is the set of cached
# page prefixes plus a fake memory: every page carries its own identity (extra_key, token prefix), so
# a copy to the wrong page, a lost write-back or a stale load shows up as a wrong identity.


class FakeHost:
    def __init__(self, capacity: int, device: dict[int, tuple]):
        self.capacity = capacity
        self.free_list = list(range(capacity, 0, -1))
        self.mem: dict[int, tuple] = {}  # host page -> identity
        self.device = device  # device page -> identity (shared with the machine)

    def alloc(self, n: int) -> np.ndarray | None:
        if n > len(self.free_list):
            return None
        return np.array([self.free_list.pop() for _ in range(n)], np.int32)

    def free(self, pages: np.ndarray) -> None:
        assert not set(pages.tolist()) & set(self.free_list), "host double free"
        self.free_list.extend(pages.tolist())

    def save(self, device_pages: np.ndarray, host_pages: np.ndarray) -> None:
        for d, h in zip(device_pages.tolist(), host_pages.tolist(), strict=True):
            self.mem[h] = self.device[d]


def node_pages(cache: RadixCache) -> Iterator[tuple[TreeNode, tuple]]:
    """(node, identity of each of its pages)."""
    ps = cache.page_size
    for extra_key, root in cache._roots.items():
        stack: list[tuple[TreeNode, tuple[int, ...]]] = [(c, ()) for c in root.children.values()]
        while stack:
            node, prefix = stack.pop()
            ids = []
            for i in range(0, len(node.key), ps):
                prefix = (*prefix, *node.key[i : i + ps].tolist())
                ids.append((extra_key, prefix))
            yield node, tuple(ids)
            stack.extend((c, prefix) for c in node.children.values())


class TieredRadixMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 2, 4]), host_pages=st.sampled_from([3, 1000]))
    def setup(self, page_size: int, host_pages: int) -> None:
        self.ps = page_size
        self.device: dict[int, tuple] = {}  # device page -> identity of the tokens written there
        self.host = FakeHost(host_pages, self.device)
        self.evicted: list[int] = []
        self.cache = RadixCache(page_size=page_size, free_slots=lambda s: self.evicted.extend(s.tolist()),
                                host=self.host)
        self.present: set[tuple] = set()  # naive model: every page prefix inserted and not dropped
        self.ample = host_pages == 1000  # the host never fills: nothing is ever dropped
        self.handed_in: list[int] = []
        self.caller_freed: list[int] = []
        self.locks: list[TreeNode] = []
        self.next_slot = 0
        self.seen: list[list[int]] = []

    def fresh(self, n: int) -> np.ndarray:
        self.next_slot = -(-self.next_slot // self.ps) * self.ps  # page-aligned runs
        out = arange(self.next_slot, n)
        self.next_slot += n
        self.handed_in.extend(out.tolist())
        return out

    def ident(self, extra_key: str | None, tokens: list[int], k: int) -> tuple:
        return (extra_key, tuple(tokens[:k]))

    def expected_total(self, tokens: list[int], extra_key: str | None) -> int:
        k = 0
        while k + self.ps <= len(tokens) and self.ident(extra_key, tokens, k + self.ps) in self.present:
            k += self.ps
        return k

    def load(self, r: object) -> np.ndarray:
        """The caller's half of a host hit: fresh device pages, host contents copied in, attached."""
        n = sum(len(n.key) for n in r.host_nodes)
        slots = self.fresh(n)
        pages = np.concatenate([node.host for node in r.host_nodes])
        for d, h in zip((slots[:: self.ps] // self.ps).tolist(), pages.tolist(), strict=True):
            self.device[d] = self.host.mem[h]
        self.cache.attach(r.host_nodes, slots)
        return slots

    @rule(data=st.data(), extra_key=extra_keys, load=st.booleans())
    def insert(self, data: st.DataObject, extra_key: str | None, load: bool) -> None:
        tokens = data.draw(shared_prefix_tokens(self.seen))
        self.seen.append(tokens)
        r = self.cache.match_prefix(tokens, extra_key)
        prefix = r.slots
        if load and r.host_nodes:
            prefix = np.concatenate([prefix, self.load(r)])
        m = len(prefix)
        slots = np.concatenate([prefix, self.fresh(len(tokens) - m)])
        n = len(tokens) // self.ps * self.ps
        for k in range(m + self.ps, n + 1, self.ps):
            self.device[int(slots[k - 1]) // self.ps] = self.ident(extra_key, tokens, k)
        count = self.cache.insert(tokens, slots, extra_key)
        assert m <= count <= n and count % self.ps == 0
        self.caller_freed.extend(slots[m:count].tolist())
        self.caller_freed.extend(slots[n:].tolist())
        self.present |= {self.ident(extra_key, tokens, k) for k in range(self.ps, n + 1, self.ps)}

    @rule(data=st.data(), extra_key=extra_keys, lock=st.booleans())
    def match(self, data: st.DataObject, extra_key: str | None, lock: bool) -> None:
        tokens = data.draw(shared_prefix_tokens(self.seen))
        r = self.cache.match_prefix(tokens, extra_key)
        assert len(r.slots) + r.host_len == self.expected_total(tokens, extra_key)
        for i, d in enumerate((r.slots[:: self.ps] // self.ps).tolist()):
            assert self.device[d] == self.ident(extra_key, tokens, (i + 1) * self.ps)
        if lock:
            if r.host_nodes:
                self.load(r)
                r = self.cache.match_prefix(tokens, extra_key)
                assert not r.host_nodes
            self.cache.lock(r.node)
            self.locks.append(r.node)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        self.cache.unlock(self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1))))

    @rule(num_tokens=st.integers(0, 16))
    def evict(self, num_tokens: int) -> None:
        before = len(self.evicted)
        freed = self.cache.evict(num_tokens)
        assert freed == len(self.evicted) - before
        assert freed >= num_tokens or self.cache.evictable_size == 0

    @rule(num_pages=st.integers(0, 4))
    def evict_host(self, num_pages: int) -> None:
        self.cache.evict_host(num_pages)
        self.present = {i for _, ids in node_pages(self.cache) for i in ids}

    @invariant()
    def tiers_hold_what_they_claim(self) -> None:
        check_invariants(self.cache)
        held: set[tuple] = set()
        host_used: list[int] = []
        for node, ids in node_pages(self.cache):
            assert node.on_device or node.host is not None, "a node on neither tier"
            assert node.parent is not None
            assert not node.on_device or node.parent.parent is None or node.parent.on_device
            if node.on_device:
                assert [self.device[d] for d in (node.slots[:: self.ps] // self.ps).tolist()] == list(ids)
            if node.host is not None:
                assert [self.host.mem[h] for h in node.host.tolist()] == list(ids)
                host_used.extend(node.host.tolist())
            held |= set(ids)
        assert len(set(host_used)) == len(host_used), "host pages shared"
        assert sorted(host_used + self.host.free_list) == list(range(1, self.host.capacity + 1))
        assert self.cache.host_size == len(host_used) * self.ps
        assert held <= self.present
        if self.ample:
            assert held == self.present, "a write-back lost pages although the host had room"
        else:
            self.present = held  # pages dropped for lack of host room (and their subtrees) are gone
        accounted = self.evicted + self.caller_freed + self.cache.all_slots().tolist()
        assert sorted(accounted) == sorted(self.handed_in)

    def teardown(self) -> None:
        for node in self.locks:
            self.cache.unlock(node)
        self.cache.evict(10**9)
        self.cache.evict_host(10**9)
        assert self.cache.total_size == 0 and self.cache.stats().num_nodes == 0
        assert len(self.host.free_list) == self.host.capacity


TieredRadixMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_tiered_radix_against_reference = TieredRadixMachine.TestCase
