"""The engine's stats (`Server.stats()`, the gauges of `/metrics`): counts, occupancy, traces,
the delta pool's and the KV pages' state, as one dict taken on the engine thread between steps.
"""

from __future__ import annotations

import time

from dzjax.models.forward import TRACE_COUNTS


def take(engine) -> dict:
    """A snapshot of `engine` (a `dzjax.serving.engine.Engine`; on its thread)."""
    c = engine.counts
    elapsed = time.perf_counter() - engine.started
    return {
        "uptime_s": elapsed,
        "requests": c["requests"],
        "finished": {k.removeprefix("finished_"): v for k, v in c.items()
                     if k.startswith("finished_")},
        "running": sum(r is not None for r in engine.rows),
        "max_batch": engine.config.max_batch,
        "waiting": len(engine.waiting),
        "generated_tokens": c["tokens"],
        "decode_steps": c["steps"],
        # dispatched before the step before them was read (the host did not wait)
        "overlapped_steps": c["overlapped_steps"],
        "prefill_calls": c["prefill_calls"],
        "mean_batch_rows": c["decode_rows"] / max(c["steps"], 1),
        "mean_active_deltas": c["active_deltas"] / max(c["steps"], 1),
        "max_active_deltas": c["max_active_deltas"],
        # admissions of delta requests: with the delta on the device, or loaded for them
        "delta_hits": c["delta_hits"], "delta_misses": c["delta_misses"],
        # Compilations since this engine started (programs of the same shapes are shared).
        "traces": {k.removeprefix("serve_"): TRACE_COUNTS[k] - v
                   for k, v in engine._traces_at_start.items()},
        "pool": engine.pool.stats(),
        "kv": {"pages": engine.page_table.num_pages, "page_size": engine.page_table.page_size,
               "pages_in_use": engine.page_table.in_use,
               # pages taken from the prefix index instead of computed; held by no request
               "prefix_hits": engine.page_table.hits, "cached_pages": engine.page_table.cached,
               "bytes": engine.pages.nbytes, "preemptions": c["preemptions"],
               "max_running": c["max_running"]},
    }
