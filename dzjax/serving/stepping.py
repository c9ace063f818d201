"""The engine's device side: building each step's arrays from the running requests, dispatching
the jitted prefill and decode (`dzjax.serving.steps`), and reading their tokens back.

`Steps` is a part of `Engine` (its state: rows, page table, pool, pages, counts; and `_emit`,
`_grow_or_preempt`): kept apart so that the engine's request bookkeeping and the device work
read on their own. Decode is pipelined (`EngineConfig.pipeline_decode`): step n+1 is dispatched
with step n's tokens as its input, still on the device, and only then are step n's tokens read.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dzjax.models.generate import bucket
from dzjax.models.sharding import put, to_host
from dzjax.serving import scheduler, steps
from dzjax.models.scoring import MAX_TOP_LOGPROBS
from dzjax.serving.requests import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, Request, TokenLogprob


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A decode step dispatched to the device whose tokens have not been read."""

    tokens: jax.Array  # int32 [B], on the device
    rows: list[tuple[Request, int]]  # the requests it decodes and their batch rows
    scored: tuple | None = None  # (logprob [B], top ids [B, K], top logprobs [B, K]), if asked


def prompt_top(k: int) -> int:
    """Alternatives computed per prompt position for a request asking k: 0, 1, 5 or the most
    (few compiled variants of the prefill)."""
    return next(b for b in (0, 1, 5, MAX_TOP_LOGPROBS) if k <= b)


def token_logprob(scored, i: int, k: int) -> TokenLogprob:
    """Row i's `TokenLogprob` with k alternatives, from host arrays (logprob, top ids, top lps)."""
    lp, ids, lps = scored
    return TokenLogprob(float(lp[i]), tuple((int(t), float(v)) for t, v in
                                            zip(ids[i][:k], lps[i][:k])))


class Steps:
    multihost = None  # on a mesh over several processes: process 0's `multihost.Leader`
    following = False  # ... and on the other processes (which replay process 0's calls)
    _last_tokens = None  # the last decode step's tokens, on the device

    def _sampling(self, requests: list[Request | None], ahead=frozenset()):
        """(seeds, counters, temperature, top_p, top_k, min_p, suppress) for rows of requests
        (None: an idle row); the requests in `ahead` (ids) have one token more than they hold
        (in flight). suppress [rows, EOS ids + MAX_STOP_TOKEN_IDS]: a row short of its
        min_tokens may not produce end-of-sequence or its stop_token_ids (-1: padding)."""
        seeds, counters, temperature, top_p, min_p = (np.zeros(len(requests), d) for d in (
            np.uint32, np.int32, np.float32, np.float32, np.float32))
        top_k = np.zeros(len(requests), np.int32)
        eos = sorted(self.eos)
        suppress = np.full((len(requests), len(eos) + MAX_STOP_TOKEN_IDS), -1, np.int32)
        top_p[:] = 1.0
        for i, r in enumerate(requests):
            if r is not None:
                s = r.sampling
                seeds[i], counters[i] = s.seed, len(r.output_ids) + (r.id in ahead)
                temperature[i], top_p[i], top_k[i], min_p[i] = s.temperature, s.top_p, \
                    s.top_k, s.min_p
                if counters[i] < s.min_tokens:
                    held = ([] if s.ignore_eos else eos) + list(s.stop_token_ids)
                    suppress[i, :len(held)] = held
        return seeds, counters, temperature, top_p, top_k, min_p, suppress

    def _penalties(self, requests: list[Request | None], ahead=frozenset()):
        """The penalties' arrays of `steps._penalized` for rows of requests, or None when no
        row asks for penalties or logit_bias (the steps' plain variant). A row's history is its
        context known here (at most max_seq_len tokens: one shape, one compiled variant); a
        request in `ahead` has its newest token in flight, the step's input."""
        if not any(r is not None and r.sampling.penalized for r in requests):
            return None
        n = len(requests)
        history = np.full((n, self.max_seq_len), -1, np.int32)
        output_start = np.zeros(n, np.int32)
        repetition = np.ones(n, np.float32)
        frequency, presence = np.zeros(n, np.float32), np.zeros(n, np.float32)
        bias_ids = np.full((n, MAX_LOGIT_BIAS), -1, np.int32)
        bias_values = np.zeros((n, MAX_LOGIT_BIAS), np.float32)
        in_flight = np.array([r is not None and r.id in ahead for r in requests])
        for i, r in enumerate(requests):
            if r is None or not r.sampling.penalized:
                continue
            s, context = r.sampling, r.prompt_ids + r.output_ids
            history[i, :len(context)] = context
            output_start[i] = len(r.prompt_ids)
            repetition[i], frequency[i], presence[i] = (s.repetition_penalty,
                                                        s.frequency_penalty, s.presence_penalty)
            for j, (token, bias) in enumerate(s.logit_bias):
                bias_ids[i, j], bias_values[i, j] = token, bias
        return (history, output_start, in_flight, repetition, frequency, presence, bias_ids,
                bias_values)

    def _prefill(self, admitted: list[Request]) -> None:
        """Prefill the admitted requests' contexts: the prompt, and for a preempted request the
        output so far too (its next token comes out of this prefill, with the same key)."""
        by_length = collections.defaultdict(list)
        for r in admitted:
            by_length[bucket(len(r.prompt_ids) + len(r.output_ids), 16,
                             self.max_seq_len)].append(r)
        pt = self.page_table
        for t, group in sorted(by_length.items()):
            n = bucket(len(group), 1, self.config.max_batch)
            ids = np.zeros((n, t), np.int32)
            lengths = np.ones(n, np.int32)
            tables = np.full((n, pt.max_pages), pt.num_pages, np.int32)  # padding: dropped
            slots = np.full(n, -1, np.int32)
            for i, r in enumerate(group):
                context = r.prompt_ids + r.output_ids
                ids[i, :len(context)] = context
                # (shared prefix pages are not written again)
                lengths[i], tables[i], slots[i] = len(context), pt.prefill_table(r.batch_row), \
                    r.delta_slot
            logprobs = any(r.sampling.logprobs is not None for r in group)
            # Prompt log-probs once per request (not again after a preemption).
            want = [r.sampling.prompt_logprobs for r in group
                    if r.sampling.prompt_logprobs is not None and r.prompt_logprobs is None]
            top = prompt_top(max(want)) if want else None
            rows = group + [None] * (n - len(group))
            tokens, extras = self._run_prefill(ids, lengths, tables, slots, self._sampling(rows),
                                               self._penalties(rows), logprobs, top)
            self.counts["prefill_calls"] += 1
            tokens = to_host(tokens)
            extras = jax.tree.map(to_host, extras)
            for i, r in enumerate(group):
                if self.config.prefix_sharing:  # its full pages now hold its context
                    pt.register(r.batch_row, r.model, self._prefix_keys(r))
                if "prompt" in extras and r.sampling.prompt_logprobs is not None \
                        and r.prompt_logprobs is None:
                    k = r.sampling.prompt_logprobs
                    r.prompt_logprobs = [None] + [  # position t scored token t + 1
                        token_logprob(tuple(a[i] for a in extras["prompt"]), t, k)
                        for t in range(len(r.prompt_ids) - 1)]
                scored = None
                if r.sampling.logprobs is not None:
                    scored = token_logprob(extras["token"], i, r.sampling.logprobs)
                self._emit(r, int(tokens[i]), scored)

    def _decode(self) -> None:
        """Dispatch one decode step for the running requests; then read the step before it, if
        one is in flight (its tokens are this step's input, still on the device)."""
        prev = self._inflight
        ahead = frozenset() if prev is None else frozenset(r.id for r, _ in prev.rows)
        # Each request's context as this step sees it: with its token in flight, if any.
        context = {r.id: len(r.prompt_ids) + len(r.output_ids) + (r.id in ahead)
                   for r in self.rows if r is not None}
        # A request whose in-flight token is its last (max_tokens) is not decoded again.
        live = [r for r in self.rows if r is not None
                and context[r.id] - len(r.prompt_ids) < r.sampling.max_tokens]
        position = {r.id: context[r.id] - 1 for r in live}
        stay = self._grow_or_preempt(live, position, may_preempt=prev is None) if live else []
        if stay is None or not stay:  # pages run out with a step in flight, or nothing to do
            if prev is not None:
                self._read_inflight()
                if stay is None:
                    self._decode()
            return
        live, ids = stay, {r.id for r in stay}
        b, pt = self.config.max_batch, self.page_table
        positions = np.zeros(b, np.int32)  # idle rows: no pages, so their writes are dropped
        slots = np.full(b, -1, np.int32)
        for r in live:
            positions[r.batch_row], slots[r.batch_row] = position[r.id], r.delta_slot
        tables = pt.tables
        if len(live) < sum(r is not None for r in self.rows):  # rows ending in flight: no writes
            tables = tables.copy()
            tables[[r.batch_row for r in self.rows if r is not None and r.id not in ids]] = \
                pt.num_pages
        if prev is None:
            tokens = np.zeros(b, np.int32)
            for r in live:
                tokens[r.batch_row] = r.output_ids[-1]
        else:  # every live request was in the step in flight (nothing is admitted meanwhile)
            tokens = prev.tokens
        num_pages = bucket(max(pt.held(r.batch_row) for r in live), 1, pt.max_pages)
        rows = [r if r is not None and r.id in ids else None for r in self.rows]
        logprobs = any(r.sampling.logprobs is not None for r in live)
        out = self._run_decode(tables, tokens, positions, slots, self._sampling(rows, ahead),
                               self._penalties(rows, ahead), num_pages, logprobs)
        out, scored = (out[0], out[1:]) if logprobs else (out, None)
        self._inflight = InFlight(out, [(r, r.batch_row) for r in live], scored)
        self.counts["steps"] += 1
        self.counts["decode_rows"] += len(live)
        self.counts["max_running"] = max(self.counts["max_running"], len(live))
        active = len({r.model for r in live if r.model is not None})
        self.counts["active_deltas"] += active
        self.counts["max_active_deltas"] = max(self.counts["max_active_deltas"], active)
        if prev is not None:
            self.counts["overlapped_steps"] += 1
            self._read(prev)
        if not self.pipeline:
            self._read_inflight()

    def _grow_or_preempt(self, live: list[Request], position: dict[int, int],
                         may_preempt: bool) -> list[Request] | None:
        """Before a decode step: each request of `live` whose next token (at `position`) starts a
        page gets one; when too few are free, the scheduler picks requests to preempt (they give
        their pages back and wait at the front of the queue to recompute their context).
        Returns the requests that stay, or None (nothing changed) when some would have to be
        preempted and `may_preempt` is False."""
        pt = self.page_table
        if not may_preempt and sum(pt.needs_page(r.batch_row, position[r.id])
                                   for r in live) > pt.free:
            return None
        # What preempting frees, newest first as the scheduler preempts (shared pages counted
        # for the last of their holders).
        newest_first = sorted(live, key=lambda r: -r.order)
        freed = dict(zip((r.id for r in newest_first),
                         pt.freed_by_releasing([r.batch_row for r in newest_first])))
        victims = set(scheduler.preempt(
            [scheduler.Running(r.id, r.order, freed[r.id],
                               int(pt.needs_page(r.batch_row, position[r.id]))) for r in live],
            pt.free))
        for r in sorted((r for r in live if r.id in victims), key=lambda r: -r.order):
            self._vacate(r)
            self.waiting.appendleft(r)  # the newest first, so the oldest ends up in front
            self.counts["preemptions"] += 1
        stay = [r for r in live if r.id not in victims]
        for r in stay:
            if pt.needs_page(r.batch_row, position[r.id]):
                pt.grow(r.batch_row)
        return stay

    def _placed_tokens(self, tokens):
        """The decode step's input tokens placed alike whether they come from the host or from
        the step before (on a mesh: replicated), so that both are one compiled program."""
        if self.kernels.mesh is None:
            return tokens
        where = NamedSharding(self.kernels.mesh, P())
        return jax.device_put(tokens, where) if isinstance(tokens, jax.Array) else put(tokens,
                                                                                       where)

    def _host_args(self, *args):
        """A step's host arrays as they are; on a mesh over several processes, each placed
        (replicated) from this process's copy: jit would first check that every process passes
        the same value, a collective of its own."""
        if self.multihost is None and not self.following:
            return args
        where = NamedSharding(self.kernels.mesh, P())
        return jax.tree.map(lambda a: put(a, where) if isinstance(a, np.ndarray) else a, args)

    def _read_inflight(self) -> None:
        inflight, self._inflight = self._inflight, None
        self._read(inflight)

    def _read(self, step: InFlight) -> None:
        """Report a decode step's tokens (waiting for the device); a request that ended or left
        its row since the step was dispatched gets none."""
        tokens = to_host(step.tokens)
        scored = None if step.scored is None else tuple(to_host(a) for a in step.scored)
        for r, row in step.rows:
            if r.finish_reason is None and r.batch_row == row:
                k = r.sampling.logprobs
                self._emit(r, int(tokens[row]),
                           None if k is None else token_logprob(scored, row, k))

    def _mirror(self, kind: str, **fields) -> None:
        """On a mesh over several processes, hand this device call to the other processes
        first (`multihost`), so that they make it too."""
        if self.multihost is not None:
            self.multihost.send(kind, **fields)

    def _run_prefill(self, ids, lengths, tables, slots, sampling, penalties, logprobs: bool,
                     top: int | None):
        """Launch one prefill (the pages are donated and replaced); returns (tokens, extras)."""
        self._mirror("prefill", ids=ids, lengths=lengths, tables=tables, slots=slots,
                     sampling=sampling, penalties=penalties, logprobs=logprobs, top=top)
        ids, lengths, tables, slots, sampling, penalties = self._host_args(
            ids, lengths, tables, slots, sampling, penalties)
        out = steps.prefill(
            self.params, self.pool.stacks, self.pages, ids, lengths, tables, slots, sampling,
            penalties, config=self.base.config, dtype=self.dtype, kernels=self.kernels,
            logprobs=logprobs, prompt_top=top)
        tokens, extras, self.pages = out if len(out) == 3 else (out[0], {}, out[1])
        return tokens, extras

    def _run_decode(self, tables, tokens, positions, slots, sampling, penalties,
                    num_pages: int, logprobs: bool):
        """Launch one decode step (the pages are donated and replaced); returns its output.
        Serving and `compile_decode` both call it, so that they build the same program: jit
        keys its cache on how the arguments are passed, not only on their shapes. `tokens`:
        host ids, or the step before's output, still on the device (which a follower of
        `multihost` receives as None: its own step before's)."""
        on_device = isinstance(tokens, jax.Array)
        self._mirror("decode", tables=tables, tokens=None if on_device else tokens,
                     positions=positions, slots=slots, sampling=sampling, penalties=penalties,
                     num_pages=num_pages, logprobs=logprobs)
        tokens = self._placed_tokens(self._last_tokens if tokens is None else tokens)
        tables, positions, slots, sampling, penalties = self._host_args(
            tables, positions, slots, sampling, penalties)
        out, self.pages = steps.decode(
            self.params, self.pool.stacks, self.pages, tables, tokens, positions, slots,
            sampling, penalties, config=self.base.config, dtype=self.dtype,
            kernels=self.kernels, num_pages=num_pages, logprobs=logprobs)
        self._last_tokens = out[0] if logprobs else out
        return out

    def compile_decode(self) -> None:
        """Compile the decode step for every bucket of pages read, on idle rows (nothing is
        written), so that no compilation happens later while serving (benchmarks). The plain
        variant: a step with logprobs or penalties is another program, compiled at first use."""
        b, pt = self.config.max_batch, self.page_table
        n, last = 1, self._last_tokens  # (a step in flight: its tokens are the next input)
        while True:
            idle = np.full((b, pt.max_pages), pt.num_pages, np.int32)
            zeros = np.zeros(b, np.int32)
            self._run_decode(idle, zeros, zeros, np.full(b, -1, np.int32),
                             self._sampling([None] * b), None, min(n, pt.max_pages), False)
            if n >= pt.max_pages:
                break
            n *= 2
        self._last_tokens = last

