"""What the benchmark measures of one system: throughput, TTFT and latency percentiles, SLO
attainment, and every request's times."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One answered request; times in seconds after the start of the run."""

    index: int
    model: str
    arrival: float
    first_token: float
    finished: float
    tokens: int


def _percentiles(values: np.ndarray) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean()), "max": float(values.max())}


def summarize(outcomes: list[Outcome], num_requests: int, slo_s: float) -> dict:
    """Throughput, TTFT and latency percentiles, SLO attainment, and the per-request times."""
    arrival = np.array([o.arrival for o in outcomes])
    first = np.array([o.first_token for o in outcomes])
    finished = np.array([o.finished for o in outcomes])
    tokens = sum(o.tokens for o in outcomes)
    duration = float(finished.max() - arrival.min())
    latency = finished - arrival
    return {
        "requests": num_requests, "answered": len(outcomes), "generated_tokens": tokens,
        "duration_s": duration, "throughput_tokens_per_s": tokens / duration,
        "throughput_requests_per_s": len(outcomes) / duration,
        "ttft_s": _percentiles(first - arrival), "latency_s": _percentiles(latency),
        "slo_s": slo_s, "slo_attainment": float(np.mean(latency <= slo_s)),
        # [index, model, arrival, ttft, latency, tokens] per request, for plots and re-analysis
        "per_request": [[o.index, o.model, round(o.arrival, 4), round(o.first_token - o.arrival, 4),
                         round(o.finished - o.arrival, 4), o.tokens] for o in outcomes],
    }
