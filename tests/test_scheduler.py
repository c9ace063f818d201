"""The scheduler's policy, on its own: a pure function of the queue and the pool, tested without
JAX (`dzjax.serving.scheduler` imports nothing of it)."""

import ast
from pathlib import Path

import pytest

from dzjax.serving.scheduler import (FAILED, ON_DISK, ON_HOST, READING, RESIDENT, Admission,
                                     Limits, PoolView, Running, Slot, Waiting, preempt,
                                     schedule)

NO_CAP = Limits(max_deltas_per_step=8, max_overtakes=4)


def pool(slots, **states) -> PoolView:
    return PoolView(tuple(Slot(*s) if isinstance(s, tuple) else Slot(s) for s in slots), states)


def test_it_needs_no_jax():
    source = Path(__file__).resolve().parent.parent / "dzjax" / "serving" / "scheduler.py"
    imported = {n.names[0].name if isinstance(n, ast.Import) else n.module
                for n in ast.walk(ast.parse(source.read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert imported <= {"__future__", "dataclasses", "typing"}, imported


def test_the_docstring_example():
    waiting = [Waiting(0, "c"), Waiting(1, "b"), Waiting(2, None), Waiting(3, "a")]
    plan = schedule(waiting, [0, 1], set(),
                    pool([("a", 0, 1), None], a=RESIDENT, b=ON_HOST, c=ON_DISK), NO_CAP)
    assert plan.read == ["c"] and plan.keep == ["c", "b"]
    assert plan.admit == [Admission(1, 0, slot=1, load="b"), Admission(2, 1)]
    assert plan.overtaken == {0: 2}
    assert not plan.fail and not plan.cancel


def test_all_base_only_requests_need_no_slot():
    waiting = [Waiting(i, None) for i in range(5)]
    plan = schedule(waiting, [3, 1, 2], set(), pool([None, None]), NO_CAP)
    assert [(a.request, a.row, a.slot) for a in plan.admit] == [(0, 3, -1), (1, 1, -1), (2, 2, -1)]


def test_one_delta_loads_once_for_all_its_requests():
    waiting = [Waiting(i, "a") for i in range(3)]
    plan = schedule(waiting, [0, 1, 2], set(), pool([None, None], a=ON_HOST), NO_CAP)
    assert [a.slot for a in plan.admit] == [0, 0, 0]
    assert [a.load for a in plan.admit] == ["a", None, None]


def test_eviction_takes_the_least_recently_used_idle_slot_and_never_a_busy_one():
    slots = [("x", 1, 9), ("y", 0, 5), ("z", 0, 2)]  # x is in use; z is the oldest idle
    plan = schedule([Waiting(0, "a"), Waiting(1, "b"), Waiting(2, "c")], [0, 1, 2], {"x"},
                    pool(slots, x=RESIDENT, y=RESIDENT, z=RESIDENT, a=ON_HOST, b=ON_HOST,
                         c=ON_HOST), NO_CAP)
    assert [(a.slot, a.load) for a in plan.admit] == [(2, "a"), (1, "b")]  # z, then y go
    assert plan.overtaken == {}  # c is last: nobody behind it was admitted


def test_a_full_pool_of_running_deltas_makes_others_wait():
    plan = schedule([Waiting(0, "b"), Waiting(1, None)], [0, 1], {"a"},
                    pool([("a", 2, 1)], a=RESIDENT, b=ON_HOST), NO_CAP)
    assert [a.request for a in plan.admit] == [1]  # base-only passes
    assert plan.overtaken == {0: 1}


def test_the_delta_cap_counts_running_deltas():
    limits = Limits(max_deltas_per_step=2, max_overtakes=4)
    plan = schedule([Waiting(0, "c"), Waiting(1, "a")], [0, 1], {"a", "b"},
                    pool([("a", 1, 1), ("b", 1, 2), None], a=RESIDENT, b=RESIDENT, c=ON_HOST),
                    limits)
    assert [a.request for a in plan.admit] == [1]  # a already runs; c would be a third


def test_a_request_overtaken_too_often_holds_back_other_deltas_but_not_the_base():
    limits = Limits(max_deltas_per_step=1, max_overtakes=2)
    waiting = [Waiting(0, "rare", overtaken=2), Waiting(1, "popular"), Waiting(2, None)]
    plan = schedule(waiting, [0, 1, 2], {"popular"},
                    pool([("popular", 1, 1), None], popular=RESIDENT, rare=ON_HOST), limits)
    assert [a.request for a in plan.admit] == [2]  # popular waits for rare; base passes
    assert plan.overtaken == {0: 3, 1: 1}


def test_waiting_for_a_disk_read_never_starves_others():
    limits = Limits(max_deltas_per_step=8, max_overtakes=0)
    plan = schedule([Waiting(0, "cold"), Waiting(1, "warm")], [0, 1], set(),
                    pool([None, None], cold=READING, warm=ON_HOST), limits)
    assert [a.request for a in plan.admit] == [1]
    assert plan.read == []  # already being read


def test_queued_deltas_on_disk_are_read_ahead_of_their_turn_within_a_window():
    plan = schedule([Waiting(0, None), Waiting(1, "d1"), Waiting(2, "d2"), Waiting(3, "d1")],
                    [0], set(), pool([None], d1=ON_DISK, d2=ON_DISK), NO_CAP)
    assert plan.read == ["d1", "d2"] and plan.keep == ["d1", "d2"]
    assert [a.request for a in plan.admit] == [0]
    # A window of 2: the third distinct delta waits for its turn, and what is being read or on
    # the host counts toward the window (kept there until it runs).
    limits = Limits(max_deltas_per_step=8, max_overtakes=4, read_ahead=2)
    waiting = [Waiting(i, f"d{i}") for i in range(4)]
    plan = schedule(waiting, [], set(), pool([None], d0=READING, d1=ON_HOST, d2=ON_DISK,
                                             d3=ON_DISK), limits)
    assert plan.read == [] and plan.keep == ["d0", "d1"]


def test_failed_reads_and_removed_deltas_fail_their_requests_only():
    pool_view = PoolView((Slot(None),), {"bad": FAILED, "ok": ON_HOST},
                         {"bad": "delta 'bad' could not be read: gone"})
    waiting = [Waiting(0, "bad"), Waiting(1, "gone"), Waiting(2, "ok"), Waiting(3, "bad")]
    plan = schedule(waiting, [0, 1], set(), pool_view, NO_CAP)
    assert plan.fail == [(0, "delta 'bad' could not be read: gone"),
                         (1, "model 'gone' was removed"),
                         (3, "delta 'bad' could not be read: gone")]
    assert plan.forget_failures == ["bad"]
    assert [a.request for a in plan.admit] == [2]


def test_failures_are_reported_even_when_no_row_is_free():
    plan = schedule([Waiting(0, None), Waiting(1, "bad")], [], set(),
                    PoolView((Slot(None),), {"bad": FAILED}, {}), NO_CAP)
    assert [i for i, _ in plan.fail] == [1] and not plan.admit


def test_cancelled_requests_leave_the_queue():
    plan = schedule([Waiting(0, "a", cancelled=True), Waiting(1, "a")], [0], set(),
                    pool([None], a=ON_HOST), NO_CAP)
    assert plan.cancel == [0] and [a.request for a in plan.admit] == [1]


def test_skewed_popularity_fills_rows_in_arrival_order():
    waiting = [Waiting(i, "hot" if i % 4 else "cold") for i in range(12)]
    plan = schedule(waiting, list(range(8)), set(),
                    pool([None, None], hot=ON_HOST, cold=ON_HOST), NO_CAP)
    assert [a.request for a in plan.admit] == list(range(8))
    assert {a.slot for a in plan.admit if waiting[a.request].model == "cold"} == {0}  # first
    assert {a.slot for a in plan.admit if waiting[a.request].model == "hot"} == {1}


# -- KV pages ------------------------------------------------------------------------------------

def test_requests_are_admitted_by_the_pages_their_context_fills():
    waiting = [Waiting(0, None, pages=3), Waiting(1, "a", pages=2), Waiting(2, None, pages=1)]
    plan = schedule(waiting, [0, 1, 2], set(), pool([None], a=ON_HOST), NO_CAP, free_pages=4)
    assert [a.request for a in plan.admit] == [0, 2]  # 3 + 1: the second does not fit
    assert plan.overtaken == {1: 1}


def test_a_request_waiting_for_pages_is_passed_at_most_max_overtakes_times():
    limits = Limits(max_deltas_per_step=8, max_overtakes=2)
    waiting = [Waiting(0, None, overtaken=2, pages=5), Waiting(1, None, pages=1)]
    plan = schedule(waiting, [0, 1], set(), pool([None]), limits, free_pages=2)
    assert plan.admit == []  # it blocks the small one until pages free up
    plan = schedule(waiting, [0, 1], set(), pool([None]), limits, free_pages=5)
    assert [a.request for a in plan.admit] == [0]


def test_preemption_takes_the_most_recently_admitted_until_the_rest_fit():
    running = [Running(0, order=1, pages=2, needs=1), Running(1, order=2, pages=3, needs=1),
               Running(2, order=3, pages=2, needs=1)]
    assert preempt(running, free_pages=1) == [2]  # the docstring's example
    assert preempt(running, free_pages=3) == []
    assert preempt(running, free_pages=0) == [2]  # freeing 2 covers the other two
    assert preempt([Running(0, 1, 1, 1), Running(1, 2, 1, 1), Running(2, 3, 1, 1)], 0) == [2, 1]
    assert preempt([Running(0, 1, 1, 1), Running(1, 2, 9, 0)], 0) == [1]  # the oldest needs one
    with pytest.raises(RuntimeError, match="oldest request"):  # never the last survivor
        preempt([Running(0, order=1, pages=4, needs=1)], free_pages=0)
