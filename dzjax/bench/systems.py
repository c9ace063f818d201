"""The systems under test, serving one workload in real time on the same machine.

  dzjax   `dzjax.serve` with every delta: continuous batching, many deltas per decode step.
  swap    one merged fine-tune resident at a time, as HF-style serving does it: first come, first
          served; the head request's model is loaded from its merged checkpoint on disk (the page
          cache dropped first, so it is a disk read; load time counts), then the arrived requests
          of that model run in static batches through `dzjax.generate`.
  merged  every merged fine-tune resident (when memory allows): the same static batches, no load.

Every request generates exactly its max_tokens (EOS ignored), so all systems do the same work.
Latencies are measured from each request's scheduled arrival. `dzjax.generate` does not stream:
the baselines' first-token time is the batch's start plus the measured warm prefill time of the
batch's shape. All compilation happens before the clock starts (`traces_during_run` checks it).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from dzjax.bench.metrics import Outcome
from dzjax.bench.workload import BenchRequest, Lengths, WorkloadConfig
from dzjax.models.forward import TRACE_COUNTS, forward_cached
from dzjax.models.generate import bucket, generate
from dzjax.models.kernel_options import KernelOptions
from dzjax.models.llama import KVCache
from dzjax.models.loading import load_base
from dzjax.serving.server import serve


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _traces() -> int:
    return sum(TRACE_COUNTS.values())


# ----------------------------------------------------------------------------------------------
# Shapes: every compiled program is built before the clock starts.


def batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes a batch of 1..max_batch rows can take."""
    return sorted({bucket(n, 1, max_batch) for n in range(1, max_batch + 1)})


def generate_shapes(prompt_len: Lengths, output_len: Lengths) -> dict[tuple[int, int], tuple]:
    """{(prompt bucket, cache bucket): (prompt length, max_tokens)} for every shape that
    `dzjax.generate` can be called with on a batch of this workload (its longest prompt and its
    largest max_tokens decide it), with one example each."""
    shapes = {}
    for p in range(prompt_len.low, prompt_len.high + 1):
        for m in range(output_len.low, output_len.high + 1):
            shapes.setdefault((bucket(p, 16), bucket(p + m, 16)), (p, m))
    return shapes


# ----------------------------------------------------------------------------------------------
# The systems.


def run_dzjax(base, deltas: dict, workload: list[BenchRequest], *, max_batch: int,
              max_seq_len: int, dtype: str, implementation: str | None) -> tuple[list, dict]:
    """Serve the workload with `dzjax.serve` (all deltas); returns (outcomes, extra stats)."""
    with serve(base, deltas, max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype,
               max_resident_deltas=len(deltas), implementation=implementation) as server:
        _warm_engine(server, workload, max_batch, max_seq_len)
        traces, before = _traces(), _engine_counts(server.stats())
        start = time.perf_counter()
        handles = []
        for r in workload:
            _sleep_until(start + r.arrival)
            handles.append(server.submit(list(r.prompt), r.model, max_tokens=r.max_tokens,
                                         ignore_eos=True))
        outcomes = []
        for r, h in zip(workload, handles):
            c = h.result()
            submitted = h.request.arrival - start  # the engine's timings count from the submit
            outcomes.append(Outcome(r.index, r.model, r.arrival,
                                    submitted + c.timings["first_token"],
                                    submitted + c.timings["total"], len(c.token_ids)))
        after = _engine_counts(server.stats())
    run = {k: after[k] - before[k] for k in after}  # the warm-up's steps left out
    return outcomes, {"decode_steps": run["steps"], "prefill_calls": run["prefills"],
                      "mean_batch_rows": run["rows"] / max(run["steps"], 1),
                      "mean_active_deltas": run["active"] / max(run["steps"], 1),
                      "traces_during_run": _traces() - traces}


def _engine_counts(stats: dict) -> dict:
    """The engine's running totals, from its stats (which give some of them as means)."""
    steps = stats["decode_steps"]
    return {"steps": steps, "prefills": stats["prefill_calls"],
            "rows": stats["mean_batch_rows"] * steps, "active": stats["mean_active_deltas"] * steps}


def _warm_engine(server, workload: list[BenchRequest], max_batch: int, max_seq_len: int) -> None:
    """Compile the engine's prefill for every (rows, prompt bucket) and its decode step.

    The requests of one size are submitted from the engine thread (`engine.call`), so they are
    admitted together and prefilled as one group of exactly that size.
    """
    models = sorted({r.model for r in workload})
    lengths = sorted({bucket(len(r.prompt), 16, max_seq_len): len(r.prompt)
                      for r in workload}.values())
    for length in lengths:
        for n in batch_sizes(max_batch):
            submit = lambda length=length, n=n: [
                server.submit([1] * length, models[i % len(models)], max_tokens=2,
                              ignore_eos=True) for i in range(n)]
            for handle in server.engine.call(submit):
                handle.result()
    server.engine.call(server.engine.compile_decode)  # every bucket of KV pages read


def run_static(models, workload: list[BenchRequest], *, max_batch: int, dtype,
               prefill_s: dict) -> tuple[list, dict]:
    """The baselines: one model at a time, first come first served, static batches.

    The head of the queue picks the model (switching to it if another is current); then up to
    max_batch arrived requests of that model run as one `dzjax.generate` call.

    Args:
      models: `models(name)` returns the `Base` of a merged fine-tune, loading it (the swap
        baseline) or looking it up (all merged models resident).
      prefill_s: {(rows, prompt bucket, cache bucket): seconds}, for the first-token times.
    Returns:
      (outcomes, stats: model switches, seconds spent switching, batches).
    """
    waiting: list[BenchRequest] = []
    upcoming = list(workload)
    current, model = None, None
    stats = {"switches": 0, "switch_s": 0.0, "batches": 0}
    outcomes = []
    traces = _traces()
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start

    def arrive() -> None:
        while upcoming and upcoming[0].arrival <= clock():
            waiting.append(upcoming.pop(0))

    while upcoming or waiting:
        arrive()
        if not waiting:
            _sleep_until(start + upcoming[0].arrival)
            continue
        name = waiting[0].model
        if name != current:
            t = clock()
            model = None  # one model resident: drop the old one before loading the next
            model, current = models(name), name
            stats["switches"] += 1
            stats["switch_s"] += clock() - t
            arrive()  # requests that came during the load join this model's batch
        batch = [r for r in waiting if r.model == name][:max_batch]
        for r in batch:
            waiting.remove(r)
        outcomes += _static_batch(model, batch, clock, max_batch=max_batch, dtype=dtype,
                                  prefill_s=prefill_s)
        stats["batches"] += 1
    stats["traces_during_run"] = _traces() - traces
    stats["mean_batch_rows"] = len(outcomes) / max(stats["batches"], 1)
    return sorted(outcomes, key=lambda o: o.index), stats


def _static_batch(model, batch: list[BenchRequest], clock, *, max_batch: int, dtype,
                  prefill_s: dict) -> list[Outcome]:
    """One `dzjax.generate` call for a batch of one model's requests, padded to a power of two
    rows (as the engine pads its prefills), run for the batch's largest max_tokens; every request
    finishes when the call returns."""
    rows = bucket(len(batch), 1, max_batch)
    prompts = [list(r.prompt) for r in batch]
    prompts += prompts[:1] * (rows - len(batch))  # padding rows: outputs dropped
    max_tokens = max(r.max_tokens for r in batch)
    longest = max(len(r.prompt) for r in batch)
    shape = (rows, bucket(longest, 16), bucket(longest + max_tokens, 16))
    start = clock()
    outputs = generate(model, prompts, max_tokens=max_tokens, dtype=dtype, stop_at_eos=False)
    done = clock()
    # the first token comes a warm prefill after the start, but never after the call returned
    # (a loaded machine can run this call faster than the warm-up measured)
    first = min(start + prefill_s[shape], done)
    return [Outcome(r.index, r.model, r.arrival, first, done,
                    len(out[:r.max_tokens])) for r, out in zip(batch, outputs)]


def warm_static(model, workload_config: WorkloadConfig, *, max_batch: int, dtype,
                repeats: int = 3) -> dict:
    """Compile `dzjax.generate` for every shape the baselines can meet, and measure the warm
    prefill time of each: {(rows, prompt bucket, cache bucket): seconds}."""
    prefill_s = {}
    for (prompt_bucket, cache_bucket), (p, m) in generate_shapes(
            workload_config.prompt_len, workload_config.output_len).items():
        for rows in batch_sizes(max_batch):
            generate(model, [[1] * p] * rows, max_tokens=m, dtype=dtype, stop_at_eos=False)
            ids = np.ones((rows, prompt_bucket), np.int32)
            positions = np.broadcast_to(np.arange(prompt_bucket, dtype=np.int32), ids.shape)
            times = []
            for _ in range(repeats):  # the prefill call `generate` makes, alone
                cache = KVCache.zeros(model.config, rows, cache_bucket, dtype)
                t = time.perf_counter()
                jax.block_until_ready(forward_cached(
                    model.params, ids, positions, cache, config=model.config, dtype=dtype,
                    kernels=KernelOptions.resolve()))
                times.append(time.perf_counter() - t)
            prefill_s[(rows, prompt_bucket, cache_bucket)] = statistics.median(times)
    return prefill_s


def drop_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the cached pages of a checkpoint's files, so the next read comes
    from the disk (as a swap of a model that has not been used for a while does)."""
    for f in Path(directory).iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def swap_loader(merged: dict[str, Path], weights_dtype, cold: bool):
    """models(name) for the swap baseline: the merged checkpoint loaded from disk each call."""
    def load(name: str):
        if cold:
            drop_page_cache(merged[name])
        model = load_base(merged[name], dtype=weights_dtype)
        jax.block_until_ready(model.params)
        return model
    return load


def merged_fits(base, count: int, fraction: float) -> tuple[bool, str]:
    """Whether `count` models of the base's size fit in `fraction` of the free device (or host)
    memory; returns the answer and the numbers behind it."""
    need = count * sum(leaf.nbytes for leaf in jax.tree.leaves(base.params))
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free, where = stats["bytes_limit"] - stats.get("bytes_in_use", 0), "device"
    else:
        free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host"
    ok = need <= fraction * free
    return ok, (f"{count} merged models need {need / 2**30:.2f} GiB; "
                f"{fraction:.0%} of the free {where} memory is {fraction * free / 2**30:.2f} GiB")
