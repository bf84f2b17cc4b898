"""A free list of pages: the host-side ledger of one page pool (the device KV pool, the host tier).

Page 0 is reserved (padding tokens write there) and is never handed out.
"""

from __future__ import annotations

import numpy as np


class PageAllocator:
    def __init__(self, num_pages: int, what: str = "page"):
        """num_pages includes the reserved page 0."""
        self.num_pages = num_pages
        self._what = what
        self.reset()

    @property
    def capacity(self) -> int:
        """Usable pages (page 0 excluded)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> np.ndarray | None:
        """n pages, or None when fewer are free (the caller evicts or retracts and retries)."""
        if n > self._num_free:
            return None
        self._num_free -= n
        return self._free[self._num_free:self._num_free + n][::-1].copy()

    def free(self, pages: np.ndarray) -> None:
        n = len(pages)
        if n == 0:
            return
        if self._num_free + n > self.capacity:  # a ledger bug: fail loudly, never corrupt the free list
            raise RuntimeError(f"{self._what} double free: {n} pages freed with {self._num_free} of "
                               f"{self.capacity} already free")
        self._free[self._num_free:self._num_free + n] = pages
        self._num_free += n

    def free_pages_set(self) -> set[int]:
        return set(self._free[: self._num_free].tolist())

    def reset(self) -> None:
        self._free = np.arange(self.num_pages - 1, 0, -1, dtype=np.int32)  # a stack; pops low pages first
        self._num_free = self.num_pages - 1
