"""Kernel benchmark: compressed-delta matmuls on Llama-7B projection shapes.

  PYTHONPATH=. python benchmarks/kernels.py            # full sweep (meant for a GPU)
  PYTHONPATH=. python benchmarks/kernels.py --quick    # small CPU sweep of the XLA path
  PYTHONPATH=. python benchmarks/kernels.py --model    # the static model, no device needed
  PYTHONPATH=. python benchmarks/kernels.py --ptx      # compile tilings for sm_90 (needs triton)

For each shape [K, N] x batch M (decode 1-64; prefill 512 and 2048, the prefill route) x format x
number of delta slots D (rows round-robin over them, and with 8 slots also all rows on one: "1 of
8 active") it reports the time, the bytes a perfect kernel must read (compressed weights of every
active delta, x, the f32 output), the achieved fraction of the memory bandwidth measured with a
large copy, and the speedup over bf16 dense weights: one `jnp.dot` for D = 1 (single-delta
kernel), one bf16 matmul per active delta otherwise. Each case is timed as one jitted program
that calls the kernel once per distinct copy of the weights (at least 8 copies and 128 MB, so no
call finds its weights in L2; `variants`), bf16 activations, median of repeats. For three cases
a profiler trace gives the time per device operation (`kernel_breakdown`: the kernel, the
split-K sum, the row sort). Results go to benchmarks/results/kernels-<backend>-<date>.json with
the device and date.

`--model` runs nothing: for the same sweep it predicts, from each kernel configuration the
dispatch would pick (`DeltaMatmulConfig` / `MultiDeltaConfig.heuristic`), the bytes the kernel
reads (every row tile reads its column strips' compressed weights again; split-K partial sums are
written and read back), how much of an H100/H200 its programs fill (their warps, one per
scheduler, 4 per SM of 132), and a time: the largest of the bytes at 3.35 TB/s over the share
filled, the float32-to-bf16 conversions where
weights are still built in float32 (8-bit; 16 per clock per SM at 1.98 GHz), and the instruction
issue from the `--ptx` table (128 thread instructions per clock per SM; the multi-delta
kernel's for the row tile that holds a group's ceil(M / min(D, M)) rows). Printed with the
fraction of the ideal bytes bound (compressed weights of the active deltas, x and the output,
read once), the prefill route at M = 2048 against the dense bf16 matmul (the "1 of 8
active" and M = 512 cases of the sweep are not modelled), and a Llama-7B layer's projections
in a decode step of M = 16 with 8 deltas active against the base's alone (`decode_steps`);
written to benchmarks/results/kernels-model.json. A model, not a measurement.

`--ptx` (needs the `triton` package, CPU only) compiles every tiling the dispatch picks in the
sweep, and the other decode tilings at 4096 x 4096, for sm_90 and counts, in the PTX of the K
loop, the instructions each thread issues per K step: divided by the weights a step dequantizes,
the instructions per weight; and the same in the machine code (SASS, from the wheel's
nvdisasm), which is what issues and what `--model` uses; for the multi-delta kernel on the phase
route, each row tile's K loop (`multi_delta.row_tile_sizes`: a program takes the smallest that
holds its group, and `--model` counts that one). Written to benchmarks/results/kernels-ptx.json.
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
                                  quantize_to_format, tiling)

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


ROTATE_BYTES = 128 << 20  # distinct weights cycled per timing: over twice an H100/H200's L2 (50/60 MB)
MAX_ROTATIONS = 32
PREFILL_BATCHES = [512, 2048]  # the prefill route (dispatch.PREFILL_ROWS rows on), full sweep only


def variants(tree, count: int) -> list:
    """`count` copies of a delta (or stack, or bf16 matrix) in distinct device buffers, so that
    no call finds its weights in L2 after the one before. Packed words and n:m positions are
    XOR-ed with a per-copy constant (any bits are codes; positions may repeat, which the kernels
    handle as one write), floats shifted; zero points are kept as they are (the bf16 route needs
    them below 2**bits). The kernels do the same work on every copy."""
    def one(i):
        def leaf(path, a):
            if jax.tree_util.keystr(path).endswith("zeros"):
                return a + 0  # a new buffer, the same values
            if jnp.issubdtype(a.dtype, jnp.integer):
                bits = 8 * a.dtype.itemsize
                salt = np.array((i * 0x9E3779B9) & ((1 << bits) - 1), np.uint64)
                return a ^ jnp.asarray(salt.astype(f"uint{bits}").view(a.dtype))
            return a + jnp.asarray(i * 1e-3, a.dtype)
        return jax.jit(lambda t: jax.tree_util.tree_map_with_path(leaf, t))(tree)
    return [tree] + [one(i) for i in range(1, count)]


def rotations(nbytes: int, quick: bool) -> int:
    """How many distinct copies one timing cycles through (at least 8, see ROTATE_BYTES)."""
    return 2 if quick else min(MAX_ROTATIONS, max(8, -(-ROTATE_BYTES // max(nbytes, 1))))


def loop_time(fn, x, operand_sets, repeats: int) -> float:
    """Seconds per call of fn(x, *operands), over one jitted program that calls it once per
    operand set in turn (distinct weights every call, host dispatch paid once per program)."""
    @jax.jit
    def many(x, sets):
        total = jnp.float32(0)
        for ops in sets:  # every output summed, so no call can be dropped or sliced away
            total = total + jnp.sum(fn(x, *ops))
        return total
    return timeit(many, x, operand_sets, repeats=repeats) / len(operand_sets)


def kernel_breakdown(fn, *args, calls: int = 5, top: int = 8) -> dict[str, float]:
    """Microseconds per call of the device operations of fn(*args), by name, from a profiler
    trace (perfetto JSON): the kernel itself, the partial-sum reduction, row sorting. On a GPU
    only the streams' lanes count (not the "XLA Modules" / "XLA Ops" summary lanes, which would
    count everything again); on a CPU the trace has no device lanes and the host's XLA
    operations are listed instead."""
    import glob
    import gzip
    import tempfile

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        path = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)[0]
        trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = {pid for pid, name in names.items() if name.startswith("/device:")}
    threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device}
    streams = {key for key, name in threads.items() if "stream" in name.lower()}
    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or (device and e.get("pid") not in device):
            continue
        if streams and (e.get("pid"), e.get("tid")) not in streams:
            continue
        if not device and (e["name"].startswith("$") or "::" in e["name"]
                           or e["name"].startswith(("Pjit", "SlinkyThreadPool"))):
            continue  # host-side Python frames and runtime bookkeeping
        totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0.0) / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top])


def run(quick: bool, implementation: str | None, repeats: int, budget_s: float | None = None,
        on_row=None) -> dict:
    """The sweep; stops (marking the report `truncated`) once `budget_s` seconds have passed."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    shapes = SHAPES[:1] if quick else SHAPES
    batches = [1, 16] if quick else BATCHES + PREFILL_BATCHES
    deltas = [1, 4] if quick else DELTAS
    formats = dict(list(FORMATS.items())[:2]) if quick else FORMATS
    bandwidth = measure_bandwidth((64 if quick else 1024) << 20, repeats)
    dev = jax.devices()[0]
    report = dict(device=f"{dev.platform}:{dev.device_kind}", backend=jax.default_backend(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  jax_version=jax.__version__, implementation=implementation or "auto",
                  quick=quick, measured_bandwidth_GBps=bandwidth / 1e9, truncated=False,
                  timing="one jitted program per case, cycling through distinct copies of the "
                         "weights (>= 8, >= 128 MB in all unless quick); median of repeats",
                  results=[], breakdown=[])
    rows = report["results"]
    single = lambda x, q: delta_matmul(x, q, implementation=implementation)
    multi = lambda x, s, b: multi_delta_matmul(x, s, b, implementation=implementation)
    dense = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
    cases = []  # (k, n, format, M, D, active): rows round-robin, or all on one slot
    for k, n in shapes:
        for name in formats:
            for m in batches:
                for d in deltas if m <= max(BATCHES) else [1, 4]:
                    cases.append((k, n, name, m, d, min(d, m)))
                if not quick and m > 1 and 8 in deltas and m <= max(BATCHES):
                    cases.append((k, n, name, m, 8, 1))
    # The targets' cases first (a budget may stop the sweep): the first shape at decode batches
    # 1 and 16 with 1 delta, 8 active and 1 of 8 active, and the largest prefill.
    first = lambda c: not (c[:2] == shapes[0] and (
        (c[3] in (1, 16) and c[4] in (1, 8)) or (c[3] == max(batches) and c[4] == 1)))
    cases.sort(key=first)  # stable: the rest keep their order
    weights, inputs = {}, {}
    for k, n, name, m, d, active in cases:
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            report["truncated"] = True
            return report
        fmt = formats[name] or Format(bits=8, group_size=k)
        if (k, n, name) not in weights:
            weights[k, n, name] = random_delta(rng, k, n, fmt)
        if (k, n) not in inputs:
            inputs[k, n] = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        q, w_base = weights[k, n, name], inputs[k, n]
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        io_bytes = x.nbytes + m * n * 4
        if d == 1:
            sets = [(v,) for v in variants(q, rotations(q.nbytes, quick))]
            t = loop_time(single, x, sets, repeats)
            base_sets = [(w,) for w in variants(w_base, rotations(w_base.nbytes, quick))]
            t_base = loop_time(dense, x, base_sets, repeats)
            base_bytes = w_base.nbytes
        else:
            stack = jax.tree.map(lambda a: jnp.broadcast_to(a, (d, *a.shape)).copy(), q)
            slots = jnp.arange(m) % d if active > 1 else jnp.zeros(m, jnp.int32)
            batch = make_delta_batch(slots, d)
            sets = [(s, batch) for s in variants(stack, rotations(active * q.nbytes, quick))]
            t = loop_time(multi, x, sets, repeats)
            # Baseline: one bf16 matmul per active delta over its rows.
            per = -(-m // active)
            xs = jnp.pad(x, ((0, per * active - m), (0, 0))).reshape(active, per, k)
            ws = jnp.broadcast_to(w_base, (active, k, n)).copy()
            sep = lambda xs, ws: jnp.einsum("apk,akn->apn", xs, ws,
                                            preferred_element_type=jnp.float32)
            base_sets = [(w,) for w in variants(ws, rotations(ws.nbytes, quick))]
            t_base = loop_time(sep, xs, base_sets, repeats)
            base_bytes = active * w_base.nbytes
        nbytes = active * q.nbytes + io_bytes
        rows.append(dict(
            k=k, n=n, batch=m, format=name, deltas=d, active_deltas=active, rotations=len(sets),
            time_us=t * 1e6, bytes=nbytes, bandwidth_fraction=nbytes / t / bandwidth,
            bf16_time_us=t_base * 1e6, bf16_bytes=base_bytes + io_bytes,
            speedup_vs_bf16=t_base / t))
        print(f"{k:>5}x{n:<5} M={m:<4} {name:<18} D={d:<2} active={active:<2} "
              f"{t * 1e6:10.1f} us {nbytes / 1e6:8.2f} MB  {nbytes / t / bandwidth:6.1%} of bw  "
              f"x{t_base / t:5.2f} vs bf16", flush=True)
        if (k, n) == shapes[0] and name == next(iter(formats)) and (
                (m, d, active) in ((1, 1, 1), (16, 8, 8), (max(batches), 1, 1))):
            report["breakdown"].append(dict(
                k=k, n=n, batch=m, format=name, deltas=d, active_deltas=active,
                us_per_call=kernel_breakdown(single if d == 1 else multi, x, *sets[0])))
        if on_row is not None:
            on_row(report)
    return report


HBM_BYTES_PER_S = 3.35e12  # H100 SXM / H200 class
SMS = tiling.SMS
CLOCK_HZ = 1.98e9
CVT_PER_S = 16 * SMS * CLOCK_HZ  # float32 -> bf16 conversions, 16 per clock per SM
ISSUE_PER_S = 128 * SMS * CLOCK_HZ  # thread instructions: 4 warp instructions per clock per SM
PTX_TABLE = pathlib.Path(__file__).parent / "results" / "kernels-ptx.json"
BF16_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core peak
DENSE_EFFICIENCY = 0.7  # of that peak, for a large cuBLAS matmul
PREFILL_BATCH = 2048


def tile_key(kind: str, c) -> tuple:
    """What the K loop's body depends on: the kernel and its tile (not K, N or the split)."""
    return kind, c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages, c.phases


def ptx_configs(fmt, quick: bool = False):
    """The tilings `--ptx` compiles for one format: every one the dispatch picks in the sweep
    (single delta, and multi-delta with 8 slots), then the other decode tilings at 4096 x 4096.
    Yields (kind, M, K, N, config), one per `tile_key`."""
    from dzjax.pallas_kernels import DeltaMatmulConfig, MultiDeltaConfig
    from dzjax.pallas_kernels.tiling import block_k_ok

    seen = set()

    def new(kind, c):
        fresh = tile_key(kind, c) not in seen
        seen.add(tile_key(kind, c))
        return fresh

    for k, n in SHAPES[:1] if quick else SHAPES:
        f = fmt or Format(bits=8, group_size=k)
        for m in BATCHES:
            for kind, c in (("single", DeltaMatmulConfig.heuristic(m, k, n, f)),
                            ("multi", MultiDeltaConfig.heuristic(m, k, n, 8, f))):
                if new(kind, c):
                    yield kind, m, k, n, c
    k = n = 4096
    f = fmt or Format(bits=8, group_size=k)
    for bn in (64, 128):
        for bk in (64, 128, 256):
            c = DeltaMatmulConfig(block_m=16, block_n=bn, block_k=bk, split_k=2)
            if block_k_ok(bk, k, f) and new("single", c):
                yield "single", 1, k, n, c


def row_tile_loops(loops, sizes) -> bool:
    """Whether the K loops (`compiled.sass_loops`, by MMA count) are one a row tile of `sizes`:
    as many, with MMAs in proportion to the rows (the 8-row loop a quarter of the 32-row's)."""
    mma = [sum(line.count("MMA") for line in loop) for loop in loops]
    return len(sizes) > 1 and len(mma) == len(sizes) and all(
        m * sizes[0] == mma[0] * t for m, t in zip(mma, sizes))


def ptx_table(quick: bool = False) -> dict:
    """Compile every `ptx_configs` tiling for sm_90 and count the K loop's instructions."""
    import functools

    from dzjax.pallas_kernels import delta_matmul_pallas, multi_delta_matmul_pallas
    from dzjax.pallas_kernels import compiled
    from dzjax.pallas_kernels.multi_delta import row_tile_sizes

    rows = []
    for name, base_fmt in list(FORMATS.items())[:1] if quick else FORMATS.items():
        for kind, m, k, n, c in ptx_configs(base_fmt, quick):
            fmt = base_fmt or Format(bits=8, group_size=k)
            q = compiled.abstract_delta(k, n, fmt)
            x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
            if kind == "single":
                fn = functools.partial(delta_matmul_pallas, config=c)
                ir = compiled.triton_ir(fn, x, q)
            else:
                stack = jax.tree.map(lambda a: jax.ShapeDtypeStruct((8, *a.shape), a.dtype), q)
                batch = make_delta_batch(jnp.arange(m) % 9 - 1, 8)
                fn = functools.partial(multi_delta_matmul_pallas, config=c)
                ir = compiled.triton_ir(fn, x, stack, batch)
            kernel = compiled.compile_sm90(ir[0], num_warps=c.num_warps, num_stages=c.num_stages)
            report = compiled.ptxas_report(kernel["ptx"])
            loop = compiled.loop_instructions(kernel["ptx"])
            per_step = sum(loop.values())
            per_weight = per_step * 32 * c.num_warps / (c.block_k * c.block_n)
            loops = compiled.sass_loops(kernel["cubin"])
            sass = sum(compiled.sass_loop_instructions(loops[-1] if loops else []).values())
            sass_per_weight = sass * 32 * c.num_warps / (c.block_k * c.block_n)
            # The multi-delta kernel's K loop of each row tile (one loop a tile, or none).
            sizes = row_tile_sizes(c.block_m, c.phases) if kind == "multi" else ()
            by_rows = {str(t): sum(compiled.sass_loop_instructions(loop).values())
                       * 32 * c.num_warps / (c.block_k * c.block_n)
                       for t, loop in zip(sizes, loops)} if row_tile_loops(loops, sizes) else {}
            key = {op: v for op, v in sorted(loop.items())
                   if op.startswith(("cvt", "mma", "wgmma", "st.shared", "ldmatrix", "selp"))}
            rows.append(dict(format=name, kernel=kind, batch=m, k=k, n=n, config=str(c),
                             tile=list(tile_key(kind, c)),
                             instructions_per_step=per_step, instructions_per_weight=per_weight,
                             sass_per_step=sass, sass_per_weight=sass_per_weight,
                             sass_per_weight_by_rows=by_rows,
                             registers=report["registers"], spill_bytes=report["spill_bytes"],
                             key_instructions=key))
            print(f"{name:<18} {kind:<6} M={m:<3} {c.block_m}x{c.block_n}x{c.block_k} "
                  f"w{c.num_warps} split{c.split_k}: {per_step:5} instr/step "
                  f"{per_weight:5.2f}/weight (SASS {sass_per_weight:5.2f}) "
                  f"{'phases ' if c.phases else ''}{report['registers']:3} regs "
                  f"{report['spill_bytes']} spill"
                  + "".join(f", {t} rows {v:.2f}" for t, v in by_rows.items()), flush=True)
    return {"what": "PTX of the K loop for sm_90 (triton, no GPU), per thread", "results": rows}


def model(quick: bool = False) -> dict:
    """The static bytes/occupancy/issue model of every configuration of the sweep, and of the
    prefill route (see the docstring)."""
    from dzjax.pallas_kernels import DeltaMatmulConfig, MultiDeltaConfig
    from dzjax.pallas_kernels import phases
    from dzjax.pallas_kernels.multi_delta import row_tile_index, row_tile_sizes
    from dzjax.pallas_kernels.single_delta import dequant_dtype

    table = json.loads(PTX_TABLE.read_text())["results"] if PTX_TABLE.exists() else []
    # What issues: the machine code's count where one was found (a K loop), else the PTX's.
    per_weight = {(r["format"], *r["tile"]): r.get("sass_per_weight") or r["instructions_per_weight"]
                  for r in table}
    by_rows = {(r["format"], *r["tile"]): r.get("sass_per_weight_by_rows") or {} for r in table}
    rows, prefill = [], []
    for k, n in SHAPES[:1] if quick else SHAPES:
        for name, fmt in FORMATS.items():
            fmt = fmt or Format(bits=8, group_size=k)
            weights = sum(int(np.prod(shape)) * dtype.itemsize
                          for shape, dtype in fmt.stored_arrays(k, n).values())
            for m in BATCHES:
                for d in DELTAS:
                    active = min(d, m)
                    if d == 1:
                        kind, c = "single", DeltaMatmulConfig.heuristic(m, k, n, fmt)
                        row_tiles, groups = -(-m // c.block_m), 1
                    else:
                        kind, c = "multi", MultiDeltaConfig.heuristic(m, k, n, d, fmt)
                        row_tiles = -(-(-(-m // active)) // c.block_m)
                        groups = active
                    busy = groups * row_tiles * (n // c.block_n) * c.split_k
                    ideal = active * weights + m * k * 2 + m * n * 4
                    # The phase route reads x permuted (and masked per scale group when groups
                    # are shorter than a step), written by one XLA pass before: in bf16 for
                    # 16-bit pairs, else as float32.
                    units = phases.layout(fmt, c.block_k)[3]
                    size = 2 if phases.pairs(fmt, jnp.bfloat16) else 4
                    x_bytes = m * k * 2 + (2 * m * k * size * units if c.phases else 0)
                    # Every row tile reads its strips' weights again; split-K partial sums are
                    # written and read back by the sum, the rows of x only (the multi-delta
                    # kernel's spare row tile is neither: before 2026-12-03 the sum read it).
                    partials = 0 if c.split_k == 1 else c.split_k * 2 * m * n * 4
                    # The 2:4 phase route reads the zero points twice (as bytes for the
                    # epilogue, as 32-bit words for the pruned entries: `phases_nm.zero_words`).
                    again = (int(np.prod(fmt.stored_arrays(k, n)["zeros"][0]))
                             if c.phases and fmt.nm is not None and not fmt.symmetric else 0)
                    # A ragged split (`tiling.split_steps`) runs steps past K, masked off.
                    total = k // c.block_k
                    run = c.split_k * tiling.split_steps(total, c.split_k) / total
                    read = (groups * row_tiles * (weights + again) * run + x_bytes + partials
                            + m * n * 4)
                    filled = tiling.filled(busy, c.num_warps)
                    t_mem = read / (HBM_BYTES_PER_S * filled)
                    dequantized = groups * row_tiles * k * n * run  # weights built, re-reads too
                    # float32 -> bf16 roundings remain only where weights are built in float32.
                    cvt = dequant_dtype(fmt, jnp.bfloat16) == jnp.float32 and not c.phases
                    t_cvt = dequantized / (CVT_PER_S * filled) if cvt else 0.0
                    ipw = per_weight.get((name, *tile_key(kind, c)))
                    if kind == "multi":  # the row tile that holds a group's rows
                        sizes = row_tile_sizes(c.block_m, c.phases)
                        rows_taken = sizes[int(row_tile_index(-(-m // active), sizes))]
                        ipw = by_rows.get((name, *tile_key(kind, c)), {}).get(str(rows_taken), ipw)
                    t_issue = 0.0 if ipw is None else dequantized * ipw / (ISSUE_PER_S * filled)
                    t = max(t_mem, t_cvt, t_issue)
                    bound = ("memory" if t == t_mem else "conversions" if t == t_cvt
                             else "instruction issue")
                    rows.append(dict(k=k, n=n, batch=m, format=name, deltas=d,
                                     active_deltas=active, config=str(c), busy_programs=busy,
                                     sms_filled=filled, ideal_bytes=ideal, modeled_bytes=read,
                                     predicted_us=t * 1e6, bound=bound,
                                     instructions_per_weight=ipw,
                                     fraction_of_bytes_bound=ideal / HBM_BYTES_PER_S / t))
                    r = rows[-1]
                    print(f"{k:>5}x{n:<5} M={m:<3} {name:<18} D={d:<2} {t * 1e6:8.1f} us "
                          f"{busy:>5} programs  {r['fraction_of_bytes_bound']:6.1%} of bound "
                          f"({r['bound']}{'' if ipw else ', no PTX count'})", flush=True)
            # The prefill route (`dispatch.PREFILL_ROWS` rows on): dequantize once (read the
            # compressed bytes, write bf16 weights), then the dense matmul reads them; against
            # the dense bf16 matmul alone, at DENSE_EFFICIENCY of the tensor-core peak.
            m = PREFILL_BATCH
            t_dense = max(2 * m * k * n / (BF16_FLOPS * DENSE_EFFICIENCY),
                          (k * n * 2 + m * k * 2 + m * n * 4) / HBM_BYTES_PER_S)
            t_dequant = (weights + k * n * 2) / HBM_BYTES_PER_S
            prefill.append(dict(k=k, n=n, batch=m, format=name, dense_bf16_us=t_dense * 1e6,
                                predicted_us=(t_dequant + t_dense) * 1e6,
                                fraction_of_dense=t_dense / (t_dequant + t_dense)))
            print(f"{k:>5}x{n:<5} M={m:<4} {name:<18} prefill route "
                  f"{(t_dequant + t_dense) * 1e6:8.1f} us, "
                  f"{prefill[-1]['fraction_of_dense']:6.1%} of the dense bf16 matmul", flush=True)
    return {"what": "static model (no measurement)", "hbm_bytes_per_s": HBM_BYTES_PER_S,
            "sms": SMS, "cvt_per_s": CVT_PER_S, "issue_per_s": ISSUE_PER_S,
            "bf16_flops": BF16_FLOPS, "dense_efficiency": DENSE_EFFICIENCY,
            "ptx_table": PTX_TABLE.name if table else None, "results": rows, "prefill": prefill,
            "decode_step": [] if quick else decode_steps(rows)}


# A Llama-7B layer's projections: q, k, v, o; gate, up; down.
LAYER = [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]
KV_BYTES_PER_TOKEN = 2 * 4096 * 2  # a Llama-7B layer's K and V of one token, bf16 (32 heads)
CONTEXTS = (1024, 4096)  # tokens of KV cache a row, for the step with attention


def decode_steps(rows, m: int = 16, deltas: int = 8) -> list[dict]:
    """A decode step's projections with `deltas` deltas active against the base alone, per
    format: the base's bf16 matmuls at the bytes bound plus the modeled delta kernels, and the
    bytes alone (base once, every active delta's compressed weights), the least the ratio can
    be. Attention is left out there (it is the same with and without deltas, so it only brings
    the ratio down); `with_attention` adds it, each row reading CONTEXTS tokens of KV cache at
    the bytes bound (paged attention over a Llama-7B layer's 32 heads)."""
    out = []
    for name in FORMATS:
        t_base = sum((k * n * 2 + m * k * 2 + m * n * 4) / HBM_BYTES_PER_S for k, n in LAYER)
        t_delta = sum(next(r["predicted_us"] for r in rows if (r["k"], r["n"], r["batch"],
                                                               r["format"], r["deltas"])
                           == (k, n, m, name, deltas)) * 1e-6 for k, n in LAYER)
        base_bytes = sum(k * n * 2 for k, n in LAYER)
        delta_bytes = sum(r["ideal_bytes"] - m * r["k"] * 2 - m * r["n"] * 4 for r in rows
                          if (r["batch"], r["format"], r["deltas"]) == (m, name, deltas)
                          for k, n in LAYER if (r["k"], r["n"]) == (k, n))
        t_attention = {c: m * c * KV_BYTES_PER_TOKEN / HBM_BYTES_PER_S for c in CONTEXTS}
        out.append(dict(format=name, batch=m, active_deltas=deltas,
                        step_vs_base=(t_base + t_delta) / t_base,
                        bytes_vs_base=(base_bytes + delta_bytes) / base_bytes,
                        with_attention=[dict(context=c, step_vs_base=(t_base + t + t_delta)
                                             / (t_base + t)) for c, t in t_attention.items()]))
        print(f"decode step, M={m}, {deltas} deltas, {name:<18}: "
              f"{out[-1]['step_vs_base']:.2f}x the base-only step "
              f"(bytes alone: {out[-1]['bytes_vs_base']:.2f}x; with attention over "
              + ", ".join(f"{a['context']} tokens {a['step_vs_base']:.2f}x"
                          for a in out[-1]["with_attention"]) + ")", flush=True)
    return out


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep (CPU, XLA path)")
    p.add_argument("--implementation", default=None, choices=["auto", "xla", "pallas", "interpret"])
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop the sweep after this many seconds (the JSON says truncated)")
    p.add_argument("--model", action="store_true",
                   help="print the static bytes/occupancy model instead of measuring")
    p.add_argument("--ptx", action="store_true",
                   help="compile the decode tilings for sm_90 and count instructions (triton)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.ptx:
        path = a.out / PTX_TABLE.name
        path.write_text(json.dumps(ptx_table(a.quick), indent=1) + "\n")
        print(f"wrote {path}")
        return path
    if a.model:
        path = a.out / "kernels-model.json"
        path.write_text(json.dumps(model(a.quick), indent=1) + "\n")
        print(f"wrote {path}")
        return path
    stamp = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path = a.out / f"kernels-{jax.default_backend()}-{stamp}.json"

    def write(report):  # after every row, so that a killed run still leaves its results
        path.write_text(json.dumps(report, indent=1))

    write(run(a.quick, a.implementation, a.repeats or (3 if a.quick else 10), a.budget_s, write))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
