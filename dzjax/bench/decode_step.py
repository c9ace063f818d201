"""The decode-step microbenchmark: the jitted serving decode step with many active deltas
against base only."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.models.kernel_options import KernelOptions
from dzjax.models.llama import KVCache
from dzjax.serving import steps
from dzjax.serving.pool import DeltaPool


def decode_step_times(base, deltas: dict, *, batch: int, cache_len: int, dtype: str,
                      implementation: str | None, repeats: int) -> dict:
    """Median ms of the jitted decode step over `batch` rows: base only (no delta stacks),
    stacks resident but unused, 1 delta, and min(8, deltas, batch) deltas (rows round-robin).
    The cases take turns, so that other load on the machine skews them alike."""
    pool = DeltaPool(base, len(deltas), host_cache_bytes=1 << 62)
    try:
        for slot, (name, source) in enumerate(deltas.items()):
            pool.add(pool.validate(name, source))
            pool.load(name, slot)
        active = min(8, len(deltas), batch)
        cases = {"base": (None, -1), "resident_unused": (pool.stacks, -1),
                 "1_delta": (pool.stacks, 0), f"{active}_deltas": (pool.stacks, active)}
        runners = {label: _decode_step(base, stacks, np.arange(batch) % spread if spread > 1
                                       else np.full(batch, spread), cache_len, jnp.dtype(dtype),
                                       KernelOptions.resolve(implementation))
                   for label, (stacks, spread) in cases.items()}
        times = {label: [] for label in runners}
        for i in range(repeats + 2):  # two warm-up rounds: compile, then a first run
            for label, step in runners.items():
                t = step()
                if i >= 2:
                    times[label].append(t)
    finally:
        pool.close()
    ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
    return {"batch": batch, "cache_len": cache_len, "active_deltas": active, "repeats": repeats,
            "ms": ms, "ratio_active_vs_base": ms[f"{active}_deltas"] / ms["base"],
            # far below the medians: other work on the machine slowed this microbenchmark
            "ms_min": {label: 1e3 * min(t) for label, t in times.items()}}


def _decode_step(base, stacks, slots, cache_len, dtype, kernels: KernelOptions):
    """A function that runs `steps.decode` once on its own cache and returns the seconds."""
    b = len(slots)
    slots = np.asarray(slots, np.int32)
    tokens, positions = np.ones(b, np.int32), np.full(b, cache_len // 2, np.int32)
    sampling = (np.zeros(b, np.uint32), np.zeros(b, np.int32), np.zeros(b, np.float32),
                np.ones(b, np.float32))
    cache = KVCache.zeros(base.config, b, cache_len, dtype)

    def step() -> float:
        nonlocal cache
        t = time.perf_counter()
        out, cache = steps.decode(base.params, stacks, cache, tokens, positions, slots, sampling,
                                  config=base.config, dtype=dtype, kernels=kernels)
        jax.block_until_ready(out)
        return time.perf_counter() - t
    return step
