"""The serving engine: continuous batching of many requests over many deltas, on one thread.

Each loop iteration (a "step"): take new requests and commands from the inbox, take in finished
delta reads, ask the scheduler (`scheduler.schedule`, a pure function of the queue and the pool)
for a plan and carry it out (write deltas into device slots, admit requests into free batch rows),
prefill the admitted requests, then decode one token for every running request in one jitted call.
Requests join and leave between steps; the compiled programs never change (see `steps`).
The host does not wait for the device between decode steps: step n+1 is dispatched with step
n's tokens still on the device, and only then are step n's tokens read, reported and checked
for their ends (`pipeline_decode`, on by default on an accelerator); a request that ended at
step n wastes its row of step n+1.
The pipeline is drained (step n read first) when requests could be admitted or preempted.

Memory is fixed up front (a pool of KV pages, batch rows, delta slots): requests are admitted by
the KV pages their context fills, and take one more page as their output crosses a page; when
the pages run out, the most recently admitted requests are preempted (their pages freed, their
context recomputed when they run again). A request that could never fit (prompt + max_tokens over
max_seq_len, or more pages than the pool has) is refused at once.
Other threads talk to the engine only through its methods; every change of state happens on the
engine thread, between steps.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from dzjax.errors import DzjaxError
from dzjax.models import kv_heads, sharding
from dzjax.models.forward import TRACE_COUNTS, default_dtype
from dzjax.models.generate import bucket
from dzjax.models.kernel_options import KernelOptions
from dzjax.models.kv_cache import KVPages, pallas_attention_unsupported
from dzjax.models.loading import Base
from dzjax.models.text import eos_ids
from dzjax.serving import multihost, scheduler, snapshot
from dzjax.serving.detokenize import TextStream
from dzjax.serving.engine_config import EngineConfig
from dzjax.serving.kv_pages import PageTable
from dzjax.serving.loop import EngineLoop
from dzjax.serving.metrics import Metrics
from dzjax.serving.stepping import InFlight, Steps
from dzjax.serving.pool import DeltaPool
from dzjax.serving.requests import (DeltaUnavailableError, Event, ModelNotFoundError, Request,
                                    RequestError, SamplingParams, ServerClosedError,
                                    TokenLogprob)

log = logging.getLogger("dzjax.serving")


class Engine(Steps, EngineLoop):
    """Owns the model state and runs the step cycle on its own thread (`EngineLoop`); other
    threads call `submit`, `cancel`, `add_delta`, `remove_delta`, `delta_names`, `stats`, `call`
    and `close`; every change of state happens on the engine thread."""

    def __init__(self, base: Base, config: EngineConfig, metrics: Metrics | None = None,
                 role: multihost.Leader | multihost.Follower | None = None):
        super().__init__()
        if multihost.spans_processes(config.mesh) and role is None:
            raise DzjaxError("a mesh over several processes is served by calling dzjax.serve on "
                             "every process")
        if config.mesh is not None:  # any user's mesh, as the one-axis mesh dzjax computes on
            config = dataclasses.replace(config, mesh=sharding.as_tp_mesh(config.mesh,
                                                                          config.tp_axis))
        elif config.tp_axis is not None:
            raise DzjaxError("tp_axis names an axis of a mesh: give the mesh too")
        self.base, self.config = base, config
        self.metrics = metrics or Metrics()  # per-model counts and latencies (Prometheus)
        if config.max_batch < 1:
            raise DzjaxError(f"max_batch must be >= 1, got {config.max_batch}")
        context = base.config.max_position_embeddings
        self.max_seq_len = config.max_seq_len or min(context, 1024)
        if not 1 < self.max_seq_len <= context:
            raise DzjaxError(f"max_seq_len={self.max_seq_len} must be in [2, {context}] "
                             f"(the model's context)")
        self.dtype = jnp.dtype(config.dtype or default_dtype())
        for name in ("fuse_projections", "pipeline_decode", "prefix_sharing"):
            value = getattr(config, name)
            if not isinstance(value, bool) and not (name == "pipeline_decode" and value is None):
                raise DzjaxError(f"{name} must be True or False, got {value!r}")
        self.pipeline = (jax.default_backend() != "cpu" if config.pipeline_decode is None
                         else config.pipeline_decode)
        self.kernels = KernelOptions.resolve(config.implementation, config.mesh,
                                             fused_projections=config.fuse_projections)
        self.limits = scheduler.Limits(
            max_deltas_per_step=config.max_deltas_per_step or config.max_resident_deltas,
            max_overtakes=config.max_batch if config.max_overtakes is None
            else config.max_overtakes, read_ahead=config.max_resident_deltas)
        # More devices than KV heads: each KV head replicated over the devices sharing it.
        replicas = kv_heads.replicas(base.config, sharding.tp_size(config.mesh))
        model = kv_heads.replicated_config(base.config, replicas)
        if config.mesh is not None:  # refuse a mesh that does not divide the model, before XLA does
            sharding.check_mesh(config.mesh, model)
        # The params as the model computes them: KV heads replicated, fused projections (each
        # delta made the same way when the pool reads it), placed on the mesh.
        prepare = kv_heads.preparation(base.config, replicas, self.kernels.shards,
                                       config.fuse_projections)
        params = base.params
        if config.mesh is not None:  # fused on the host, then placed: no full copy on device 0
            params = jax.device_get(params)
        self.params = params if prepare is None else prepare(params)
        if config.mesh is not None:
            self.params = sharding.shard_params(self.params, config.mesh)
        # The engine keeps its own params only: the base's are freed once nobody else holds
        # them (with fused projections, two copies of q/k/v and gate/up otherwise).
        as_converted = base.without_weights()  # (what deltas are checked against)
        base = self.base = dataclasses.replace(as_converted, config=model)
        self.pool = DeltaPool(as_converted, config.max_resident_deltas, config.host_cache_bytes,
                              mesh=config.mesh, read_timeout_s=config.delta_read_timeout_s,
                              prepare=prepare)
        self.max_prompt_bytes = config.max_prompt_bytes or 32 * self.max_seq_len
        for name, value in [("max_stop_strings", config.max_stop_strings),
                            ("max_stop_chars", config.max_stop_chars),
                            ("max_prompt_bytes", self.max_prompt_bytes)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DzjaxError(f"{name} must be an integer >= 1, got {value!r}")
        self.eos = eos_ids(base.config, base.tokenizer)
        ps = config.page_size
        if isinstance(ps, bool) or not isinstance(ps, int) or ps < 1:
            raise DzjaxError(f"page_size must be an integer >= 1, got {ps!r}")
        max_pages = -(-self.max_seq_len // ps)
        num_pages = config.max_batch * max_pages if config.kv_pages is None else config.kv_pages
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise DzjaxError(f"kv_pages must be an integer >= 1, got {num_pages!r}")
        if self.kernels.implementation in ("pallas", "interpret") and any(
                w is None for w in base.config.sliding_windows):
            why = pallas_attention_unsupported(ps, base.config.head_dim, 1)
            if why is not None:
                raise DzjaxError(f"implementation={self.kernels.implementation!r}: the Pallas "
                                 f"paged-attention kernel cannot serve this cache: {why}")
        # Block tables padded to a power of two, so that every bucket of pages read is one.
        self.page_table = PageTable(num_pages, ps, config.max_batch, bucket(max_pages))
        self.pages = KVPages.zeros(base.config, num_pages, config.page_size, self.dtype)
        if config.mesh is not None:
            self.pages = jax.device_put(self.pages, jax.sharding.NamedSharding(
                config.mesh, sharding.pages_spec()))
        self._admissions = itertools.count()  # admission order, for preemption
        self.rows: list[Request | None] = [None] * config.max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self._streams: dict[int, TextStream] = {}  # request id -> its text (with a tokenizer)
        self._ids = itertools.count()
        self._inflight: InFlight | None = None  # the decode step dispatched and not yet read
        self.counts = collections.Counter()  # steps, decode_rows, tokens, requests, ...
        self.started = time.perf_counter()
        self._traces_at_start = {k: TRACE_COUNTS[k] for k in ("serve_decode", "serve_prefill")}
        self._published = snapshot.take(self)  # see latest_stats
        # A mesh over several processes: process 0 runs this engine and sends each device call
        # to the others (`multihost`), whose engines are never started and only replay them.
        self.following = isinstance(role, multihost.Follower)
        if isinstance(role, multihost.Leader):
            self.multihost = role
        if not self.following:
            self.start()
        if self.multihost is not None:
            self.multihost.watch(self._lost_process)

    # -- other threads -------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], model: str | None, sampling: SamplingParams,
               listener: Callable[[Event], None]) -> Request:
        """Queue a request (token ids, in the vocabulary); its events go to `listener`, which is
        called on the engine thread and must not block."""
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
        pages = self.page_table.pages_for(len(prompt_ids) + sampling.max_tokens)
        if pages > self.page_table.num_pages:
            raise RequestError(f"the prompt plus max_tokens need {pages} KV pages; the server "
                               f"has {self.page_table.num_pages} (kv_pages)")
        for name, ids in [("stop_token_ids", sampling.stop_token_ids),
                          ("logit_bias", [t for t, _ in sampling.logit_bias])]:
            if any(t >= vocab for t in ids):
                raise RequestError(f"{name} token ids must lie in [0, {vocab})", param=name)
        if sampling.stop and self.base.tokenizer is None:
            raise RequestError("stop strings need a tokenizer; the base has none", param="stop")
        if len(sampling.stop) > self.config.max_stop_strings:
            raise RequestError(f"{len(sampling.stop)} stop strings; at most "
                               f"{self.config.max_stop_strings} are allowed", param="stop")
        longest = max(map(len, sampling.stop), default=0)
        if longest > self.config.max_stop_chars:
            raise RequestError(f"a stop string of {longest} characters; at most "
                               f"{self.config.max_stop_chars} are allowed", param="stop")
        request = Request(next(self._ids), model, list(prompt_ids), sampling, listener)
        self._post(request)  # against close(): accepted before it, or refused
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away): its batch slot is freed at the next step."""
        request.cancelled = True
        self._wake()

    def add_delta(self, name: str, source) -> None:
        """Serve another delta (a `Delta` or a file path): read and checked on the caller's
        thread, registered between steps."""
        entry = self.pool.validate(name, source)
        if self.multihost is not None and entry.path is None:
            raise DzjaxError(f"delta {name!r}: on a mesh over several processes, deltas are "
                             f"given as files (the same path on every host), not as objects")
        self.call(self._add_delta, entry)

    def _add_delta(self, entry) -> None:
        self.pool.add(entry)
        if self.multihost is not None:  # (files only: see add_delta)
            self._mirror("add", name=entry.name, path=str(entry.path.resolve()))
        self.metrics.served(entry.name)

    def remove_delta(self, name: str) -> None:
        """Stop serving a delta; refused while requests run on it (preempted ones included:
        they have output already), queued ones fail."""
        self.call(self._remove_delta, name)

    def _remove_delta(self, name: str) -> None:
        started = sum(r.model == name and bool(r.output_ids) for r in self.waiting)
        if started:
            raise DzjaxError(f"delta {name!r} is in use by {started} preempted requests")
        self.pool.remove(name)
        self._mirror("remove", name=name)
        self.page_table.forget(name)  # a delta added again under this name has other weights
        self.metrics.forget(name)

    def delta_names(self) -> list[str]:
        return self.pool.names()

    def delta_paths(self) -> dict[str, Path | None]:
        """{name: its file} of the served deltas (None: given as an object)."""
        entries = list(self.pool.entries.items())  # one read: safe from any thread
        return {name: entry.path for name, entry in sorted(entries, key=lambda e: e[0])}

    def close(self, timeout: float | None = None) -> None:
        if self.multihost is not None and self.multihost.failure is not None:
            timeout = 2.0 if timeout is None else min(timeout, 2.0)  # (a step may hang)
        super().close(timeout)
        self.pool.close()

    @property
    def failed(self) -> Exception | None:
        """Why the engine stopped by itself (a lost process), or None (running, or closed)."""
        return None if self._close_called else self.stopped_by

    # -- the engine thread ---------------------------------------------------------------------

    def _busy(self) -> bool:
        return any(self.rows) or bool(self.waiting) or self._inflight is not None

    def _recover(self, error: Exception) -> None:
        if self.multihost is not None:  # the processes' states may differ now: stop them all
            processes = len(self.multihost.followers) + 1
            self.multihost.fail(f"a step failed on the mesh over {processes} processes "
                                f"({type(error).__name__}: {error}); the server stops")
            return  # (the loop ends at its next turn and fails every request)
        self._inflight = None  # its rows fail below
        for r in [r for r in self.rows if r is not None]:
            self._finish(r, "error", error)
        # A failed step may have consumed its donated buffers: make them again.
        if self.pages.k[0].is_deleted():
            self.pages = sharding.zeros_like_placed(self.pages)
            self.page_table.forget(everything=True)  # the prefixes' keys and values are gone
        stacks = jax.tree.leaves(self.pool.stacks)
        if stacks and stacks[0].is_deleted():
            self.pool.reset_device()

    def _fail_all(self, error: Exception, pending: list) -> None:
        for r in [r for r in self.rows if r is not None] + list(self.waiting) + pending:
            self._finish(r, "error", error)
        self.waiting.clear()
        if self.multihost is not None:
            self.multihost.close()

    def _lost_process(self, message: str) -> None:
        """A follower or a step failed (`multihost.Leader`, its watch thread or the engine's):
        stop, failing every request with `message`, also if a step hangs in a collective."""
        self._abort = ServerClosedError(message)
        self._wake()
        if threading.current_thread() is self._thread:  # (from _recover: the loop ends next)
            return
        self._thread.join(2.0)
        if self._thread.is_alive():  # waiting in a collective for the lost process
            self._fail_everything(self._abort)

    def _accept(self, request: Request) -> None:
        if request.model is not None and request.model not in self.pool.entries:
            self._finish(request, "error", ModelNotFoundError(
                f"model {request.model!r} is not served"))
            return
        self.counts["requests"] += 1
        self.waiting.append(request)

    def _step(self) -> bool:
        """One step; returns whether it did anything."""
        cancelled = [r for r in self.rows if r is not None and r.cancelled]
        for r in cancelled:
            self._finish(r, "cancelled")
        self.pool.poll()
        admitted = self._admit() if self.waiting else []
        if admitted:
            self._prefill(admitted)
        if any(self.rows):
            self._decode()
        elif self._inflight is not None:
            self._read_inflight()
        return bool(cancelled or admitted or any(self.rows) or self._inflight is not None)

    def _admit(self) -> list[Request]:
        """Ask the scheduler for a plan and carry it out; returns the admitted requests. When
        the plan admits and a decode step is in flight, that step is read first (rows may end)
        and the scheduler asked again."""
        plan, growth = self._plan()
        if plan.admit and self._inflight is not None:
            self._read_inflight()
            plan, growth = self._plan()
        return self._carry_out(plan, growth)

    def _plan(self) -> tuple[scheduler.Plan, int]:
        """The scheduler's plan, and the free pages the running requests' next tokens take."""
        pt = self.page_table
        # A request's pages: its context, and the position its first decode writes; less
        # the pages of a prefix it shares (`kv_pages`).
        waiting = [scheduler.Waiting(r.id, r.model, r.overtaken, r.cancelled,
                                     pt.cost(*self._pages_of(r))) for r in self.waiting]
        free = [i for i, r in enumerate(self.rows) if r is None]
        live = [r for r in self.rows if r is not None]
        running = {r.model for r in live if r.model is not None}
        # Pages the running requests' next tokens take are not free for newcomers (a token in
        # flight counts: the next one goes after it).
        ahead = set() if self._inflight is None else {r.id for r, _ in self._inflight.rows}
        growth = sum(pt.needs_page(r.batch_row, len(r.prompt_ids) + len(r.output_ids) - 1
                                   + (r.id in ahead)) for r in live)
        return scheduler.schedule(waiting, free, running, self.pool.view(), self.limits,
                                  free_pages=max(0, pt.free - growth)), growth

    def _carry_out(self, plan: scheduler.Plan, growth: int) -> list[Request]:
        pt = self.page_table
        by_id = {r.id: r for r in self.waiting}
        for i in plan.cancel:
            self._leave_queue(by_id[i], "cancelled")
        for i, why in plan.fail:
            error = (ModelNotFoundError(why) if by_id[i].model not in self.pool.entries
                     else DeltaUnavailableError(why))
            self._leave_queue(by_id[i], "error", error)
        for name in plan.forget_failures:
            self.pool.forget_failure(name)
        self.pool.keep(plan.keep + [a.load for a in plan.admit if a.load is not None])
        for name in plan.read:
            self.pool.start_read(name)
        # (Counted as the plan says, also for a request whose admission below fails.)
        for i, n in plan.overtaken.items():
            by_id[i].overtaken = n
        admitted = []
        for a in plan.admit:
            r = by_id[a.request]
            pages, shared = self._pages_of(r)
            if pt.cost(pages, shared) > pt.free - growth:  # an admission before took the cached
                continue  # prefix pages this one counted on: it waits for the next step
            if a.load is not None:
                self._mirror("load", name=a.load, slot=a.slot)  # (before: it may hold a
                try:                                             # collective)
                    self.pool.load(a.load, a.slot)
                except Exception as e:  # this delta cannot be loaded now: this request fails
                    if self.multihost is not None:  # the processes' slots may differ now
                        raise
                    log.exception("loading delta %r failed", a.load)
                    self._leave_queue(r, "error", DeltaUnavailableError(
                        f"delta {a.load!r} could not be loaded: {e}"))
                    continue
            if a.slot >= 0:
                if self.pool.slot_names[a.slot] != r.model:  # the load here failed: it waits
                    continue
                self.pool.acquire(a.slot)
            self.waiting.remove(r)
            pt.assign(a.row, pages, shared)
            r.batch_row, r.delta_slot = a.row, a.slot
            if r.order < 0:  # a preempted request keeps its place: older than newcomers
                r.order = next(self._admissions)
            if r.admitted is None:  # (not again when a preempted request comes back)
                r.admitted = time.perf_counter()
                self.metrics.admitted(r.model, len(r.prompt_ids))
                if r.model is not None:
                    self.counts["delta_misses" if a.load is not None else "delta_hits"] += 1
            self.rows[a.row] = r
            admitted.append(r)
        return admitted

    def _pages_of(self, r: Request) -> tuple[int, list[int]]:
        """The pages r needs to be admitted (its context and the position its first decode
        writes) and those of them it can share."""
        pt, length = self.page_table, len(r.prompt_ids) + len(r.output_ids)
        if not self.config.prefix_sharing:
            return pt.pages_for(length + 1), []
        return pt.pages_for(length + 1), pt.lookup(r.model, self._prefix_keys(r))

    def _prefix_keys(self, r: Request) -> list[bytes]:
        """r's context's prefix keys (`kv_pages`), hashed once per context length."""
        length = len(r.prompt_ids) + len(r.output_ids)
        if not r.prefix_keys or r.prefix_keys[0] != length:
            r.prefix_keys = (length, self.page_table.keys(r.model, r.prompt_ids + r.output_ids))
        return r.prefix_keys[1]

    def _vacate(self, r: Request) -> None:
        """Free r's batch row, its KV pages and its delta slot."""
        if r.batch_row is not None:
            self.rows[r.batch_row] = None
            self.page_table.release(r.batch_row)
            if r.delta_slot >= 0:
                self.pool.release(r.delta_slot)
        r.batch_row, r.delta_slot = None, -1

    def _leave_queue(self, r: Request, reason: str, error: Exception | None = None) -> None:
        self.waiting.remove(r)
        self._finish(r, reason, error)

    def _emit(self, r: Request, token: int, scored: TokenLogprob | None = None) -> None:
        """Append one generated token to r (and its log-prob, when asked), report the new text,
        and finish r when it is done."""
        now = time.perf_counter()
        gap = None if r.last_token is None else now - r.last_token
        r.last_token = now
        if r.first_token is None:
            r.first_token = now
            self.metrics.first_token(r.model, now - r.arrival)
        if (token in self.eos and not r.sampling.ignore_eos) or token in r.sampling.stop_token_ids:
            if scored is not None:  # not in the output, but its log-prob is (as vLLM's)
                r.logprobs.append(scored)
                self._notify(r, Event("token", token_ids=(token,), logprobs=(scored,)))
            self._finish(r, "stop")
            return
        r.output_ids.append(token)
        logprobs = () if scored is None else (scored,)
        r.logprobs.extend(logprobs)
        self.counts["tokens"] += 1
        self.metrics.token(r.model, gap)
        reason = "length" if len(r.output_ids) >= r.sampling.max_tokens else None
        if self.base.tokenizer is None:
            self._notify(r, Event("token", token_ids=(token,), logprobs=logprobs))
        else:
            stream = self._streams.get(r.id)
            if stream is None:
                stream = self._streams[r.id] = TextStream(self.base.tokenizer, r.output_ids,
                                                          r.sampling.stop)
            piece, stopped = stream.push()
            r.text = stream.text
            if stopped:
                reason = "stop"
            self._notify(r, Event("token", text=piece, token_ids=(token,), logprobs=logprobs))
        if reason is not None:
            self._finish(r, reason)

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
        self._vacate(r)
        self.counts["finished_" + reason] += 1
        self.metrics.finished(r.model, reason, r.finished - r.arrival)
        stream = self._streams.pop(r.id, None)
        tail = stream.rest() if stream is not None and reason != "error" else ""
        if tail:
            self._notify(r, Event("token", text=tail))
        self._notify(r, Event("done", finish_reason=reason, error=error))

    def stats(self) -> dict:
        """Counts, occupancy, traces and the pool's state: a snapshot, taken between steps."""
        return self.call(self._between_steps)

    def latest_stats(self) -> dict:
        """The snapshot the engine thread published after its latest step (when idle, at most
        ~0.05 s old), or by the latest `stats()`: never waits for the engine, so a scraper is
        answered while a step compiles or hangs. Raises ServerClosedError once it has stopped."""
        if not self.alive:
            raise ServerClosedError("the serving engine has stopped")
        return self._published

    def _between_steps(self) -> dict:
        self._published = snapshot.take(self)
        return self._published
