"""Planning at scale: a discrete-event simulator of R dzjax replicas behind a delta-affinity
router, fed with measured costs, that predicts throughput, TTFT, latency and SLO attainment of
a workload (`dzjax.bench.workload`: D deltas, a popularity skew, Poisson arrivals).

What it models, as the engine and `dzjax.serving.ray_serve` run:
  router   each request passes the router's processes (`hops`: Ray's proxy, the ingress; each
           a single-threaded event loop that also forwards every streamed token, sharing its
           time among all it holds), and `route_s` more, and goes to the least busy replica
           (below its `max_ongoing`) whose multiplexed set holds its delta, or else to the
           least busy one (which adds the delta to its set, least recently used out);
           base-only requests to the least busy; while every replica is at its limit,
           requests wait at the router.
  replica  the engine's loop, admitting with the engine's own scheduler
           (`dzjax.serving.scheduler.schedule`: first come first served with bounded
           overtaking, device slots reused least recently used first, reads from disk in the
           background while the others go on, read-ahead): a delta written into a slot from
           host memory costs `load_s["host"]` in the step; a read from disk ends
           `load_s["disk"] - load_s["host"]` after it starts. The admitted requests are
           prefilled together (their first token), then every row, the just admitted ones
           included, decodes one token in one step whose cost depends on the rows and on how
           many distinct deltas they use. Requests arriving during a step wait for the next.
           Each token then passes the hops back (the ingress, then the proxy) to the client:
           TTFT and latency are when the first and the last token have passed them.
  sharing  on a machine whose cores the replicas and the hops share, the replicas' steps are
           slowed by a factor that depends on the requests in flight (`Costs.contention`),
           fitted to closed loops measured on the deployment (`closed_loop`,
           `fit_contention`).
  Not modelled: KV pages (the pool is taken as large enough: no page waits, no preemption),
  prefix sharing, the decode pipeline of accelerators, stop strings and EOS (every request
  generates its max_tokens).

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
from dzjax.serving import scheduler


@dataclasses.dataclass(frozen=True)
class Costs:
    """Seconds of each thing a replica does, measured.

    decode_s: {(rows, active deltas): one decode step}, interpolated linearly in rows and in
      active deltas between measured points (and extended from the last two beyond them).
    prefill_s: {rows: one prefill of that many admitted requests together}, interpolated.
    load_s: {"host": a delta from host memory to the device, "disk": read from its file too}.
    route_s: the router's and HTTP's time per request that is not work of a hop (added
      before it reaches a replica).
    token_s: the serving process's time to send one row's token on (the stream through the
      router and HTTP), added to each decode step per row: on the replica it shares the
      interpreter with the engine's loop.
    hops: ((request_s, token_s), ...): the router's processes a request passes in order
      (a token passes them in reverse), each an event loop sharing its time among all it
      holds: its work per request and per streamed token. () = none.
    hop_share: the part of a hop's work that a request or token waits for (the rest the hop
      does after passing it on: closing, accounting); the hop stays busy for all of it.
    contention: {requests in flight in the deployment: factor on the time of the replicas'
      steps then}, interpolated from {1: 1.0} and held at the last given point beyond it: on
      a machine whose cores the replicas, the hops and the client share (as on a CPU host)
      they slow each other down, and more so the more they have to do (the hops' work, as
      measured, is not scaled: scaling it too predicted TTFT up to 42% high). Measured on the
      deployment against the other costs (`fit_contention` on closed loops), it also takes
      in how far the deployment's speed differs from the costs' (a factor below 1: faster
      than when they were measured; below the smallest loop fitted the factor runs to 1.0
      at one request, unless a loop of 1 client gives it). {} = none (replicas on their own
      devices).
    """

    decode_s: dict
    prefill_s: dict
    load_s: dict
    route_s: float = 0.0
    token_s: float = 0.0
    contention: dict = dataclasses.field(default_factory=dict)
    hops: tuple = ()
    hop_share: float = 1.0

    def decode(self, rows: int, active: int) -> float:
        by_active = collections.defaultdict(dict)
        for (r, a), s in self.decode_s.items():
            by_active[a][r] = s
        per_active = {a: _interpolate(table, rows) for a, table in by_active.items()}
        return max(_interpolate(per_active, active), 0.0)

    def slowdown(self, in_flight: int) -> float:
        table = {1: 1.0, **self.contention}
        return _interpolate(table, min(max(in_flight, min(table)), max(table)))

    def prefill(self, rows: int) -> float:
        return max(_interpolate(self.prefill_s, rows), 0.0)

    def to_json(self) -> dict:
        return {"decode_s": [[r, a, s] for (r, a), s in sorted(self.decode_s.items())],
                "prefill_s": [[r, s] for r, s in sorted(self.prefill_s.items())],
                "load_s": dict(self.load_s), "route_s": self.route_s, "token_s": self.token_s,
                "contention": [[k, v] for k, v in sorted(self.contention.items())],
                "hops": [list(h) for h in self.hops], "hop_share": self.hop_share}

    @classmethod
    def from_json(cls, data: dict) -> "Costs":
        """The costs `to_json` wrote."""
        return cls(decode_s={(r, a): s for r, a, s in data["decode_s"]},
                   prefill_s={r: s for r, s in data["prefill_s"]}, load_s=dict(data["load_s"]),
                   route_s=data["route_s"], token_s=data["token_s"],
                   contention={k: v for k, v in data["contention"]},
                   hops=tuple(tuple(h) for h in data["hops"]), hop_share=data["hop_share"])


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
    """One replica's engine: its queue and batch rows, and its pool's device slots, admitted by
    the engine's own scheduler (`dzjax.serving.scheduler.schedule`)."""

    def __init__(self, deployment: Deployment):
        self.d = deployment
        self.queue: list = []  # routed here, waiting, in arrival order
        self.overtaken: dict[int, int] = {}
        self.rows: list = [None] * deployment.max_batch  # [request, tokens left, slot]
        self.slots = [scheduler.Slot(None)] * deployment.max_resident_deltas
        self.clock = 0  # the slots' recency
        self.on_host: set = set()  # deltas read from disk (then cached in host memory)
        self.reading: dict[str, float] = {}  # delta -> when its background read ends
        self.routed: collections.OrderedDict = collections.OrderedDict()  # the router's view
        self.stepping = False
        self.free_at = 0.0

    @property
    def running(self) -> list:
        return [row for row in self.rows if row is not None]

    @property
    def ongoing(self) -> int:
        return len(self.queue) + len(self.running)

    def _state(self, name: str) -> str:
        if any(s.name == name for s in self.slots):
            return scheduler.RESIDENT
        if name in self.on_host:
            return scheduler.ON_HOST
        return scheduler.READING if name in self.reading else scheduler.ON_DISK

    def wake(self) -> float | None:
        """When a background read ends (the next time a waiting request may run), if any."""
        return min(self.reading.values(), default=None)

    def step(self, now: float, costs: Costs, emitted: list,
             in_flight: int = 1) -> tuple[float, bool]:
        """One engine step starting at `now` while `in_flight` requests are in the deployment:
        its seconds, and whether it did anything. The tokens it makes are appended to
        `emitted` as (time, request, first, last)."""
        for i, row in enumerate(self.rows):  # the rows the last step finished are free now
            if row is not None and row[1] == 0:
                self.rows[i] = None
        for name, ready in list(self.reading.items()):  # reads that ended are on the host
            if ready <= now:
                del self.reading[name]
                self.on_host.add(name)
        base = self.d.base_name
        deltas = {r.model for r in self.queue} | {row[0].model for row in self.running}
        users = collections.Counter(row[2] for row in self.running if row[2] >= 0)
        slots = [dataclasses.replace(s, users=users[i]) for i, s in enumerate(self.slots)]
        plan = scheduler.schedule(
            [scheduler.Waiting(r.index, None if r.model == base else r.model,
                               self.overtaken.get(r.index, 0)) for r in self.queue],
            [i for i, row in enumerate(self.rows) if row is None],
            {row[0].model for row in self.running if row[0].model != base},
            scheduler.PoolView(tuple(slots), {n: self._state(n) for n in deltas - {base}}),
            scheduler.Limits(max_deltas_per_step=self.d.max_resident_deltas,
                             max_overtakes=self.d.max_batch,
                             read_ahead=self.d.max_resident_deltas))
        upload = costs.load_s["host"]
        for name in plan.read:  # in the background: the others go on
            self.reading[name] = now + max(costs.load_s["disk"] - upload, 0.0)
        self.overtaken.update(plan.overtaken)
        by_id = {r.index: r for r in self.queue}
        spent, admitted = 0.0, []
        for a in plan.admit:
            r = by_id[a.request]
            self.queue.remove(r)
            self.overtaken.pop(r.index, None)
            if a.load is not None:  # written from host memory into its slot
                spent += upload
            if a.slot >= 0:
                self.clock += 1
                self.slots[a.slot] = scheduler.Slot(r.model, 0, self.clock)
            self.rows[a.row] = [r, r.max_tokens - 1, a.slot]
            admitted.append(self.rows[a.row])
        if admitted:  # the prefill gives each its first token
            spent += costs.prefill(len(admitted))
            first = now + spent * costs.slowdown(in_flight)
            for row in admitted:
                emitted.append((first, row[0], True, row[1] == 0))
        decoding = [row for row in self.running if row[1] > 0]  # (the admitted ones too)
        if decoding:
            active = len({row[0].model for row in decoding} - {base})
            spent += costs.decode(len(decoding), active) + costs.token_s * len(decoding)
        spent *= costs.slowdown(in_flight)
        end = now + spent
        for row in decoding:  # (a row done is freed at the next step, when this one ends)
            row[1] -= 1
            emitted.append((end, row[0], False, row[1] == 0))
        return spent, bool(admitted or decoding)


class _Hop:
    """One of the router's processes: an event loop, which shares its time among everything it
    holds (requests and tokens, interleaved). An item is passed on when `share` of its work is
    done; the rest keeps the hop busy after."""

    def __init__(self, share: float):
        self.share = share
        self.jobs: list = []  # [work left, work left when its item is passed on, item or None]
        self.last = 0.0
        self.version = 0

    def _advance(self, now: float) -> None:
        if self.jobs:
            each = (now - self.last) / len(self.jobs)
            for job in self.jobs:
                job[0] -= each
        self.last = now

    def add(self, now: float, work: float, item) -> None:
        self._advance(now)
        self.jobs.append([work, work * (1.0 - self.share), item])
        self.version += 1

    def next_time(self) -> float:
        """When the next item is passed on or the next job ends."""
        left = min(j[0] - j[1] if j[2] is not None else j[0] for j in self.jobs)
        return self.last + max(left, 0.0) * len(self.jobs)

    def passed(self, now: float) -> list:
        """The items passed on by `now` (and the jobs ended dropped)."""
        self._advance(now)
        out = []
        for job in self.jobs:
            if job[2] is not None and job[0] - job[1] <= 1e-12:
                out.append(job[2])
                job[2] = None
        self.jobs = [j for j in self.jobs if j[0] > 1e-12]
        self.version += 1
        return out


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
             slo_s: float = 10.0, warm: list[BenchRequest] = ()) -> dict:
    """Predicted outcome of serving `workload` on `deployment`: `dzjax.bench.metrics`'
    summary (throughput, TTFT and latency percentiles, SLO attainment, per request), and the
    router's resident hits and misses. `warm`: requests served first (not counted), so that
    the workload meets replicas in the state they leave (as a real run after a warm-up)."""
    replicas, start = _warmed(deployment, costs, warm)
    counts = collections.Counter()
    shifted = [dataclasses.replace(r, arrival=r.arrival + start) for r in workload]
    done = [dataclasses.replace(o, arrival=o.arrival - start, first_token=o.first_token - start,
                                finished=o.finished - start)
            for o in _serve(replicas, shifted, deployment, costs, counts)]
    summary = summarize(sorted(done, key=lambda o: o.index), len(workload), slo_s)
    routed = counts["hits"] + counts["misses"]
    summary["router"] = {"hits": counts["hits"], "misses": counts["misses"],
                         "hit_rate": counts["hits"] / routed if routed else None}
    return summary


def _warmed(deployment: Deployment, costs: Costs, warm: list[BenchRequest]):
    """The deployment's replicas after serving `warm` (none: fresh), and when the workload
    may start (a second after the warm-up's last request ended; 0 without one)."""
    replicas = [_Replica(deployment) for _ in range(deployment.replicas)]
    if not warm:
        return replicas, 0.0
    done = _serve(replicas, list(warm), deployment, costs, collections.Counter())
    return replicas, max(o.finished for o in done) + 1.0


def closed_loop(workload: list[BenchRequest], deployment: Deployment, costs: Costs, *,
                clients: int, seconds: float, warm: list[BenchRequest] = ()) -> float:
    """Predicted tokens/s of `clients` clients, client k sending `workload[k::clients]` in turn
    (and again), each request as its previous one ends, for `seconds` (none sent after):
    the tokens generated over the time to the last one's end (as
    `benchmarks/simulate.py` measures a real closed loop)."""
    if not 1 <= clients <= len(workload):
        raise DzjaxError(f"clients must be between 1 and {len(workload)}, got {clients!r}")
    replicas, start = _warmed(deployment, costs, warm)
    turns = {k: 0 for k in range(clients)}
    client_of = {}

    def send(k: int, now: float) -> BenchRequest:
        mine = workload[k::clients]
        r = dataclasses.replace(mine[turns[k] % len(mine)], arrival=now,
                                index=len(client_of))
        turns[k] += 1
        client_of[r.index] = k
        return r

    def follow(outcome: Outcome) -> list[BenchRequest]:
        now = outcome.finished
        return [send(client_of[outcome.index], now)] if now < start + seconds else []

    first = [send(k, start) for k in range(clients)]
    done = _serve(replicas, first, deployment, costs, collections.Counter(), follow=follow)
    return sum(o.tokens for o in done) / (max(o.finished for o in done) - start)


def fit_contention(workload: list[BenchRequest], deployment: Deployment, costs: Costs,
                   measured: dict, *, seconds: float, warm: list[BenchRequest] = (),
                   bounds: tuple[float, float] = (0.25, 8.0)) -> dict:
    """`Costs.contention` from closed loops measured on the deployment: {clients: tokens/s}.
    For each, the factor (within `bounds`, to 1%) with which `closed_loop` predicts the
    measured tokens/s: in a closed loop of c clients c requests are in flight (nearly all
    the time: fewer only in the loop's tail, after `seconds`), so the factor is the one at
    c. Each is fitted on its own, a constant factor. A rate that no factor within `bounds`
    gives is refused."""
    fitted = {}
    for clients, want in sorted(measured.items()):
        low, high = bounds
        while high / low > 1.01:  # (tokens/s falls as the factor grows)
            mid = (low * high) ** 0.5
            trial = dataclasses.replace(costs, contention={1: mid, clients: mid})
            got = closed_loop(workload, deployment, trial, clients=clients, seconds=seconds,
                              warm=warm)
            low, high = (mid, high) if got > want else (low, mid)
        if low <= bounds[0] or high >= bounds[1]:
            raise DzjaxError(f"the closed loop of {clients} clients measured {want:.4g} "
                             f"tokens/s, which no contention within {bounds} predicts")
        fitted[clients] = (low * high) ** 0.5
    return fitted


def _serve(replicas: list[_Replica], workload: list[BenchRequest], deployment: Deployment,
           costs: Costs, counts: collections.Counter, follow=None) -> list[Outcome]:
    """Run `workload` through the router and `replicas` (as they are) to the end. `follow`:
    called with each request's outcome as it ends, returns the requests it sends then."""
    events, done = [], []
    order = iter(range(1 << 62))  # ties in time keep the order events were made in
    hops = [_Hop(costs.hop_share) for _ in costs.hops]
    first_seen: dict[int, float] = {}
    in_flight = 0  # requests that reached the first hop whose last token is not out yet

    def give(now, i, work, item):  # hop i takes `item` (an event's kind and payload)
        hops[i].add(now, work, item)
        heapq.heappush(events, (hops[i].next_time(), next(order), "hop", (i, hops[i].version)))

    for r in workload:
        heapq.heappush(events, (r.arrival, next(order), "request", (r, 0)))
    held: collections.deque = collections.deque()  # waiting at the router, in order
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "hop":  # a hop may have passed something on
            i, version = payload
            hop = hops[i]
            if version != hop.version:  # (it took more since: a later event stands)
                continue
            for item_kind, item in hop.passed(now):
                heapq.heappush(events, (now, next(order), item_kind, item))
            if hop.jobs:
                heapq.heappush(events, (hop.next_time(), next(order), "hop", (i, hop.version)))
            continue
        if kind == "request":  # (request, hop): at hop `hop` on its way in; -1: arrived
            r, hop = payload
            if hop == 0:
                in_flight += 1
            if 0 <= hop < len(hops):
                give(now, hop, costs.hops[hop][0], ("request", (r, hop + 1)))
            elif hop == len(hops):  # past the hops: the rest of the way (`route_s`)
                heapq.heappush(events, (now + costs.route_s, next(order), "request", (r, -1)))
            else:
                held.append(r)
        elif kind == "token":  # (request, first, last, hop): the hops in reverse, then out
            r, first, last, hop = payload
            if hop < len(hops):
                i = len(hops) - 1 - hop
                give(now, i, costs.hops[i][1], ("token", (r, first, last, hop + 1)))
                continue
            if first:
                first_seen[r.index] = now
            if last:
                in_flight -= 1
                done.append(Outcome(r.index, r.model, r.arrival, first_seen.pop(r.index), now,
                                    r.max_tokens))
                for nxt in follow(done[-1]) if follow else ():
                    heapq.heappush(events, (nxt.arrival, next(order), "request", (nxt, 0)))
        else:
            replica = payload
            emitted = []
            spent, progressed = replica.step(now, costs, emitted, in_flight)
            for at, r, first, last in emitted:
                heapq.heappush(events, (at, next(order), "token", (r, first, last, 0)))
            replica.free_at = now + spent
            wake = replica.wake()
            if progressed and (replica.queue or replica.running):
                heapq.heappush(events, (now + spent, next(order), "step", replica))
            elif replica.queue and wake is not None:  # waiting for a read to end
                heapq.heappush(events, (max(wake, now + spent), next(order), "step", replica))
            elif replica.queue or replica.running:
                raise DzjaxError("the simulated replica cannot make progress")
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
                heapq.heappush(events, (max(now, replica.free_at), next(order), "step", replica))
    return done
