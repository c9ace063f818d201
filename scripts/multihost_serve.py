"""Serving over several processes with `jax.distributed` (CPU: gloo), from Python.

    python scripts/multihost_serve.py --processes 2 BASE_DIR --delta a=A.dz.safetensors ... \
        --requests REQUESTS.json [--out TOKENS.json]

launches N processes on this host, each with one CPU device; every process calls `dzjax.serve`
with the same arguments and a mesh over all N devices. Process 0 gets the server and serves
the requests (a JSON list of {"prompt": [ids], "model": name or null, "max_tokens": n, and
optionally "temperature", "seed"}), all submitted at once; the others follow it. Process 0
prints {"processes", "devices", "tokens"} as JSON (and writes the tokens to --out). With
--kill-follower, process 1 is then killed and the report says how process 0's server stopped.

On several hosts it is the same program: one process per host (or GPU), each started with
`jax.distributed.initialize(coordinator_address="HOST0:PORT", num_processes=N, process_id=i)`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(args) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.processes, process_id=args.process_id)
    import jax.numpy as jnp

    import dzjax
    from dzjax.models.sharding import make_mesh

    mesh = make_mesh()  # every device of every process
    base = dzjax.load_base(args.base, dtype=jnp.float32)
    deltas = dict(d.split("=", 1) for d in args.delta)
    max_batch = args.follower_max_batch if args.process_id and args.follower_max_batch else 4
    server = dzjax.serve(base, deltas, mesh=mesh, max_batch=max_batch, max_seq_len=64,
                         max_resident_deltas=args.slots, worker_timeout_s=args.worker_timeout)
    if server is None:  # a follower: process 0 closed its server
        print(f"process {jax.process_index()}: followed to the end", flush=True)
        return
    with open(args.requests) as f:
        requests = json.load(f)
    def run():
        handles = [server.submit(r["prompt"], r["model"], max_tokens=r["max_tokens"],
                                 temperature=r.get("temperature", 0.0), seed=r.get("seed"),
                                 ignore_eos=True) for r in requests]
        return [h.result().token_ids for h in handles]
    tokens = run()
    report = {"processes": jax.process_count(), "devices": mesh.size, "tokens": tokens}
    if args.timed:  # the same requests again, compiled: seconds and decode steps
        steps, start = server.stats()["decode_steps"], time.perf_counter()
        run()
        report["timed"] = {"seconds": time.perf_counter() - start,
                           "decode_steps": server.stats()["decode_steps"] - steps}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(tokens, f)
    if not args.kill_follower:
        server.close()
        print(json.dumps(report), flush=True)
        return
    print("idle", flush=True)  # the launcher kills process 1 now
    waited = time.monotonic()
    while server.engine.alive and time.monotonic() - waited < 120:
        time.sleep(0.1)
    report["stopped_after_s"] = round(time.monotonic() - waited, 1)
    report["stopped_by"] = str(server.engine.stopped_by)
    try:
        server.generate([1, 2, 3], max_tokens=2)
    except Exception as e:  # noqa: BLE001 - reported: the test checks it
        report["then"] = f"{type(e).__name__}: {e}"
    print(json.dumps(report), flush=True)
    os._exit(0)  # (jax.distributed's shutdown would wait for the killed process)


def launch(args) -> int:
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--process-id", str(i),
                               "--coordinator", f"127.0.0.1:{port}", *sys.argv[1:]], env=env,
                              stdout=subprocess.PIPE if i == 0 else None, text=True)
             for i in range(args.processes)]
    try:
        for line in procs[0].stdout:  # process 0's output, passed on
            print(line, end="", flush=True)
            if line.strip() == "idle" and args.kill_follower:
                procs[1].kill()
        codes = [p.wait(timeout=600) for p in procs]
        if args.kill_follower:
            codes = codes[:1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return 0 if all(c == 0 for c in codes) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base")
    p.add_argument("--delta", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--requests", required=True, help="a JSON file of requests")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--slots", type=int, default=2, help="max_resident_deltas")
    p.add_argument("--out", default=None)
    p.add_argument("--worker-timeout", type=float, default=10.0, help="worker_timeout_s")
    p.add_argument("--timed", action="store_true",
                   help="serve the requests a second time and report its seconds and steps")
    p.add_argument("--follower-max-batch", type=int, default=None,
                   help="start process 1 with this max_batch (to see it refused)")
    p.add_argument("--kill-follower", action="store_true",
                   help="once the requests are answered, kill process 1 and report how process "
                   "0's server stops")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
