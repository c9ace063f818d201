"""`dzjax bench`: serving throughput and latency of dzjax against the swap and merged baselines.

    dzjax bench --synthetic                          # random base + 8 random deltas (cached)
    dzjax bench BASE --delta code=code.dz.safetensors --delta chat=chat.dz.safetensors

One seeded workload (Poisson arrivals, uniform or Zipf popularity over the deltas, prompt and
output lengths) is served, in real time, by three systems on the same machine (`systems`): dzjax
(continuous batching, many deltas per step), swap (one merged model resident at a time, loaded
from disk) and merged (every merged model resident, when memory allows). A microbenchmark times
the jitted decode step with many active deltas against base only (`decode_step`).
Results: JSON (command, device, config, per-system metrics and per-request times) and a PNG plot.

  workload     the seeded requests             metrics      what is measured of a system
  models       synthetic or real checkpoints   systems      the three systems
  decode_step  the decode-step microbenchmark  run          one benchmark run -> the report
  report       JSON header, plot, table        cli          the command line
"""

from dzjax.bench.metrics import Outcome, summarize
from dzjax.bench.models import Models, SyntheticConfig, build_synthetic, prepare_real
from dzjax.bench.run import SYSTEMS, BenchConfig, benchmark, default_weights_dtype
from dzjax.bench.workload import BenchRequest, Lengths, WorkloadConfig, make_workload, popularity

__all__ = ["SYSTEMS", "BenchConfig", "BenchRequest", "Lengths", "Models", "Outcome",
           "SyntheticConfig", "WorkloadConfig", "benchmark", "build_synthetic",
           "default_weights_dtype", "make_workload", "popularity", "prepare_real", "summarize"]
