"""The planning simulator (`dzjax.bench.simulate`) against outcomes worked out by hand from its
documented rules: batching, prefill and decode costs, loads by tier, affinity routing."""

import dataclasses
import json

import pytest

from dzjax.bench.simulate import Costs, Deployment, closed_loop, fit_contention, simulate
from dzjax.bench.workload import BenchRequest
from dzjax.errors import DzjaxError

# decode(rows, active) = 0.010 + 0.002 * rows + 0.005 * active on the measured points
COSTS = Costs(decode_s={(r, a): 0.010 + 0.002 * r + 0.005 * a for r in (1, 4) for a in (0, 2)},
              prefill_s={1: 0.030, 4: 0.060}, load_s={"host": 0.1, "disk": 0.5}, route_s=0.004)


def request(i: int, arrival: float, model: str, tokens: int) -> BenchRequest:
    return BenchRequest(i, arrival, model, (1, 2, 3), tokens)


def test_costs_interpolate_between_and_beyond_the_measured_points():
    assert COSTS.decode(2, 1) == pytest.approx(0.010 + 0.004 + 0.005)
    assert COSTS.decode(8, 3) == pytest.approx(0.010 + 0.016 + 0.015)  # extended
    assert COSTS.prefill(2) == pytest.approx(0.040)


def test_one_request_waits_for_its_route_load_prefill_and_decode_steps():
    out = simulate([request(0, 1.0, "a", 5)], Deployment(replicas=1), COSTS)
    ttft = 0.004 + 0.5 + 0.030  # routed, read from disk, prefilled (the first token)
    latency = ttft + 4 * COSTS.decode(1, 1)
    row = out["per_request"][0]
    assert row[3] == pytest.approx(ttft, abs=1e-4) and row[4] == pytest.approx(latency, abs=1e-4)
    assert out["router"] == {"hits": 0, "misses": 1, "hit_rate": 0.0}


def test_requests_arriving_together_are_prefilled_and_decoded_as_one_batch():
    work = [request(0, 0.0, "base", 3), request(1, 0.0, "base", 2)]
    out = simulate(work, Deployment(replicas=1), COSTS)
    first = 0.004 + COSTS.prefill(2)
    step = COSTS.decode(2, 0)  # two rows, no delta; the admitted rows decode in that step too
    (a, b) = out["per_request"]
    assert a[3] == b[3] == pytest.approx(first, abs=1e-4)
    assert b[4] == pytest.approx(first + step, abs=1e-4)
    assert a[4] == pytest.approx(first + step + COSTS.decode(1, 0), abs=1e-4)
    assert out["generated_tokens"] == 5 and out["router"]["misses"] == 0  # base: not counted


def test_a_replica_is_busy_until_the_step_that_ends_its_last_request_ends():
    # r0's only step (prefill, then its second and last token) ends at 0.004 + 0.030 + 0.012;
    # r1, routed during it, goes to the idle replica, not to the one still computing r0.
    work = [request(0, 0.0, "base", 2), request(1, 0.02, "base", 1)]
    out = simulate(work, Deployment(replicas=2), COSTS)
    assert out["per_request"][1][3] == pytest.approx(0.004 + 0.030, abs=1e-4)  # its TTFT


def test_a_read_from_disk_runs_in_the_background_while_others_go_on():
    work = [request(0, 0.0, "a", 3), request(1, 0.0, "base", 2)]
    out = simulate(work, Deployment(replicas=1), COSTS)
    (a, b) = out["per_request"]
    assert b[3] == pytest.approx(0.004 + 0.030, abs=1e-4)  # not held behind a's read
    read_done = 0.004 + (0.5 - 0.1)  # then written into its slot from host memory
    assert a[3] == pytest.approx(read_done + 0.1 + 0.030, abs=1e-4)
    assert a[4] == pytest.approx(a[3] + 2 * COSTS.decode(1, 1), abs=1e-4)


def test_a_slot_in_use_is_never_taken_by_another_delta():
    work = [request(0, 0.0, "a", 4), request(1, 0.0, "b", 2)]
    out = simulate(work, Deployment(replicas=1, max_resident_deltas=1), COSTS)
    (a, b) = out["per_request"]
    assert b[3] > a[4]  # b waits until a has finished with the one slot


def test_a_delta_evicted_comes_back_from_host_memory():
    work = [request(0, 0.0, "a", 1), request(1, 10.0, "b", 1), request(2, 20.0, "a", 1)]
    out = simulate(work, Deployment(replicas=1, max_resident_deltas=1), COSTS)
    ttfts = [row[3] for row in out["per_request"]]
    assert ttfts == pytest.approx([0.004 + 0.5 + 0.03, 0.004 + 0.5 + 0.03, 0.004 + 0.1 + 0.03],
                                  abs=1e-4)
    assert out["router"]["misses"] == 3  # (one slot: the router's set forgets a for b)


def test_the_router_sends_a_delta_where_it_already_is():
    # Two replicas: a and b are both taken on by the first (idle, first in order); later a
    # and b go to the first again (their holder).
    work = [request(0, 0.0, "a", 1), request(1, 5.0, "b", 1), request(2, 10.0, "a", 1),
            request(3, 15.0, "b", 1)]
    out = simulate(work, Deployment(replicas=2, max_resident_deltas=2), COSTS)
    assert out["router"] == {"hits": 2, "misses": 2, "hit_rate": 0.5}
    assert [row[3] for row in out["per_request"]][2:] == pytest.approx([0.034, 0.034], abs=1e-4)
    # The busy holder is still preferred over an idle replica without the delta (affinity).
    busy = [request(0, 0.0, "a", 50), request(1, 0.01, "a", 1)]
    out = simulate(busy, Deployment(replicas=2), COSTS)
    assert out["router"]["hits"] == 1


def test_requests_past_max_ongoing_wait_at_the_router():
    work = [request(0, 0.0, "a", 3), request(1, 0.0, "a", 1)]
    out = simulate(work, Deployment(replicas=1, max_batch=1, max_ongoing=1), COSTS)
    first_done = 0.004 + 0.5 + 0.030 + 2 * COSTS.decode(1, 1)
    (a, b) = out["per_request"]
    assert a[4] == pytest.approx(first_done, abs=1e-4)
    assert b[3] == pytest.approx(first_done + 0.030, abs=1e-4)  # admitted at the next step


def test_a_deployment_is_validated():
    with pytest.raises(DzjaxError, match="replicas"):
        Deployment(replicas=0)


def test_a_warm_start_finds_the_deltas_where_the_warm_up_left_them():
    work = [request(0, 0.0, "a", 2), request(1, 0.0, "b", 2)]
    cold = simulate(work, Deployment(replicas=2), COSTS)
    warm = simulate(work, Deployment(replicas=2), COSTS, warm=work)
    assert cold["router"]["misses"] == 2 and warm["router"] == {"hits": 2, "misses": 0,
                                                                 "hit_rate": 1.0}
    # no disk read, no upload: the route, the prefill, one decode step
    assert [row[3] for row in warm["per_request"]] == pytest.approx([0.034, 0.034], abs=1e-4)
    assert warm["generated_tokens"] == 4 and len(warm["per_request"]) == 2


HOPS = dataclasses.replace(COSTS, hops=((0.010, 0.002), (0.020, 0.003)))


def test_requests_and_tokens_pass_the_routers_processes_both_ways():
    """In through the hops in order (their work per request), then route_s; each token back
    through them in reverse (their work per token): TTFT and latency when the client has it."""
    out = simulate([request(0, 0.0, "base", 3)], Deployment(replicas=1), HOPS)
    row = out["per_request"][0]
    first = 0.010 + 0.020 + 0.004 + COSTS.prefill(1)
    assert row[3] == pytest.approx(first + 0.003 + 0.002, abs=1e-6)
    last = first + 2 * COSTS.decode(1, 0)  # one token a step: no token waits for another
    assert row[4] == pytest.approx(last + 0.003 + 0.002, abs=1e-6)


def test_a_hop_shares_its_time_among_what_it_holds():
    """Two requests at once share the first hop (10 ms each: both through at 20 ms, not one
    at 10 and one at 20), then the second (20 ms each: both at 60 ms)."""
    work = [request(0, 0.0, "base", 1), request(1, 0.0, "base", 1)]
    out = simulate(work, Deployment(replicas=1), HOPS)
    at_replica = 0.020 + 0.040 + 0.004
    first = at_replica + COSTS.prefill(2)
    # both first tokens back: the ingress (3 ms each, shared: 6 ms), then the proxy (2 ms each)
    assert [r[3] for r in out["per_request"]] == pytest.approx([first + 0.006 + 0.004] * 2,
                                                               abs=1e-6)


def test_a_hop_stays_busy_with_what_it_passed_on():
    """With hop_share 0.5 a request is passed on at half its work; the hop still does the
    other half, shared with the next request."""
    one_hop = dataclasses.replace(COSTS, hops=((0.010, 0.0),), hop_share=0.5, route_s=0.0)
    work = [request(0, 0.0, "base", 5), request(1, 0.005, "base", 1)]  # b: the idle replica
    out = simulate(work, Deployment(replicas=2), one_hop)
    a, b = out["per_request"]
    assert a[3] == pytest.approx(0.005 + COSTS.prefill(1), abs=1e-6)
    # b needs 5 ms of the hop's time before it is passed on, at half speed: 10 ms
    assert b[3] == pytest.approx(0.010 + COSTS.prefill(1), abs=1e-6)


def test_costs_read_back_what_they_wrote():
    full = dataclasses.replace(HOPS, contention={2: 1.5, 4: 2.0}, token_s=0.001, hop_share=0.5)
    assert Costs.from_json(json.loads(json.dumps(full.to_json()))) == full


def test_a_closed_loop_sends_each_clients_next_request_as_its_last_one_ends():
    # one client, 5 tokens a request: route, prefill, 4 decode steps; sent at 0, 0.082, 0.164
    # and 0.246 (before 0.3), the last ends at 0.328
    one = [request(0, 0.0, "base", 5)]
    cycle = 0.004 + COSTS.prefill(1) + 4 * COSTS.decode(1, 0)
    assert cycle == pytest.approx(0.082)
    assert closed_loop(one, Deployment(replicas=1), COSTS, clients=1, seconds=0.3) == \
        pytest.approx(20 / (4 * cycle))
    # two clients: their requests are batched (prefill 2, 4 steps of 2 rows), twice
    two = [request(0, 0.0, "base", 5), request(1, 0.0, "base", 5)]
    cycle = 0.004 + COSTS.prefill(2) + 4 * COSTS.decode(2, 0)
    assert closed_loop(two, Deployment(replicas=1), COSTS, clients=2, seconds=0.15) == \
        pytest.approx(20 / (2 * cycle))
    with pytest.raises(DzjaxError, match="clients"):
        closed_loop(two, Deployment(replicas=1), COSTS, clients=3, seconds=1.0)


def test_contention_grows_with_the_requests_in_flight_and_slows_the_replicas_steps():
    shared = dataclasses.replace(COSTS, contention={2: 1.5, 4: 2.0})
    assert [shared.slowdown(n) for n in (0, 1, 3, 4, 10)] == pytest.approx(
        [1.0, 1.0, 1.75, 2.0, 2.0])  # held at the last point beyond it
    assert COSTS.slowdown(5) == 1.0  # none given: none
    # a lone request at a factor 2: its step twice as long, the hops' work and route_s not
    out = simulate([request(0, 0.0, "base", 1)], Deployment(replicas=1),
                   dataclasses.replace(HOPS, contention={1: 2.0}))
    ttft = (0.010 + 0.020) + 0.004 + 2 * COSTS.prefill(1) + (0.003 + 0.002)
    assert out["per_request"][0][3] == pytest.approx(ttft, abs=1e-6)
    # in flight: two at once on two replicas, both at the factor for 2; one after the other
    # (the first done), each alone at 1
    two = dataclasses.replace(COSTS, contention={2: 2.0})
    together = simulate([request(0, 0.0, "base", 1), request(1, 0.0, "base", 1)],
                        Deployment(replicas=2), two)
    apart = simulate([request(0, 0.0, "base", 1), request(1, 10.0, "base", 1)],
                     Deployment(replicas=2), two)
    assert [r[3] for r in together["per_request"]] == pytest.approx([0.004 + 0.060] * 2)
    assert [r[3] for r in apart["per_request"]] == pytest.approx([0.004 + 0.030] * 2)


def test_contention_is_fitted_to_a_measured_closed_loop():
    two = [request(0, 0.0, "base", 5), request(1, 0.0, "base", 5)]
    work = COSTS.prefill(2) + 4 * COSTS.decode(2, 0)  # a cycle's replica time, at factor 1
    slower = 10 / (0.004 + 2.0 * work)  # tokens/s a cycle at a factor 2 gives
    faster = 200.0  # a factor of (0.05 - 0.004) / work, below 1
    fitted = fit_contention(two, Deployment(replicas=1), COSTS, {2: slower}, seconds=0.15)
    assert fitted[2] == pytest.approx(2.0, rel=0.01)
    fitted = fit_contention(two, Deployment(replicas=1), COSTS, {2: faster}, seconds=0.15)
    assert fitted[2] == pytest.approx((0.05 - 0.004) / work, rel=0.01) and fitted[2] < 1
    with pytest.raises(DzjaxError, match="closed loop of 2 clients"):  # beyond the bounds
        fit_contention(two, Deployment(replicas=1), COSTS, {2: 1e6}, seconds=0.15)
