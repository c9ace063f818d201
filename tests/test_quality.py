"""Quality on a real fine-tune: a trained tiny base and a full fine-tune of it on other text
(tests/fixtures/make_trained.py). The compressed delta must keep most of what fine-tuning gained."""

import json

import jax.numpy as jnp
import pytest
from conftest import FIXTURES

import dzjax
from dzjax.compress.calibration import embedded_corpus
from dzjax.compress.evaluate import perplexity, token_windows

TRAINED = FIXTURES / "trained"


@pytest.fixture(scope="module")
def setting():
    split = json.loads((TRAINED / "split.json").read_text())
    docs = embedded_corpus("code")
    base = dzjax.load_base(TRAINED / "base", dtype=jnp.float32)
    finetune = dzjax.load_base(TRAINED / "code_ft", dtype=jnp.float32)
    windows = token_windows(base.tokenizer, docs[split["train_docs"]:], 128)
    return base, finetune, windows, docs[:split["train_docs"]]


def test_compressed_delta_stays_close_to_the_finetune_and_beats_rtn(setting, tmp_path):
    base, finetune, windows, train_docs = setting
    ppl_base, ppl_ft = perplexity(base, windows), perplexity(finetune, windows)
    assert ppl_ft < 0.7 * ppl_base, "the fixture fine-tune should clearly beat its base"
    ppl = {}
    for method in ("obs", "rtn"):
        dzjax.convert(TRAINED / "base", TRAINED / "code_ft", tmp_path / f"{method}.dz", bits=4,
                      sparsity="2:4", group_size=128, method=method, calibration=train_docs,
                      n_samples=32, seq_len=128, progress=False)
        ppl[method] = perplexity(base, windows, dzjax.load_delta(tmp_path / f"{method}.dz"))
    gained = ppl_base - ppl_ft
    assert ppl["obs"] - ppl_ft < 0.2 * gained, (ppl_base, ppl_ft, ppl)  # keeps > 80% of the gain
    assert ppl["obs"] < ppl["rtn"], ppl
