"""The serving engine: continuous batching of many requests over many deltas, on one thread.

Each loop iteration (a "step"): take new requests and commands from the inbox, admit waiting
requests into free batch slots (the scheduler below), prefill the admitted ones, then decode one
token for every running request in one jitted call. Requests join and leave between steps; the
compiled programs never change (see `steps`).

Scheduler policy:
- First come, first served: waiting requests are considered in arrival order.
- A request needs a free batch slot and, unless it is for the base model, its delta in a device
  slot of the pool. A delta not on the host is read from disk in the background as soon as its
  request is queued, while the others decode.
- At most `max_deltas_per_step` distinct deltas run in one step.
- Later requests may overtake one that waits for a pool slot or the delta cap, but only
  `max_overtakes` times: after that, no request for another delta is admitted until it runs
  (base-only requests still are, as they hold no pool slot), so running deltas drain, a slot frees
  and an unpopular delta cannot starve.
- Memory is fixed up front (KV cache rows, pool slots): when it is short, requests wait in the
  queue; a request that could never fit (prompt + max_tokens > max_seq_len) is refused at once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models import sharding
from dzjax.models.forward import TRACE_COUNTS
from dzjax.models.generate import bucket
from dzjax.models.llama import KVCache
from dzjax.models.loading import Base
from dzjax.serving import steps
from dzjax.serving.pool import DeltaPool

log = logging.getLogger("dzjax.serving")


class RequestError(DzjaxError):
    """A request cannot be served as asked (its fields, its model, its length)."""


class ModelNotFoundError(RequestError):
    """A request names a model that is not served."""


class ServerClosedError(DzjaxError):
    """The server is closed (or its engine stopped): it takes no more requests."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request generates. temperature 0 is greedy."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    ignore_eos: bool = False

    def __post_init__(self):
        checks = [(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                   f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
                  (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
                   f"temperature must be in [0, 100], got {self.temperature!r}"),
                  (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
                   f"top_p must be in (0, 1], got {self.top_p!r}"),
                  (isinstance(self.seed, int) and 0 <= self.seed < 2 ** 32,
                   f"seed must be an integer in [0, 2**32), got {self.seed!r}"),
                  (all(isinstance(s, str) and s for s in self.stop),
                   f"stop must be non-empty strings, got {self.stop!r}")]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request reports as it runs: a piece of output, then the end."""

    kind: str  # "token" or "done"
    text: str = ""  # the new text (token events; empty without a tokenizer)
    token_ids: tuple[int, ...] = ()  # the new token ids
    finish_reason: str | None = None  # done: "stop", "length", "cancelled" or "error"
    error: Exception | None = None


@dataclasses.dataclass
class Request:
    """One request and everything measured about it (times from `time.perf_counter`)."""

    id: int
    model: str | None  # a delta name; None = the base model
    prompt_ids: list[int]
    sampling: SamplingParams
    listener: Callable[[Event], None]
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""  # the output text so far (with a tokenizer)
    emitted: int = 0  # characters of `text` already reported
    decoded: tuple[int, int] = (0, 0)  # incremental detokenization: (prefix, read) token offsets
    finish_reason: str | None = None
    cancelled: bool = False
    overtaken: int = 0
    batch_row: int | None = None
    delta_slot: int = -1

    @property
    def timings(self) -> dict:
        """Seconds from arrival to admission, first token and finish."""
        since = lambda t: None if t is None else t - self.arrival
        return {"queued": since(self.admitted), "first_token": since(self.first_token),
                "total": since(self.finished)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_batch: int = 8  # batch slots (rows decoded per step)
    max_seq_len: int | None = None  # KV cache length per slot; None = min(context, 1024)
    max_resident_deltas: int = 8  # device slots of the delta pool
    max_deltas_per_step: int | None = None  # None = max_resident_deltas
    host_cache_bytes: int = 4 << 30
    max_overtakes: int | None = None  # None = max_batch
    dtype: str = "float32"  # activations
    implementation: str | None = None  # delta kernels (see dzjax.pallas_kernels)
    mesh: object = None  # a jax.sharding.Mesh with axis "tp": tensor parallelism (None: one device)


class Engine:
    """Owns the model state and runs the loop on its own thread; other threads talk to it
    through `submit`, `cancel`, `call` (run a function on the engine thread) and `close`."""

    def __init__(self, base: Base, config: EngineConfig):
        from dzjax.pallas_kernels.dispatch import requested_implementation

        self.base, self.config = base, config
        if config.max_batch < 1:
            raise DzjaxError(f"max_batch must be >= 1, got {config.max_batch}")
        context = base.config.max_position_embeddings
        self.max_seq_len = config.max_seq_len or min(context, 1024)
        if not 1 < self.max_seq_len <= context:
            raise DzjaxError(f"max_seq_len={self.max_seq_len} must be in [2, {context}] "
                             f"(the model's context)")
        self.dtype = jnp.dtype(config.dtype)
        self.implementation = requested_implementation(config.implementation)
        self.max_deltas_per_step = config.max_deltas_per_step or config.max_resident_deltas
        self.max_overtakes = (config.max_batch if config.max_overtakes is None
                              else config.max_overtakes)
        self.mesh, self.params = config.mesh, base.params
        if self.mesh is not None:  # refuse a mesh that does not divide the model, before XLA does
            sharding.check_mesh(self.mesh, base.config)
            self.params = sharding.shard_params(base.params, self.mesh)
        self.pool = DeltaPool(base, config.max_resident_deltas, config.host_cache_bytes,
                              mesh=self.mesh)
        self.eos = set(base.config.eos_token_ids)
        tok = base.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            self.eos.add(tok.eos_token_id)
        self.cache = KVCache.zeros(base.config, config.max_batch, self.max_seq_len, self.dtype)
        if self.mesh is not None:
            self.cache = jax.device_put(self.cache, jax.sharding.NamedSharding(
                self.mesh, sharding.cache_spec()))
        self.rows: list[Request | None] = [None] * config.max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._closing = False
        self._lock = threading.Lock()
        self.counts = collections.Counter()  # steps, decode_rows, tokens, requests, ...
        self.started = time.perf_counter()
        self._traces_at_start = {k: TRACE_COUNTS[k] for k in ("serve_decode", "serve_prefill")}
        self._thread = threading.Thread(target=self._run, name="dzjax-engine", daemon=True)
        self._thread.start()

    # -- other threads -------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], model: str | None, sampling: SamplingParams,
               listener: Callable[[Event], None]) -> Request:
        if self._closing or not self.alive:
            raise ServerClosedError("the server is closed")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        vocab = self.base.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_ids) + sampling.max_tokens > self.max_seq_len:
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"exceeds the context of {self.max_seq_len} tokens")
        if sampling.stop and self.base.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; the base has none")
        request = Request(next(self._ids), model, list(prompt_ids), sampling, listener)
        with self._lock:  # against close(): accepted before it, or refused
            if self._closing:
                raise ServerClosedError("the server is closed")
            self._inbox.put(("submit", request))
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away): its batch slot is freed at the next step."""
        request.cancelled = True
        self._inbox.put(("wake", None))

    def call(self, fn, *args):
        """Run fn(*args) on the engine thread between steps; returns its result or raises."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["result"] = fn(*args)
            except Exception as e:
                box["error"] = e
            done.set()
        if not self.alive:
            raise ServerClosedError("the serving engine has stopped")
        self._inbox.put(("call", run))
        while not done.wait(0.1):
            if not self.alive:  # it stopped before reaching our call
                raise ServerClosedError("the serving engine has stopped")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def close(self, timeout: float | None = None) -> None:
        """Finish every accepted request, then stop; new requests are refused meanwhile."""
        with self._lock:
            self._closing = True
            self._inbox.put(("wake", None))
        self._thread.join(timeout)
        self.pool.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        idle = False
        try:
            while True:
                busy = any(self.rows) or self.waiting
                if self._closing and not busy and self._inbox.empty():
                    return
                # Block briefly when there is nothing to do, or when the last step did nothing
                # (requests waiting for a disk read): no busy loop.
                self._drain_inbox(block=idle or not busy)
                try:
                    idle = not self._step()
                except Exception as e:  # fail the running requests, keep serving the others
                    log.exception("serving step failed")
                    self._recover(e)
        finally:  # however the thread ends, nobody waits for it forever
            self._fail_everything(ServerClosedError("the serving engine has stopped"))

    def _recover(self, error: Exception) -> None:
        for r in [r for r in self.rows if r is not None]:
            self._finish(r, "error", error)
        # A failed step may have consumed its donated buffers: make them again.
        if self.cache.k.is_deleted():
            self.cache = steps.zeros_like_placed(self.cache)
        stacks = jax.tree.leaves(self.pool.stacks)
        if stacks and stacks[0].is_deleted():
            self.pool.reset_device()

    def _fail_everything(self, error: Exception) -> None:
        with self._lock:
            self._closing = True
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                self.waiting.append(payload)
            elif kind == "call":
                payload()
        for r in [r for r in self.rows if r is not None] + list(self.waiting):
            self._finish(r, "error", error)
        self.waiting.clear()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "submit":
                self._accept(payload)
            elif kind == "call":
                payload()
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, request: Request) -> None:
        if request.model is not None and request.model not in self.pool.entries:
            self._finish(request, "error", ModelNotFoundError(
                f"model {request.model!r} is not served"))
            return
        self.counts["requests"] += 1
        self.waiting.append(request)
        if request.model is not None:
            self.pool.prefetch(request.model)

    def _step(self) -> bool:
        """One step; returns whether it did anything."""
        cancelled = [r for r in self.rows if r is not None and r.cancelled]
        for r in cancelled:
            self._finish(r, "cancelled")
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if any(self.rows):
            self._decode()
        return bool(cancelled or admitted or any(self.rows))

    def _admit(self) -> list[Request]:
        free = [i for i, r in enumerate(self.rows) if r is None]
        running = {r.model for r in self.rows if r is not None and r.model is not None}
        admitted: list[Request] = []
        starving = None  # a request overtaken too often: others' deltas wait for it
        for request in list(self.waiting):
            if request.cancelled:
                self.waiting.remove(request)
                self._finish(request, "cancelled")
                continue
            if not free:
                break
            name = request.model
            if name is not None:
                entry = self.pool.entries.get(name)
                if entry is None:  # removed while queued
                    self.waiting.remove(request)
                    self._finish(request, "error", ModelNotFoundError(
                        f"model {name!r} was removed"))
                    continue
                if starving is not None and name != starving.model:
                    continue
                slot = None
                if name in running or len(running) < self.max_deltas_per_step:
                    try:
                        slot = self.pool.make_resident(name)
                    except Exception as e:  # this delta cannot be loaded: only its request fails
                        log.exception("loading delta %r failed", name)
                        entry.error = e
                if slot is None:
                    if entry.error is not None:
                        self.waiting.remove(request)
                        self._finish(request, "error", entry.error)
                        continue
                    # Waiting for a pool slot or the cap (not for a disk read) can starve.
                    if self.pool.host_ready(name) and request.overtaken >= self.max_overtakes:
                        starving = request
                    continue
                self.pool.acquire(slot)
                request.delta_slot = slot
                running.add(name)
            for earlier in self.waiting:
                if earlier is request:
                    break
                earlier.overtaken += 1
            self.waiting.remove(request)
            request.batch_row = free.pop(0)
            request.admitted = time.perf_counter()
            self.rows[request.batch_row] = request
            admitted.append(request)
        return admitted

    @staticmethod
    def _sampling(requests: list[Request | None]):
        """(seeds, counters, temperature, top_p) for rows of requests (None: an idle row)."""
        seeds, counters, temperature, top_p = (np.zeros(len(requests), d) for d in (
            np.uint32, np.int32, np.float32, np.float32))
        top_p[:] = 1.0
        for i, r in enumerate(requests):
            if r is not None:
                seeds[i], counters[i] = r.sampling.seed, len(r.output_ids)
                temperature[i], top_p[i] = r.sampling.temperature, r.sampling.top_p
        return seeds, counters, temperature, top_p

    def _prefill(self, admitted: list[Request]) -> None:
        by_length = collections.defaultdict(list)
        for r in admitted:
            by_length[bucket(len(r.prompt_ids), 16, self.max_seq_len)].append(r)
        for t, group in sorted(by_length.items()):
            n = bucket(len(group), 1, self.config.max_batch)
            ids = np.zeros((n, t), np.int32)
            lengths = np.ones(n, np.int32)
            rows = np.full(n, self.config.max_batch, np.int32)  # padding rows: writes dropped
            slots = np.full(n, -1, np.int32)
            for i, r in enumerate(group):
                ids[i, :len(r.prompt_ids)] = r.prompt_ids
                lengths[i], rows[i], slots[i] = len(r.prompt_ids), r.batch_row, r.delta_slot
            tokens, self.cache = steps.prefill(
                self.params, self.pool.stacks, self.cache, ids, lengths, rows, slots,
                self._sampling(group + [None] * (n - len(group))), config=self.base.config,
                dtype=self.dtype, implementation=self.implementation, mesh=self.mesh)
            self.counts["prefill_calls"] += 1
            tokens = np.asarray(tokens)
            for i, r in enumerate(group):
                self._emit(r, int(tokens[i]))

    def _decode(self) -> None:
        b = self.config.max_batch
        tokens = np.zeros(b, np.int32)
        positions = np.full(b, self.max_seq_len, np.int32)  # idle rows: writes dropped
        slots = np.full(b, -1, np.int32)
        live = [r for r in self.rows if r is not None]
        for r in live:
            tokens[r.batch_row] = r.output_ids[-1]
            positions[r.batch_row] = len(r.prompt_ids) + len(r.output_ids) - 1
            slots[r.batch_row] = r.delta_slot
        out, self.cache = steps.decode(
            self.params, self.pool.stacks, self.cache, tokens, positions, slots,
            self._sampling(self.rows), config=self.base.config, dtype=self.dtype,
            implementation=self.implementation, mesh=self.mesh)
        out = np.asarray(out)
        self.counts["steps"] += 1
        self.counts["decode_rows"] += len(live)
        active = len({r.model for r in live if r.model is not None})
        self.counts["active_deltas"] += active
        self.counts["max_active_deltas"] = max(self.counts["max_active_deltas"], active)
        for r in live:
            self._emit(r, int(out[r.batch_row]))

    def _emit(self, r: Request, token: int) -> None:
        """Append one generated token to r, report the new text, and finish r when it is done."""
        if r.first_token is None:
            r.first_token = time.perf_counter()
        if token in self.eos and not r.sampling.ignore_eos:
            self._finish(r, "stop")
            return
        r.output_ids.append(token)
        self.counts["tokens"] += 1
        reason = "length" if len(r.output_ids) >= r.sampling.max_tokens else None
        if self.base.tokenizer is None:
            self._notify(r, Event("token", token_ids=(token,)))
        else:
            grown = len(r.text)
            r.text += self._new_text(r)
            # A stop string can only end in the new text (or straddle into it).
            longest = max(map(len, r.sampling.stop), default=0)
            start = max(0, grown - longest + 1)
            cut = min((i for i in (r.text.find(s, start) for s in r.sampling.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                r.text, reason = r.text[:cut], "stop"
            safe = len(r.text)  # hold back what may be the start of a stop string
            if reason is None:
                for s in r.sampling.stop:
                    for k in range(min(len(s) - 1, len(r.text)), 0, -1):
                        if r.text.endswith(s[:k]):
                            safe = min(safe, len(r.text) - k)
                            break
            new, r.emitted = r.text[r.emitted:safe], max(r.emitted, safe)
            self._notify(r, Event("token", text=new, token_ids=(token,)))
        if reason is not None:
            self._finish(r, reason)

    def _new_text(self, r: Request) -> str:
        """The text that r's last token completes, decoding only a few tokens (not the whole
        output each time): the tokens since the last complete character, against the same
        tokens without the new ones. Empty while a multi-byte character is still incomplete."""
        tok = self.base.tokenizer
        prefix, read = r.decoded
        before = tok.decode(r.output_ids[prefix:read], skip_special_tokens=True)
        after = tok.decode(r.output_ids[prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        r.decoded = (read, len(r.output_ids))
        return after[len(before):]

    def _notify(self, r: Request, event: Event) -> None:
        try:
            r.listener(event)
        except Exception:  # a listener that fails (its client gone) cancels only its request
            log.exception("request %d: listener failed; cancelling it", r.id)
            r.cancelled = True

    def _finish(self, r: Request, reason: str, error: Exception | None = None) -> None:
        if r.finish_reason is not None:
            return
        r.finished, r.finish_reason = time.perf_counter(), reason
        if r.batch_row is not None:
            self.rows[r.batch_row] = None
            if r.delta_slot >= 0:
                self.pool.release(r.delta_slot)
        self.counts["finished_" + reason] += 1
        tail = r.text[r.emitted:] if reason != "error" else ""
        r.emitted = len(r.text)
        if tail:
            self._notify(r, Event("token", text=tail))
        self._notify(r, Event("done", finish_reason=reason, error=error))

    def stats(self) -> dict:
        c = self.counts
        elapsed = time.perf_counter() - self.started
        return {
            "uptime_s": elapsed,
            "requests": c["requests"],
            "finished": {k.removeprefix("finished_"): v for k, v in c.items()
                         if k.startswith("finished_")},
            "running": sum(r is not None for r in self.rows),
            "waiting": len(self.waiting),
            "generated_tokens": c["tokens"],
            "decode_steps": c["steps"],
            "prefill_calls": c["prefill_calls"],
            "mean_batch_rows": c["decode_rows"] / max(c["steps"], 1),
            "mean_active_deltas": c["active_deltas"] / max(c["steps"], 1),
            "max_active_deltas": c["max_active_deltas"],
            # Compilations since this engine started (programs of the same shapes are shared).
            "traces": {k.removeprefix("serve_"): TRACE_COUNTS[k] - v
                       for k, v in self._traces_at_start.items()},
            "pool": self.pool.stats(),
        }
