"""Host radix tree over token ids -> KV slots: prefix match, insert, LRU eviction, locks.

Plain Python + numpy, no JAX. A slot is a flat KV index (page * page_size + offset). With
page_size > 1 every node holds whole pages: keys are compared page by page and nodes are only
ever split at page boundaries, so evicting a node frees whole pages.

Ownership: the tree owns the slots it holds. `insert` returns how many leading (page-aligned)
tokens were already present on the device; the tree keeps its own slots for that range and the
caller frees whichever of its slots in that range it allocated itself.

Tiers (with a `HostStore`, the hierarchical cache): a node's KV lives on the device (`slots`), in
host pages (`host`), or both. Device eviction writes a node back to the host instead of dropping
it; the host has its own LRU. Device-resident nodes form a top subtree: a node on the device has
its parent on the device, so a match is a device prefix followed by host-only nodes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int32)


@dataclass(eq=False)
class TreeNode:
    key: np.ndarray = field(default_factory=lambda: _EMPTY)  # int32 [n] token ids, n % page_size == 0
    # int32 [n] KV slot of each token; None when the node is not on the device (host only)
    slots: np.ndarray | None = field(default_factory=lambda: _EMPTY)
    host: np.ndarray | None = None  # int32 [n // page_size] host pages holding a copy, or None
    parent: TreeNode | None = None  # None only for a namespace root
    children: dict[int | tuple[int, ...], TreeNode] = field(default_factory=dict)
    # lock_ref > 0 on a node implies lock_ref > 0 on all its ancestors (locks cover whole paths).
    lock_ref: int = 0
    last_access: int = 0
    hit_count: int = 0
    evicted: bool = False  # removed from the tree (from both tiers)
    pinned: bool = False  # a host copy in use (being loaded or saved): host eviction skips it

    @property
    def on_device(self) -> bool:
        return self.slots is not None

    def __repr__(self) -> str:
        return f"TreeNode(len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


@dataclass
class MatchResult:
    slots: np.ndarray  # int32 [n] KV slot of each matched token on the device; n is a multiple of page_size
    node: TreeNode  # deepest matched device node (the namespace root when none matched); lock/unlock take it
    # host-only nodes matched after `node`, in path order: the rest of the match, loadable from the host
    host_nodes: list[TreeNode] = field(default_factory=list)

    @property
    def host_len(self) -> int:
        return sum(len(n.key) for n in self.host_nodes)


@dataclass
class RadixStats:
    total_tokens: int
    num_nodes: int
    shared_prefixes: int  # nodes matched by at least one request (hit_count > 0)
    host_tokens: int = 0  # tokens with a host copy


class HostStore(Protocol):
    """Host memory for KV pages (jaxradix.cache.host_pool.HostPool)."""

    def alloc(self, n: int) -> np.ndarray | None: ...  # n host pages, or None when fewer are free
    def free(self, pages: np.ndarray) -> None: ...
    def save(self, device_pages: np.ndarray, host_pages: np.ndarray) -> None: ...  # device -> host copy


@dataclass(frozen=True)
class NodeView:
    """A read-only copy of one tree node, for drawing and inspection (RadixCache.snapshot)."""

    index: int  # position in the snapshot list
    parent: int | None  # index of the parent node; None when the parent is a namespace root
    extra_key: str | None  # the namespace (extra_key) the node lives under
    token_ids: tuple[int, ...]  # the node's own part of the key; len % page_size == 0
    lock_ref: int  # > 0: on the matched path of a running request, not evictable
    hit_count: int  # how many matches went through this node
    last_access: int  # LRU clock (larger = more recent)
    on_device: bool = True  # the node's KV is in the device pool
    on_host: bool = False  # a copy is in the host tier (hierarchical cache)


TokenIds = Sequence[int] | np.ndarray


class RadixCache:
    def __init__(
        self,
        page_size: int = 1,
        disable: bool = False,
        free_slots: Callable[[np.ndarray], None] | None = None,
        host: HostStore | None = None,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.disable = disable
        self._free_slots = free_slots
        self.host = host
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Drop everything without calling free_slots (the engine resets its allocator too)."""
        # One root per extra_key: entries under different keys never match each other.
        self._roots: dict[str | None, TreeNode] = {}
        self._evictable = 0  # device tokens in unlocked nodes
        self._protected = 0  # device tokens in locked nodes
        self._host_tokens = 0  # tokens with a host copy

    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

    @property
    def host_size(self) -> int:
        return self._host_tokens

    @property
    def total_size(self) -> int:
        return self._evictable + self._protected

    def root(self, extra_key: str | None = None) -> TreeNode:
        return self._roots.setdefault(extra_key, TreeNode())

    def match_prefix(self, tokens: TokenIds, extra_key: str | None = None, touch: bool = True) -> MatchResult:
        """touch=False peeks (for scheduling order): no LRU or hit-count update."""
        node = self.root(extra_key)
        if self.disable:
            return MatchResult(_EMPTY.copy(), node)
        tokens = self._aligned(tokens)
        now = next(self._clock)
        pos, parts, host_nodes = 0, [], []
        cur = node
        while pos < len(tokens) and (child := cur.children.get(self._page_key(tokens[pos:]))):
            m = self._match_len(child.key, tokens[pos:])
            if m < len(child.key):
                child = self._split(child, m)
            if touch:
                child.last_access = now
                child.hit_count += 1
            if child.on_device:
                parts.append(child.slots)
                node = child
            else:
                host_nodes.append(child)
            pos += m
            cur = child
        slots = np.concatenate(parts) if parts else _EMPTY.copy()
        return MatchResult(slots, node, host_nodes)

    def insert(self, tokens: TokenIds, slots: np.ndarray, extra_key: str | None = None) -> int:
        """Cache the page-aligned part of `tokens`; return how many leading tokens were already present.

        The tree keeps its own slots for tokens[:count] and takes slots[count:n] (n = page-aligned
        length). The caller still owns slots[n:] and its own slots in [0, count).
        """
        tokens = np.asarray(tokens, dtype=np.int32)
        slots = np.asarray(slots, dtype=np.int32)
        if len(slots) != len(tokens):
            raise ValueError(f"insert: {len(tokens)} tokens but {len(slots)} slots")
        if self.disable:
            return 0
        n = len(tokens) // self.page_size * self.page_size
        node, pos, now = self.root(extra_key), 0, next(self._clock)
        present = None  # where the device copy ends: host-only nodes on the path adopt the caller's slots
        while pos < n and (child := node.children.get(self._page_key(tokens[pos:n]))):
            m = self._match_len(child.key, tokens[pos:n])
            child.last_access = now
            if m < len(child.key):
                if pos + m == n and child.on_device:  # tokens end inside child: nothing new to attach
                    return n if present is None else present
                child = self._split(child, m)
            if not child.on_device:
                present = pos if present is None else present
                child.slots = slots[pos:pos + m].copy()
                self._evictable += m
            pos += m
            node = child
        if pos < n:
            leaf = TreeNode(tokens[pos:n].copy(), slots[pos:n].copy(), parent=node, last_access=now)
            node.children[self._page_key(leaf.key)] = leaf
            self._evictable += n - pos
        return pos if present is None else present

    def evict(self, num_tokens: int) -> int:
        """Free the device pages of unlocked nodes with no device child, least recently used first,
        until >= num_tokens are freed or none is left. With a host store a node is written back to
        the host (kept in the tree, host only) when the host can hold it, else dropped."""
        if num_tokens <= 0:
            return 0
        # id() breaks ties so the heap never compares nodes.
        heap = [(n.last_access, id(n), n) for n in self.nodes() if self._device_evictable(n)]
        heapq.heapify(heap)
        freed: list[np.ndarray] = []
        saves: list[tuple[np.ndarray, TreeNode]] = []  # (device slots, node) to copy to the host
        count = 0
        while count < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None and node.slots is not None
            freed.append(node.slots)
            count += len(node.key)
            self._evictable -= len(node.key)
            if self.host is not None and node.host is None:
                hp = self._host_alloc(len(node.key) // self.page_size)
                if hp is not None:
                    node.host, node.pinned = hp, True  # pinned: not host-evicted before its save runs
                    self._host_tokens += len(node.key)
                    saves.append((node.slots, node))
            node.slots = None
            if node.host is None:
                self._drop(node)
            if parent.parent is not None and self._device_evictable(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        for _, n in saves:
            n.pinned = False
        saves = [(sl, n) for sl, n in saves if n.host is not None]  # not dropped later with an ancestor
        if saves:
            assert self.host is not None
            S = self.page_size
            self.host.save(np.concatenate([sl[::S] // S for sl, _ in saves]).astype(np.int32),
                           np.concatenate([n.host for _, n in saves]))
        if freed and self._free_slots is not None:
            self._free_slots(np.concatenate(freed))
        return count

    def attach(self, nodes: list[TreeNode], slots: np.ndarray) -> None:
        """Host-only nodes (a match's host_nodes, in path order) now hold device slots too (the
        caller copied their host pages there): they become device-resident, unlocked."""
        pos = 0
        for node in nodes:
            assert not node.on_device and node.host is not None and not node.evicted
            assert node.parent is not None and (node.parent.parent is None or node.parent.on_device)
            node.slots = slots[pos:pos + len(node.key)].copy()
            pos += len(node.key)
            self._evictable += len(node.key)
        assert pos == len(slots)

    def evict_host(self, num_pages: int) -> int:
        """Free host copies, least recently used first: host-only leaves leave the tree, nodes also
        on the device just lose their copy. Returns the host pages freed."""
        if num_pages <= 0 or self.host is None:
            return 0
        heap = [(n.last_access, id(n), n) for n in self.nodes() if self._host_evictable(n)]
        heapq.heapify(heap)
        count = 0
        while count < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None and node.host is not None
            count += len(node.host)
            self._free_host(node)
            if not node.on_device:
                self._drop(node)
                if parent.parent is not None and not parent.on_device and self._host_evictable(parent):
                    heapq.heappush(heap, (parent.last_access, id(parent), parent))  # a new host-only leaf
        return count

    def _device_evictable(self, node: TreeNode) -> bool:
        return node.on_device and node.lock_ref == 0 and not any(c.on_device for c in node.children.values())

    def _host_evictable(self, node: TreeNode) -> bool:
        if node.host is None or node.pinned:
            return False
        return node.on_device or not node.children

    def _host_alloc(self, n: int) -> np.ndarray | None:
        assert self.host is not None
        pages = self.host.alloc(n)
        if pages is None:
            self.evict_host(n)
            pages = self.host.alloc(n)
        return pages

    def _free_host(self, node: TreeNode) -> None:
        assert self.host is not None and node.host is not None
        self.host.free(node.host)
        self._host_tokens -= len(node.key)
        node.host = None

    def _drop(self, node: TreeNode) -> None:
        """Remove a node that is on neither tier, with its (host-only) subtree, from the tree."""
        assert node.parent is not None and not node.on_device and node.host is None
        del node.parent.children[self._page_key(node.key)]
        stack = [node]
        while stack:
            n = stack.pop()
            n.evicted = True
            if n.host is not None:
                self._free_host(n)
            stack.extend(n.children.values())

    def lock(self, node: TreeNode) -> None:
        """Protect the path root -> node from eviction (a running request holds its matched prefix)."""
        if node.evicted or (node.parent is not None and not node.on_device):
            raise ValueError("lock: node was evicted; match again and lock before anything can evict")
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise ValueError("unlock: node is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent

    def nodes(self) -> Iterator[TreeNode]:
        """Every non-root node, depth first."""
        stack = [c for r in self._roots.values() for c in r.children.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def stats(self) -> RadixStats:
        nodes = list(self.nodes())
        return RadixStats(
            total_tokens=sum(len(n.key) for n in nodes if n.on_device),
            host_tokens=self._host_tokens,
            num_nodes=len(nodes),
            shared_prefixes=sum(n.hit_count > 0 for n in nodes),
        )

    def snapshot(self) -> list[NodeView]:
        """Every non-root node as a NodeView, parents before children. Read-only; take it on the
        thread that owns the tree (or while nothing mutates it, e.g. an idle engine)."""
        views: list[NodeView] = []
        stack: list[tuple[TreeNode, int | None, str | None]] = [
            (c, None, k) for k, r in self._roots.items() for c in r.children.values()][::-1]
        while stack:
            node, parent, key = stack.pop()
            views.append(NodeView(len(views), parent, key, tuple(node.key.tolist()), node.lock_ref,
                                  node.hit_count, node.last_access, node.on_device, node.host is not None))
            stack.extend((c, views[-1].index, key) for c in reversed(list(node.children.values())))
        return views

    def all_slots(self) -> np.ndarray:
        """Every slot held by the tree (for the engine's leak check)."""
        parts = [n.slots for n in self.nodes() if n.slots is not None]
        return np.concatenate(parts) if parts else _EMPTY.copy()

    def _aligned(self, tokens: TokenIds) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int32)
        return tokens[: len(tokens) // self.page_size * self.page_size]

    def _page_key(self, tokens: np.ndarray) -> int | tuple[int, ...]:
        if self.page_size == 1:
            return int(tokens[0])
        return tuple(tokens[: self.page_size].tolist())

    def _match_len(self, key: np.ndarray, tokens: np.ndarray) -> int:
        """Length of the common prefix of key and tokens, cut down to whole pages."""
        n = min(len(key), len(tokens))
        diff = np.flatnonzero(key[:n] != tokens[:n])
        m = int(diff[0]) if diff.size else n
        return m // self.page_size * self.page_size

    def _split(self, child: TreeNode, at: int) -> TreeNode:
        """Split child at `at` (page-aligned, 0 < at < len): a new parent takes key[:at]; return it."""
        parent = child.parent
        # The new parent keeps the child's lock_ref, so sizes and unlock paths stay consistent.
        hp = at // self.page_size
        new = TreeNode(
            child.key[:at],
            None if child.slots is None else child.slots[:at],
            None if child.host is None else child.host[:hp],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
            hit_count=child.hit_count,
        )
        parent.children[self._page_key(new.key)] = new
        child.key, child.parent = child.key[at:], new
        child.slots = None if child.slots is None else child.slots[at:]
        child.host = None if child.host is None else child.host[hp:]
        new.children[self._page_key(child.key)] = child
        return new
