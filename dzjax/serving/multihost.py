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
import itertools
import json
import logging
import threading
import time
from pathlib import Path

import jax
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.serving.requests import ServerClosedError

log = logging.getLogger("dzjax.serving")

PREFIX = "dzjax/serve"
HEARTBEAT_S = 1.0  # how often a follower says it is alive (and which calls it has taken)
START_TIMEOUT_S = 600  # how long the processes wait for each other to start serving
_sessions = itertools.count()  # servers started in this process (each has its own keys)


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


# -- the start: every process agrees, before any collective -------------------------------------

def start(base, config, deltas: dict):
    """This process's part in serving on `config.mesh` (over several processes): process 0's
    `Leader` or another's `Follower`, once every process has checked that it was started as
    process 0 was (model, options, mesh, delta files). Runs before anything is placed on the
    mesh (placing is collective: processes started otherwise would meet in mismatched
    collectives); a difference raises on every process, naming it."""
    client = _client()
    processes = {d.process_index for d in config.mesh.devices.flat}
    if processes != set(range(jax.process_count())):
        raise DzjaxError(f"the mesh spans processes {sorted(processes)}, not all "
                         f"{jax.process_count()} of jax.distributed: one server spans them all")
    for name, path in deltas.items():
        if not isinstance(path, (str, Path)):
            raise DzjaxError(f"delta {name!r}: on a mesh over several processes, deltas are "
                             f"given as files (the same path on every host), not as objects")
    if not config.worker_timeout_s > 0:
        raise DzjaxError(f"worker_timeout_s must be > 0, got {config.worker_timeout_s}")
    prefix = f"{PREFIX}/{next(_sessions)}"  # (every process serves in the same order)
    own, me, wait_ms = hello(base, config, deltas), jax.process_index(), START_TIMEOUT_S * 1000
    if me == 0:
        client.key_value_set_bytes(f"{prefix}/hello", json.dumps(own).encode())
        problems = [client.blocking_key_value_get(f"{prefix}/agreed/{p}", wait_ms)
                    for p in sorted(processes - {0})]
        problems = [p for p in problems if p != "ok"]
        if problems:
            raise DzjaxError("; ".join(problems))
        return Leader(config.mesh, prefix, config.worker_timeout_s)
    leader = json.loads(client.blocking_key_value_get_bytes(f"{prefix}/hello", wait_ms))
    problem = difference(leader, own)
    client.key_value_set(f"{prefix}/agreed/{me}", problem or "ok")
    if problem:
        raise DzjaxError(problem)
    return Follower(prefix)


def hello(base, config, deltas: dict) -> dict:
    """What the processes compare before serving: the model, the settings, the mesh's devices
    and the delta files (absolute paths)."""
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if f.name != "mesh"}
    return {"options": json.loads(json.dumps(options, default=str)),
            "model": json.loads(json.dumps(dataclasses.asdict(base.config), default=str)),
            "mesh": [d.id for d in config.mesh.devices.flat],
            "deltas": {n: str(Path(p).resolve()) for n, p in deltas.items()}}


def difference(leader: dict, own: dict) -> str | None:
    """None if they agree, else what differs (a message for both sides)."""
    for part in ("model", "options", "mesh", "deltas"):
        theirs, mine = leader.get(part), own[part]
        if theirs != mine:
            differ = ([k for k in set(theirs or {}) | set(mine)
                       if (theirs or {}).get(k) != mine.get(k)]
                      if isinstance(mine, dict) else [part])
            return (f"process {jax.process_index()} was started with other {part} than process "
                    f"0 (differing: {sorted(differ)}); every process must call dzjax.serve "
                    f"with the same base, deltas and options")
    return None


# -- the leader ----------------------------------------------------------------------------------

class Leader:
    """Process 0's side: sends each device call to the followers and watches that they live."""

    def __init__(self, mesh, prefix: str, worker_timeout_s: float):
        self.client, self.prefix = _client(), prefix
        self.followers = sorted({d.process_index for d in mesh.devices.flat} - {0})
        self.worker_timeout_s = worker_timeout_s
        self.sent = 0
        self._read_by_all = 0  # calls every follower has taken (deleted from the store)
        self.failure: str | None = None  # why the server stops, once a follower is gone
        self._on_failure = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # (the engine's thread and the watch thread send)
        self._closed = False

    def send(self, kind: str, **fields) -> None:
        """Hand one device call to every follower (before making it here, or after it for one
        without collectives that may fail here: then it is sent only if it succeeded)."""
        if self.failure is not None:
            raise ServerClosedError(self.failure)
        try:
            self._put(kind, **fields)
        except Exception as e:  # the followers may now lack a call: they cannot go on
            self.fail(f"sending a call to the other processes failed ({e}); the server stops")
            raise ServerClosedError(self.failure) from None

    def _put(self, kind: str, **fields) -> None:
        with self._lock:
            self.client.key_value_set_bytes(f"{self.prefix}/op/{self.sent}",
                                            encode({"kind": kind, **fields}))
            self.sent += 1

    def _forget(self, read: int) -> None:
        """Delete the calls below `read` (every follower has taken them)."""
        for n in range(self._read_by_all, read):
            self.client.key_value_delete(f"{self.prefix}/op/{n}")
        self._read_by_all = max(self._read_by_all, read)

    def watch(self, on_failure) -> None:
        """Call on_failure(message) once, from a thread of its own, when a follower's
        heartbeat stops for worker_timeout_s or it reports an error."""
        self._on_failure = on_failure
        threading.Thread(target=self._watch, name="dzjax-multihost-watch", daemon=True).start()

    def _watch(self) -> None:
        last = {p: (None, time.monotonic()) for p in self.followers}
        n = len(self.followers) + 1
        while not self._stop.wait(HEARTBEAT_S / 2):
            read = []
            for p in self.followers:
                beat, error = (self._get(f"{self.prefix}/{key}/{p}") for key in ("alive", "error"))
                if error is not None:
                    return self.fail(f"process {p} of {n} failed: {error}; the server stops")
                seen, since = last[p]
                if beat != seen:
                    last[p] = (beat, time.monotonic())
                elif time.monotonic() - since > self.worker_timeout_s:
                    return self.fail(f"process {p} of {n} stopped answering (no heartbeat for "
                                     f"{self.worker_timeout_s:g} s): the server stops")
                read.append(int(beat.split()[1]) if beat else 0)
            try:
                self._forget(min(read))
            except Exception:  # noqa: BLE001 - (only memory: tried again next time)
                log.exception("deleting the calls the other processes took failed")

    def _get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception:  # noqa: BLE001 - not written (yet)
            return None

    def fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            log.error("%s", message)
            if self._on_failure is not None:
                self._on_failure(message)

    def close(self) -> None:
        """Tell the followers that the server has stopped: they return from `serve` (or raise
        with the failure's message)."""
        with self._lock:
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

class Follower:
    """Process i > 0's side: receives the leader's device calls, in order, and makes them."""

    def __init__(self, prefix: str):
        self.client, self.prefix = _client(), prefix
        self.received = 0

    def _heartbeat(self, stop: threading.Event) -> None:
        """'beats received': alive, and how many calls it has taken (for the leader to free)."""
        key, beats = f"{self.prefix}/alive/{jax.process_index()}", 0
        while not stop.is_set():
            try:
                self.client.key_value_set(key, f"{beats} {self.received}", allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the leader is gone; `receive` says so
                return
            beats += 1
            stop.wait(HEARTBEAT_S)

    def receive(self) -> dict:
        """The next call (waits as long as the leader is idle); raises if the leader is gone."""
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(
                    f"{self.prefix}/op/{self.received}", 1000)
            except Exception as e:  # noqa: BLE001 - a timeout (idle), or the service is gone
                if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
                    continue
                raise DzjaxError(f"process {jax.process_index()}: lost process 0 (the server) "
                                 f"after {self.received} calls: {e}") from None
            self.received += 1
            return decode(data)

    def follow(self, engine) -> None:
        """Make the leader's device calls on this process's engine (never started) until the
        leader stops; a call that fails here is reported to the leader, which stops too."""
        stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(stop,), name="dzjax-multihost-beat",
                         daemon=True).start()
        me = jax.process_index()
        try:
            while True:
                op = self.receive()
                kind = op.pop("kind")
                if kind == "stop":
                    return
                if kind == "fail":
                    raise DzjaxError(f"process {me}: the server on process 0 stopped: "
                                     f"{op['message']}")
                try:
                    replay(engine, kind, op)
                except Exception as e:  # noqa: BLE001 - reported to the leader, then raised
                    message = (f"its call {self.received - 1} ({kind}) failed: "
                               f"{type(e).__name__}: {e}")
                    try:
                        self.client.key_value_set(f"{self.prefix}/error/{me}", message[:2000])
                    except Exception:  # noqa: BLE001 - the leader is gone too
                        pass
                    raise DzjaxError(f"process {me}: {message}") from e
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
