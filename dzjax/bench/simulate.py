"""Planning at scale: a discrete-event simulator of R dzjax replicas behind a delta-affinity
router, fed with measured costs, that predicts throughput, TTFT, latency and SLO attainment of
a workload (`dzjax.bench.workload`: D deltas, a popularity skew, Poisson arrivals).

What it models, as the engine and `dzjax.serving.ray_serve` run:
  router   each request, `route_s` after it arrives, goes to the least busy replica whose
           multiplexed set holds its delta, or else to the least busy replica (which adds the
           delta to its set, least recently used out); base-only requests to the least busy.
  replica  the engine's loop: a step admits queued requests first come first served while a
           batch row is free and their delta is on the device or can be put there (a slot whose
           delta no running request uses, least recently used first); each delta put there
           costs a load (`load_s`: from host memory once read, from disk the first time), the
           admitted requests are prefilled together (their first token), then every running
           request decodes one token in one step whose cost depends on the rows and on how
           many distinct deltas they use. Requests arriving during a step wait for the next.

The costs (`Costs`) come from measurements on the machine to plan for (see
`benchmarks/simulate.py`, which measures them and checks a prediction against a real run).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq

import numpy as np

from dzjax.bench.metrics import Outcome, summarize
from dzjax.bench.workload import BenchRequest
from dzjax.errors import DzjaxError


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds of each thing a replica does, measured.

    decode_s: {(rows, active deltas): one decode step}, interpolated linearly in rows and in
      active deltas between measured points (and extended from the last two beyond them).
    prefill_s: {rows: one prefill of that many admitted requests together}, interpolated.
    load_s: {"host": a delta from host memory to the device, "disk": read from its file too}.
    route_s: the router's and HTTP's time per request (added before it reaches a replica).
    token_s: the serving process's time to send one row's token on (the stream through the
      router and HTTP), added to each decode step per row: on the replica it shares the
      interpreter with the engine's loop.
    contention: {replicas busy at once: factor on a step's time}, interpolated (1 where not
      given): replicas that share a machine's cores (as on a CPU host) slow each other down;
      replicas on their own devices have none.
    """

    decode_s: dict
    prefill_s: dict
    load_s: dict
    route_s: float = 0.0
    token_s: float = 0.0
    contention: dict = dataclasses.field(default_factory=dict)

    def decode(self, rows: int, active: int) -> float:
        by_active = collections.defaultdict(dict)
        for (r, a), s in self.decode_s.items():
            by_active[a][r] = s
        per_active = {a: _interpolate(table, rows) for a, table in by_active.items()}
        return max(_interpolate(per_active, active), 0.0)

    def slowdown(self, busy: int) -> float:
        return max(_interpolate({1: 1.0, **self.contention}, busy), 1.0)

    def prefill(self, rows: int) -> float:
        return max(_interpolate(self.prefill_s, rows), 0.0)

    def to_json(self) -> dict:
        return {"decode_s": [[r, a, s] for (r, a), s in sorted(self.decode_s.items())],
                "prefill_s": [[r, s] for r, s in sorted(self.prefill_s.items())],
                "load_s": dict(self.load_s), "route_s": self.route_s, "token_s": self.token_s,
                "contention": [[k, v] for k, v in sorted(self.contention.items())]}


def _interpolate(table: dict, x: float) -> float:
    xs = sorted(table)
    if len(xs) == 1:
        return table[xs[0]]
    i = min(max(np.searchsorted(xs, x) - 1, 0), len(xs) - 2)  # the segment (or the end one)
    x0, x1 = xs[i], xs[i + 1]
    return table[x0] + (table[x1] - table[x0]) * (x - x0) / (x1 - x0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deployment:
    """What is planned: replicas, each with max_batch rows and max_resident_deltas device
    slots (its router-side multiplexed set is as large)."""

    replicas: int
    max_batch: int = 8
    max_resident_deltas: int = 8
    max_ongoing: int | None = None  # requests a replica takes at once (None: 2 * max_batch,
    base_name: str = "base"         # as `ray_serve`); the others wait at the router

    def __post_init__(self):
        if self.max_ongoing is None:
            object.__setattr__(self, "max_ongoing", 2 * self.max_batch)
        for name in ("replicas", "max_batch", "max_resident_deltas", "max_ongoing"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DzjaxError(f"{name} must be an integer >= 1, got {value!r}")


class _Replica:
    def __init__(self, deployment: Deployment):
        self.d = deployment
        self.queue: collections.deque = collections.deque()
        self.running: list[list] = []  # [request, tokens still to generate, first token time]
        self.device: collections.OrderedDict = collections.OrderedDict()  # LRU, device slots
        self.routed: collections.OrderedDict = collections.OrderedDict()  # the router's view
        self.read: set = set()  # deltas read from disk once (then cached in host memory)
        self.stepping = False
        self.free_at = 0.0

    @property
    def ongoing(self) -> int:
        return len(self.queue) + len(self.running)

    def _place(self, model: str, costs: Costs) -> float | None:
        """Seconds to have `model` on the device (0 if there), None if no slot can be freed."""
        if model == self.d.base_name:
            return 0.0
        if model in self.device:
            self.device.move_to_end(model)
            return 0.0
        if len(self.device) >= self.d.max_resident_deltas:
            used = {r.model for r, _, _ in self.running}
            victim = next((m for m in self.device if m not in used), None)
            if victim is None:
                return None
            del self.device[victim]
        self.device[model] = True
        tier = "host" if model in self.read else "disk"
        self.read.add(model)
        return costs.load_s[tier]

    def step(self, now: float, costs: Costs, done: list, busy: int = 1) -> tuple[float, bool]:
        """One engine step starting at `now` while `busy` replicas (this one included) have
        work: its seconds, and whether it did anything."""
        spent, admitted = 0.0, []
        while self.queue and len(self.running) + len(admitted) < self.d.max_batch:
            load = self._place(self.queue[0].model, costs)
            if load is None:
                break  # the head waits for a slot (as the engine's first come, first served)
            spent += load
            admitted.append(self.queue.popleft())
        if admitted:
            spent += costs.prefill(len(admitted))
        decoding = [row for row in self.running if row[1] > 0]
        if decoding:
            active = len({r.model for r, _, _ in decoding} - {self.d.base_name})
            spent += costs.decode(len(decoding), active) + costs.token_s * len(decoding)
        spent *= costs.slowdown(busy)
        end = now + spent
        for row in decoding:
            row[1] -= 1
        for r in admitted:
            self.running.append([r, r.max_tokens - 1, end])
        for row in [row for row in self.running if row[1] == 0]:
            self.running.remove(row)
            r, _, first = row
            done.append(Outcome(r.index, r.model, r.arrival, first, end, r.max_tokens))
        return spent, bool(admitted or decoding)


def _route(replicas: list[_Replica], model: str, base_name: str):
    """The replica for a request, and whether its delta was in that replica's set (a hit);
    (None, False) while every replica has max_ongoing requests."""
    replicas = [r for r in replicas if r.ongoing < r.d.max_ongoing]
    if not replicas:
        return None, False
    if model != base_name:
        holding = [r for r in replicas if model in r.routed]
        if holding:
            chosen = min(holding, key=lambda r: r.ongoing)
            chosen.routed.move_to_end(model)
            return chosen, True
    chosen = min(replicas, key=lambda r: r.ongoing)
    if model != base_name:
        chosen.routed[model] = True
        if len(chosen.routed) > chosen.d.max_resident_deltas:
            chosen.routed.popitem(last=False)
    return chosen, False


def simulate(workload: list[BenchRequest], deployment: Deployment, costs: Costs, *,
             slo_s: float = 10.0) -> dict:
    """Predicted outcome of serving `workload` on `deployment`: `dzjax.bench.metrics`'
    summary (throughput, TTFT and latency percentiles, SLO attainment, per request), and the
    router's resident hits and misses."""
    replicas = [_Replica(deployment) for _ in range(deployment.replicas)]
    events, order, done = [], 0, []
    counts = collections.Counter()
    for r in workload:
        heapq.heappush(events, (r.arrival + costs.route_s, order, "arrive", r))
        order += 1
    held: collections.deque = collections.deque()  # waiting at the router, in order
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            held.append(payload)
        else:
            replica = payload
            busy = sum(bool(r.queue or r.running) for r in replicas)
            spent, progressed = replica.step(now, costs, done, busy)
            replica.free_at = now + spent
            if progressed and (replica.queue or replica.running):
                heapq.heappush(events, (now + spent, order, "step", replica))
                order += 1
            elif replica.queue or replica.running:
                raise DzjaxError("the simulated replica cannot make progress: a request's "
                                 "delta never fits (max_resident_deltas too small?)")
            else:
                replica.stepping = False
        while held:  # the router sends on what it holds, as replicas take requests
            replica, hit = _route(replicas, held[0].model, deployment.base_name)
            if replica is None:
                break
            r = held.popleft()
            if r.model != deployment.base_name:
                counts["hits" if hit else "misses"] += 1
            replica.queue.append(r)
            if not replica.stepping:
                replica.stepping = True
                heapq.heappush(events, (max(now, replica.free_at), order, "step", replica))
                order += 1
    summary = summarize(sorted(done, key=lambda o: o.index), len(workload), slo_s)
    routed = counts["hits"] + counts["misses"]
    summary["router"] = {"hits": counts["hits"], "misses": counts["misses"],
                         "hit_rate": counts["hits"] / routed if routed else None}
    return summary
