"""Prometheus metrics of a server, in prometheus-client's text format (`GET /metrics`).

Per model (a delta's name, or the base's), recorded by the engine as it runs:
  dzjax_requests_total{model, outcome}           requests that ended: stop, length, cancelled, error
  dzjax_prompt_tokens_total{model}               prompt tokens of admitted requests
  dzjax_generation_tokens_total{model}           tokens generated
  dzjax_time_to_first_token_seconds{model}       histogram: arrival to the first token
  dzjax_inter_token_latency_seconds{model}       histogram: between a request's tokens
  dzjax_request_latency_seconds{model}           histogram: arrival to the end
  dzjax_http_responses_total{route, status}      HTTP answers (refused requests included)
Read from the engine's stats when scraped (a snapshot taken between steps):
  dzjax_requests_waiting, dzjax_requests_running, dzjax_batch_rows, dzjax_batch_occupancy,
  dzjax_kv_pages, dzjax_kv_pages_in_use, dzjax_kv_bytes, dzjax_kv_bytes_in_use,
  dzjax_delta_pool_slots, dzjax_delta_pool_resident, dzjax_delta_pool_host_cache_bytes,
  dzjax_delta_pool_{hits,misses,device_loads,evictions,disk_reads,failed_reads}_total
    (a hit: a request admitted with its delta already on the device; a miss: it had to be
    loaded), dzjax_decode_steps_total, dzjax_preemptions_total, dzjax_prefix_cache_hits_total
    (KV pages shared instead of computed), dzjax_engine_up (0 once the engine has stopped).
Each server has its own registry: two servers in one process do not mix their counts. An
unloaded delta's series are dropped. A request with n choices counts as n requests here (each
choice is a sequence the engine prefills and decodes), where vLLM counts it once.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds; first tokens include queueing and prefill, so their range is wider.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The engine's per-model counters and histograms (thread-safe: prometheus-client's)."""

    def __init__(self, base_name: str = "base"):
        self.base_name = base_name
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dzjax_requests", "Requests that ended, by model and outcome",
                                ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("dzjax_prompt_tokens", "Prompt tokens of admitted requests",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("dzjax_generation_tokens", "Tokens generated",
                                         ["model"], registry=r)
        self.ttft = Histogram("dzjax_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("dzjax_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of a request", ["model"],
                             buckets=ITL_BUCKETS, registry=r)
        self.latency = Histogram("dzjax_request_latency_seconds",
                                 "Seconds from a request's arrival to its end", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.http = Counter("dzjax_http_responses", "HTTP responses, by route and status",
                            ["route", "status"], registry=r)
        self.gone: set[str] = set()  # unloaded deltas: what their last requests do is not kept

    def http_response(self, route: str, status: int) -> None:
        self.http.labels(route, str(status)).inc()

    def label(self, model: str | None) -> str:
        return self.base_name if model is None else model

    def admitted(self, model: str | None, prompt_tokens: int) -> None:
        if model not in self.gone:
            self.prompt_tokens.labels(self.label(model)).inc(prompt_tokens)

    def first_token(self, model: str | None, since_arrival: float) -> None:
        if model not in self.gone:
            self.ttft.labels(self.label(model)).observe(since_arrival)

    def token(self, model: str | None, gap: float | None) -> None:
        """One generated token, `gap` seconds after the request's previous one (None: first)."""
        if model in self.gone:
            return
        model = self.label(model)
        self.generation_tokens.labels(model).inc()
        if gap is not None:
            self.itl.labels(model).observe(gap)

    def finished(self, model: str | None, outcome: str, latency: float) -> None:
        if model in self.gone:  # (its queued requests fail after the unload)
            return
        model = self.label(model)
        self.requests.labels(model, outcome).inc()
        self.latency.labels(model).observe(latency)

    def served(self, model: str) -> None:
        """A delta (again) served under `model`: its series start over."""
        self.gone.discard(model)

    def forget(self, model: str) -> None:
        """Drop a model's series (a delta unloaded: its name may come back with other weights,
        and a server that loads many deltas over time must not keep a series for each); what
        its requests still queued do until `served(model)` is not recorded."""
        self.gone.add(model)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl,
                       self.latency):
            _remove(metric, model)
        for outcome in ("stop", "length", "cancelled", "error"):
            _remove(self.requests, model, outcome)

    def watch(self, stats: Callable[[], dict]) -> None:
        """Export the gauges of `stats()` (the engine's snapshot) at each scrape."""
        self.registry.register(_Snapshot(stats))

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # (never recorded)
        pass


class _Snapshot:
    """A collector of the engine's state at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def describe(self):
        return []  # (collected on demand only: registering it must not call the engine)

    def collect(self):
        try:
            s = self.stats()
        except Exception:  # the engine has stopped: the counters above still report
            s = None
        yield GaugeMetricFamily("dzjax_engine_up", "1 while the serving engine runs",
                                value=int(s is not None))
        if s is None:
            return
        kv, pool = s["kv"], s["pool"]
        gauges = {
            "requests_waiting": ("Requests queued, not yet admitted", s["waiting"]),
            "requests_running": ("Requests in the batch", s["running"]),
            "batch_rows": ("Batch rows (max_batch)", s["max_batch"]),
            "batch_occupancy": ("Share of the batch rows in use",
                                s["running"] / max(s["max_batch"], 1)),
            "kv_pages": ("KV pages in the pool", kv["pages"]),
            "kv_pages_in_use": ("KV pages held by requests", kv["pages_in_use"]),
            "kv_bytes": ("Bytes of the KV page pool", kv["bytes"]),
            "kv_bytes_in_use": ("Bytes of the KV pages held by requests",
                                kv["bytes"] * kv["pages_in_use"] // max(kv["pages"], 1)),
            "delta_pool_slots": ("Device slots of the delta pool", pool["capacity"]),
            "delta_pool_resident": ("Deltas on the device", len(pool["resident"])),
            "delta_pool_host_cache_bytes": ("Bytes of deltas cached on the host",
                                            pool["host_cache_bytes"]),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"dzjax_{name}", doc, value=value)
        counters = {
            "delta_pool_hits": ("Admissions whose delta was on the device", s["delta_hits"]),
            "delta_pool_misses": ("Admissions whose delta had to be loaded", s["delta_misses"]),
            "delta_pool_device_loads": ("Deltas written into a device slot",
                                        pool["device_loads"]),
            "delta_pool_evictions": ("Deltas evicted from a device slot", pool["evictions"]),
            "delta_pool_disk_reads": ("Delta files read from disk", pool["disk_reads"]),
            "delta_pool_failed_reads": ("Delta reads that failed", pool["failed_reads"]),
            "decode_steps": ("Decode steps run", s["decode_steps"]),
            "preemptions": ("Requests preempted for KV pages", kv["preemptions"]),
            "prefix_cache_hits": ("KV pages shared from a common prefix", kv["prefix_hits"]),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"dzjax_{name}", doc, value=value)
