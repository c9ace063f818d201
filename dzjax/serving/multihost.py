"""Serving over several processes (multi-controller SPMD, `jax.distributed`): one model split over
the devices of several processes or hosts, one server.

Every process runs the same jitted steps on its own part of the mesh; only process 0 (the
leader) has a scheduler, a request queue and (with `dzjax serve`) HTTP. Each time the leader's
engine touches the device state - registers a delta, writes one into a slot, prefills, decodes -
it first sends that call's host arguments to the other processes (the followers), in order,
through the key-value store of `jax.distributed`'s coordination service; each follower's engine
makes the same call on the same state, so that the collectives inside the steps meet.

Failure: a follower writes a heartbeat every second; when one stops (the process died) or a step
fails (a collective with a dead peer fails at once), the leader's engine stops, every request
ends with an error naming the process, and `dzjax serve` exits; a follower whose leader is gone
exits with an error too. No step is retried: the processes' states could differ after a failure.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import time

import jax
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.serving.requests import ServerClosedError

log = logging.getLogger("dzjax.serving")

PREFIX = "dzjax/serve"
WINDOW = 4096  # sent calls kept in the store (the followers are at most a step or two behind)
HEARTBEAT_S = 1.0  # how often a follower says it is alive
WORKER_TIMEOUT_S = 10.0  # default: a follower silent this long is taken for dead


def spans_processes(mesh) -> bool:
    """Whether a mesh's devices belong to several processes."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def _client():
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None:
        raise DzjaxError("a mesh over several processes needs jax.distributed.initialize() first")
    return client


# -- messages: JSON with numpy arrays beside it --------------------------------------------------

def encode(value) -> bytes:
    """Bytes for a value of None, bools, ints, floats, strings, lists, tuples, dicts with string
    keys and numpy arrays (no pickle: a follower runs nothing but the steps)."""
    arrays: list[np.ndarray] = []

    def walk(v):
        if isinstance(v, np.ndarray):
            arrays.append(v)
            return {"__array__": len(arrays) - 1}
        if isinstance(v, tuple):
            return {"__tuple__": [walk(x) for x in v]}
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, np.generic):
            return v.item()
        return v
    head = json.dumps(walk(value)).encode()
    out = io.BytesIO()
    out.write(len(head).to_bytes(8, "little"))
    out.write(head)
    for a in arrays:
        np.save(out, a, allow_pickle=False)
    return out.getvalue()


def decode(data: bytes):
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8:8 + n])
    stream = io.BytesIO(data[8 + n:])
    arrays = []

    def walk(v):
        if isinstance(v, dict):
            if "__array__" in v:
                while len(arrays) <= v["__array__"]:
                    arrays.append(np.load(stream, allow_pickle=False))
                return arrays[v["__array__"]]
            if "__tuple__" in v:
                return tuple(walk(x) for x in v["__tuple__"])
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v
    return walk(head)


# -- the leader ----------------------------------------------------------------------------------

class Leader:
    """Process 0's side: sends each device call to the followers and watches that they live."""

    def __init__(self, mesh, worker_timeout_s: float = WORKER_TIMEOUT_S):
        if not worker_timeout_s > 0:
            raise DzjaxError(f"worker_timeout_s must be > 0, got {worker_timeout_s}")
        self.client = _client()
        self.followers = sorted({d.process_index for d in mesh.devices.flat} - {0})
        self.worker_timeout_s = worker_timeout_s
        self.sent = 0
        self.failure: str | None = None  # why the server stops, once a follower is gone
        self._on_failure = None
        self._stop = threading.Event()
        self._closed = False

    def send(self, kind: str, **fields) -> None:
        """Hand one device call to every follower (before making it here, or after it for one
        without collectives that may fail here: then it is sent only if it succeeded)."""
        if self.failure is not None:
            raise ServerClosedError(self.failure)
        self._put(kind, **fields)

    def _put(self, kind: str, **fields) -> None:
        self.client.key_value_set_bytes(f"{PREFIX}/op/{self.sent}",
                                        encode({"kind": kind, **fields}))
        if self.sent >= WINDOW:
            self.client.key_value_delete(f"{PREFIX}/op/{self.sent - WINDOW}")
        self.sent += 1

    def watch(self, on_failure) -> None:
        """Call on_failure(message) once, from a thread of its own, when a follower's
        heartbeat stops for worker_timeout_s."""
        self._on_failure = on_failure
        threading.Thread(target=self._watch, name="dzjax-multihost-watch", daemon=True).start()

    def _watch(self) -> None:
        last = {p: (None, time.monotonic()) for p in self.followers}
        while not self._stop.wait(HEARTBEAT_S / 2):
            for p in self.followers:
                try:
                    beat = self.client.key_value_try_get(f"{PREFIX}/alive/{p}")
                except Exception:  # noqa: BLE001 - not written yet (it is still starting)
                    beat = None
                seen, since = last[p]
                if beat != seen:
                    last[p] = (beat, time.monotonic())
                elif time.monotonic() - since > self.worker_timeout_s:
                    self.fail(f"process {p} of {len(self.followers) + 1} stopped answering (no "
                              f"heartbeat for {self.worker_timeout_s:g} s): the server stops")
                    return

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("%s", message)
            if self._on_failure is not None:
                self._on_failure(message)

    def close(self) -> None:
        """Tell the followers that the server has stopped: they return from `serve` (or raise
        with the failure's message)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            if self.failure is None:
                self._put("stop")
            else:
                self._put("fail", message=self.failure)
        except Exception:  # noqa: BLE001 - the coordination service is gone: nobody to tell
            log.exception("telling the other processes to stop failed")


# -- a follower ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Follower:
    """Process i > 0's side: receives the leader's device calls, in order."""

    client: object = dataclasses.field(default_factory=_client)
    received: int = 0

    def heartbeat(self, stop: threading.Event) -> None:
        key, n = f"{PREFIX}/alive/{jax.process_index()}", 0
        while not stop.is_set():
            try:
                self.client.key_value_set(key, str(n), allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the leader is gone; `receive` says so
                return
            n += 1
            stop.wait(HEARTBEAT_S)

    def receive(self) -> dict:
        """The next call (waits as long as the leader is idle); raises if the leader is gone."""
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(f"{PREFIX}/op/{self.received}",
                                                                1000)
            except Exception as e:  # noqa: BLE001 - a timeout (idle), or the service is gone
                if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                    continue
                raise DzjaxError(f"process {jax.process_index()}: lost process 0 (the server) "
                                 f"after {self.received} calls: {e}") from None
            self.received += 1
            return decode(data)


def follow(engine, deltas: dict) -> None:
    """Run a follower: make the leader's device calls on this process's engine (not started)
    until the leader stops. `deltas` (this process's `serve` argument) must name the same files
    as the leader's."""
    follower = Follower()
    stop = threading.Event()
    threading.Thread(target=follower.heartbeat, args=(stop,), name="dzjax-multihost-beat",
                     daemon=True).start()
    try:
        hello = follower.receive()
        check_hello(hello, engine, deltas)
        while True:
            op = follower.receive()
            kind = op.pop("kind")
            if kind == "stop":
                return
            if kind == "fail":
                raise DzjaxError(f"process {jax.process_index()}: the server on process 0 "
                                 f"stopped: {op['message']}")
            replay(engine, kind, op)
    finally:
        stop.set()
        engine.pool.close()


def replay(engine, kind: str, op: dict) -> None:
    """Make one of the leader's device calls on a follower's engine."""
    pool = engine.pool
    if kind == "add":
        pool.add(pool.validate(op["name"], op["path"]))
    elif kind == "remove":
        pool.remove(op["name"])
    elif kind == "load":
        pool.read_now(op["name"])
        pool.load(op["name"], op["slot"])
    elif kind == "prefill":
        engine._run_prefill(**op)
    elif kind == "decode":
        engine._run_decode(**op)
    else:
        raise DzjaxError(f"process 0 sent an unknown call {kind!r} (another dzjax version?)")


def hello(engine, deltas: dict) -> dict:
    """What the followers check before following: the same model, settings and deltas."""
    options = {f.name: getattr(engine.config, f.name) for f in dataclasses.fields(engine.config)
               if f.name != "mesh"}
    return {"kind": "hello", "options": json.loads(json.dumps(options, default=str)),
            "model": json.loads(json.dumps(dataclasses.asdict(engine.base.config), default=str)),
            "mesh": [d.id for d in engine.config.mesh.devices.flat],
            "deltas": {n: str(p) for n, p in deltas.items()}}


def check_hello(got: dict, engine, deltas: dict) -> None:
    own = hello(engine, deltas)
    for part in ("model", "options", "mesh", "deltas"):
        if got.get(part) != own[part]:
            differ = ([k for k in set(got.get(part) or {}) | set(own[part])
                       if (got.get(part) or {}).get(k) != own[part].get(k)]
                      if isinstance(own[part], dict) else [part])
            raise DzjaxError(f"process {jax.process_index()} was started with other {part} than "
                             f"process 0 (differing: {sorted(differ)}); every process must call "
                             f"dzjax.serve with the same base, deltas and options")
