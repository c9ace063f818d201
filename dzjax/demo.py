"""The embedded demo (`dzjax demo`): the whole story on a tiny model, with nothing downloaded.

1. A tiny Llama (the base) is trained on text shipped with dzjax.
2. A few full-parameter fine-tunes of it are trained: on Python code, and on two rewritings of the
   prose (shouted in capitals; whispered in lower case), so that each model's answer shows which
   weights produced it.
3. Each fine-tune is compressed against the base into a delta file (`dzjax.convert`).
4. One `dzjax.serve` answers a mixed batch of all of them at once, and a small workload is timed
   against the swap baseline (one merged model resident at a time, loaded from disk).

 The corpora in `dzjax/data/` are excerpts of the Python standard library
(see `dzjax/data/make_corpus.py`): "prose", the English paragraphs of docstrings, which the base is
trained on, and "code", small Python functions, kept for training a fine-tune of the same base. One
byte-level BPE tokenizer is trained on both, so that every fine-tune shares the base's vocabulary.

The trained models are standard HF checkpoints (config.json, model.safetensors, tokenizer) in the
cache, `$DZJAX_CACHE` or `~/.cache/dzjax`, under `demo/tiny-llama-v2` (the base), `...-<name>`
(the fine-tunes) and `demo/deltas-v2/<name>.dz.safetensors`; `run` builds each once and then
reuses it.
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

from dzjax import bench, paths
from dzjax.compress.calibration import DOMAINS
from dzjax.compress.calibration import embedded_corpus as corpus
from dzjax.compress.delta_file import load_delta
from dzjax.compress.pipeline import convert
from dzjax.errors import DzjaxError
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.llama import CausalLM
from dzjax.models.loading import load_base
from dzjax.models.saving import save_hf
from dzjax.serving.server import serve

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MODEL_NAME = "demo/tiny-llama-v2"  # bump the version when the recipe changes
DELTA_DIR = "demo/deltas-v2"
MARKER = "dzjax_demo.json"  # written last: a model dir without it is incomplete
PROMPTS = ("Return the", "This method", "If the file", "The optional")
# A plain chat template, so that the demo model also answers /v1/chat/completions.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@dataclasses.dataclass(frozen=True)
class FineTune:
    """A fine-tune of the demo base: trained on one corpus, rewritten by `rewrite`."""

    corpus: str
    rewrite: str  # "none", "upper" or "lower"
    prompt: str  # what the demo asks it

    def documents(self) -> list[str]:
        docs = corpus(self.corpus)
        return {"none": docs, "upper": [d.upper() for d in docs],
                "lower": [d.lower() for d in docs]}[self.rewrite]


FINETUNES = {
    "code": FineTune("code", "none", "def read_"),
    "shout": FineTune("prose", "upper", "RETURN THE"),
    "whisper": FineTune("prose", "lower", "return the"),
}
FINETUNE_STEPS = 200


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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False)  # decode(encode(text)) == text
    fast.chat_template = CHAT_TEMPLATE
    return fast


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


def build_finetune(base_dir: Path, name: str, out_dir: Path, *, steps: int = FINETUNE_STEPS,
                   log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune every parameter of the demo base on FINETUNES[name]'s documents; save as a HF
    checkpoint `out_dir` (with the base's tokenizer) and return its summary (also the marker)."""
    t0 = time.perf_counter()
    base = load_base(base_dir, dtype=jnp.float32)
    cfg = TrainConfig(steps=steps, peak_lr=1e-3, seed=1)
    tokens = token_stream(base.tokenizer, FINETUNES[name].documents())
    params, losses = train(base.config, tokens, cfg, params=base.params, log=log)
    save_hf(out_dir, base.config, params, dtype=np.float32, tokenizer=base.tokenizer,
            overwrite=True)
    summary = dict(recipe=dataclasses.asdict(cfg), finetune=dataclasses.asdict(FINETUNES[name]),
                   loss_start=float(losses[0]), loss_end=float(losses[-min(10, len(losses)):].mean()),
                   train_seconds=round(time.perf_counter() - t0, 2))
    _write_json_atomic(out_dir / MARKER, summary)
    return summary


def _cached_finetune(out_dir: Path, name: str, steps: int) -> dict | None:
    try:
        summary = json.loads((out_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (summary.get("recipe", {}).get("steps") == steps
            and summary.get("finetune") == dataclasses.asdict(FINETUNES[name]))
    return summary if same else None


def _delta(base_dir: Path, ft_dir: Path, path: Path, name: str, n_samples: int):
    """The delta file of one fine-tune: converted once (4-bit, 2:4 sparse, groups of 128), and
    again when the fine-tune was rebuilt after it. Returns (delta, converted now)."""
    try:
        if path.stat().st_mtime >= (ft_dir / MARKER).stat().st_mtime:
            return load_delta(path), False
    except (DzjaxError, OSError):
        pass  # missing, stale or damaged: convert again
    delta = convert(base_dir, ft_dir, path, bits=4, sparsity="2:4", group_size=128,
                          name=name, n_samples=n_samples, seq_len=128, progress=False)
    return delta, True


def run(cache_dir: str | os.PathLike | None = None, rebuild: bool = False, max_tokens: int = 40,
        out: Callable[[str], None] = print, *, steps: int = TrainConfig.steps,
        finetune_steps: int = FINETUNE_STEPS, n_samples: int = 32,
        bench_requests: int = 24) -> dict:
    """Build (or reuse) the demo base, fine-tunes and deltas; serve them all in one batch.

    Args:
      cache_dir: cache root (default `$DZJAX_CACHE` or ~/.cache/dzjax).
      rebuild: train and convert again even when complete results are cached.
      max_tokens: tokens generated per prompt (greedy).
      out: where the report's lines go.
      steps, finetune_steps: training steps of the base and of each fine-tune.
      n_samples: calibration windows for compression.
      bench_requests: requests of the throughput comparison with the swap baseline (0: skip it).
    Returns:
      dict with path, built, build_seconds, load_seconds, generate_seconds, params, loss_start,
      final_loss, prompts and texts (the base's answers), finetunes ({name: prompt, text,
      ratio_vs_bf16, delta_bytes, built}) and throughput (the comparison, or None).
    """
    root = Path(cache_dir or paths.cache_dir())
    model_dir = root / MODEL_NAME
    summary = None if rebuild else cached_summary(model_dir, steps)
    built = summary is None
    out("dzjax demo: a tiny Llama and three fine-tunes, compressed to deltas and served at once")
    t0 = time.perf_counter()
    if built:
        out(f"building {model_dir} ({steps} training steps on {jax.devices()[0].platform})")
        summary = build_tiny_model(model_dir, steps=steps, log=out)
    build_seconds = time.perf_counter() - t0 if built else 0.0

    finetunes = {}
    for name in FINETUNES:
        ft_dir = root / f"{MODEL_NAME}-{name}"
        ft = None if rebuild or built else _cached_finetune(ft_dir, name, finetune_steps)
        if ft is None:
            out(f"fine-tuning {name!r} ({finetune_steps} steps on "
                f"{FINETUNES[name].corpus}, {FINETUNES[name].rewrite})")
            ft = build_finetune(model_dir, name, ft_dir, steps=finetune_steps)
        t1 = time.perf_counter()
        delta, converted = _delta(model_dir, ft_dir, root / DELTA_DIR / f"{name}.dz.safetensors",
                                  name, n_samples)
        report = delta.metadata["report"]
        finetunes[name] = dict(path=str(delta.path or ""), dir=str(ft_dir), built=converted,
                               convert_seconds=time.perf_counter() - t1 if converted else 0.0,
                               ratio_vs_bf16=report["ratio_vs_bf16"],
                               delta_bytes=report["delta_bytes"], loss_end=ft["loss_end"])

    t0 = time.perf_counter()
    base = load_base(model_dir)
    load_seconds = time.perf_counter() - t0
    prompts = list(PROMPTS) + [FINETUNES[n].prompt for n in FINETUNES]
    models = [None] * len(PROMPTS) + list(FINETUNES)
    t0 = time.perf_counter()
    with serve(base, {n: f["path"] for n, f in finetunes.items()},
                     max_batch=len(prompts), max_seq_len=128) as server:
        texts = server.generate(prompts, model=models, max_tokens=max_tokens)
    generate_seconds = time.perf_counter() - t0
    for name, text in zip(FINETUNES, texts[len(PROMPTS):]):
        finetunes[name].update(prompt=FINETUNES[name].prompt, text=text)

    c = base.config
    megabytes = sum(f.stat().st_size for f in model_dir.iterdir()) / 1e6
    out(f"base      {model_dir} ({megabytes:.1f} MB)")
    out(f"          Llama, {summary['params'] / 1e6:.2f}M params: {c.num_layers} layers, hidden "
        f"{c.hidden_size}, {c.num_heads} heads ({c.num_kv_heads} kv), vocab {c.vocab_size}")
    how = (f"built in {build_seconds:.1f} s" if built else
           f"reused from the cache (built in {summary['train_seconds']:.0f} s)")
    out(f"          {how}; trained {summary['recipe']['steps']} steps on "
        f"{summary['corpus_tokens']} tokens, loss {summary['loss_start']:.2f} -> "
        f"{summary['loss_end']:.2f}")
    for name, f in finetunes.items():
        how = f"converted in {f['convert_seconds']:.1f} s" if f["built"] else "reused"
        out(f"delta     {name:8s} {f['delta_bytes'] / 1e3:6.0f} kB, {f['ratio_vs_bf16']:.1f}x "
            f"smaller than a bf16 delta (4-bit, 2:4 sparse; {how})")
    out(f"served    {len(prompts)} requests over the base and {len(FINETUNES)} deltas in one "
        f"batch: {generate_seconds:.1f} s for {max_tokens} tokens each (greedy, "
        f"loaded in {load_seconds:.1f} s)")
    for prompt, model, text in zip(prompts, models, texts):  # [prompt] then its continuation
        out(f"  {model or 'base':8s} [{prompt}]{text}".replace("\n", "\\n"))
    throughput = None
    if bench_requests:
        throughput = compare_with_swap(model_dir, finetunes, bench_requests,
                                       root / "demo" / "bench")
        d, s = throughput["dzjax"], throughput["swap"]
        out(f"throughput {bench_requests} requests at once over the {len(FINETUNES)} deltas: "
            f"dzjax {d['tokens_per_s']:.0f} tokens/s, the swap baseline (one merged model at a "
            f"time, loaded from disk) {s['tokens_per_s']:.0f} tokens/s: "
            f"{d['tokens_per_s'] / s['tokens_per_s']:.2f}x ({s['switches']} swaps)")
    return dict(path=str(model_dir), built=built, build_seconds=build_seconds,
                load_seconds=load_seconds, generate_seconds=generate_seconds,
                params=summary["params"], loss_start=summary["loss_start"],
                final_loss=summary["loss_end"], prompts=list(PROMPTS),
                texts=texts[:len(PROMPTS)], finetunes=finetunes, throughput=throughput)


def compare_with_swap(model_dir: Path, finetunes: dict, requests: int, root: Path) -> dict:
    """A small `dzjax bench` run on the demo models: all requests at once, uniform over the
    fine-tunes, against the swap baseline. Returns {system: tokens_per_s, ...}."""
    models = bench.prepare_real(model_dir, {n: Path(f["path"]) for n, f in finetunes.items()},
                                "float32", root)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    workload = bench.WorkloadConfig(models=tuple(finetunes), vocab_size=vocab,
                                    num_requests=requests, rate=float("inf"),
                                    prompt_len=bench.Lengths(8, 16), output_len=bench.Lengths(16, 32))
    report = bench.benchmark(models, workload, bench.BenchConfig(
        systems=("dzjax", "swap"), max_batch=8, weights_dtype="float32", decode_repeats=0))
    return {name: {"tokens_per_s": m["throughput_tokens_per_s"],
                   "latency_p50_s": m["latency_s"]["p50"], "switches": m.get("switches", 0)}
            for name, m in report["systems"].items()}
