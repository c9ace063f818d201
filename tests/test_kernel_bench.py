"""The kernel benchmark's measuring tools (benchmarks/kernels.py), on CPU: distinct weight copies
for the L2-proof timing loop, the profiler breakdown, and the static model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dzjax.pallas_kernels import DeltaMatmulConfig, Format, MultiDeltaConfig, delta_matmul

_SPEC = importlib.util.spec_from_file_location(
    "kernels_bench", Path(__file__).parent.parent / "benchmarks" / "kernels.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_variants_are_distinct_copies_of_the_same_work():
    fmt = Format(bits=4, group_size=64, nm=(2, 4))
    q = bench.random_delta(np.random.default_rng(0), 128, 32, fmt)
    copies = bench.variants(q, 3)
    assert len(copies) == 3 and copies[0] is q
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 128)), jnp.bfloat16)
    outs = []
    for c in copies:
        assert jax.tree.map(lambda a: (a.shape, a.dtype), c) == \
            jax.tree.map(lambda a: (a.shape, a.dtype), q)
        y = np.asarray(delta_matmul(x, c, implementation="xla"))
        assert np.isfinite(y).all()
        outs.append(y)
    # Distinct buffers with different codes (the kernels' work per copy is the same), and the
    # zero points kept below 2**bits, which the bf16 route needs.
    for c in copies:
        assert int(np.asarray(c.zeros).max()) < 2 ** fmt.bits
    for i in range(3):
        for j in range(i):
            assert not np.array_equal(np.asarray(copies[i].qweight), np.asarray(copies[j].qweight))
            assert not np.array_equal(outs[i], outs[j])


def test_rotations_cover_the_cache():
    assert bench.rotations(6 << 20, quick=False) * (6 << 20) >= bench.ROTATE_BYTES
    assert bench.rotations(1 << 30, quick=False) == 8  # at least 8 even for big weights
    assert bench.rotations(1, quick=False) == bench.MAX_ROTATIONS


def test_loop_time_and_breakdown_on_cpu():
    a = jnp.ones((256, 256), jnp.float32)
    f = lambda x, w: x @ w
    t = bench.loop_time(f, a, [(a,), (a + 1,)], repeats=2)
    assert 0 < t < 10
    ops = bench.kernel_breakdown(jax.jit(f), a, a, calls=2)
    assert ops and all(v >= 0 for v in ops.values())
    assert not any(name.startswith("$") for name in ops)  # no Python frames


def test_model_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "PTX_TABLE", tmp_path / "absent.json")  # bytes and SMs only
    report = bench.model(quick=True)
    assert report["ptx_table"] is None and report["results"] and report["prefill"]
    for r in report["results"]:
        assert 0 < r["fraction_of_bytes_bound"] <= 1.0 + 1e-9, r
        assert r["modeled_bytes"] >= r["ideal_bytes"] * (1 - 1e-9), r
    for r in report["prefill"]:
        assert 0 < r["fraction_of_dense"] < 1


def test_decode_step_ratio():
    """A layer's delta kernels at the bytes bound, weights an eighth of bf16 (2 bits), 8 deltas:
    the bytes alone are twice the base's, and the step adds x and the outputs."""
    m, bw = 16, bench.HBM_BYTES_PER_S
    rows = [dict(k=k, n=n, batch=m, format=name, deltas=8,
                 ideal_bytes=8 * (k * n // 4) + m * k * 2 + m * n * 4,
                 predicted_us=(8 * (k * n // 4) + m * k * 2 + m * n * 4) / bw * 1e6)
            for name in bench.FORMATS for k, n in set(bench.LAYER)]
    base = sum(k * n * 2 + m * k * 2 + m * n * 4 for k, n in bench.LAYER)
    deltas = sum(2 * k * n + m * k * 2 + m * n * 4 for k, n in bench.LAYER)
    for r in bench.decode_steps(rows, m=m, deltas=8):
        assert r["bytes_vs_base"] == pytest.approx(2.0)
        assert r["step_vs_base"] == pytest.approx(1 + deltas / base)
        # Attention reads m rows' KV cache (2 x 4096 bf16 a token) in both steps.
        for a in r["with_attention"]:
            kv = m * a["context"] * 2 * 4096 * 2
            assert a["step_vs_base"] == pytest.approx(1 + deltas / (base + kv))


@pytest.mark.parametrize("fmt", [Format(bits=4, group_size=128, nm=(2, 4)), None])
def test_ptx_configs_include_every_dispatched_tiling(fmt):
    """The PTX table covers each tiling the model will look up (so it never guesses)."""
    keys = {bench.tile_key(kind, c) for kind, _, _, _, c in bench.ptx_configs(fmt)}
    for k, n in bench.SHAPES:
        f = fmt or Format(bits=8, group_size=k)
        for m in bench.BATCHES:
            assert bench.tile_key("single", DeltaMatmulConfig.heuristic(m, k, n, f)) in keys
            for d in bench.DELTAS[1:]:
                assert bench.tile_key("multi", MultiDeltaConfig.heuristic(m, k, n, d, f)) in keys
