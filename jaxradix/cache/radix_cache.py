"""Host radix tree over token ids -> KV slots: prefix match, insert, LRU eviction, locks.

Plain Python + numpy, no JAX. A slot is a flat KV index (page * page_size + offset). With
page_size > 1 every node holds whole pages: keys are compared page by page and nodes are only
ever split at page boundaries, so evicting a node frees whole pages.

Ownership: the tree owns the slots it holds. `insert` returns how many leading (page-aligned)
tokens were already present; the tree keeps its own slots for that range and the caller frees
whichever of its slots in that range it allocated itself.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int32)


@dataclass(eq=False)
class TreeNode:
    key: np.ndarray = field(default_factory=lambda: _EMPTY)  # int32 [n] token ids, n % page_size == 0
    slots: np.ndarray = field(default_factory=lambda: _EMPTY)  # int32 [n] KV slot of each token
    parent: TreeNode | None = None  # None only for a namespace root
    children: dict[int | tuple[int, ...], TreeNode] = field(default_factory=dict)
    # lock_ref > 0 on a node implies lock_ref > 0 on all its ancestors (locks cover whole paths).
    lock_ref: int = 0
    last_access: int = 0
    hit_count: int = 0
    evicted: bool = False

    def __repr__(self) -> str:
        return f"TreeNode(len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


@dataclass
class MatchResult:
    slots: np.ndarray  # int32 [n] KV slot of each matched token; n is a multiple of page_size
    node: TreeNode  # deepest matched node (the namespace root when nothing matched); lock/unlock take it


@dataclass
class RadixStats:
    total_tokens: int
    num_nodes: int
    shared_prefixes: int  # nodes matched by at least one request (hit_count > 0)


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


TokenIds = Sequence[int] | np.ndarray


class RadixCache:
    def __init__(
        self,
        page_size: int = 1,
        disable: bool = False,
        free_slots: Callable[[np.ndarray], None] | None = None,
    ):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.disable = disable
        self._free_slots = free_slots
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Drop everything without calling free_slots (the engine resets its allocator too)."""
        # One root per extra_key: entries under different keys never match each other.
        self._roots: dict[str | None, TreeNode] = {}
        self._evictable = 0
        self._protected = 0

    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def protected_size(self) -> int:
        return self._protected

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
        pos, parts = 0, []
        while pos < len(tokens) and (child := node.children.get(self._page_key(tokens[pos:]))):
            m = self._match_len(child.key, tokens[pos:])
            if m < len(child.key):
                child = self._split(child, m)
            if touch:
                child.last_access = now
                child.hit_count += 1
            parts.append(child.slots)
            pos += m
            node = child
        slots = np.concatenate(parts) if parts else _EMPTY.copy()
        return MatchResult(slots, node)

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
        while pos < n and (child := node.children.get(self._page_key(tokens[pos:n]))):
            m = self._match_len(child.key, tokens[pos:n])
            child.last_access = now
            if m < len(child.key):
                if pos + m == n:  # tokens end inside child: nothing new to attach, no split needed
                    return n
                child = self._split(child, m)
            pos += m
            node = child
        if pos < n:
            leaf = TreeNode(tokens[pos:n].copy(), slots[pos:n].copy(), parent=node, last_access=now)
            node.children[self._page_key(leaf.key)] = leaf
            self._evictable += n - pos
        return pos

    def evict(self, num_tokens: int) -> int:
        """Free unlocked leaves, least recently used first, until >= num_tokens are freed or none is left."""
        if num_tokens <= 0:
            return 0
        # id() breaks ties so the heap never compares nodes.
        heap = [(n.last_access, id(n), n) for n in self.nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[np.ndarray] = []
        count = 0
        while count < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[self._page_key(node.key)]
            node.evicted = True
            freed.append(node.slots)
            count += len(node.key)
            self._evictable -= len(node.key)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        if freed and self._free_slots is not None:
            self._free_slots(np.concatenate(freed))
        return count

    def lock(self, node: TreeNode) -> None:
        """Protect the path root -> node from eviction (a running request holds its matched prefix)."""
        if node.evicted:
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
            total_tokens=sum(len(n.key) for n in nodes),
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
                                  node.hit_count, node.last_access))
            stack.extend((c, views[-1].index, key) for c in reversed(list(node.children.values())))
        return views

    def all_slots(self) -> np.ndarray:
        """Every slot held by the tree (for the engine's leak check)."""
        parts = [n.slots for n in self.nodes()]
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
        new = TreeNode(
            child.key[:at],
            child.slots[:at],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
            hit_count=child.hit_count,
        )
        parent.children[self._page_key(new.key)] = new
        child.key, child.slots, child.parent = child.key[at:], child.slots[at:], new
        new.children[self._page_key(child.key)] = child
        return new
