"""The host side of the paged KV cache: which pages are free, each batch row's block table, and
the pages of prompt prefixes that requests of the same model share.

The pages themselves live on the device (`dzjax.models.kv_cache.KVPages`, P pages of
`page_size` positions per layer); this keeps the bookkeeping the steps read: `tables`
[rows, max_pages], whose row r lists the pages of the request in batch row r in position order,
and P (out of range: writes dropped) in its unused entries. Pages are handed out when a request
is admitted (what its context fills), one more each time its next token starts a page, and given
back when it ends or is preempted. Which request gets or gives pages is the scheduler's decision
(`scheduler.schedule`, `scheduler.preempt`).

Prefix sharing: a full page of a prefilled context is indexed by (model, the tokens from the
start up to its end). A request admitted later whose context starts with the same tokens, for
the same model, takes those pages into its table instead of new ones (a reference count per
page), and its prefill does not write them (`prefill_table`). Only full pages before the last
context position are shared, and a request writes only positions after its context, so a shared
page is never written again: no copy on write is needed. A page no request holds stays indexed
(cached) until its memory is needed: `free` counts it, and `grow` reuses the least recently
released first after the never-used ones.
"""

from __future__ import annotations

import collections

import numpy as np
import xxhash


def prefix_keys(model: str | None, tokens, page_size: int, pages: int) -> list[bytes]:
    """The index keys of the first `pages` full pages of `tokens` for `model`: a digest of
    the model and every token from the start to the end of that page."""
    h = xxhash.xxh3_128()
    h.update(repr(model).encode() + b"\0")
    keys = []
    ids = np.asarray(tokens, np.int32)
    for i in range(pages):
        h.update(ids[i * page_size:(i + 1) * page_size].tobytes())
        keys.append(h.digest())
    return keys


class PageTable:
    def __init__(self, num_pages: int, page_size: int, rows: int, max_pages: int):
        self.num_pages, self.page_size, self.max_pages = num_pages, page_size, max_pages
        self.tables = np.full((rows, max_pages), num_pages, np.int32)
        self._held = [0] * rows
        self._shared = [0] * rows  # leading pages of the row taken from the prefix index
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: recently freed pages first
        self._refs = np.zeros(num_pages, np.int32)  # rows holding each page
        self._index: dict[tuple, int] = {}  # (model, key) -> page
        self._key_of: dict[int, tuple] = {}  # page -> its (model, key)
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # refs 0
        self.hits = 0  # pages shared instead of allocated, ever

    @property
    def free(self) -> int:
        """Pages that can be handed out: never used or freed, and cached prefixes."""
        return len(self._free) + len(self._cached)

    @property
    def in_use(self) -> int:
        return self.num_pages - self.free

    @property
    def cached(self) -> int:
        return len(self._cached)

    def pages_for(self, tokens: int) -> int:
        """Pages that `tokens` positions fill."""
        return -(-tokens // self.page_size)

    def held(self, row: int) -> int:
        return self._held[row]

    # -- prefixes ----------------------------------------------------------------------------

    def _shareable(self, tokens) -> int:
        """Full pages before the last position of `tokens` (the prefill recomputes that one)."""
        return (len(tokens) - 1) // self.page_size

    def keys(self, model: str | None, tokens) -> list[bytes]:
        """The index keys of the pages of context `tokens` that can be shared (`prefix_keys`)."""
        return prefix_keys(model, tokens, self.page_size, self._shareable(tokens))

    def lookup(self, model: str | None, keys: list[bytes]) -> list[int]:
        """The pages of the longest indexed prefix of a context of these `keys` for `model`."""
        pages = []
        for key in keys:
            page = self._index.get((model, key))
            if page is None:
                break
            pages.append(page)
        return pages

    def cost(self, pages: int, shared: list[int] = ()) -> int:
        """How many of the free pages a request of `pages` pages sharing `shared` (`lookup`)
        takes: the pages not shared, and the shared ones that were cached (counted as free)."""
        return pages - len(shared) + sum(p in self._cached for p in shared)

    def register(self, row: int, model: str | None, keys: list[bytes]) -> None:
        """Index the full pages of `row`'s prefilled context, of these `keys` (first come first
        kept)."""
        for i, key in enumerate(keys):
            page = int(self.tables[row, i])
            if (model, key) not in self._index and page not in self._key_of:
                self._index[(model, key)] = page
                self._key_of[page] = (model, key)

    def forget(self, model: str | None = None, *, everything: bool = False) -> None:
        """Drop the index entries of `model` (a delta removed), or all of them (the pages'
        contents were lost); cached pages become free."""
        for page, (m, key) in list(self._key_of.items()):
            if everything or m == model:
                del self._key_of[page], self._index[(m, key)]
                if page in self._cached:
                    del self._cached[page]
                    self._free.append(page)

    # -- rows ---------------------------------------------------------------------------------

    def assign(self, row: int, pages: int, shared: list[int] = ()) -> None:
        """Give an empty row `pages` pages: the `shared` ones first (from `lookup`), then new."""
        if self._held[row]:
            raise ValueError(f"row {row} holds {self._held[row]} pages already")
        if len(shared) > pages:
            raise ValueError(f"{len(shared)} shared pages for a row of {pages}")
        for i, page in enumerate(shared):
            self._cached.pop(page, None)
            self._refs[page] += 1
            self.tables[row, i] = page
        self._held[row] = self._shared[row] = len(shared)
        self.hits += len(shared)
        for _ in range(pages - len(shared)):
            self.grow(row)

    def grow(self, row: int) -> None:
        """One more page for `row` (for the position after its last page)."""
        if self._held[row] >= self.max_pages:
            raise RuntimeError(f"row {row} holds the most pages a request can ({self.max_pages})")
        if self._free:
            page = self._free.pop()
        elif self._cached:  # the least recently released cached prefix page
            page, _ = self._cached.popitem(last=False)
            del self._index[self._key_of.pop(page)]
        else:
            raise RuntimeError("no free KV page (the scheduler preempts before this happens)")
        self._refs[page] += 1
        self.tables[row, self._held[row]] = page
        self._held[row] += 1

    def release(self, row: int) -> None:
        """All of `row`'s pages given back: free, or cached when they hold an indexed prefix."""
        for page in (int(p) for p in self.tables[row, :self._held[row]][::-1]):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._cached[page] = None
                else:
                    self._free.append(page)
        self.tables[row] = self.num_pages
        self._held[row] = self._shared[row] = 0

    def prefill_table(self, row: int) -> np.ndarray:
        """`row`'s block table for its prefill: shared pages out of range (not written)."""
        table = self.tables[row].copy()
        table[:self._shared[row]] = self.num_pages
        return table

    def needs_page(self, row: int, position: int) -> bool:
        """Whether writing `position` in `row` needs a page it does not hold yet."""
        return position // self.page_size >= self._held[row]

    def freed_by_releasing(self, rows: list[int]) -> list[int]:
        """For rows released one after the other in this order, the pages each one's release
        frees (or caches): its pages no row still holds then (a shared page counts once, for
        the last of its holders to go)."""
        refs = self._refs.copy()
        out = []
        for row in rows:
            pages = self.tables[row, :self._held[row]]
            refs[pages] -= 1
            out.append(int(np.sum(refs[pages] == 0)))
        return out
