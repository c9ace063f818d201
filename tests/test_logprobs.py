"""Log-probabilities, against log_softmax of `dzjax.logits` on the whole sequence (logits
materialised whole, log-softmax in float64 NumPy: independent of the scoring head):
`dzjax.score` (per-token log-probs of a batch whose rows use different deltas, in one jitted
pass), and the serving engine's (computed inside its jitted prefill and decode steps): the
prompt's (`Server.score`, echo) and each generated token's, for base and delta rows at once."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dzjax
from conftest import fixture_dir, make_deltas

OPTIONS = dict(max_batch=4, max_seq_len=64, max_resident_deltas=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logprobs")
    paths = make_deltas(fixture_dir("llama"), tmp, 2)
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    server = dzjax.serve(base, {"ft0": paths["ft0"]}, **OPTIONS)
    yield base, [dzjax.load_delta(p) for p in paths.values()], server
    server.close()


def log_softmax_rows(base, ids, delta) -> np.ndarray:
    logits = np.asarray(dzjax.logits(base, np.asarray(ids)[None], delta), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    return logits - (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)


def test_prompt_logprobs_of_base_and_delta_rows(setup):
    base, deltas, server = setup
    delta = deltas[0]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, n).tolist() for n in (7, 12, 3)]
    models = ["ft0", None, "ft0"]
    scored = server.score(prompts, models, top_logprobs=3)
    for p, m, got in zip(prompts, models, scored):
        want = log_softmax_rows(base, p, delta if m else None)
        assert len(got) == len(p) and got[0] is None
        for t in range(1, len(p)):
            assert got[t].logprob == pytest.approx(want[t - 1, p[t]], abs=2e-4)
            ids = [i for i, _ in got[t].top]
            assert ids == np.argsort(-want[t - 1])[:3].tolist()
            np.testing.assert_allclose([v for _, v in got[t].top], want[t - 1, ids], atol=2e-4)
    # The delta changes them (so the comparison above tells a delta row from a base row).
    base_row = log_softmax_rows(base, prompts[0], None)
    assert abs(scored[0][3].logprob - base_row[2, prompts[0][3]]) > 1e-3


def test_generated_token_logprobs_greedy_and_sampled(setup):
    base, deltas, server = setup
    delta = deltas[0]
    prompt = np.random.default_rng(1).integers(3, 200, 9).tolist()
    for temperature, model in ((0.0, "ft0"), (1.0, None)):
        out = server.generate([prompt], model, max_tokens=5, temperature=temperature,
                              ignore_eos=True, logprobs=2, details=True)[0]
        assert len(out.logprobs) == len(out.token_ids) == 5
        rows = log_softmax_rows(base, prompt + out.token_ids, delta if model else None)
        for j, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            want = rows[len(prompt) - 1 + j]
            # The model's own distribution (before temperature), whatever was sampled.
            assert lp.logprob == pytest.approx(want[token], abs=2e-4)
            assert [i for i, _ in lp.top] == np.argsort(-want)[:2].tolist()
            if temperature == 0:
                assert lp.top[0][0] == token


def test_the_token_that_ends_a_request_keeps_its_logprob(setup):
    """Ending on a stop token (or EOS): not in the output, but its log-prob is the last entry
    (lm-eval reads echo's log-probs up to the one generated token)."""
    base, deltas, server = setup
    prompt = np.random.default_rng(2).integers(3, 200, 6).tolist()
    first = dzjax.generate(base, [prompt], delta=deltas[0], max_tokens=1, stop_at_eos=False)[0][0]
    out = server.generate([prompt], "ft0", max_tokens=3, stop_token_ids=[first], logprobs=1,
                          details=True)[0]
    assert out.token_ids == [] and out.finish_reason == "stop" and len(out.logprobs) == 1
    want = log_softmax_rows(base, prompt, deltas[0])[-1, first]
    assert out.logprobs[0].logprob == pytest.approx(want, abs=2e-4)


def test_logprobs_fields_are_checked(setup):
    server = setup[2]
    with pytest.raises(dzjax.DzjaxError, match=r"logprobs must be an integer in \[0, 20\]"):
        server.submit([5, 6], logprobs=21)
    with pytest.raises(dzjax.DzjaxError, match="prompt_logprobs"):
        server.submit([5, 6], prompt_logprobs=-1)


# -- dzjax.score ---------------------------------------------------------------------------------


def reference_logprobs(base, ids, delta) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1, from the full logits of one row."""
    logits = np.asarray(dzjax.logits(base, np.asarray(ids)[None], delta), np.float64)[0]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return (logits - lse[:, None])[np.arange(len(ids) - 1), np.asarray(ids)[1:]]


def test_mixed_deltas_in_one_pass_match_each_row_alone(setup):
    base, deltas, _ = setup
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
    base, deltas, _ = setup
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
    base, deltas, _ = setup
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
