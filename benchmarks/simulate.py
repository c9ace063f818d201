"""The planning simulator against a real run: measure a replica's costs on this machine, predict
a workload on R replicas with `dzjax.bench.simulate`, serve the same workload on R real
replicas (Ray Serve, `dzjax.serving.ray_serve`), and compare throughput, TTFT, latency and SLO
attainment.

  PYTHONPATH=. python benchmarks/simulate.py [--replicas 2] [--rate 6] [--requests 120]
  (needs the ray extra: pip install -e '.[ray]')

The replica's costs are measured on one in-process server before Ray starts (`measure_costs`):
decode steps by rows and active deltas, prefills by rows, a delta's load from disk and from
host memory. The workload then runs on the replicas once to compile every shape on each, then
`--passes` times measured, each pass calibrated on the deployment just before it
(`calibrate`: the machine's speed drifts over minutes): a few sequential requests (not the
workload) give the router's and HTTP's time per request and the time to stream a token on,
with the CPU time the router's processes (Ray's proxy, the ingress: `hops`) spend on them
per request and per token (psutil; the part of it a lone request waits for is `hop_share`);
closed loops of the workload's requests at 4 concurrencies give the contention for the
shared cores (`dzjax.bench.simulate.fit_contention`). Each pass is predicted from its own
calibration; the real and predicted figures are the medians over the passes (the real
passes' range, and each pass's error, are reported too, with the programs compiled during
each pass). Every request asks for logprobs=0, in the calibration too: the synthetic model
has no tokenizer, and a stream without text carries a chunk per token only with its
log-probability.
Results: benchmarks/results/simulate-<backend>-<date>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import pathlib
import socket
import statistics
import sys
import tempfile
import time

ROWS, ACTIVE, TOKENS = (1, 2, 4), (0, 1, 2), 33


def _timed(server, requests: list[tuple[str, list[int], int]]) -> float:
    """Seconds from submitting `requests` (model, prompt, max_tokens) together (one admission)
    to the last one's end."""
    start = time.perf_counter()
    handles = server.engine.call(lambda: [server.submit(p, m, max_tokens=n, ignore_eos=True,
                                                        logprobs=0) for m, p, n in requests])
    for h in handles:
        h.result()
    return time.perf_counter() - start


def measure_costs(base_dir, deltas: dict, *, max_batch: int, max_resident: int,
                  prompt_len: int, repeats: int = 3, **options):
    """A replica's `Costs`, measured on one in-process server (route_s left 0)."""
    import dzjax
    from dzjax.bench.simulate import Costs

    names = sorted(deltas)
    prompt = list(range(1, prompt_len + 1))
    server = dzjax.serve(base_dir, deltas, max_batch=max_batch,
                         max_resident_deltas=max_resident, **options)
    try:
        def case(rows, active, tokens):
            models = ["base"] * rows if active == 0 else [names[i % active] for i in range(rows)]
            return [(m, prompt, tokens) for m in models]
        for rows in ROWS:  # compile every shape (and put the first deltas on the device)
            for active in ACTIVE:
                if active <= rows:
                    _timed(server, case(rows, active, TOKENS))
        decode, prefill = {}, {}
        for rows in ROWS:
            for active in ACTIVE:
                if active > rows:
                    continue
                whole = statistics.median(_timed(server, case(rows, active, TOKENS))
                                          for _ in range(repeats))
                first = statistics.median(_timed(server, case(rows, active, 1))
                                          for _ in range(repeats))
                decode[(rows, active)] = (whole - first) / (TOKENS - 1)
                if active == min(rows, 1):
                    prefill[rows] = first
        resident = statistics.median(_timed(server, [(names[0], prompt, 1)])
                                     for _ in range(repeats))
        disk = [_timed(server, [(name, prompt, 1)]) - resident for name in names[max_resident:]]
        host = [_timed(server, [(name, prompt, 1)]) - resident for name in names[:max_resident]]
    finally:
        server.close()
    return Costs(decode_s=decode, prefill_s=prefill,
                 load_s={"disk": statistics.median(disk), "host": statistics.median(host)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(client, r) -> float:
    """Stream request `r`'s completion to its end; when its first token came."""
    first = None
    for chunk in client.completions.create(model=r.model, prompt=list(r.prompt),
                                           max_tokens=r.max_tokens, temperature=0,
                                           stream=True, logprobs=0,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and first is None:
            first = time.perf_counter()
    return first


def run_real(url: str, workload) -> list:
    """Send `workload` at its arrival times (streaming completions); the outcomes."""
    import openai

    from dzjax.bench.metrics import Outcome

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(r, start):
        time.sleep(max(0.0, start + r.arrival - time.perf_counter()))
        sent = time.perf_counter()
        first = _stream(client, r)
        end = time.perf_counter()
        return Outcome(r.index, r.model, sent - start, first - start, end - start,
                       r.max_tokens)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        start = time.perf_counter() + 0.5
        outcomes = list(pool.map(lambda r: one(r, start), workload))
    client.close()
    return outcomes


def closed_loop(url: str, workload, clients: int, seconds: float) -> float:
    """Tokens/s of `clients` clients, client k streaming `workload[k::clients]` one request
    after another (and again) for `seconds` (none sent after): as
    `dzjax.bench.simulate.closed_loop` predicts it."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()

    def worker(k):
        tokens = 0
        for r in workload[k::clients] * 1000:
            if time.perf_counter() >= start + seconds:
                break
            _stream(client, r)
            tokens += r.max_tokens
        return tokens
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(worker, range(clients)))
    client.close()
    return total / (time.perf_counter() - start)


def median_summary(passes: list[dict]) -> dict:
    """Each figure of `summarize`'s summaries (and the router's counts): its median over the
    passes."""
    def median(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: median([v[k] for v in values]) for k in first if k != "per_request"}
        return statistics.median(values) if isinstance(first, (int, float)) and \
            not isinstance(first, bool) and None not in values else first
    return median(passes)


ROUTER_PROCESSES = ("ProxyActor", "ServeReplica:dzjax:Ingress")  # in the order a request passes


def router_processes() -> list:
    """The router's processes on this machine (Ray's proxy, the ingress), in `ROUTER_PROCESSES`
    order, found by their process titles."""
    import psutil

    found = {}
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        for key in ROUTER_PROCESSES:
            if title.startswith("ray::") and key in title:
                found.setdefault(key, []).append(p)
    missing = [key for key in ROUTER_PROCESSES if key not in found]
    if missing:
        raise RuntimeError(f"no Ray process titled {missing} on this machine")
    return [found[key] for key in ROUTER_PROCESSES]


def cpu_seconds(processes: list) -> list[float]:
    """CPU seconds (user + system) each group of processes has used so far."""
    return [sum(sum(p.cpu_times()[:2]) for p in group) for group in processes]


def _routing(url: str, refresh: bool = False) -> dict:
    """The ingress's stats; refresh: after a few /health requests, which bring each replica's
    compilation count up to date."""
    import httpx2

    for _ in range(8 if refresh else 0):
        httpx2.get(url + "/health", timeout=30)
    return httpx2.get(url + "/v1/ray/stats", timeout=30).json()


CLOSED_S = 8.0  # seconds of each closed loop


def calibrate(url: str, workload, costs, deployment, router, probes: int = 6) -> dict:
    """The deployment's own costs, measured on it now, added to `costs` (the replica's, from
    `measure_costs`): sequential requests (one at a time, so one row) give the router's and
    HTTP's time per request (`route_s`) and the time to stream each token on (`token_s`),
    and the work of each of the router's processes (their CPU time) per request and per
    streamed token (`hops`, `hop_share`); closed loops of R, R*B/2, R*B and 2*R*B clients
    (R replicas of B rows) give the contention of everything sharing the cores
    (`fit_contention`). {"costs": the costs (JSON), "closed_loops_tokens_per_s": the loops'
    figures, "lone_latency_s": a lone request of the workload's longest length}."""
    from dzjax.bench.simulate import fit_contention

    def sequential(max_tokens):
        before = cpu_seconds(router)
        latency = statistics.median(o.finished - o.arrival for o in run_real(url, [
            dataclasses.replace(r, arrival=i * 0.5, max_tokens=max_tokens)
            for i, r in enumerate(workload[:probes])]))
        return latency, [(b - a) / probes for a, b in zip(before, cpu_seconds(router))]
    longest = max(r.max_tokens for r in workload)  # (a shape the warm-up compiled)
    (one, work_one), (whole, work_whole) = sequential(1), sequential(longest)
    per_token = [max(0.0, (w - o) / (longest - 1)) for o, w in zip(work_one, work_whole)]
    hops = tuple((max(0.0, o - t), t) for o, t in zip(work_one, per_token))
    # Alone, a one-token request waits for its hops' work on its path, and for the rest of
    # the way (route_s): when the work is more than that wait, only a share of it is.
    path = max(0.0, one - costs.prefill(1))
    work = sum(r + t for r, t in hops)
    share = min(1.0, path / work) if work else 1.0
    costs = dataclasses.replace(
        costs, hops=hops, hop_share=share, route_s=max(0.0, path - share * work),
        token_s=max(0.0, (whole - one) / (longest - 1) - costs.decode(1, 1)))
    r, b = deployment.replicas, deployment.max_batch
    loops = {c: closed_loop(url, workload, c, CLOSED_S)
             for c in sorted({r, max(1, r * b // 2), r * b, 2 * r * b})}
    contention = fit_contention(workload, deployment, costs, loops, seconds=CLOSED_S,
                                warm=workload)
    return {"costs": dataclasses.replace(costs, contention=contention).to_json(),
            "closed_loops_tokens_per_s": loops, "lone_latency_s": whole}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--deltas", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-resident", type=int, default=2)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--rate", type=float, default=6.0, help="requests/s (Poisson)")
    p.add_argument("--popularity", default="zipf")
    p.add_argument("--prompt-len", default="16:32")
    p.add_argument("--output-len", default="8:32")
    p.add_argument("--slo", type=float, default=5.0, help="latency SLO, seconds")
    p.add_argument("--passes", type=int, default=3,
                   help="measured passes of the workload (the real figures: their medians)")
    p.add_argument("--cache-dir", type=pathlib.Path,
                   default=pathlib.Path(tempfile.gettempdir()) / "dzjax-bench")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args()
    if args.requests < 2 * args.replicas * args.max_batch:  # (the largest closed loop's clients)
        p.error(f"--requests must be at least 2 * replicas * max_batch = "
                f"{2 * args.replicas * args.max_batch}, got {args.requests}")

    import jax
    import ray
    from ray import serve

    from dzjax.bench.metrics import summarize
    from dzjax.bench.models import SyntheticConfig, build_synthetic
    from dzjax.bench.simulate import Costs, Deployment, simulate
    from dzjax.bench.workload import Lengths, WorkloadConfig, make_workload
    from dzjax.serving import ray_serve

    synthetic = SyntheticConfig(layers=2, hidden=256, intermediate=688, vocab=4096, heads=4,
                                context=512, deltas=args.deltas, weights_dtype="float32")
    models = build_synthetic(synthetic, args.cache_dir)
    options = dict(max_seq_len=128, dtype="float32")
    lengths = Lengths.parse(args.prompt_len)
    costs = measure_costs(models.base_dir, models.deltas, max_batch=args.max_batch,
                          max_resident=args.max_resident,
                          prompt_len=(lengths.low + lengths.high) // 2, **options)
    print("measured costs:", json.dumps(costs.to_json()), flush=True)

    workload = make_workload(WorkloadConfig(
        models=tuple(sorted(models.deltas)), vocab_size=synthetic.vocab,
        num_requests=args.requests, rate=args.rate, popularity=args.popularity,
        prompt_len=lengths, output_len=Lengths.parse(args.output_len), seed=0))

    deployment = Deployment(replicas=args.replicas, max_batch=args.max_batch,
                            max_resident_deltas=args.max_resident)
    ray.init(include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"JAX_PLATFORMS": jax.default_backend()}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ray_serve.application(models.base_dir, models.deltas,
                                    num_replicas=args.replicas, max_batch=args.max_batch,
                                    max_resident_deltas=args.max_resident,
                                    weights_dtype="float32", **options),
              name="dzjax", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        run_real(url, workload)  # compile every shape on every replica
        router = router_processes()
        passes, calibrations = [], []  # each pass calibrated just before it: the machine's
        for _ in range(args.passes):   # speed drifts over minutes
            calibrations.append(calibrate(url, workload, costs, deployment, router))
            print("calibrated:", json.dumps(calibrations[-1]["costs"]), flush=True)
            before = _routing(url, refresh=True)
            passes.append(summarize(run_real(url, workload), len(workload), args.slo))
            after = _routing(url, refresh=True)
            passes[-1]["traces_during_run"] = sum(  # (programs compiled while measured)
                sum(after["replicas"][r]["traces"].values())
                - sum(before["replicas"][r]["traces"].values())
                for r in after["replicas"].keys() & before["replicas"].keys())
            routed = {k: after[k] - before[k] for k in ("hits", "misses")}
            passes[-1]["router"] = routed | {"hit_rate": routed["hits"] / max(
                1, routed["hits"] + routed["misses"])}
        print("programs compiled during each measured pass:",
              [r["traces_during_run"] for r in passes], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    # Each pass predicted from its own calibration, warm as the real replicas were (they
    # served the workload before); real and predicted figures: the medians over the passes.
    predictions = [simulate(workload, deployment, Costs.from_json(c["costs"]), slo_s=args.slo,
                            warm=workload) for c in calibrations]
    real, predicted = median_summary(passes), median_summary(predictions)

    def pick(summary, key, sub):
        return summary[key] if sub is None else summary[key][sub]

    def error(key, sub=None):
        want, got = pick(real, key, sub), pick(predicted, key, sub)
        reals = [pick(r, key, sub) for r in passes]
        return {"real": want, "predicted": got, "error": (got - want) / want if want else None,
                "real_passes_range": [min(reals), max(reals)],
                "passes_error": [(pick(q, key, sub) - w) / w if w else None
                                 for q, w in zip(predictions, reals)]}
    comparison = {"throughput_tokens_per_s": error("throughput_tokens_per_s"),
                  "ttft_p50_s": error("ttft_s", "p50"), "ttft_p99_s": error("ttft_s", "p99"),
                  "latency_p50_s": error("latency_s", "p50"),
                  "latency_p99_s": error("latency_s", "p99"),
                  "slo_attainment": error("slo_attainment")}
    print(f"router hit rate: real {real['router']['hit_rate']:.3f}, predicted "
          f"{predicted['router']['hit_rate']:.3f}")
    for name, c in comparison.items():
        low, high = c["real_passes_range"]
        each = " ".join(f"{100 * e:+.0f}%" for e in c["passes_error"] if e is not None)
        print(f"{name:26s} real {c['real']:9.3f} ({low:.3f}-{high:.3f})  predicted "
              f"{c['predicted']:9.3f}  error {100 * c['error']:+6.1f}%  (passes {each})"
              if c["error"] is not None else name)
    backend = jax.default_backend()
    out = args.out or pathlib.Path(__file__).parent / "results" / (
        f"simulate-{backend}-{datetime.date.today()}.json")
    for summary in (*passes, *predictions):
        summary.pop("per_request")
    out.write_text(json.dumps({
        "command": " ".join(["PYTHONPATH=. python benchmarks/simulate.py", *sys.argv[1:]]),
        "backend": backend, "date": str(datetime.date.today()), "config": vars(args) | {
            "cache_dir": None, "out": None, "model": dataclasses.asdict(synthetic)},
        "costs": costs.to_json(), "calibrations": calibrations, "real": real,
        "real_passes": passes, "predicted": predicted, "predicted_passes": predictions,
        "comparison": comparison}, indent=2, default=str) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
