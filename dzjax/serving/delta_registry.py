"""The deltas of replicas on Ray Serve (`dzjax.serving.ray_serve`), kept in step, without Ray:
the ingress's `DeltaRegistry` (what `admin.Admin` loads into and unloads from, in place of a
server), and each replica's `Follower`, which brings its server's deltas in line with the
registry state a forwarded request carries (`DeltaRegistry.snapshot`)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from dzjax.errors import DzjaxError
from dzjax.serving.requests import ModelNotFoundError, ServerClosedError

RETRY_FREE_S = 0.5  # how often a replica tries again to free a delta in use when unloaded


class DeltaRegistry:
    """The deltas the replicas serve, kept by the ingress. `check(name, path)` reads and checks
    a delta file on one replica (raising a DzjaxError). Each delta is (path, load): load 0 for
    those given at deployment, else the version that loaded it, so that a file loaded again
    under the same name is read again by every replica."""

    def __init__(self, base_name: str, deltas: dict[str, str], check):
        self.base_name, self.check = base_name, check
        self.paths = {name: (path, 0) for name, path in deltas.items()}
        self.epoch = uuid.uuid4().hex  # (a restarted ingress starts over from the given deltas)
        self.version = 0
        self._lock = threading.Lock()  # (loads run on a thread)
        self._changed()

    def models(self) -> list[str]:
        with self._lock:
            return [self.base_name, *sorted(self.paths)]

    def add_delta(self, name: str, path) -> None:
        self.check(name, str(path))
        with self._lock:
            if name in self.paths:
                raise DzjaxError(f"a delta named {name!r} is already served")
            self.version += 1
            self.paths[name] = (str(path), self.version)
            self._changed()

    def remove_delta(self, name: str) -> None:
        with self._lock:
            if name not in self.paths:
                raise ModelNotFoundError(f"no delta named {name!r} is served")
            del self.paths[name]
            self.version += 1
            self._changed()

    def snapshot(self) -> tuple:
        """(epoch, version, ((name, path, load), ...)): what a replica follows (sent with every
        request: built once per change)."""
        return self._snapshot

    def _changed(self) -> None:  # (under the lock, or before any thread sees the registry)
        self._snapshot = self.epoch, self.version, tuple(sorted(
            (name, path, load) for name, (path, load) in self.paths.items()))


class Follower:
    """One replica's side: its `server` serves the deltas of the latest registry state it was
    sent, and no others. `deltas`: those given at deployment (load 0); `replica`: its name,
    for messages. A delta still in use when unloaded (or loaded again) is freed at a later
    request (tried at most every `retry_free_s`); one that could not be read is tried again by
    a request for it."""

    def __init__(self, server, deltas: dict[str, str], replica: str, *,
                 retry_free_s: float = RETRY_FREE_S):
        self.server, self.replica, self.retry_free_s = server, replica, retry_free_s
        self.loads = {name: (path, 0) for name, path in deltas.items()}  # what it serves
        self.wanted = dict(self.loads)  # what it should
        self.seen = None  # the (epoch, version) it follows
        self.retiring: set[str] = set()  # to free once unused here
        self.failed: dict[str, tuple] = {}  # name -> ((path, load), why it was not read)
        self._lock = asyncio.Lock()
        self._tried = 0.0  # (monotonic) when the deltas retiring were last tried

    def behind(self, registry: tuple) -> bool:
        """Whether `registry` is newer than the state followed (one sent earlier may arrive
        later: it is not followed back); a new epoch (a restarted ingress) always is."""
        return self.seen is None or registry[0] != self.seen[0] or registry[1] > self.seen[1]

    def due(self, registry: tuple) -> bool:
        """Whether `sync` has anything to do now."""
        return self.behind(registry) or (
            bool(self.retiring) and time.monotonic() > self._tried + self.retry_free_s)

    async def sync(self, registry: tuple) -> None:
        """Serve what `registry` says. The state counts as followed only once this is done:
        a request that arrives meanwhile waits for it (its delta may be the one being read)."""
        async with self._lock:
            self._tried = time.monotonic()
            newer = self.behind(registry)
            if newer:
                self.wanted = {name: (path, load) for name, path, load in registry[2]}
                self.retiring |= {name for name, load in self.loads.items()
                                  if self.wanted.get(name) != load}
            for name in sorted(self.retiring):
                try:
                    await asyncio.to_thread(self.server.remove_delta, name)
                except ModelNotFoundError:
                    pass
                except DzjaxError:  # requests run on it here
                    continue
                self.retiring.discard(name)
                self.loads.pop(name, None)
            for name, load in self.wanted.items():
                if self.loads.get(name) != load and name not in self.retiring \
                        and self.failed.get(name, (None,))[0] != load:
                    await self._add(name, load)
            if newer:
                self.seen = registry[:2]

    async def _add(self, name: str, load: tuple) -> None:
        try:
            await asyncio.to_thread(self.server.add_delta, name, load[0])  # (reads the file)
        except DzjaxError as e:  # (its requests here get the error)
            self.failed[name] = (load, str(e))
        else:
            self.loads[name] = load
            self.failed.pop(name, None)

    async def unavailable(self, model: str) -> str | None:
        """Why this replica cannot serve `model` now (it answers 503), or None."""
        if model in self.retiring and model in self.wanted:
            return (f"delta {model!r} was loaded again, and replica {self.replica} still runs "
                    f"requests on its previous file: try again")
        if model in self.failed:
            async with self._lock:
                if model in self.failed and model in self.wanted:
                    await self._add(model, self.wanted[model])
            if model in self.failed:
                return (f"delta {model!r} could not be read on replica {self.replica}: "
                        f"{self.failed[model][1]}")
        return None

    async def check(self, name: str, path: str) -> tuple | None:
        """For a load at the ingress: read and check the delta file (not served yet: every
        replica takes it on at its next request). None, or (kind, why): "closed" (this
        replica's server is) or "invalid"."""
        try:
            await asyncio.to_thread(self.server.check_delta, name, path)
        except ServerClosedError as e:
            return "closed", str(e)
        except DzjaxError as e:
            return "invalid", str(e)
        return None
