"""The scheduler: which waiting requests run next, which deltas load where, and which running
requests give their KV pages back when the pages run out. Pure Python.

`schedule(waiting, free_rows, running, pool, limits, free_pages)` looks at the queue and the
pool's state and returns a `Plan`; `preempt(running, free_pages)` picks the requests to preempt
before a decode step. The engine carries both out (writes deltas into device slots, hands out
pages, prefills the admitted requests, fails, cancels or requeues the others). Nothing here
touches JAX, so the policy is unit-tested on its own (`tests/test_scheduler.py`).

The policy:
- First come, first served: waiting requests are considered in arrival order.
- A request needs a free batch row, the KV pages its context fills (`Waiting.pages`) and, unless
  it is for the base model, its delta in a device slot of the pool. A resident delta is used where it is; one on the host is written into a free
  slot, else into the least recently used slot that no running (or just admitted) request uses;
  one on disk is read in the background first (the request waits; others go on).
- Reads look ahead: the first `read_ahead` distinct deltas the queue waits for (in queue order)
  are read now and kept on the host until they run (`Plan.keep`), so a delta is read once however
  long its request waits, and reads never evict each other from a small host cache.
- At most `max_deltas_per_step` distinct deltas run in one step.
- Later requests may overtake one that waits for a pool slot or the delta cap, but only
  `max_overtakes` times: after that, no request for another delta is admitted until it runs
  (base-only requests still are, as they hold no pool slot), so running deltas drain, a slot frees
  and an unpopular delta cannot starve. Waiting for a disk read does not count: a read ends.
- A request whose delta was removed, or whose delta's read failed, fails with that error at
  once, wherever it is in the queue (it never waits for a batch row first).
- KV pages: a request that does not find enough free pages waits; later, smaller ones may pass
  it `max_overtakes` times, then nothing more is admitted until it is (pages free as others end).
- Preemption: when the running requests need more new pages for their next token than are free,
  the most recently admitted give theirs back, until the rest fit (they go back to the front of the
  queue and recompute their context later: nothing is lost, and the oldest always progress).

Running example (2 free rows, a pool of 2 slots: "a" resident and idle, slot 1 free; "b" on the
host, "c" on disk; no delta cap):
  waiting [r0 -> c, r1 -> b, r2 -> base, r3 -> a]
  plan:   read ["c"] (keep ["c", "b"] on the host); admit r1 into row 0 (load "b" into slot 1),
          r2 into row 1 (no slot); r0 was overtaken twice; r3 waits for a row.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

# The states of a delta in the pool (`PoolView.states`).
RESIDENT, ON_HOST, READING, ON_DISK, FAILED = "resident", "host", "reading", "disk", "failed"


@dataclasses.dataclass(frozen=True)
class Waiting:
    """What the scheduler knows of a waiting request."""

    id: int
    model: str | None  # a delta's name; None = the base model
    overtaken: int = 0  # times a later request was admitted before it
    cancelled: bool = False
    pages: int = 0  # KV pages its context (prompt, and output so far) fills


@dataclasses.dataclass(frozen=True)
class Slot:
    """One device slot of the pool."""

    name: str | None  # the resident delta, or None when free
    users: int = 0  # running requests that use it
    last_used: int = 0  # a clock: the most recent admission that used it


@dataclasses.dataclass(frozen=True)
class PoolView:
    """The pool's state: its device slots, and each registered delta's state (RESIDENT, ON_HOST,
    READING, ON_DISK or FAILED, with the failure's message in `errors`). A name missing from
    `states` is not served (removed)."""

    slots: tuple[Slot, ...]
    states: dict[str, str]
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_deltas_per_step: int
    max_overtakes: int
    read_ahead: int = 8  # distinct waited-for deltas read from disk ahead of their turn


@dataclasses.dataclass(frozen=True)
class Admission:
    request: int  # the request's id
    row: int  # its batch row
    slot: int = -1  # its device slot, -1 = base only
    load: str | None = None  # a delta to write into `slot` first (replacing what is there)


@dataclasses.dataclass
class Plan:
    admit: list[Admission] = dataclasses.field(default_factory=list)
    cancel: list[int] = dataclasses.field(default_factory=list)  # cancelled while waiting
    fail: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (id, why)
    read: list[str] = dataclasses.field(default_factory=list)  # deltas to read from disk
    keep: list[str] = dataclasses.field(default_factory=list)  # keep on the host: runs soon
    forget_failures: list[str] = dataclasses.field(default_factory=list)  # reported; retry later
    overtaken: dict[int, int] = dataclasses.field(default_factory=dict)  # id -> new count


def schedule(waiting: Sequence[Waiting], free_rows: Sequence[int], running: set[str],
             pool: PoolView, limits: Limits, free_pages: int | None = None) -> Plan:
    """The next step's plan (see the module docstring).

    Args:
      waiting: the queue, in arrival order.
      free_rows: batch rows with no running request, in the order to fill them.
      running: the deltas of the running requests.
      pool: the pool's slots and each delta's state.
      limits: the delta cap per step and the overtaking bound.
      free_pages: KV pages free now (None: no page accounting).
    """
    plan = Plan()
    rows = list(free_rows)
    slots = list(pool.slots)  # updated as this plan loads deltas and admits requests
    clock = max((s.last_used for s in slots), default=0)
    active = set(running)
    starving: Waiting | None = None  # overtaken too often: others' deltas wait for it
    blocked = False  # a request overtaken too often waits for pages: nobody else is admitted
    overtaken = {w.id: w.overtaken for w in waiting}
    passed: list[Waiting] = []  # waiting requests considered and left waiting, in order
    # The first deltas the queue waits for are read now, in the background: by their turn they
    # are ready.
    for w in waiting:
        if len(plan.keep) >= limits.read_ahead:
            break
        state = pool.states.get(w.model) if w.model is not None else None
        if not w.cancelled and state in (ON_HOST, READING, ON_DISK) and w.model not in plan.keep:
            plan.keep.append(w.model)
            if state == ON_DISK:
                plan.read.append(w.model)
    for w in waiting:
        if w.cancelled:
            plan.cancel.append(w.id)
            continue
        name = w.model
        state = pool.states.get(name) if name is not None else RESIDENT
        if name is not None and state is None:
            plan.fail.append((w.id, f"model {name!r} was removed"))
            continue
        if state == FAILED:
            plan.fail.append((w.id, pool.errors.get(name, f"delta {name!r} could not be read")))
            if name not in plan.forget_failures:
                plan.forget_failures.append(name)
            continue
        if not rows or blocked:  # nothing more runs this step; failures and cancellations still
            continue  # leave
        if free_pages is not None and w.pages > free_pages:  # waits for pages to free
            if overtaken[w.id] >= limits.max_overtakes:
                blocked = True  # nobody passes it any more
            passed.append(w)
            continue
        if name is None:  # the base model: a row and pages are all it needs
            plan.admit.append(Admission(w.id, rows.pop(0)))
            free_pages = None if free_pages is None else free_pages - w.pages
            _overtake(passed, overtaken)
            continue
        if starving is not None and name != starving.model:
            passed.append(w)
            continue
        slot = _slot_for(name, state, slots) if (
            name in active or len(active) < limits.max_deltas_per_step) else None
        if slot is None:
            # Waiting for a pool slot or the delta cap (not for a disk read) can starve.
            if state in (RESIDENT, ON_HOST) and overtaken[w.id] >= limits.max_overtakes:
                starving = w
            passed.append(w)
            continue
        clock += 1
        old = slots[slot]
        load = name if old.name != name else None
        slots[slot] = Slot(name, old.users + 1, clock)
        plan.admit.append(Admission(w.id, rows.pop(0), slot, load))
        free_pages = None if free_pages is None else free_pages - w.pages
        active.add(name)
        _overtake(passed, overtaken)
    plan.overtaken = {w.id: overtaken[w.id] for w in waiting if overtaken[w.id] != w.overtaken}
    return plan


@dataclasses.dataclass(frozen=True)
class Running:
    """What the preemption policy knows of a running request."""

    id: int
    order: int  # admission order: larger = admitted later
    pages: int  # pages it holds
    needs: int  # new pages its next token needs (0 or 1)


def preempt(running: Sequence[Running], free_pages: int) -> list[int]:
    """The requests to preempt so that the others' next tokens find pages: the most recently
    admitted first, until what the rest need fits in the free pages plus what was given back.
    The oldest is never preempted (it cannot need more pages than the pool has: requests that
    could are refused at submit), so every step makes progress.

    Example: free 1; running a (order 1, needs 1), b (order 2, 3 pages, needs 1), c (order 3,
    2 pages, needs 1) -> need 3 > 1: preempt c (free 3, need 2), then enough: [c].
    """
    needed = sum(r.needs for r in running)
    victims = []
    newest_first = sorted(running, key=lambda r: -r.order)
    for r in newest_first[:-1]:
        if needed <= free_pages:
            break
        victims.append(r.id)
        free_pages += r.pages
        needed -= r.needs
    if needed > free_pages:
        raise RuntimeError(f"the oldest request needs {needed} pages and {free_pages} are free: "
                           f"it holds more than the pool (the submit check prevents this)")
    return victims


def _overtake(passed: list[Waiting], overtaken: dict[int, int]) -> None:
    """A request was admitted: every earlier one still waiting was overtaken once more."""
    for earlier in passed:
        overtaken[earlier.id] += 1


def _slot_for(name: str, state: str, slots: list[Slot]) -> int | None:
    """The slot `name` runs in: where it is resident; for a delta on the host, a free slot or
    the least recently used idle one; None when it must wait (on disk, or every slot busy)."""
    for i, s in enumerate(slots):
        if s.name == name:
            return i
    if state != ON_HOST:
        return None
    free = [i for i, s in enumerate(slots) if s.name is None]
    if free:
        return free[0]
    idle = [i for i, s in enumerate(slots) if not s.users]
    return min(idle, key=lambda i: slots[i].last_used) if idle else None
