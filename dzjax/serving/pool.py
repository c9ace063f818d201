"""The delta pool: a fixed number of device slots, an LRU host cache, and the disk (mechanism
only: which delta goes where is the scheduler's decision).

Device: one pytree of stacks mirroring the delta files, every leaf with a leading [S] slot axis
(`dzjax.models.delta_stacks`). Loading a delta writes its tensors into a slot, so the compiled
serving steps never see a new shape. A slot counts the running requests that use it.
Host: `Delta` objects with numpy leaves, kept in LRU order within `host_cache_bytes`; a delta that
was given as an object (no file) is always kept. Disk: a delta given as a path is read again by a
background thread when it has left the host cache, while the engine keeps decoding.

A delta that queued requests wait for (`keep`) is uploaded to the device ahead of its load by a
background thread (at most `MAX_STAGED` at once), so that writing it into a slot is a copy on the
device, not a transfer from the engine's thread.

Each delta is in one state (`scheduler.RESIDENT`, `ON_HOST`, `READING`, `ON_DISK`, `FAILED`);
`view()` gives them to the scheduler. A failed read stays FAILED (and is reported with its error)
until the engine has failed the requests that waited for it and calls `forget_failure`.

All deltas in one pool share one layout (the same tensors, shapes and formats: deltas converted
with the same settings from the same base); a delta of another layout is refused when added.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import time
from pathlib import Path

import jax

from dzjax.compress.delta_file import Delta, load_delta
from dzjax.errors import DzjaxError
from dzjax.models import delta_stacks, sharding
from dzjax.models.forward import check_delta
from dzjax.models.loading import Base
from dzjax.serving import scheduler
from dzjax.serving.requests import ModelNotFoundError

log = logging.getLogger("dzjax.serving")
MAX_STAGED = 2  # deltas uploaded ahead of their load (device memory for this many more deltas)


def to_host(delta: Delta) -> Delta:
    """The delta with numpy leaves (host memory)."""
    return dataclasses.replace(delta, params=jax.device_get(delta.params))


@dataclasses.dataclass
class Entry:
    """A registered delta."""

    name: str
    path: Path | None  # None: given as an object, never dropped from the host cache
    nbytes: int
    layout: tuple
    digest: str | None  # of the file as added: a read that finds other content is refused
    host: Delta | None = None  # the host copy, None when only on disk
    loading: concurrent.futures.Future | None = None
    loading_since: float = 0.0  # time.monotonic() when the read started
    error: Exception | None = None  # the last failed read, until forgotten


class DeltaPool:
    """Device slots, host cache and disk for the deltas of one serving engine.

    Changed by the engine's thread only; `validate` runs on any thread, and other threads may read
    `names()` (a snapshot).
    """

    def __init__(self, base: Base, capacity: int, host_cache_bytes: int, mesh=None,
                 read_timeout_s: float = 120.0, prepare=None):
        if capacity < 1:
            raise DzjaxError(f"max_resident_deltas must be >= 1, got {capacity}")
        if not read_timeout_s > 0:
            raise DzjaxError(f"delta_read_timeout_s must be > 0, got {read_timeout_s}")
        self.base, self.mesh = base, mesh
        self.prepare = prepare  # params -> params as the model uses them (fused projections)
        self.read_timeout_s = read_timeout_s
        self.capacity = capacity
        self.host_cache_bytes = host_cache_bytes
        self.layout: tuple | None = None
        self.stacks = None  # the device pytree of [capacity]-slot stacks, made with the first delta
        self.entries: dict[str, Entry] = {}
        self._host_lru: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._kept: set[str] = set()  # on the host until they run, whatever the cache's size
        self.slot_names: list[str | None] = [None] * capacity
        self.users = [0] * capacity  # running requests per slot
        self._last_used = [0] * capacity
        self._clock = 0
        self._reader = self._new_reader()
        self._uploader = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dzjax-delta-upload")
        self._staged: dict[str, concurrent.futures.Future] = {}  # name -> its device params
        # disk_reads, failed_reads, device_loads (staged_loads of them), evictions
        self.counts = collections.Counter()

    @staticmethod
    def _new_reader() -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dzjax-delta-read")

    # -- registry ------------------------------------------------------------------------------

    def validate(self, name: str, source) -> Entry:
        """Read (if a path) and check a delta against the base; returns its entry."""
        if not isinstance(name, str) or not name:
            raise DzjaxError(f"a delta name must be a non-empty string, got {name!r}")
        if isinstance(source, (str, Path)):
            delta, path = load_delta(source, base=self.base), Path(source)
        elif isinstance(source, Delta):
            delta, path = source, None
        else:
            raise DzjaxError(f"delta {name!r}: expected a dzjax.Delta or a file path, "
                             f"got {type(source).__name__}")
        delta.check_base(self.base)
        check_delta(self.base.params, delta.params)
        host = self._to_host(name, delta)
        return Entry(name, path, host.nbytes, delta_stacks.layout(host.params), delta.digest,
                     host=host)

    def _to_host(self, name: str, delta: Delta) -> Delta:
        """The delta as the stacks hold it: numpy leaves, prepared for the model."""
        delta = to_host(delta)
        if self.prepare is None:
            return delta
        try:
            return dataclasses.replace(delta, params=self.prepare(delta.params))
        except DzjaxError as e:
            raise DzjaxError(f"delta {name!r}: {e}") from None

    def add(self, entry: Entry) -> None:
        if entry.name in self.entries:
            raise DzjaxError(f"a delta named {entry.name!r} is already served")
        delta_stacks.check_fits(self.layout, entry.name, entry.layout)
        if self.layout is None:
            self.stacks = delta_stacks.empty_stacks(entry.host.params, self.capacity, self.mesh)
            self.layout = entry.layout
        self.entries[entry.name] = entry
        self._touch_host(entry.name)

    def remove(self, name: str) -> None:
        if name not in self.entries:
            raise ModelNotFoundError(f"no delta named {name!r} is served")
        slot = self.slot_of(name)
        if slot is not None and self.users[slot]:
            raise DzjaxError(f"delta {name!r} is in use by {self.users[slot]} running requests")
        if slot is not None:
            self.slot_names[slot] = None
        self.entries.pop(name)
        self._host_lru.pop(name, None)
        staged = self._staged.pop(name, None)
        if staged is not None:
            staged.cancel()

    def names(self) -> list[str]:
        return sorted(list(self.entries))  # list() first: a snapshot, however the dict changes

    # -- state ---------------------------------------------------------------------------------

    def state(self, name: str) -> str:
        entry = self.entries[name]
        if self.slot_of(name) is not None:
            return scheduler.RESIDENT
        if entry.host is not None:
            return scheduler.ON_HOST
        if entry.loading is not None:
            return scheduler.READING
        return scheduler.FAILED if entry.error is not None else scheduler.ON_DISK

    def view(self) -> scheduler.PoolView:
        """The pool as the scheduler sees it."""
        slots = tuple(scheduler.Slot(n, u, t) for n, u, t in
                      zip(self.slot_names, self.users, self._last_used))
        return scheduler.PoolView(
            slots, {n: self.state(n) for n in self.entries},
            {n: f"delta {n!r} ({e.path}) could not be read: {e.error}"
             for n, e in self.entries.items() if e.error is not None})

    # -- host cache and disk -------------------------------------------------------------------

    def _touch_host(self, name: str) -> None:
        self._host_lru[name] = None
        self._host_lru.move_to_end(name)
        held = sum(self.entries[n].nbytes for n in self._host_lru)
        for victim in list(self._host_lru):  # least recently used first; objects are kept
            if held <= self.host_cache_bytes:
                break
            entry = self.entries[victim]
            if victim != name and entry.path is not None and victim not in self._kept:
                entry.host = None
                del self._host_lru[victim]
                held -= entry.nbytes

    def start_read(self, name: str) -> None:
        """Read a delta that is only on disk, in the background."""
        entry = self.entries[name]
        if self.state(name) == scheduler.ON_DISK:
            entry.loading = self._reader.submit(self._read_again, entry)
            entry.loading_since = time.monotonic()

    def read_now(self, name: str) -> None:
        """Put a delta on the host now, on this thread, reading it if it left the host cache
        (a follower of `multihost`, which loads a delta when process 0 did)."""
        entry = self.entries[name]
        if entry.host is None:
            entry.host = self._read_again(entry)
            self.counts["disk_reads"] += 1
            self._touch_host(name)

    def _read_again(self, entry: Entry) -> Delta:
        """Read a delta that left the host cache, checked again as when it was added: the file
        may have been damaged or replaced since (its hashes, its digest, base and layout)."""
        delta = load_delta(entry.path, base=self.base)
        if delta.digest != entry.digest:
            raise DzjaxError(f"delta {entry.name!r} ({entry.path}) changed on disk since it was "
                             f"added (its content digest differs); add it again to serve the "
                             f"new file")
        delta = self._to_host(entry.name, delta)
        if delta_stacks.layout(delta.params) != self.layout:
            raise DzjaxError(f"delta {entry.name!r} ({entry.path}) changed on disk since it was "
                             f"added: " + delta_stacks.describe_difference(
                                 self.layout, delta_stacks.layout(delta.params)))
        return delta

    def poll(self) -> None:
        """Take in the reads that finished: their deltas are on the host now, or FAILED; a read
        that takes longer than `read_timeout_s` (a hung disk) is given up: FAILED too."""
        for name, entry in self.entries.items():
            if entry.loading is None:
                continue
            if not entry.loading.done():
                waited = time.monotonic() - entry.loading_since
                if waited > self.read_timeout_s:  # the thread may still finish: ignored then
                    entry.loading = None
                    entry.error = TimeoutError(f"reading took more than {self.read_timeout_s:g} s")
                    self.counts["failed_reads"] += 1
                    # Later reads get a thread of their own, not a place behind the hung one.
                    self._reader.shutdown(wait=False)
                    self._reader = self._new_reader()
                continue
            future, entry.loading = entry.loading, None
            try:
                entry.host = future.result()
            except Exception as e:  # a file removed or damaged since it was added
                entry.error = e
                self.counts["failed_reads"] += 1
            else:
                self.counts["disk_reads"] += 1
                self._touch_host(name)

    def keep(self, names) -> None:
        """Keep these deltas' host copies (queued requests wait for them) until the next call:
        the host cache may hold them beyond its size for that long."""
        self._kept = set(names)
        # The first of them that are on the host and not resident: uploaded ahead, off the
        # engine thread.
        wanted = [n for n in dict.fromkeys(names) if self.slot_of(n) is None
                  and n in self.entries and self.entries[n].host is not None][:MAX_STAGED]
        for n in [n for n in self._staged if n not in wanted]:
            self._staged.pop(n).cancel()  # (one already uploading finishes and is dropped)
        for n in wanted:
            if n not in self._staged:
                self._staged[n] = self._uploader.submit(self._upload, self.entries[n].host.params)

    def _upload(self, params):
        """A delta's params on the device, placed as one slot of the stacks (uploader thread)."""
        if self.mesh is None:
            return jax.block_until_ready(jax.device_put(params))
        where = sharding.slot_shardings(params, self.mesh)
        return jax.block_until_ready(jax.tree.map(sharding.put, params, where))

    def forget_failure(self, name: str) -> None:
        """The requests that waited for a failed read were failed: the next one tries again."""
        if name in self.entries:
            self.entries[name].error = None

    # -- device slots --------------------------------------------------------------------------

    def slot_of(self, name: str) -> int | None:
        try:
            return self.slot_names.index(name)
        except ValueError:
            return None

    def resident(self) -> list[str]:
        return [n for n in self.slot_names if n is not None]

    def load(self, name: str, slot: int) -> None:
        """Write delta `name` (on the host) into device slot `slot`, replacing what was there."""
        entry = self.entries[name]
        if entry.host is None:
            raise DzjaxError(f"delta {name!r} is not on the host")
        if self.users[slot]:
            raise DzjaxError(f"slot {slot} is in use by {self.users[slot]} running requests")
        if self.slot_names[slot] is not None:
            self.counts["evictions"] += 1
        self.slot_names[slot] = None  # until written: a failed write leaves the slot empty
        params = entry.host.params
        staged = self._staged.pop(name, None)
        if staged is not None:  # uploaded ahead (or being uploaded: no slower than here)
            try:
                params = staged.result()
                self.counts["staged_loads"] += 1
            except Exception:  # noqa: BLE001 - the host copy is still there: upload it here
                log.exception("uploading delta %r ahead failed; loading it from the host", name)
        if params is entry.host.params and self.mesh is not None:  # placed as a slot first:
            params = self._upload(params)  # (a mesh over several processes takes no host arrays)
        self.stacks = delta_stacks.write_slot(self.stacks, slot, params)
        self.slot_names[slot] = name
        self.counts["device_loads"] += 1
        self._touch_host(name)

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
            self.stacks = sharding.zeros_like_placed(self.stacks)
        self.slot_names = [None] * self.capacity
        self._staged.clear()

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
        self._uploader.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        return {"resident": self.resident(), "capacity": self.capacity,
                "registered": sorted(self.entries),
                "host_cached": list(self._host_lru),
                "host_cache_bytes": sum(self.entries[n].nbytes for n in self._host_lru),
                "staged": list(self._staged),
                **{k: self.counts[k] for k in ("disk_reads", "failed_reads", "device_loads",
                                               "staged_loads", "evictions")}}
