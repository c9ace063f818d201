"""The embedded demo (`dzjax demo`): a tiny Llama trained on text shipped with dzjax, then loaded
and generated from with dzjax (the serving issue grows it into the convert-and-serve story).

Nothing is downloaded. The corpora in `dzjax/data/` are excerpts of the Python standard library
(see `dzjax/data/make_corpus.py`): "prose", the English paragraphs of docstrings, which the base is
trained on, and "code", small Python functions, kept for training a fine-tune of the same base. One
byte-level BPE tokenizer is trained on both, so that every fine-tune shares the base's vocabulary.

The trained model is a standard HF checkpoint (config.json, model.safetensors, tokenizer) in the
cache, `$DZJAX_CACHE` or `~/.cache/dzjax`, under `demo/tiny-llama-v1`; `run` builds it once and
then reuses it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dzjax.compress.calibration import DOMAINS
from dzjax.compress.calibration import embedded_corpus as corpus
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.llama import CausalLM

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MODEL_NAME = "demo/tiny-llama-v1"  # bump the version when the recipe changes
MARKER = "dzjax_demo.json"  # written last: a model dir without it is incomplete
PROMPTS = ("Return the", "This method", "If the file", "The optional")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Next-token training of the tiny model: AdamW with linear warmup, then cosine decay."""

    steps: int = 600
    batch_size: int = 8
    seq_len: int = 128
    peak_lr: float = 3e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer (every text encodes, no <unk>) that prepends <s> like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False)  # decode(encode(text)) == text


def tiny_config(tokenizer) -> ModelConfig:
    """A 4-layer Llama of about a million parameters: trains in about a minute on two CPU cores."""
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=len(tokenizer), hidden_size=128,
        intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0), max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_ids=(tokenizer.eos_token_id,))


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one int32 stream, each as <s> text </s> (so the model learns to stop)."""
    ids = tokenizer(docs, add_special_tokens=True)["input_ids"]
    return np.concatenate([np.asarray(d + [tokenizer.eos_token_id], np.int32) for d in ids])


def next_token_loss(params, batch, *, config: ModelConfig):
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]; batch is [B, T + 1]."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    logits, _ = CausalLM(config).apply({"params": params}, inputs, positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.peak_lr, warmup, max(cfg.steps, warmup + 1), end_value=cfg.peak_lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.95, weight_decay=cfg.weight_decay))


@functools.lru_cache(maxsize=4)  # calls with the same settings share one compiled step
def _optimizer_and_step(config: ModelConfig, cfg: TrainConfig):
    tx = optimizer(cfg)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(next_token_loss)(params, batch, config=config)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, step


def train(config: ModelConfig, tokens: np.ndarray, cfg: TrainConfig, params=None,
          log: Callable[[str], None] | None = None):
    """Train on random windows of the token stream; returns (params, per-step losses).

    Args:
      config: the model.
      tokens: int32 token stream [N] (see `token_stream`), longer than `cfg.seq_len`.
      cfg: steps, batch, schedule and seed.
      params: initial params (a fine-tune starts from the base's); default: fresh, from the seed.
      log: called with a progress line about ten times.
    """
    if len(tokens) < cfg.seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens is too few for windows of {cfg.seq_len + 1}")
    if params is None:
        ids = jnp.zeros((1, cfg.seq_len), jnp.int32)
        params = CausalLM(config).init(jax.random.key(cfg.seed), ids, ids)["params"]
    else:
        params = jax.tree.map(jnp.array, params)  # a copy: the step donates its buffers
    tx, step = _optimizer_and_step(config, cfg)
    rng = np.random.default_rng(cfg.seed)
    starts = rng.integers(0, len(tokens) - cfg.seq_len, size=(cfg.steps, cfg.batch_size))
    window = np.arange(cfg.seq_len + 1)
    opt_state, losses = tx.init(params), []
    every = max(1, cfg.steps // 10)
    for i in range(cfg.steps):
        params, opt_state, loss = step(params, opt_state, tokens[starts[i][:, None] + window])
        losses.append(loss)
        if log is not None and (i % every == 0 or i == cfg.steps - 1):
            log(f"  step {i + 1:4d}/{cfg.steps}  loss {float(loss):.3f}")
    return params, np.asarray(jax.device_get(losses), np.float32)


def build_tiny_model(out_dir: str | os.PathLike, *, steps: int = TrainConfig.steps, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> dict:
    """Train the tokenizer and the tiny Llama and save them as a HF checkpoint dir `out_dir`.

    Returns (and writes into `out_dir` as dzjax_demo.json, last, marking the dir complete) a
    summary: the recipe, the loss at the first step and the mean of the last steps' losses
    ("loss_start", "loss_end"), the training time and the parameter count.
    """
    from dzjax.models.saving import save_hf

    t0 = time.perf_counter()
    tokenizer = train_tokenizer([doc for domain in DOMAINS for doc in corpus(domain)])
    config = tiny_config(tokenizer)
    cfg = TrainConfig(steps=steps, seed=seed)
    docs = corpus("prose")
    tokens = token_stream(tokenizer, docs)
    if log is not None:
        log(f"  corpus: {len(docs)} docstrings, {sum(map(len, docs)) // 1000} kB -> {len(tokens)} "
            f"tokens of a {len(tokenizer)}-token byte-level BPE")
    params, losses = train(config, tokens, cfg, log=log)
    seconds = time.perf_counter() - t0
    # Float32 on disk: 4 MB, and later fine-tunes and deltas start from exactly these weights.
    save_hf(out_dir, config, params, dtype=np.float32, tokenizer=tokenizer, overwrite=True)
    summary = dict(
        recipe=dataclasses.asdict(cfg), corpus="prose", corpus_tokens=int(len(tokens)),
        vocab_size=config.vocab_size, params=int(sum(p.size for p in jax.tree.leaves(params))),
        loss_start=float(losses[0]), loss_end=float(losses[-min(10, len(losses)):].mean()),
        train_seconds=round(seconds, 2))
    _write_json_atomic(Path(out_dir) / MARKER, summary)
    return summary


def _write_json_atomic(path: Path, contents: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(contents, indent=2) + "\n")
    os.replace(tmp, path)


def cached_summary(model_dir: Path, steps: int) -> dict | None:
    """The summary of a complete model built with `steps` steps in `model_dir`, else None."""
    try:
        summary = json.loads((model_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    recipe = dataclasses.asdict(TrainConfig(steps=steps))
    return summary if summary.get("recipe") == recipe else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("DZJAX_CACHE") or Path.home() / ".cache" / "dzjax")


def run(cache_dir: str | os.PathLike | None = None, rebuild: bool = False, max_tokens: int = 40,
        out: Callable[[str], None] = print, *, steps: int = TrainConfig.steps) -> dict:
    """Build (or reuse) the demo model, load it with dzjax, and generate from a few prompts.

    Args:
      cache_dir: cache root (default `$DZJAX_CACHE` or ~/.cache/dzjax); the model lives in
        `<cache_dir>/demo/tiny-llama-v1`.
      rebuild: train again even when a complete model is cached.
      max_tokens: tokens generated per prompt (greedy).
      out: where the report's lines go.
      steps: training steps (a cached model built with other steps is rebuilt).
    Returns:
      dict with path, built (bool), build_seconds (0 when reused), load_seconds,
      generate_seconds, params, loss_start, final_loss, prompts and texts.
    """
    import dzjax

    model_dir = Path(cache_dir or default_cache_dir()) / MODEL_NAME
    summary = None if rebuild else cached_summary(model_dir, steps)
    built = summary is None
    out("dzjax demo: a tiny Llama trained on Python's docstrings, served by dzjax")
    t0 = time.perf_counter()
    if built:
        out(f"building {model_dir} ({steps} training steps on {jax.devices()[0].platform})")
        summary = build_tiny_model(model_dir, steps=steps, log=out)
    build_seconds = time.perf_counter() - t0 if built else 0.0

    t0 = time.perf_counter()
    base = dzjax.load_base(model_dir)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    texts = dzjax.generate(base, list(PROMPTS), max_tokens=max_tokens)
    generate_seconds = time.perf_counter() - t0

    c = base.config
    megabytes = sum(f.stat().st_size for f in model_dir.iterdir()) / 1e6
    out(f"model     {model_dir} ({megabytes:.1f} MB)")
    out(f"          Llama, {summary['params'] / 1e6:.2f}M params: {c.num_layers} layers, hidden "
        f"{c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} kv), vocab {c.vocab_size}")
    how = (f"built in {build_seconds:.1f} s" if built else
           f"reused from the cache (built in {summary['train_seconds']:.0f} s)")
    out(f"          {how}; trained {summary['recipe']['steps']} steps on "
        f"{summary['corpus_tokens']} tokens, loss {summary['loss_start']:.2f} -> "
        f"{summary['loss_end']:.2f}")
    out(f"          loaded in {load_seconds:.1f} s; {len(PROMPTS)} prompts x {max_tokens} tokens "
        f"generated (greedy) in {generate_seconds:.1f} s")
    for prompt, text in zip(PROMPTS, texts):  # the prompt in brackets, then its continuation
        out(f"  [{prompt}]{text}".replace("\n", "\\n"))
    return dict(path=str(model_dir), built=built, build_seconds=build_seconds,
                load_seconds=load_seconds, generate_seconds=generate_seconds,
                params=summary["params"], loss_start=summary["loss_start"],
                final_loss=summary["loss_end"], prompts=list(PROMPTS), texts=texts)
