"""Tensor parallelism: the serving decode step's time and memory per device against mesh size.

  PYTHONPATH=. python benchmarks/tensor_parallel.py [--devices 8] [--layers 4] [--hidden 512]

Builds a random Llama (heads, kv heads, MLP and vocab divisible by the largest mesh), one random
fine-tune converted to a delta (round-to-nearest) and serves it under `--deltas` names (so that
many pool slots are active, as with as many distinct deltas), then times the jitted decode step
(`dzjax.serving.steps.decode`, every batch row on a different delta) on meshes of 1, 2, 4, ...
devices, and reads the bytes each device holds (base params, delta stacks, KV cache). On CPU
"devices" (`jax_num_cpu_devices`) share the same cores, so the time shows the partitioning's
overhead, not a speedup; on several GPUs the same script measures the real scaling.
Results: benchmarks/results/tensor-parallel-<backend>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="CPU devices to create (CPU only)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--deltas", type=int, default=8)
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)  # the CPU platform only
    import jax.numpy as jnp
    import numpy as np

    import dzjax
    from dzjax.models.config import ModelConfig, RopeConfig
    from dzjax.models.llama import CausalLM
    from dzjax.models.saving import save_hf
    from dzjax.models.sharding import make_mesh
    from dzjax.serving import steps

    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.heads, head_dim=args.hidden // args.heads, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=4096)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="dzjax-tp-"))
    ids = jnp.zeros((1, 4), jnp.int32)
    params = CausalLM(config).init(jax.random.key(0), ids, ids)["params"]
    base_dir = save_hf(tmp / "base", config, params, dtype=jnp.bfloat16)
    noise = jax.tree.map(lambda a: a + 0.01 * np.random.default_rng(1).standard_normal(a.shape)
                         .astype(np.float32), params)
    ft_dir = save_hf(tmp / "ft", config, noise, dtype=jnp.bfloat16)
    delta_path = tmp / "ft.dz.safetensors"
    dzjax.convert(base_dir, ft_dir, delta_path, method="rtn", progress=False,
                  calibration=np.random.default_rng(0).integers(0, args.vocab, (2, 64)))
    base = dzjax.load_base(base_dir)
    names = {f"d{i}": delta_path for i in range(args.deltas)}

    rows = []
    n = 1
    while n <= len(jax.devices()):
        mesh = make_mesh(n)
        with dzjax.serve(base, names, max_batch=args.batch, max_seq_len=args.cache_len,
                         max_resident_deltas=args.deltas, dtype="bfloat16", mesh=mesh) as server:
            server.generate([[1, 2, 3]] * args.deltas, model=list(names), max_tokens=2)
            e = server.engine
            b = args.batch
            slots = np.arange(b, dtype=np.int32) % args.deltas
            sampling = (np.zeros(b, np.uint32), np.zeros(b, np.int32), np.zeros(b, np.float32),
                        np.ones(b, np.float32))
            pages, pt = e.pages, e.page_table
            tables = np.arange(b * pt.max_pages, dtype=np.int32).reshape(b, pt.max_pages)

            def step(pages):
                out, pages = steps.decode(
                    e.params, e.pool.stacks, pages, tables, np.ones(b, np.int32),
                    np.full(b, 10, np.int32), slots, sampling, config=base.config,
                    dtype=e.dtype, kernels=e.kernels, num_pages=1)
                out.block_until_ready()
                return pages

            pages = step(pages)  # compile (the engine's idle pages are reused: donated)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                pages = step(pages)
                times.append(time.perf_counter() - t0)
            e.pages = pages
            device0 = jax.devices()[0]

            def on_device0(tree):
                return sum(s.data.nbytes for a in jax.tree.leaves(tree)
                           for s in a.addressable_shards if s.device == device0)

            rows.append({"devices": n, "decode_step_ms": 1e3 * statistics.median(times),
                         "bytes_per_device": {"params": on_device0(e.params),
                                              "delta_stacks": on_device0(e.pool.stacks),
                                              "kv_cache": on_device0(e.pages)}})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        n *= 2

    today = datetime.date.today().isoformat()
    report = {"what": "serving decode step vs tensor-parallel mesh size", "date": today,
              "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
              "command": "PYTHONPATH=. python benchmarks/tensor_parallel.py " + " ".join(sys.argv[1:]),
              "config": vars(args) | {"out": None}, "results": rows}
    out = args.out or pathlib.Path(
        f"benchmarks/results/tensor-parallel-{jax.default_backend()}-{today}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
