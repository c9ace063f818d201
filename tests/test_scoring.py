"""`dzjax.score`: per-token log-probabilities of a batch whose rows use different deltas, in one
jitted pass, against log_softmax of `dzjax.logits` row by row (independent of the scoring head:
logits materialised whole, log-softmax in float64 NumPy)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dzjax
from conftest import fixture_dir, make_deltas


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    paths = make_deltas(fixture_dir("llama"), tmp, 2)
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    return base, [dzjax.load_delta(p) for p in paths.values()]


def reference_logprobs(base, ids, delta) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, from the full logits of one row."""
    logits = np.asarray(dzjax.logits(base, np.asarray(ids)[None], delta), np.float64)[0]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return (logits - lse[:, None])[np.arange(len(ids) - 1), np.asarray(ids)[1:]]


def test_mixed_deltas_in_one_pass_match_each_row_alone(setup):
    base, deltas = setup
    rng = np.random.default_rng(0)
    rows = [0, 1, -1, 0, 1]
    lengths = [9, 5, 12, 3, 12]
    ids = [rng.integers(3, 200, n).tolist() for n in lengths]
    s = dzjax.score(base, ids, deltas=deltas, rows=rows, top_logprobs=3)
    assert s.token_logprobs.shape == (5, 12) and s.top_ids.shape == (5, 12, 3)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        want = reference_logprobs(base, ids[b], None if r < 0 else deltas[r])
        got = s.token_logprobs[b]
        assert np.isnan(got[0]) and np.isnan(got[n:]).all()
        np.testing.assert_allclose(got[1:n], want, rtol=0, atol=2e-4)
        # The likeliest token at each position bounds the actual one, and is in order.
        assert (s.top_logprobs[b, 1:n, 0] >= got[1:n] - 1e-5).all()
        assert (np.diff(s.top_logprobs[b, 1:n], axis=-1) <= 1e-6).all()
    # The deltas really change the scores (else the test above could not tell rows apart).
    assert np.abs(s.token_logprobs[0, 1:9] - reference_logprobs(base, ids[0], None)).max() > 1e-3


def test_one_delta_for_all_rows_and_continuation_sums(setup):
    base, deltas = setup
    ids = np.random.default_rng(1).integers(3, 200, (2, 8))
    s = dzjax.score(base, ids, deltas=deltas[1], top_logprobs=1)
    total, greedy = s.sum(start=[5, 2])
    for b, start in enumerate([5, 2]):
        want = reference_logprobs(base, ids[b], deltas[1])[start - 1:]
        np.testing.assert_allclose(total[b], want.sum(), rtol=1e-5)
    # A continuation made of the model's own argmax tokens is greedy; random tokens are not.
    logits = np.asarray(dzjax.logits(base, ids[:1, :4], deltas[1]))[0]
    greedy_ids = np.concatenate([ids[0, :4], [int(logits[-1].argmax())]])
    _, is_greedy = dzjax.score(base, greedy_ids, deltas=deltas[1], top_logprobs=1).sum(start=4)
    assert is_greedy.tolist() == [True]
    assert greedy.tolist() == [False, False]


def test_bad_arguments_name_the_problem(setup):
    base, deltas = setup
    ids = np.ones((2, 4), np.int32)
    with pytest.raises(dzjax.DzjaxError, match="rows must say"):
        dzjax.score(base, ids, deltas=deltas)
    with pytest.raises(dzjax.DzjaxError, match=r"rows must be 2 integers in \[-1, 2\)"):
        dzjax.score(base, ids, deltas=deltas, rows=[0, 2])
    with pytest.raises(dzjax.DzjaxError, match="top_logprobs"):
        dzjax.score(base, ids, top_logprobs=21)
    with pytest.raises(dzjax.DzjaxError, match="lengths"):
        dzjax.score(base, ids, lengths=[0, 4])
    with pytest.raises(dzjax.DzjaxError, match="start"):
        dzjax.score(base, ids).sum(start=0)
