"""`dzjax bench`: the workload generator, the metrics, and the whole benchmark end to end on a tiny
synthetic model (three systems, the decode-step microbenchmark, the JSON and the plot)."""

import collections
import json
import shlex

import numpy as np
import pytest

from dzjax.cli import main, parser
from dzjax.errors import DzjaxError
from dzjax.bench import (Lengths, Outcome, SyntheticConfig, WorkloadConfig, build_synthetic,
                         default_weights_dtype, make_workload, popularity, prepare_real, summarize)
from dzjax.bench.systems import batch_sizes, generate_shapes

MODELS = tuple(f"m{i}" for i in range(8))


def workload(**overrides) -> WorkloadConfig:
    return WorkloadConfig(**{"models": MODELS, "vocab_size": 100, **overrides})


def test_poisson_arrivals_have_the_asked_rate():
    requests = make_workload(workload(num_requests=20_000, rate=5.0))
    gaps = np.diff([0.0] + [r.arrival for r in requests])
    assert gaps.min() >= 0
    assert len(requests) / requests[-1].arrival == pytest.approx(5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # exponential gaps


def test_infinite_rate_means_everything_arrives_at_once():
    assert {r.arrival for r in make_workload(workload(rate=float("inf")))} == {0.0}


def model_counts(config: WorkloadConfig) -> np.ndarray:
    counts = collections.Counter(r.model for r in make_workload(config))
    return np.array([counts[m] for m in config.models])


def test_zipf_popularity_is_skewed_in_rank_order_and_uniform_is_flat():
    n = 20_000
    zipf = workload(num_requests=n, popularity="zipf", zipf_alpha=1.5)
    counts = model_counts(zipf)
    assert (np.diff(counts) < 0).all(), counts
    np.testing.assert_allclose(counts / n, popularity(zipf), atol=0.01)
    assert counts[0] / counts[-1] == pytest.approx(8 ** 1.5, rel=0.15)
    np.testing.assert_allclose(model_counts(workload(num_requests=n)) / n, 1 / 8, atol=0.01)


def test_workloads_are_reproducible_from_their_seed():
    config = workload(num_requests=50, prompt_len=Lengths(4, 20), output_len=Lengths(1, 9))
    assert make_workload(config) == make_workload(config)
    other = make_workload(workload(num_requests=50, prompt_len=Lengths(4, 20),
                                   output_len=Lengths(1, 9), seed=1))
    assert other != make_workload(config)


def test_lengths_are_fixed_or_uniform_within_their_bounds():
    requests = make_workload(workload(num_requests=2000, prompt_len=Lengths.parse("4:20"),
                                      output_len=Lengths.parse("7")))
    prompt_lens = [len(r.prompt) for r in requests]
    assert min(prompt_lens) == 4 and max(prompt_lens) == 20
    assert {r.max_tokens for r in requests} == {7}
    assert all(0 <= t < 100 for r in requests for t in r.prompt)
    assert str(Lengths.parse("8:64")) == "8:64"
    for bad in ("0", "9:3", "x", "1:2:3"):
        with pytest.raises(DzjaxError):
            Lengths.parse(bad)


def test_bad_workloads_are_refused():
    for bad in ({"rate": 0}, {"popularity": "pareto"}, {"num_requests": 0}, {"models": ()}):
        with pytest.raises(DzjaxError):
            workload(**bad)


def test_padded_batch_sizes_and_generate_shapes():
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(6) == [1, 2, 4, 6]
    # prompts 10..16 -> bucket 16, 17..20 -> 32; with outputs 1..20, caches 16 to 64
    shapes = generate_shapes(Lengths(10, 20), Lengths(1, 20))
    assert set(shapes) == {(16, 16), (16, 32), (16, 64), (32, 32), (32, 64)}
    for (prompt_bucket, cache_bucket), (p, m) in shapes.items():  # an example of each
        assert 10 <= p <= 20 and 1 <= m <= 20
        assert prompt_bucket // 2 < p <= prompt_bucket and cache_bucket // 2 < p + m <= cache_bucket


def test_summary_of_known_outcomes():
    outcomes = [Outcome(i, "m0", arrival=float(i), first_token=i + 0.5, finished=i + 1.0 + i,
                        tokens=10) for i in range(4)]  # latencies 1, 2, 3, 4
    s = summarize(outcomes, 4, slo_s=2.5)
    assert s["duration_s"] == 7.0 and s["generated_tokens"] == 40
    assert s["throughput_tokens_per_s"] == pytest.approx(40 / 7)
    assert s["latency_s"]["p50"] == 2.5 and s["latency_s"]["max"] == 4.0
    assert s["ttft_s"]["p99"] == pytest.approx(0.5)
    assert s["slo_attainment"] == 0.5


TINY = ["--layers", "1", "--hidden", "64", "--intermediate", "64", "--vocab", "64",
        "--heads", "4", "--deltas", "2", "--group-size", "32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding the tiny synthetic models of TINY, built once for the tests below."""
    cache = tmp_path_factory.mktemp("bench-cache")
    build_synthetic(SyntheticConfig(layers=1, hidden=64, intermediate=64, vocab=64, heads=4,
                                    deltas=2, group_size=32,
                                    weights_dtype=default_weights_dtype()), cache / "bench")
    return cache
SMALL_WORKLOAD = ["--requests", "6", "--rate", "50", "--prompt-len", "5:8", "--output-len", "2:4",
                  "--max-batch", "2"]


def test_bench_end_to_end(cache, tmp_path):
    """The whole `dzjax bench --synthetic` path on a tiny model, every system and output
    (the models come from the cache, as a second run finds them)."""
    out = tmp_path / "serving.json"
    args = ["bench", "--synthetic", *TINY, *SMALL_WORKLOAD, "--decode-repeats", "2",
            "--slo", "30", "--cache-dir", str(cache), "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000

    w = report["config"]["workload"]
    expected = make_workload(WorkloadConfig(
        models=tuple(w["models"]), vocab_size=w["vocab_size"], num_requests=w["num_requests"],
        rate=float(w["rate"]), popularity=w["popularity"], zipf_alpha=w["zipf_alpha"],
        prompt_len=Lengths.parse(w["prompt_len"]), output_len=Lengths.parse(w["output_len"]),
        seed=w["seed"]))
    assert set(report["systems"]) == {"dzjax", "swap", "merged"}
    for name, s in report["systems"].items():
        assert s["requests"] == s["answered"] == len(s["per_request"]) == 6, name
        assert s["generated_tokens"] == sum(r.max_tokens for r in expected), name
        assert [row[5] for row in s["per_request"]] == [r.max_tokens for r in expected], name
        for metric in ("ttft_s", "latency_s"):
            q = s[metric]
            assert 0 <= q["p50"] <= q["p99"] <= q["max"], (name, metric)
        assert all(0 <= row[3] <= row[4] for row in s["per_request"]), name  # TTFT <= latency
        assert s["throughput_tokens_per_s"] == pytest.approx(
            s["generated_tokens"] / s["duration_s"])
        assert s["slo_attainment"] == 1.0  # the SLO is far above these latencies
        assert s["traces_during_run"] == 0, name  # everything was compiled before the clock
    dz = report["systems"]["dzjax"]  # the engine's counts of this run, warm-up left out
    assert 1 <= dz["prefill_calls"] <= 6
    assert max(r.max_tokens for r in expected) - 1 <= dz["decode_steps"] <= sum(
        r.max_tokens for r in expected)
    assert 1 <= dz["mean_batch_rows"] <= 2 and 0 <= dz["mean_active_deltas"] <= 2
    assert report["systems"]["swap"]["switches"] >= 1
    assert report["systems"]["merged"]["switch_s"] < report["systems"]["swap"]["switch_s"]
    decode = report["decode_step"]
    assert set(decode["ms"]) == {"base", "resident_unused", "1_delta", "2_deltas"}
    assert all(t > 0 for t in decode["ms"].values())
    assert set(report["ratios"]) == {"throughput_dzjax_vs_swap", "throughput_dzjax_vs_merged",
                                     "decode_step_active_deltas_vs_base",
                                     "swap_load_vs_base_decode_step"}
    assert all(r > 0 for r in report["ratios"].values())
    assert report["device"] and report["date"] and report["config"]["bench"]["max_batch"] == 2
    # The recorded command reruns the same benchmark.
    again = parser().parse_args(shlex.split(report["command"])[1:])
    assert again.requests == 6 and again.prompt_len == Lengths(5, 8) and again.synthetic


def test_bench_with_checkpoints_exports_the_merged_models_once(cache, tmp_path):
    """`dzjax bench BASE --delta NAME=PATH ...`, on the files the synthetic run built."""
    built = next((cache / "bench").glob("synthetic-*"))
    deltas = [f"{name}={built / f'delta{i}.dz.safetensors'}" for i, name in enumerate("ab")]
    args = ["bench", str(built / "base"), "--delta", deltas[0], "--delta", deltas[1],
            *SMALL_WORKLOAD, "--systems", "dzjax,swap", "--decode-repeats", "0", "--no-plot",
            "--cache-dir", str(cache), "--out", str(tmp_path / "r.json")]
    assert main(args) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["models"]["deltas"].keys() == {"a", "b"}
    assert set(report["config"]["workload"]["models"]) == {"a", "b"}
    assert [s["answered"] for s in report["systems"].values()] == [6, 6]
    assert "decode_step" not in report and not (tmp_path / "r.png").exists()
    merged = list((cache / "bench").glob("real-*/merged-*"))
    assert sorted(m.name for m in merged) == ["merged-a", "merged-b"]
    again = prepare_real(built / "base", dict(d.split("=") for d in deltas),
                         default_weights_dtype(), cache / "bench")
    assert again.build_s == 0 and sorted(again.merged.values()) == sorted(merged)


def test_bench_refuses_unclear_model_arguments(tmp_path, capsys):
    assert main(["bench", "--cache-dir", str(tmp_path)]) == 2
    assert "--synthetic" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "--systems", "dzjax,vllm",
                 "--cache-dir", str(tmp_path)]) == 2
    assert "systems" in capsys.readouterr().err
