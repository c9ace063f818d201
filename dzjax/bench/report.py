"""The benchmark's outputs: the JSON header (device, date, load), the PNG plot, a short table."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import jax
import numpy as np

from dzjax.errors import DzjaxError


def device_header() -> dict:
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}:{dev.device_kind}", "backend": jax.default_backend(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "jax_version": jax.__version__, "load_average": os.getloadavg(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def plot(report: dict, out: Path) -> Path:
    """The PNG beside `out`: throughput, TTFT and latency percentiles, each request's latency
    against its arrival, and SLO attainment as a function of the SLO."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DzjaxError("the plot needs matplotlib: pip install 'dzjax[bench]' "
                         "(or pass --no-plot)") from None
    systems = {n: s for n, s in report["systems"].items() if "skipped" not in s}
    names = list(systems)
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0, 0].bar(names, [systems[n]["throughput_tokens_per_s"] for n in names],
                 color=[f"C{i}" for i in range(len(names))])
    ax[0, 0].set_ylabel("generated tokens / s")
    ax[0, 0].set_title("throughput")
    x = np.arange(len(names))
    for j, (metric, q) in enumerate([("ttft_s", "p50"), ("ttft_s", "p99"),
                                     ("latency_s", "p50"), ("latency_s", "p99")]):
        ax[0, 1].bar(x + (j - 1.5) * 0.2, [systems[n][metric][q] for n in names], 0.2,
                     label=f"{metric.removesuffix('_s')} {q}")
    ax[0, 1].set_xticks(x, names)
    ax[0, 1].set_ylabel("seconds")
    ax[0, 1].set_title("time to first token and latency")
    ax[0, 1].legend(fontsize=8)
    slo = report["config"]["bench"]["slo_s"]
    top = max(max(r[4] for r in s["per_request"]) for s in systems.values())
    thresholds = np.linspace(0, top * 1.05, 200)
    for i, n in enumerate(names):
        rows = np.array([r[2:5] for r in systems[n]["per_request"]], float)  # arrival, ttft, lat.
        ax[1, 0].plot(rows[:, 0], rows[:, 2], ".", color=f"C{i}", label=n)
        ax[1, 1].plot(thresholds, [np.sum(rows[:, 2] <= t) / systems[n]["requests"]
                                   for t in thresholds], color=f"C{i}", label=n)
    ax[1, 0].axhline(slo, color="gray", linestyle=":", label=f"SLO {slo:g} s")
    ax[1, 0].set_xlabel("arrival (s)")
    ax[1, 0].set_ylabel("latency (s)")
    ax[1, 0].set_title("latency of each request")
    ax[1, 1].axvline(slo, color="gray", linestyle=":", label=f"SLO {slo:g} s")
    ax[1, 1].set_xlabel("SLO: latency at most (s)")
    ax[1, 1].set_ylabel("fraction of requests")
    ax[1, 1].set_title("SLO attainment")
    for a in ax[1]:
        a.legend(fontsize=8)
    w = report["config"]["workload"]
    fig.suptitle(f"{report['device']}: {len(w['models'])} deltas, {w['popularity']}, "
                 f"{w['num_requests']} requests at {w['rate']}/s, prompt {w['prompt_len']}, "
                 f"output {w['output_len']}, batch {report['config']['bench']['max_batch']}")
    fig.tight_layout()
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def table(report: dict) -> str:
    """A few lines for the terminal."""
    lines = [(f"{'system':8s} {'tok/s':>8s} {'req/s':>6s} {'TTFT p50':>9s} {'p99':>7s} "
              f"{'latency p50':>11s} {'p99':>7s} {'SLO':>5s}")]
    for name, s in report["systems"].items():
        if "skipped" in s:
            lines.append(f"{name:8s} skipped: {s['skipped']}")
            continue
        lines.append(f"{name:8s} {s['throughput_tokens_per_s']:8.1f} "
                     f"{s['throughput_requests_per_s']:6.2f} {s['ttft_s']['p50']:8.2f}s "
                     f"{s['ttft_s']['p99']:6.2f}s {s['latency_s']['p50']:10.2f}s "
                     f"{s['latency_s']['p99']:6.2f}s {s['slo_attainment']:5.0%}")
    lines += [f"{k}: {v:.2f}x" for k, v in report["ratios"].items()]
    if "decode_step" in report:
        d = report["decode_step"]
        lines.append("decode step (ms, batch {}): ".format(d["batch"])
                     + ", ".join(f"{k} {v:.1f}" for k, v in d["ms"].items()))
    return "\n".join(lines)
