"""Kernel benchmark: compressed-delta matmuls on Llama-7B projection shapes.

  PYTHONPATH=. python benchmarks/kernels.py            # full sweep (meant for a GPU)
  PYTHONPATH=. python benchmarks/kernels.py --quick    # small CPU sweep of the XLA path
  PYTHONPATH=. python benchmarks/kernels.py --model    # the static model, no device needed

For each shape [K, N] x batch M x format x number of distinct deltas D it reports the time, the
bytes a perfect kernel must read (compressed weights of every active delta, x, the f32 output), the
achieved fraction of the memory bandwidth measured with a large copy, and the speedup over bf16
dense weights: one `jnp.dot` for D = 1 (single-delta kernel), D separate bf16 matmuls otherwise
(multi-delta kernel, rows spread round-robin over the D deltas). Results go to
benchmarks/results/kernels-<backend>-<date>.json with the device and date.

`--model` runs nothing: for the same sweep it predicts, from each kernel configuration the
dispatch would pick (`DeltaMatmulConfig` / `MultiDeltaConfig.heuristic`), the bytes the kernel
reads (every row tile reads its column strips' compressed weights again; split-K partial sums are
written and read back) and how many of an H100/H200's 132 SMs its busy programs fill, and from
those a time: the larger of the bytes at 3.35 TB/s over the SMs filled, and the float32-to-bf16
conversions of the dequantized weights (one per weight per row tile, 16 per clock per SM at
1.98 GHz; the integer-to-float ones are gone, see `dequant_tile`). Printed with the fraction of
the ideal bytes bound (compressed weights of the active deltas, x and the output, read once);
written to benchmarks/results/kernels-model.json. A model, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.pallas_kernels import (Format, delta_matmul, make_delta_batch, multi_delta_matmul,
                                  quantize_to_format)

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
BATCHES = [1, 4, 16, 64]
DELTAS = [1, 4, 8, 32]
FORMATS = {
    "4bit-2:4-g128": Format(bits=4, group_size=128, nm=(2, 4)),
    "2bit-dense-g128": Format(bits=2, group_size=128),
    "4bit-dense-g128": Format(bits=4, group_size=128),
    "8bit-dense-channel": None,  # per-channel: group_size = K, filled in per shape
}


def timeit(fn, *args, repeats: int) -> float:
    """Median wall time of fn(*args) in seconds (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a large device copy (read + write)."""
    a = jnp.ones(nbytes // 4, jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    return 2 * nbytes / timeit(copy, a, repeats=repeats)


def random_delta(rng, k: int, n: int, fmt: Format):
    codes = rng.integers(0, 2 ** fmt.bits, (k, n), dtype=np.int32)
    scales = rng.uniform(0.5, 1.5, (k // fmt.group_size, n)).astype(np.float32) * 1e-3
    zeros = rng.integers(0, 2 ** fmt.bits, (k // fmt.group_size, n), dtype=np.int32)
    keep = None
    if fmt.nm is not None:  # one of the 6 patterns of 2 kept in 4, per group
        pairs = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1],
                          [0, 0, 1, 1]], bool)
        keep = pairs[rng.integers(0, 6, (k // 4, n))].transpose(0, 2, 1).reshape(k, n)
    return jax.jit(quantize_to_format, static_argnums=4)(codes, scales, zeros, keep, fmt)


def run(quick: bool, implementation: str | None, repeats: int, budget_s: float | None = None,
        on_row=None) -> dict:
    """The sweep; stops (marking the report `truncated`) once `budget_s` seconds have passed."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    shapes = SHAPES[:1] if quick else SHAPES
    batches = [1, 16] if quick else BATCHES
    deltas = [1, 4] if quick else DELTAS
    formats = dict(list(FORMATS.items())[:2]) if quick else FORMATS
    bandwidth = measure_bandwidth((64 if quick else 1024) << 20, repeats)
    dev = jax.devices()[0]
    report = dict(device=f"{dev.platform}:{dev.device_kind}", backend=jax.default_backend(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  jax_version=jax.__version__, implementation=implementation or "auto",
                  quick=quick, measured_bandwidth_GBps=bandwidth / 1e9, truncated=False,
                  results=[])
    rows = report["results"]
    for k, n in shapes:
        w_base = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        for name, fmt in formats.items():
            fmt = fmt or Format(bits=8, group_size=k)
            q = random_delta(rng, k, n, fmt)
            for m in batches:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
                for d in deltas:
                    if budget_s is not None and time.perf_counter() - t_start > budget_s:
                        report["truncated"] = True
                        return report
                    active = min(d, m)
                    io_bytes = x.nbytes + m * n * 4
                    if d == 1:
                        f = jax.jit(lambda x, q: delta_matmul(x, q, implementation=implementation))
                        t = timeit(f, x, q, repeats=repeats)
                        dot = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
                        t_base = timeit(dot, x, w_base, repeats=repeats)
                        base_bytes = w_base.nbytes
                    else:
                        stack = jax.tree.map(lambda a: jnp.broadcast_to(a, (d, *a.shape)).copy(), q)
                        batch = make_delta_batch(jnp.arange(m) % d, d)
                        f = jax.jit(lambda x, s, b: multi_delta_matmul(
                            x, s, b, implementation=implementation))
                        t = timeit(f, x, stack, batch, repeats=repeats)
                        # Baseline: one bf16 matmul per active delta over its rows.
                        ws = jnp.broadcast_to(w_base, (active, k, n))
                        per = -(-m // active)
                        xs = jnp.pad(x, ((0, per * active - m), (0, 0))).reshape(active, per, k)
                        sep = jax.jit(lambda xs, ws: [jnp.dot(xs[i], ws[i],
                                                              preferred_element_type=jnp.float32)
                                                      for i in range(active)])
                        t_base = timeit(sep, xs, ws, repeats=repeats)
                        base_bytes = active * w_base.nbytes
                    nbytes = active * q.nbytes + io_bytes
                    rows.append(dict(
                        k=k, n=n, batch=m, format=name, deltas=d, active_deltas=active,
                        time_us=t * 1e6, bytes=nbytes, bandwidth_fraction=nbytes / t / bandwidth,
                        bf16_time_us=t_base * 1e6, bf16_bytes=base_bytes + io_bytes,
                        speedup_vs_bf16=t_base / t))
                    print(f"{k:>5}x{n:<5} M={m:<3} {name:<18} D={d:<2} {t * 1e6:10.1f} us "
                          f"{nbytes / 1e6:8.2f} MB  {nbytes / t / bandwidth:6.1%} of bw  "
                          f"x{t_base / t:5.2f} vs bf16", flush=True)
                    if on_row is not None:
                        on_row(report)
    return report


HBM_BYTES_PER_S = 3.35e12  # H100 SXM / H200 class
SMS = 132
CVT_PER_S = 16 * SMS * 1.98e9  # float32 -> bf16 conversions, 16 per clock per SM


def model(quick: bool = False) -> dict:
    """The static bytes/occupancy model of every configuration of the sweep (see the docstring)."""
    from dzjax.pallas_kernels import DeltaMatmulConfig, MultiDeltaConfig

    rows = []
    for k, n in SHAPES[:1] if quick else SHAPES:
        for name, fmt in FORMATS.items():
            fmt = fmt or Format(bits=8, group_size=k)
            weights = sum(int(np.prod(shape)) * dtype.itemsize
                          for shape, dtype in fmt.stored_arrays(k, n).values())
            for m in BATCHES:
                for d in DELTAS:
                    active = min(d, m)
                    if d == 1:
                        c = DeltaMatmulConfig.heuristic(m, k, n, fmt)
                        row_tiles, groups = -(-m // c.block_m), 1
                    else:
                        c = MultiDeltaConfig.heuristic(m, k, n, d, fmt)
                        per_group = -(-m // active)
                        row_tiles, groups = -(-per_group // c.block_m), active
                    m_pad = row_tiles * c.block_m * groups
                    strips = n // c.block_n
                    busy = groups * row_tiles * strips * c.split_k if d == 1 else \
                        groups * strips * c.split_k
                    ideal = active * weights + m * k * 2 + m * n * 4
                    read = (groups * row_tiles * weights + m * k * 2
                            + (2 * c.split_k + 1) * m_pad * n * 4 if c.split_k > 1
                            else groups * row_tiles * weights + m * k * 2 + m_pad * n * 4)
                    filled = min(1.0, busy / SMS)
                    t_mem = read / (HBM_BYTES_PER_S * filled)
                    t_cvt = groups * row_tiles * k * n / (CVT_PER_S * filled)
                    t = max(t_mem, t_cvt)
                    rows.append(dict(k=k, n=n, batch=m, format=name, deltas=d,
                                     active_deltas=active, config=str(c), busy_programs=busy,
                                     sms_filled=filled, ideal_bytes=ideal, modeled_bytes=read,
                                     predicted_us=t * 1e6, bound="memory" if t_mem >= t_cvt
                                     else "conversions",
                                     fraction_of_bytes_bound=ideal / HBM_BYTES_PER_S / t))
                    r = rows[-1]
                    print(f"{k:>5}x{n:<5} M={m:<3} {name:<18} D={d:<2} {t * 1e6:8.1f} us "
                          f"{busy:>5} programs  {r['fraction_of_bytes_bound']:6.1%} of bound "
                          f"({r['bound']})", flush=True)
    return {"what": "static model (no measurement)", "hbm_bytes_per_s": HBM_BYTES_PER_S,
            "sms": SMS, "cvt_per_s": CVT_PER_S, "results": rows}


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep (CPU, XLA path)")
    p.add_argument("--implementation", default=None, choices=["auto", "xla", "pallas", "interpret"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop the sweep after this many seconds (the JSON says truncated)")
    p.add_argument("--model", action="store_true",
                   help="print the static bytes/occupancy model instead of measuring")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.model:
        path = a.out / "kernels-model.json"
        path.write_text(json.dumps(model(a.quick), indent=1) + "\n")
        print(f"wrote {path}")
        return path
    stamp = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path = a.out / f"kernels-{jax.default_backend()}-{stamp}.json"

    def write(report):  # after every row, so that a killed run still leaves its results
        path.write_text(json.dumps(report, indent=1))

    write(run(a.quick, a.implementation, a.repeats or (3 if a.quick else 20), a.budget_s, write))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
