"""One benchmark run: serve one workload with each system; the report (metrics, not printed)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dzjax.bench.decode_step import cache_table, decode_step_times
from dzjax.bench.metrics import summarize
from dzjax.bench.models import Models
from dzjax.bench.systems import merged_fits, run_dzjax, run_static, swap_loader, warm_static
from dzjax.bench.workload import BenchRequest, WorkloadConfig, make_workload
from dzjax.errors import DzjaxError
from dzjax.models.loading import load_base
from dzjax.models.forward import default_dtype

SYSTEMS = ("dzjax", "swap", "merged")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    systems: tuple[str, ...] = SYSTEMS
    max_batch: int = 8  # batch slots of dzjax; largest static batch of the baselines
    dtype: str = dataclasses.field(default_factory=lambda: default_dtype())  # activations, KV
    weights_dtype: str = dataclasses.field(default_factory=lambda: default_weights_dtype())
    implementation: str | None = None  # delta kernels of dzjax
    slo_s: float = 10.0  # a request meets the SLO when its latency is at most this
    cold_swap: bool = True  # drop the merged checkpoint's pages from the page cache before a load
    merged_memory_fraction: float = 0.5  # merged models must fit in this much free memory
    decode_repeats: int = 20  # 0 = no decode-step microbenchmark

    def __post_init__(self):
        unknown = set(self.systems) - set(SYSTEMS)
        if unknown or not self.systems:
            raise DzjaxError(f"systems are some of {', '.join(SYSTEMS)}; got {self.systems}")
        if self.max_batch < 1 or self.slo_s <= 0:
            raise DzjaxError(f"need max_batch >= 1 and slo > 0, got {self.max_batch}, {self.slo_s}")


def default_weights_dtype() -> str:
    """float32 on a CPU (bfloat16 weights cost a conversion there at every step), else bfloat16."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def benchmark(models: Models, workload_config: WorkloadConfig, config: BenchConfig) -> dict:
    """Serve one workload with each system; returns the report (metrics, not printed)."""
    base = load_base(models.base_dir, dtype=jnp.dtype(config.weights_dtype))
    max_seq_len = workload_config.prompt_len.high + workload_config.output_len.high
    if max_seq_len > base.config.max_position_embeddings:
        raise DzjaxError(f"prompts and outputs of up to {max_seq_len} tokens exceed the model's "
                         f"context of {base.config.max_position_embeddings}")
    workload = make_workload(workload_config)
    systems, prefill_s = {}, None
    for system in config.systems:
        if system != "dzjax" and prefill_s is None:  # the merged models share the base's programs
            prefill_s = warm_static(base, workload_config, max_batch=config.max_batch,
                                    dtype=jnp.dtype(config.dtype))
        systems[system] = _run_system(system, base, models, workload, config,
                                      max_seq_len=max_seq_len, prefill_s=prefill_s)
    span = workload[-1].arrival - workload[0].arrival
    report = {"offered": {  # throughputs compare capacities only when every system falls behind
        "arrival_span_s": span, "requests_per_s": len(workload) / span if span else None,
        "requested_tokens": sum(r.max_tokens for r in workload)},
        "systems": systems, "ratios": _ratios(systems)}
    if config.decode_repeats:
        decode = report["decode_step"] = decode_step_times(
            base, models.deltas, batch=config.max_batch, cache_len=max_seq_len,
            dtype=config.dtype, implementation=config.implementation,
            repeats=config.decode_repeats)
        report["ratios"]["decode_step_active_deltas_vs_base"] = decode["ratio_active_vs_base"]
        report["decode_step_by_cache"] = cache_table(
            base, batch=config.max_batch, dtype=config.dtype,
            implementation=config.implementation, repeats=max(3, config.decode_repeats // 4))
        swap = systems.get("swap", {})
        if swap.get("switches"):  # what a swap costs, in decode steps of the base
            report["ratios"]["swap_load_vs_base_decode_step"] = (
                swap["switch_s"] / swap["switches"] / (decode["ms"]["base"] / 1e3))
    return report


def _run_system(system: str, base, models: Models, workload: list[BenchRequest],
                config: BenchConfig, *, max_seq_len: int, prefill_s: dict | None) -> dict:
    """One system's metrics on the workload (or why it was skipped)."""
    weights_dtype = jnp.dtype(config.weights_dtype)
    if system == "dzjax":
        outcomes, extra = run_dzjax(base, models.deltas, workload, max_batch=config.max_batch,
                                    max_seq_len=max_seq_len, dtype=config.dtype,
                                    implementation=config.implementation)
    else:
        if system == "swap":
            loader = swap_loader(models.merged, weights_dtype, config.cold_swap)
            extra = {"cold": config.cold_swap}
        else:
            fits, why = merged_fits(base, len(models.merged), config.merged_memory_fraction)
            if not fits:
                return {"skipped": why}
            resident = {n: load_base(d, dtype=weights_dtype) for n, d in models.merged.items()}
            loader, extra = resident.__getitem__, {"memory": why}
        outcomes, stats = run_static(loader, workload, max_batch=config.max_batch,
                                     dtype=jnp.dtype(config.dtype), prefill_s=prefill_s)
        extra.update(stats)
    return {**summarize(outcomes, len(workload), config.slo_s), **extra}


def _ratios(systems: dict) -> dict:
    tput = {n: s["throughput_tokens_per_s"] for n, s in systems.items() if "skipped" not in s}
    return {f"throughput_dzjax_vs_{other}": tput["dzjax"] / tput[other]
            for other in ("swap", "merged") if "dzjax" in tput and other in tput}
