"""The embedded demo: corpora, tokenizer, training, the cached checkpoint and `run`.

One short cold `run` (a hundred training steps) is shared by the tests of this module.
"""

import jax
import numpy as np
import pytest

import dzjax
from dzjax import demo
from dzjax.models.config import ModelConfig, RopeConfig

STEPS = 100  # enough to leave the uniform distribution well behind, in ten seconds or so
# The throughput comparison is left to a slow test (`dzjax bench` has its own fast tests).
SMALL = dict(steps=STEPS, finetune_steps=20, n_samples=8, bench_requests=0, max_tokens=12)


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    """A first `run` into an empty cache: it builds the model. Returns (cache, result, lines)."""
    cache = tmp_path_factory.mktemp("cache")
    lines = []
    result = demo.run(cache_dir=cache, out=lines.append, **SMALL)
    return cache, result, lines


@pytest.fixture(scope="module")
def base(cold_run):
    return dzjax.load_base(cold_run[1]["path"])


def test_corpora_are_distinct_and_nonempty():
    prose, code = demo.corpus("prose"), demo.corpus("code")
    assert len(prose) > 100 and len(code) > 100
    assert sum(map(len, prose)) > 100_000
    assert any("Return the" in doc for doc in prose)
    assert sum(doc.startswith("def ") for doc in code) > len(code) // 2
    assert not any(doc.startswith("def ") for doc in prose)
    with pytest.raises(ValueError, match="unknown corpus domain"):
        demo.corpus("poetry")


def test_tokenizer_training_is_deterministic():
    texts = demo.corpus("prose")[:200]
    first, second = demo.train_tokenizer(texts, 512), demo.train_tokenizer(texts, 512)
    assert len(first) == 512
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_built_dir_loads_with_its_tokenizer(cold_run, base):
    assert base.tokenizer is not None
    assert base.config.architecture == "LlamaForCausalLM"
    assert base.config.vocab_size == len(base.tokenizer)
    assert base.config.bos_token_id == base.tokenizer.bos_token_id
    assert base.config.eos_token_ids == (base.tokenizer.eos_token_id,)
    assert base.tokenizer.convert_ids_to_tokens(
        [base.tokenizer.bos_token_id, base.tokenizer.eos_token_id]) == ["<s>", "</s>"]
    assert cold_run[1]["params"] == sum(p.size for p in jax.tree.leaves(base.params))


@pytest.mark.parametrize("text", [
    "Return the number of bytes in the file.",
    "  def f(x):\n\treturn x ** 2  # twice\n\n",
    "Ünïcödé, emoji \U0001f642 and CJK \u6f22\u5b57 are bytes too.",
])
def test_loaded_tokenizer_round_trips(base, text):
    ids = base.tokenizer(text)["input_ids"]
    assert ids[0] == base.tokenizer.bos_token_id  # like Llama's, it prepends <s>
    assert base.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_merges_common_words(base):
    text = "\n\n".join(demo.corpus("prose")[:50])
    assert len(base.tokenizer(text)["input_ids"]) < len(text.encode()) / 2  # ~2.6 bytes a token


def test_training_lowers_the_loss(cold_run):
    result = cold_run[1]
    assert result["loss_start"] == pytest.approx(np.log(1024), abs=0.3)  # near uniform at init
    assert result["final_loss"] < result["loss_start"] - 1.5


def test_cold_run_builds_and_reports(cold_run):
    cache, result, lines = cold_run
    assert result["built"] and result["build_seconds"] > 0
    assert result["path"] == str(cache / demo.MODEL_NAME)
    assert result["prompts"] == list(demo.PROMPTS)
    assert len(result["texts"]) == len(demo.PROMPTS) and all(result["texts"])
    report = "\n".join(lines)
    assert "built in" in report and f"step {STEPS:4d}/{STEPS}" in report
    for prompt, text in zip(result["prompts"], result["texts"]):
        assert f"[{prompt}]{text}".replace("\n", "\\n") in report


def test_second_run_reuses_the_cached_model(cold_run):
    cache, first, _ = cold_run
    lines = []
    second = demo.run(cache_dir=cache, out=lines.append, **SMALL)
    assert not second["built"] and second["build_seconds"] == 0.0
    assert not any(f["built"] for f in second["finetunes"].values())
    assert "reused from the cache" in "\n".join(lines)
    assert second["texts"] == first["texts"]  # greedy, same weights
    assert second["final_loss"] == first["final_loss"]


def test_fine_tunes_are_compressed_and_served_in_one_batch(cold_run, base):
    _, result, lines = cold_run
    report = "\n".join(lines)
    assert set(result["finetunes"]) == set(demo.FINETUNES)
    for name, f in result["finetunes"].items():
        assert f["ratio_vs_bf16"] > 3 and f["built"]
        # The batched answer is what this delta gives alone.
        alone = dzjax.generate(base, [f["prompt"]], max_tokens=12, delta=dzjax.load_delta(f["path"]))
        assert f["text"] == alone[0]
        assert f"{name:8s} [{f['prompt']}]{f['text']}".replace("\n", "\\n") in report
    assert len({f["text"] for f in result["finetunes"].values()}) > 1
    assert result["throughput"] is None


@pytest.mark.slow
def test_demo_compares_with_the_swap_baseline(cold_run, tmp_path):
    cache, result, _ = cold_run
    t = demo.compare_with_swap(cache / demo.MODEL_NAME, result["finetunes"], 8, tmp_path)
    assert t["dzjax"]["tokens_per_s"] > 0 and t["swap"]["tokens_per_s"] > 0
    assert t["swap"]["switches"] >= len(demo.FINETUNES)


def test_incomplete_or_other_recipe_cache_is_not_reused(cold_run, tmp_path):
    model_dir = cold_run[0] / demo.MODEL_NAME
    assert demo.cached_summary(model_dir, STEPS) is not None
    assert demo.cached_summary(model_dir, STEPS + 1) is None  # built with other settings
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    assert demo.cached_summary(tmp_path, STEPS) is None  # no marker: a build that did not finish
    (tmp_path / demo.MARKER).write_text("{trunc")
    assert demo.cached_summary(tmp_path, STEPS) is None


def test_train_is_deterministic_and_can_continue_from_params():
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=64)
    tokens = np.random.default_rng(0).integers(0, 64, 500).astype(np.int32)
    cfg = demo.TrainConfig(steps=4, batch_size=2, seq_len=16)
    params, losses = demo.train(config, tokens, cfg)
    again, losses_again = demo.train(config, tokens, cfg)
    np.testing.assert_array_equal(losses, losses_again)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    _, continued = demo.train(config, tokens, cfg, params=params)  # e.g. a fine-tune of a base
    assert continued[0] < losses[0]
