"""Log-probabilities from the serving engine (computed inside its jitted prefill and decode
steps): the prompt's (`Server.score`, echo) and each generated token's, for base and delta rows
in one batch, against log_softmax of `dzjax.logits` on the whole sequence (float64 NumPy)."""

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
    paths = make_deltas(fixture_dir("llama"), tmp, 1)
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    server = dzjax.serve(base, {"ft0": paths["ft0"]}, **OPTIONS)
    yield base, dzjax.load_delta(paths["ft0"]), server
    server.close()


def log_softmax_rows(base, ids, delta) -> np.ndarray:
    logits = np.asarray(dzjax.logits(base, np.asarray(ids)[None], delta), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    return logits - (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)


def test_prompt_logprobs_of_base_and_delta_rows(setup):
    base, delta, server = setup
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
    base, delta, server = setup
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


def test_logprobs_fields_are_checked(setup):
    _, _, server = setup
    with pytest.raises(dzjax.DzjaxError, match=r"logprobs must be an integer in \[0, 20\]"):
        server.submit([5, 6], logprobs=21)
    with pytest.raises(dzjax.DzjaxError, match="prompt_logprobs"):
        server.submit([5, 6], prompt_logprobs=-1)
