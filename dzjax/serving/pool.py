"""The delta pool: a fixed number of device slots, an LRU host cache, and the disk.

Device: one pytree of stacks mirroring the delta files, each leaf with a leading [S] slot axis
(`QuantizedTensor` stacks for compressed matrices, [S, *shape] arrays for exact tensors). Loading a
delta writes its tensors into a free slot (`steps.write_slot`), so the compiled serving steps never
see a new shape. A slot counts the running requests that use it; only a slot with none is evicted
(least recently used first).
Host: `Delta` objects with numpy leaves, kept in LRU order within `host_cache_bytes`; a delta that
was given as an object (no file) is always kept. Disk: a delta given as a path is read again by a
background thread (`prefetch`) when it has left the host cache, while the engine keeps decoding.

All deltas in one pool share one layout (the same tensors, shapes and formats: deltas converted
with the same settings from the same base); a delta of another layout is refused when added.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.compress.delta_file import Delta, load_delta
from dzjax.errors import DzjaxError
from dzjax.models import sharding
from dzjax.models.forward import check_delta
from dzjax.models.loading import Base
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.serving import steps

_IS_LEAF = lambda x: isinstance(x, QuantizedTensor)


def layout(params) -> tuple:
    """What must agree between deltas that share a pool: every tensor's name, shape, format."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_IS_LEAF)[0]:
        if isinstance(leaf, QuantizedTensor):
            out.append((jax.tree_util.keystr(path), leaf.shape, leaf.format))
        else:
            out.append((jax.tree_util.keystr(path), tuple(np.shape(leaf)), "exact"))
    return tuple(out)


def _describe_difference(a: tuple, b: tuple) -> str:
    names_a, names_b = {x[0]: x for x in a}, {x[0]: x for x in b}
    for name in sorted(set(names_a) | set(names_b)):
        if names_a.get(name) != names_b.get(name):
            return f"tensor {name}: {names_b.get(name, 'absent')[1:]} here, " \
                   f"{names_a.get(name, 'absent')[1:]} in the pool"
    return "layouts differ"


def to_host(delta: Delta) -> Delta:
    """The delta with numpy leaves (host memory)."""
    return dataclasses.replace(delta, params=jax.device_get(delta.params))


@dataclasses.dataclass
class _Entry:
    name: str
    path: Path | None  # None: given as an object, never dropped from the host cache
    nbytes: int
    host: Delta | None = None  # the host copy, None when only on disk
    loading: concurrent.futures.Future | None = None
    error: Exception | None = None  # the last failed disk read


class DeltaPool:
    """Device slots, host cache and disk for the deltas of one serving engine.

    Changed by the engine's thread only; `validate` runs on any thread, and other threads may read
    `names()` (a snapshot).
    """

    def __init__(self, base: Base, capacity: int, host_cache_bytes: int, mesh=None):
        if capacity < 1:
            raise DzjaxError(f"max_resident_deltas must be >= 1, got {capacity}")
        self.base, self.mesh = base, mesh
        self.capacity = capacity
        self.host_cache_bytes = host_cache_bytes
        self.layout: tuple | None = None
        self.stacks = None  # the device pytree of [capacity]-slot stacks, made with the first delta
        self.entries: dict[str, _Entry] = {}
        self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.slot_names: list[str | None] = [None] * capacity
        self.users = [0] * capacity  # running requests per slot
        self._last_used = [0] * capacity
        self._clock = 0
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dzjax-delta-read")
        self.counts = collections.Counter()  # disk_reads, device_loads, evictions

    # -- registry ------------------------------------------------------------------------------

    def validate(self, name: str, source) -> tuple[_Entry, tuple]:
        """Read (if a path) and check a delta against the base; returns its entry and layout."""
        if not isinstance(name, str) or not name:
            raise DzjaxError(f"a delta name must be a non-empty string, got {name!r}")
        if isinstance(source, (str, Path)):
            delta, path = load_delta(source), Path(source)
        elif isinstance(source, Delta):
            delta, path = source, None
        else:
            raise DzjaxError(f"delta {name!r}: expected a dzjax.Delta or a file path, "
                             f"got {type(source).__name__}")
        delta.check_base(self.base)
        check_delta(self.base.params, delta.params)
        return _Entry(name, path, delta.nbytes, host=to_host(delta)), layout(delta.params)

    def add(self, entry: _Entry, entry_layout: tuple) -> None:
        if entry.name in self.entries:
            raise DzjaxError(f"a delta named {entry.name!r} is already served")
        if self.layout is None:
            stacks = jax.tree.map(lambda a: jax.ShapeDtypeStruct((self.capacity,) + a.shape,
                                                                 a.dtype), entry.host.params)
            if self.mesh is None:
                self.stacks = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), stacks)
            else:  # split by output column over the mesh (see `dzjax.models.sharding`)
                sharding.check_delta_columns(stacks, self.mesh)
                self.stacks = jax.tree.map(lambda a, where: jnp.zeros(a.shape, a.dtype, device=where),
                                           stacks, sharding.stack_shardings(stacks, self.mesh))
            self.layout = entry_layout
        elif entry_layout != self.layout:
            raise DzjaxError(f"delta {entry.name!r} is stored differently from the deltas already "
                             f"served ({_describe_difference(self.layout, entry_layout)}); one "
                             f"server serves deltas converted with the same settings")
        self.entries[entry.name] = entry
        self._touch_host(entry.name)

    def remove(self, name: str) -> None:
        slot = self.slot_of(name)
        if slot is not None and self.users[slot]:
            raise DzjaxError(f"delta {name!r} is in use by {self.users[slot]} running requests")
        if slot is not None:
            self.slot_names[slot] = None
        self.entries.pop(name)
        self._host_lru.pop(name, None)

    # -- host cache and disk -------------------------------------------------------------------

    def _touch_host(self, name: str) -> None:
        self._host_lru[name] = None
        self._host_lru.move_to_end(name)
        held = sum(self.entries[n].nbytes for n in self._host_lru)
        for victim in list(self._host_lru):  # least recently used first; objects are kept
            if held <= self.host_cache_bytes:
                break
            entry = self.entries[victim]
            if victim != name and entry.path is not None:
                entry.host = None
                del self._host_lru[victim]
                held -= entry.nbytes

    def prefetch(self, name: str) -> None:
        """Start reading a delta from disk in the background unless it is on the host already."""
        entry = self.entries[name]
        if entry.host is None and entry.loading is None and self.slot_of(name) is None:
            entry.error = None  # a new attempt (the file may have been mended)
            entry.loading = self._reader.submit(self._read_again, entry)

    def _read_again(self, entry: _Entry) -> Delta:
        """Read a delta that left the host cache, checked again as when it was added: the file
        may have changed since (another base, another layout)."""
        delta = load_delta(entry.path)
        delta.check_base(self.base)
        if layout(delta.params) != self.layout:
            raise DzjaxError(f"delta {entry.name!r} ({entry.path}) changed on disk since it was "
                             f"added: {_describe_difference(self.layout, layout(delta.params))}")
        return to_host(delta)

    def host_ready(self, name: str) -> bool:
        entry = self.entries[name]
        if entry.host is None and entry.loading is not None and entry.loading.done():
            future, entry.loading = entry.loading, None
            try:
                entry.host, entry.error = future.result(), None
                self.counts["disk_reads"] += 1
                self._touch_host(name)
            except Exception as e:  # a file removed or damaged since it was added
                entry.error = e
        return entry.host is not None

    # -- device slots --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(list(self.entries))  # list() first: a snapshot, however the dict changes

    def slot_of(self, name: str) -> int | None:
        try:
            return self.slot_names.index(name)
        except ValueError:
            return None

    def resident(self) -> list[str]:
        return [n for n in self.slot_names if n is not None]

    def make_resident(self, name: str) -> int | None:
        """The slot holding `name`, loading it into a free or evictable slot; None when it cannot
        be loaded now (still on disk, or every slot is used by running requests)."""
        slot = self.slot_of(name)
        if slot is not None:
            return slot
        if not self.host_ready(name):
            self.prefetch(name)
            return None
        free = [i for i, n in enumerate(self.slot_names) if n is None]
        idle = [i for i, n in enumerate(self.slot_names) if n is not None and not self.users[i]]
        if free:
            slot = free[0]
        elif idle:
            slot = min(idle, key=lambda i: self._last_used[i])
            self.counts["evictions"] += 1
        else:
            return None
        entry = self.entries[name]
        self.stacks = steps.write_slot(self.stacks, np.int32(slot), entry.host.params)
        self.slot_names[slot] = name
        self.counts["device_loads"] += 1
        self._touch_host(name)
        return slot

    def acquire(self, slot: int) -> None:
        self.users[slot] += 1
        self._clock += 1
        self._last_used[slot] = self._clock

    def release(self, slot: int) -> None:
        self.users[slot] -= 1

    def reset_device(self) -> None:
        """Empty every device slot, with fresh stacks (after a failed step consumed the donated
        ones); deltas load again on demand."""
        if self.stacks is not None:
            self.stacks = steps.zeros_like_placed(self.stacks)
        self.slot_names = [None] * self.capacity

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        return {"resident": self.resident(), "capacity": self.capacity,
                "registered": sorted(self.entries),
                "host_cached": list(self._host_lru),
                "host_cache_bytes": sum(self.entries[n].nbytes for n in self._host_lru),
                **{k: self.counts[k] for k in ("disk_reads", "device_loads", "evictions")}}
