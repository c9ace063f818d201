"""Tensor-parallel generation over several processes with `jax.distributed` (CPU: gloo).

    python scripts/multiprocess_generate.py --processes 2 BASE_DIR [--delta FILE] [--out FILE]

launches N processes on this host, each with one CPU device; together they form one mesh of N
devices over which `dzjax.generate` splits the base (by heads and MLP columns), the delta and the
KV cache. Every process runs the same program (multi-controller SPMD) and gets the same tokens;
process 0 prints them (and writes them as JSON to --out).

On several GPU hosts it is the same program: run one process per host (or per GPU) with
`jax.distributed.initialize(coordinator_address="HOST0:PORT", num_processes=N, process_id=i)`
(on SLURM or TPU pods JAX finds these itself), then `make_mesh()` spans every GPU of every host and
XLA inserts NCCL collectives where the gloo ones run here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys


def worker(args) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.processes, process_id=args.process_id)
    import jax.numpy as jnp

    import dzjax
    from dzjax.models.sharding import make_mesh

    mesh = make_mesh()  # every device of every process
    assert mesh.size == args.processes, mesh
    base = dzjax.load_base(args.base, dtype=jnp.float32)
    delta = dzjax.load_delta(args.delta) if args.delta else None
    prompts = json.loads(args.prompts)
    tokens = dzjax.generate(base, prompts, max_tokens=args.max_tokens, delta=delta, mesh=mesh,
                            stop_at_eos=False)
    if jax.process_index() == 0:
        print(json.dumps({"devices": mesh.size, "processes": jax.process_count(),
                          "tokens": tokens}))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(tokens, f)
    jax.distributed.shutdown()


def launch(args) -> int:
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--process-id", str(i),
                               "--coordinator", f"127.0.0.1:{port}", *sys.argv[1:]], env=env)
             for i in range(args.processes)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return 0 if all(c == 0 for c in codes) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base")
    p.add_argument("--delta", default=None)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--prompts", default="[[1, 15, 27, 3], [1, 99]]", help="JSON token-id lists")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", default=None)
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
