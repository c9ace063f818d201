"""The decode-step microbenchmarks: the jitted serving decode step with many active deltas
against base only (`decode_step_times`), and against the KV cache's capacity and the rows'
lengths (`cache_table`: with paged KV memory, the cost follows the tokens in the cache)."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.models import fusion
from dzjax.models.generate import bucket
from dzjax.models.kernel_options import KernelOptions
from dzjax.models.kv_cache import KVPages
from dzjax.serving import steps
from dzjax.serving.pool import DeltaPool


def decode_step_times(base, deltas: dict, *, batch: int, cache_len: int, dtype: str,
                      implementation: str | None, repeats: int,
                      fused_projections: bool = True) -> dict:
    """Median ms of the jitted decode step over `batch` rows: base only (no delta stacks),
    stacks resident but unused, 1 delta, and min(8, deltas, batch) deltas (rows round-robin).
    The cases take turns, so that other load on the machine skews them alike. With
    `fused_projections` (as the server runs), q/k/v and gate/up are one matmul each."""
    kernels = KernelOptions.resolve(implementation, fused_projections=fused_projections)
    prepare = (functools.partial(fusion.fuse, config=base.config) if fused_projections
               else None)
    params = base.params if prepare is None else prepare(base.params)
    pool = DeltaPool(base, len(deltas), host_cache_bytes=1 << 62, prepare=prepare)
    try:
        for slot, (name, source) in enumerate(deltas.items()):
            pool.add(pool.validate(name, source))
            pool.load(name, slot)
        active = min(8, len(deltas), batch)
        cases = {"base": (None, -1), "resident_unused": (pool.stacks, -1),
                 "1_delta": (pool.stacks, 0), f"{active}_deltas": (pool.stacks, active)}
        runners = {label: _decode_step(base, stacks, np.arange(batch) % spread if spread > 1
                                       else np.full(batch, spread), cache_len, jnp.dtype(dtype),
                                       kernels, params=params)
                   for label, (stacks, spread) in cases.items()}
        times = _take_turns(runners, repeats)
    finally:
        pool.close()
    ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
    return {"batch": batch, "cache_len": cache_len, "active_deltas": active, "repeats": repeats,
            "fused_projections": fused_projections, "ms": ms,
            "ratio_active_vs_base": ms[f"{active}_deltas"] / ms["base"],
            # far below the medians: other work on the machine slowed this microbenchmark
            "ms_min": {label: 1e3 * min(t) for label, t in times.items()}}


def _take_turns(runners: dict, repeats: int) -> dict:
    """{key: `repeats` seconds} of each runner, the runners taking turns (so that other load on
    the machine skews them alike), after two warm-up rounds: compile, then a first run."""
    times = {key: [] for key in runners}
    for i in range(repeats + 2):
        for key, step in runners.items():
            t = step()
            if i >= 2:
                times[key].append(t)
    return times


def _decode_step(base, stacks, slots, cache_len, dtype, kernels: KernelOptions, *,
                 length: int | None = None, page_size: int = 16, params=None):
    """A function that runs `steps.decode` once and returns the seconds: `len(slots)` rows, each
    holding `length` positions (default cache_len // 2) of a page pool sized for every row at
    `cache_len` (what a server of that max_seq_len allocates)."""
    b = len(slots)
    slots = np.asarray(slots, np.int32)
    length = cache_len // 2 if length is None else length
    max_pages = -(-cache_len // page_size)
    held = -(-length // page_size)
    pages = KVPages.zeros(base.config, b * max_pages, page_size, dtype)
    tables = np.full((b, max_pages), b * max_pages, np.int32)
    for row in range(b):
        tables[row, :held] = row * max_pages + np.arange(held)
    tokens, positions = np.ones(b, np.int32), np.full(b, length - 1, np.int32)
    sampling = (np.zeros(b, np.uint32), np.zeros(b, np.int32), np.zeros(b, np.float32),
                np.ones(b, np.float32))
    num_pages = bucket(held, 1, max_pages)
    params = base.params if params is None else params

    def step() -> float:
        nonlocal pages
        t = time.perf_counter()
        out, pages = steps.decode(params, stacks, pages, tables, tokens, positions, slots,
                                  sampling, config=base.config, dtype=dtype, kernels=kernels,
                                  num_pages=num_pages)
        jax.block_until_ready(out)
        return time.perf_counter() - t
    return step


def cache_table(base, *, batch: int, dtype: str, implementation: str | None, repeats: int,
                capacities=(256, 1024, 4096, 8192), capacity_length: int = 64,
                lengths=(64, 512, 2048), length_capacity: int = 4096) -> dict:
    """Median ms of the base-only decode step: against the cache's capacity (max_seq_len) with
    every row at `capacity_length` tokens, and against the rows' length at one capacity. With a
    paged cache the first should stay flat and the second grow with the length."""
    kernels = KernelOptions.resolve(implementation)
    length_capacity = min(length_capacity, base.config.max_position_embeddings)
    cases = {("capacity", c): (c, capacity_length) for c in capacities
             if c <= base.config.max_position_embeddings}
    cases.update({("length", n): (length_capacity, n) for n in lengths
                  if n <= min(length_capacity, base.config.max_position_embeddings)})
    slots = np.full(batch, -1, np.int32)
    runners = {key: _decode_step(base, None, slots, cap, jnp.dtype(dtype), kernels, length=n)
               for key, (cap, n) in cases.items()}
    times = _take_turns(runners, repeats)
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    return {"batch": batch, "repeats": repeats, "dtype": dtype,
            "ms_by_capacity": {str(c): ms[("capacity", c)] for (kind, c) in ms
                               if kind == "capacity"},
            "capacity_rows_at_length": capacity_length,
            "ms_by_length": {str(n): ms[("length", n)] for (kind, n) in ms if kind == "length"},
            "length_at_capacity": length_capacity}
