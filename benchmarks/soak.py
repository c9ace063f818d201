"""Soak: many concurrent HTTP requests over several deltas while delta files break underneath.

    JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/soak.py [--requests 1000]
        [--deltas 6] [--out benchmarks/results/soak-cpu-<date>.json]

A real uvicorn server (`dzjax serve`'s app) over the trained fixture base and `--deltas` deltas,
with 2 device slots and no host cache, so deltas are evicted and read back from disk all the time.
All requests are sent at once from one asyncio client. When a quarter of the answers are in, one
delta's file is removed and another's is damaged (bytes flipped in its tensor data). Checked:
  - every request for the base and the untouched deltas is answered 200 with exactly the text
    `dzjax.generate` gives alone (greedy);
  - every request for the two broken deltas is either answered right (it was still on the device
    or the host) or refused with 503 naming the delta and what is wrong with its file;
  - the server's memory (RSS) stays bounded: its peak after warm-up against the warm-up's.
Writes a JSON report and prints a summary; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

import httpx2
import jax
import jax.numpy as jnp
import numpy as np
import uvicorn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from conftest import fixture_dir, make_deltas  # noqa: E402

from dzjax.models.generate import generate  # noqa: E402
from dzjax.models.loading import load_base  # noqa: E402
from dzjax.compress.delta_file import load_delta  # noqa: E402
from dzjax.serving.http import make_app  # noqa: E402
from dzjax.serving.server import serve  # noqa: E402

PROMPTS = ["The function returns", "If the file", "Return the", "This method", "The optional"]
MAX_TOKENS = 8


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start(app):
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.02)
    return http, thread, f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"


async def one(client, url, model, prompt):
    t = time.perf_counter()
    r = await client.post(url + "/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    body = r.json()
    text = body["choices"][0]["text"] if r.status_code == 200 else body["error"]["message"]
    return model, prompt, r.status_code, text, time.perf_counter() - t


async def run_load(url, jobs, on_quarter):
    limits = httpx2.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx2.AsyncClient(timeout=600, limits=limits) as client:
        tasks = [asyncio.create_task(one(client, url, m, p)) for m, p in jobs]
        results, broke = [], False
        for fut in asyncio.as_completed(tasks):
            results.append(await fut)
            if not broke and len(results) >= len(jobs) // 4:
                on_quarter()
                broke = True
        return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--deltas", type=int, default=6)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dzjax-soak-"))
    base_dir = fixture_dir("trained") / "base"
    paths = make_deltas(base_dir, tmp, args.deltas, group_size=64)
    base = load_base(base_dir, dtype=jnp.float32)
    expected = {(n, q): generate(base, [q], delta=None if n == "base" else load_delta(paths[n]),
                                 max_tokens=MAX_TOKENS)[0]
                for n in ["base", *paths] for q in PROMPTS}
    removed, damaged = f"ft{args.deltas - 2}", f"ft{args.deltas - 1}"
    server = serve(base, paths, max_batch=16, max_seq_len=64, max_resident_deltas=2,
                   host_cache_bytes=0)
    http, thread, url = start(make_app(server))
    models = ["base", *paths]
    rng = np.random.default_rng(0)
    jobs = [(models[rng.integers(len(models))], PROMPTS[rng.integers(len(PROMPTS))])
            for _ in range(args.requests)]
    asyncio.run(run_load(url, jobs[:32], lambda: None))  # warm-up: compiles every shape
    warm_rss = rss_mib()
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(rss_mib())
            time.sleep(0.1)

    def break_files():
        os.remove(paths[removed])
        data = bytearray(paths[damaged].read_bytes())
        for i in range(1, 6):
            data[-i * 997] ^= 0x5A
        paths[damaged].write_bytes(bytes(data))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    results = asyncio.run(run_load(url, jobs, break_files))
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    health = httpx2.get(url + "/health").status_code
    stats = server.stats()
    http.should_exit = True
    thread.join(30)
    server.close(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)

    outcome = collections.Counter()
    problems = []
    for model, prompt, status, text, _ in results:
        right = status == 200 and text == expected[(model, prompt)]
        if model in (removed, damaged):
            clear = status == 503 and model in text and (
                "no such file" in text if model == removed else "damaged" in text)
            outcome[f"{model} ({'removed' if model == removed else 'damaged'}): "
                    f"{'answered' if right else 'refused' if clear else 'WRONG'}"] += 1
            if not (right or clear):
                problems.append((model, prompt, status, text[:200]))
        else:
            outcome["others: " + ("answered" if right else "WRONG")] += 1
            if not right:
                problems.append((model, prompt, status, text[:200]))
    latencies = np.array([r[4] for r in results])
    report = {
        "what": "soak: concurrent HTTP requests over deltas while one delta file is removed and "
                "another damaged mid-run",
        "command": "JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/soak.py " + " ".join(
            sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "cpu_count": os.cpu_count(), "requests": args.requests, "deltas": args.deltas,
        "seconds": seconds, "requests_per_s": args.requests / seconds,
        "latency_s": {"p50": float(np.percentile(latencies, 50)),
                      "p99": float(np.percentile(latencies, 99)), "max": float(latencies.max())},
        "outcomes": dict(sorted(outcome.items())), "problems": problems[:20],
        "rss_mib": {"after_warmup": warm_rss, "peak_during_run": max(samples, default=warm_rss),
                    "end": samples[-1] if samples else warm_rss},
        "health_after": health, "pool": stats["pool"], "finished": stats["finished"],
    }
    out = args.out or pathlib.Path(
        f"benchmarks/results/soak-{jax.default_backend()}-{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("seconds", "requests_per_s", "latency_s",
                                              "outcomes", "rss_mib", "health_after")}, indent=1))
    print(f"wrote {out}")
    ok = not problems and health == 200
    ok &= report["rss_mib"]["peak_during_run"] < warm_rss + 1024
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
