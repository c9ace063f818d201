"""Fewer launches and a host that does not wait: fused projections and the pipelined engine loop.

    JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/hot_path.py [--layers 4]
        [--hidden 512] [--batch 8] [--deltas 8] [--repeats 20] [--dtype auto]
        [--implementation xla] [--out FILE.json]

(`--dtype auto`: bfloat16 on a GPU, float32 elsewhere; `benchmarks/gpu_suite.sh` runs it with
`--implementation auto`, the Pallas kernels.)

1. The serving decode step (`dzjax.bench.decode_step.decode_step_times`, XLA path) of the
   bench's synthetic Llama (`dzjax.bench.SyntheticConfig`: hidden 512, 4 layers, vocab 4096,
   float32 weights) with `--deltas` compressed deltas (4-bit 2:4 g128, fine-tunes moving every
   weight by 1% of its spread): base only and 8 rows over 8 deltas, with q/k/v and gate/up fused
   and not.
2. The engine loop: the same server with `pipeline_decode` on and off (and fusion on and off),
   64 requests of 32-token prompts and 64 output tokens over the deltas, all submitted at once:
   tokens per second, the share of decode steps dispatched before the step before them was read,
   and whether every output equals the unpipelined, unfused server's.
Cases take turns; medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np

import jax.numpy as jnp

from dzjax.bench.decode_step import decode_step_times
from dzjax.bench.models import SyntheticConfig, build_synthetic
from dzjax.models.forward import default_dtype
from dzjax.models.loading import load_base
from dzjax.paths import cache_dir
from dzjax.serving.server import serve


def loop_throughput(base, deltas, *, batch: int, rounds: int, dtype: str,
                    implementation: str) -> dict:
    rng = np.random.default_rng(0)
    names = list(deltas)
    prompts = [[int(t) for t in rng.integers(3, base.config.vocab_size, 32)] for _ in range(64)]
    models = [names[i % len(names)] for i in range(len(prompts))]
    cases = {(p, f): [] for p in (False, True) for f in (False, True)}
    outputs, overlapped = {}, {}
    servers = {key: serve(base, deltas, max_batch=batch, max_seq_len=128, dtype=dtype,
                          implementation=implementation, pipeline_decode=key[0],
                          fuse_projections=key[1]) for key in cases}
    try:
        for server in servers.values():  # warm-up: compile every bucket
            server.generate(prompts[:batch], model=models[:batch], max_tokens=64,
                            ignore_eos=True)
        for _ in range(rounds):
            for key, server in servers.items():
                before = server.stats()
                t = time.perf_counter()
                out = server.generate(prompts, model=models, max_tokens=64, ignore_eos=True)
                cases[key].append(len(prompts) * 64 / (time.perf_counter() - t))
                after = server.stats()
                outputs[key] = out
                overlapped[key] = ((after["overlapped_steps"] - before["overlapped_steps"])
                                   / (after["decode_steps"] - before["decode_steps"]))
    finally:
        for server in servers.values():
            server.close()
    reference = outputs[(False, False)]
    return {f"pipeline={p} fused={f}": {
        "tokens_per_s": statistics.median(v), "overlapped_share": overlapped[(p, f)],
        "outputs_equal_unpipelined_unfused": outputs[(p, f)] == reference}
        for (p, f), v in cases.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--deltas", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--implementation", default="xla")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = default_dtype() if args.dtype == "auto" else args.dtype
    models = build_synthetic(SyntheticConfig(layers=args.layers, hidden=args.hidden,
                                             intermediate=args.hidden * 11 // 4,
                                             vocab=args.vocab, heads=args.hidden // 64,
                                             deltas=args.deltas, weights_dtype="float32"),
                             args.cache_dir or cache_dir() / "bench")
    base = load_base(models.base_dir, dtype=jnp.dtype(dtype))
    deltas = dict(models.deltas)
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
              "args": vars(args), "decode_step": {}}
    for fused in (False, True):
        r = decode_step_times(base, deltas, batch=args.batch, cache_len=128, dtype=dtype,
                              implementation=args.implementation, repeats=args.repeats,
                              fused_projections=fused)
        report["decode_step"][f"fused={fused}"] = r
        print(f"decode step, fused={fused}: " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in r["ms"].items()), flush=True)
    report["engine_loop"] = loop_throughput(base, deltas, batch=args.batch, rounds=args.rounds,
                                            dtype=dtype, implementation=args.implementation)
    for key, r in report["engine_loop"].items():
        print(f"engine loop, {key}: {r['tokens_per_s']:.0f} tokens/s, "
              f"{100 * r['overlapped_share']:.0f}% of steps overlapped, outputs equal: "
              f"{r['outputs_equal_unpipelined_unfused']}", flush=True)
    out = pathlib.Path(args.out or f"benchmarks/results/hot-path-{jax.default_backend()}-"
                       f"{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
