"""convert(..., target_bits=B): bits and sparsity per matrix from measured sensitivity."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, make_finetune, reference

import dzjax
from dzjax.cli import main
from dzjax.compress import allocate
from dzjax.compress.delta_file import read_metadata
from dzjax.errors import DzjaxError
from dzjax.models import delta_stacks
from dzjax.models.loading import flatten_params
from dzjax.pallas_kernels.formats import QuantizedTensor

FAST = dict(n_samples=8, seq_len=32, progress=False, group_size=32)
TARGET = 3.5  # between every block matrix at 2 bits (~3.1 here) and at 3 bits (~3.9)


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    out = tmp_path_factory.mktemp("allocated") / "ft.dz.safetensors"
    delta = dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), out, target_bits=TARGET,
                          **FAST)
    return out, delta


def _formats(delta) -> dict[str, tuple]:
    """{HF name: (bits, sparsity)} of the delta's compressed block matrices."""
    out = {}
    for keys, leaf in flatten_params(delta.params).items():
        if isinstance(leaf, QuantizedTensor) and keys[1].startswith("layers_"):
            name = f"model.layers.{keys[1].split('_')[1]}.{keys[2]}.{keys[3]}.weight"
            out[name] = (leaf.format.bits, leaf.format.sparsity)
    return out


def test_target_bits_fits_the_budget_and_the_file_records_each_choice(allocated, tmp_path):
    path, converted = allocated
    report = converted.metadata["report"]
    # Within the budget, and close to it: the budget is spent, not left.
    assert TARGET - 0.25 < report["bits_per_weight"] <= TARGET
    allocation = read_metadata(path)["settings"]["allocation"]
    assert len(allocate.summary(allocation)) >= 2, allocation  # the matrices differ
    assert report["allocation"]["matrices"] == allocate.summary(allocation)
    loaded = dzjax.load_delta(path)
    stored = _formats(loaded)
    assert stored == {n: (e["bits"], e["sparsity"]) for n, e in allocation.items()}
    for unit in allocate.units(2):  # fused projections share one format
        assert len({stored[n] for n in unit}) == 1
    # A delta of mixed formats gives the logits of its merged fine-tune.
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    ids = reference("llama")["input_ids"]
    merged = dzjax.load_base(dzjax.export_hf(base, loaded, tmp_path / "merged"), dtype=jnp.float32)
    np.testing.assert_allclose(dzjax.logits(base, ids, delta=loaded), dzjax.logits(merged, ids),
                               atol=1e-4, rtol=0)


def test_an_allocation_reused_from_a_file_gives_the_same_layout(allocated, tmp_path):
    path, first = allocated

    other = make_finetune(fixture_dir("llama"), tmp_path / "other", seed=5)
    main(["convert", str(fixture_dir("llama")), str(other), "-o", str(tmp_path / "b.dz"),
          "--allocation", str(path), "--n-samples", "8", "--seq-len", "32", "--group-size", "32",
          "--quiet"])
    second = dzjax.load_delta(tmp_path / "b.dz")
    assert delta_stacks.layout(second.params) == delta_stacks.layout(first.params)
    assert _formats(second) == _formats(first)
    # The settings recorded are the same allocation, reusable in turn (here as JSON).
    allocation = read_metadata(tmp_path / "b.dz")["settings"]["allocation"]
    assert allocation == read_metadata(path)["settings"]["allocation"]
    (tmp_path / "a.json").write_text(json.dumps(allocation))
    assert allocate.read(tmp_path / "a.json") == allocation


def test_bad_targets_and_allocations_are_named(allocated, tmp_path):
    path, _ = allocated
    base, ft = fixture_dir("llama"), fixture_dir("llama_ft")
    out = tmp_path / "x.dz"
    with pytest.raises(DzjaxError, match="not both"):
        dzjax.convert(base, ft, out, target_bits=3, allocation=path, **FAST)
    with pytest.raises(DzjaxError, match="target_bits must be"):
        dzjax.convert(base, ft, out, target_bits=-1, **FAST)
    with pytest.raises(DzjaxError, match=r"target_bits=2.0 is below the smallest this delta can "
                       r"be: 3\.\d+ bits/weight"):
        dzjax.convert(base, ft, out, target_bits=2.0, **FAST)
    allocation = read_metadata(path)["settings"]["allocation"]
    q = "model.layers.0.self_attn.q_proj.weight"
    cases = [
        (dict(allocation, **{q: {"bits": 8, "sparsity": None}}), "served as one fused matrix"),
        ({k: v for k, v in allocation.items() if k != q}, "misses 1 matrices, e.g. " + q),
        (dict(allocation, **{"model.layers.9.mlp.down_proj.weight": allocation[q]}),
         "names no block matrix of this 2-layer model"),
        (dict(allocation, **{q: {"bits": 5, "sparsity": None}}), q + ": bits"),
        (dict(allocation, **{q: {"bits": 4, "sparsity": "3:2"}}), q),
        ([1, 2], "expected a mapping"),
    ]
    for bad, message in cases:
        with pytest.raises(DzjaxError, match=message):
            dzjax.convert(base, ft, out, allocation=bad, **FAST)
    with pytest.raises(DzjaxError, match="is not a file"):
        dzjax.convert(base, ft, out, allocation=tmp_path / "missing.dz", **FAST)
    plain = tmp_path / "plain.dz"
    dzjax.convert(base, ft, plain, method="rtn", **FAST)
    with pytest.raises(DzjaxError, match="records none"):
        allocate.read(plain)
    assert not out.exists()


def _brute_force(measured, budget):
    best = None
    for combo in itertools.product(*measured.values()):
        if sum(m.nbytes for m in combo) <= budget:
            error = sum(m.error for m in combo)
            best = error if best is None else min(best, error)
    return best


def test_the_greedy_choice_is_within_one_step_of_the_best():
    """On the hulls, greedy's error is at most the optimum's with one largest step less budget
    (the bound of greedy on a convex relaxation), on random instances checked exhaustively."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        measured = {}
        for u in range(4):
            nbytes = np.sort(rng.choice(np.arange(1, 60), size=4, replace=False))
            errors = np.sort(rng.uniform(0, 10, size=4))[::-1]  # rising cost, falling error
            measured[(f"u{u}",)] = [allocate.Measured((int(b), None), int(b), float(e))
                                    for b, e in zip(nbytes, errors)]
        least = sum(m[0].nbytes for m in measured.values())
        step = max(m[-1].nbytes - m[0].nbytes for m in measured.values())
        budget = int(rng.integers(least, least + 120))
        chosen = allocate.choose(measured, budget)
        assert sum(m.nbytes for m in chosen.values()) <= budget
        error = sum(m.error for m in chosen.values())
        assert error >= _brute_force(measured, budget) - 1e-9
        if budget - step >= least:
            assert error <= _brute_force(measured, budget - step) + 1e-9
    with pytest.raises(ValueError, match="needs at least"):
        allocate.choose(measured, least - 1)


def test_the_hull_drops_dominated_options():
    m = allocate.Measured
    points = [m("a", 10, 9.0), m("b", 20, 5.0), m("c", 30, 4.5), m("d", 40, 1.0),
              m("e", 25, 6.0), m("f", 20, 7.0)]
    # e costs more than b for more error; c lies above the segment b-d; f is b's size, worse.
    assert [p.option for p in allocate._hull(points)] == ["a", "b", "d"]


def test_an_option_a_shape_cannot_take_is_not_offered(monkeypatch, tmp_path):
    """A format refused for a matrix (here: 2:4, as if its K could not hold it) is dropped from
    that unit's options, not the end of target_bits; with no option left, the unit is named."""
    real = allocate._rounded

    def no_sparsity(w, obs, name):
        if obs.sparsity is not None:
            raise DzjaxError(f"{name}: 2:4 cannot hold this K")
        return real(w, obs, name)
    monkeypatch.setattr(allocate, "_rounded", no_sparsity)
    delta = dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "a.dz",
                          target_bits=TARGET, **FAST)
    assert {sparsity for _, sparsity in _formats(delta).values()} == {None}
    assert delta.metadata["report"]["bits_per_weight"] <= TARGET
    monkeypatch.setattr(allocate, "_rounded",
                        lambda w, obs, name: (_ for _ in ()).throw(DzjaxError(f"{name}: no")))
    with pytest.raises(DzjaxError, match=r"model\.layers\.0\.self_attn\..*no allocation option"):
        dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "b.dz",
                      target_bits=TARGET, **FAST)


def test_each_unit_is_measured_at_the_layer_output_and_more_bits_cost_less(monkeypatch,
                                                                           tmp_path):
    """The measure (each unit alone compressed, the change of its layer's output): positive for
    every option, falling with more bits, and 2:4 costing more than dense at the same bits."""
    seen, real = [], allocate.measure
    monkeypatch.setattr(allocate, "measure", lambda *a: seen.append(real(*a)) or seen[-1])
    dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "a.dz",
                  target_bits=TARGET, **FAST)
    (measured, _), = seen
    assert len(measured) == len(allocate.units(2))
    for unit, options in measured.items():
        error = {m.option: m.error for m in options}
        dense = [error[(b, None)] for b in (2, 3, 4, 8)]
        assert all(e > 0 for e in error.values()), unit
        assert dense == sorted(dense, reverse=True) and dense[0] > 4 * dense[-1], (unit, error)
        assert error[(4, "2:4")] > error[(4, None)], (unit, error)
