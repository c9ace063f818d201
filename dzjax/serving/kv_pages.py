"""The host side of the paged KV cache: which pages are free, and each batch row's block table.

The pages themselves live on the device (`dzjax.models.kv_cache.KVPages`, P pages of
`page_size` positions per layer); this keeps the bookkeeping the steps read: `tables`
[rows, max_pages], whose row r lists the pages of the request in batch row r in position order,
and P (out of range: writes dropped) in its unused entries. Pages are handed out when a request
is admitted (what its context fills), one more each time its next token starts a page, and all
given back when it ends or is preempted. Which request gets or gives pages is the scheduler's
decision (`scheduler.schedule`, `scheduler.preempt`).
"""

from __future__ import annotations

import numpy as np


class PageTable:
    def __init__(self, num_pages: int, page_size: int, rows: int, max_pages: int):
        self.num_pages, self.page_size, self.max_pages = num_pages, page_size, max_pages
        self.tables = np.full((rows, max_pages), num_pages, np.int32)
        self._held = [0] * rows
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: recently freed pages first

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, tokens: int) -> int:
        """Pages that `tokens` positions fill."""
        return -(-tokens // self.page_size)

    def held(self, row: int) -> int:
        return self._held[row]

    def assign(self, row: int, pages: int) -> None:
        """Give an empty row `pages` pages."""
        if self._held[row]:
            raise ValueError(f"row {row} holds {self._held[row]} pages already")
        for _ in range(pages):
            self.grow(row)

    def grow(self, row: int) -> None:
        """One more page for `row` (for the position after its last page)."""
        if not self._free:
            raise RuntimeError("no free KV page (the scheduler preempts before this happens)")
        if self._held[row] >= self.max_pages:
            raise RuntimeError(f"row {row} holds the most pages a request can ({self.max_pages})")
        self.tables[row, self._held[row]] = self._free.pop()
        self._held[row] += 1

    def release(self, row: int) -> None:
        """All of `row`'s pages back to the free pool."""
        self._free.extend(int(p) for p in self.tables[row, :self._held[row]][::-1])
        self.tables[row] = self.num_pages
        self._held[row] = 0

    def needs_page(self, row: int, position: int) -> bool:
        """Whether writing `position` in `row` needs a page it does not hold yet."""
        return position // self.page_size >= self._held[row]
