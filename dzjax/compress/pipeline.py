"""`convert`: a HF base + fine-tune -> a compressed delta file, one decoder layer at a time.

The sequential pipeline (DeltaZip, after GPTQ's "true sequential" order):
  1. the embedding delta, round-to-nearest (a one-hot input has a diagonal Hessian: OBS adds
     nothing), then the calibration activations X = embed(tokens) under base + compressed delta;
  2. for each decoder layer, with its norms and biases stored exactly: q/k/v on the Hessian of
     their shared input, then o_proj on its input recomputed with compressed q/k/v, then gate/up,
     then down_proj; X moves on through the layer with all of it compressed, so later layers
     compensate the error of earlier ones;
  3. the final norm exactly, and an untied lm_head on the Hessian of the final hidden states.
Only one layer of each checkpoint is in memory at a time (read tensor by tensor from the files),
plus the calibration activations. The file is written atomically at the end: an interrupted
convert leaves no delta file, only its progress checkpoint (`resume`), which the same convert
started again resumes from.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.compress import allocate, refine, resume
from dzjax.compress import calibration as calib
from dzjax.compress.delta_file import Delta, save_delta
from dzjax.compress.layer_pass import (CHUNK, STAGES, count_params, hessian, layer_outputs,
                                       layer_pass)
from dzjax.compress.obs import (ObsConfig, hessian_init, hessian_update, obs_prune_quantize,
                                pad_problem, reconstruction_loss, round_to_nearest)
from dzjax.errors import CheckpointError, DzjaxError
from dzjax.models.config import ModelConfig, config_to_dict, from_hf_config
from dzjax.models.kernel_options import KernelOptions
from dzjax.models.linear import embed
from dzjax.models.llama import RMSNorm
from dzjax.models.loading import (checkpoint_digest, checkpoint_files, checkpoint_fingerprint,
                                  flatten_params, hf_key_map, load_tokenizer, read_hf_config,
                                  unflatten)
from dzjax.models.safetensors_io import SafetensorsFile, check_target, remove_stale_temps
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.reference import dequantize

@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """Compression settings of a whole model (see `ObsConfig` for the per-matrix meaning)."""

    # The defaults are measured (benchmarks/compression.py quality, on fine-tunes that move
    # weights by ~3%): 2-bit dense with groups of 128 keeps the fine-tune better than 4-bit 2:4
    # (KL 0.00043 against 0.00065) in fewer bits (2.2 against 3.2 per block weight).
    bits: int = 2
    sparsity: float | str | tuple[int, int] | None = None
    group_size: int | None = 128  # a matrix with fewer inputs gets per-channel scales
    symmetric: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    method: str = "obs"  # "obs" (SparseGPT + GPTQ) or "rtn" (round-to-nearest, the baseline)
    compress_embeddings: bool = True  # False keeps the embedding and lm_head deltas exact
    # The embedding table and an untied lm_head have their own settings: they are a large share
    # of a small model, and pruning them costs much of the fine-tune (benchmarks/compression.py
    # quality). "same" = the blocks' setting.
    embedding_bits: int | str = 4  # per row, dense: within 3% of exact tables' KL
    embedding_sparsity: float | str | tuple[int, int] | None = None
    embedding_group_size: int | str | None = None
    zstd: bool = False  # a lossless zstd stage at rest over the compressed arrays
    refine_steps: int = 0  # Adam steps on each layer's (and the lm_head's) scales after OBS
    refine_lr: float = 1e-2  # its learning rate, on log(scale), cosine-decayed to 0
    # Bits and sparsity per block matrix (`allocate`): target_bits = the whole delta's bits per
    # weight to fit, chosen from measured sensitivity; or allocation = a given choice ({HF name:
    # {"bits", "sparsity"}}, a JSON file of one, or a delta file that records one).
    target_bits: float | None = None
    allocation: dict | str | Path | None = None
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("obs", "rtn"):
            raise DzjaxError(f"method must be 'obs' or 'rtn', got {self.method!r}")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) \
                or self.refine_steps < 0 or not self.refine_lr > 0:
            raise DzjaxError(f"refine_steps must be an int >= 0 and refine_lr > 0, got "
                             f"{self.refine_steps!r}, {self.refine_lr!r}")
        if self.target_bits is not None and (isinstance(self.target_bits, bool) or not isinstance(
                self.target_bits, (int, float)) or not 0 < self.target_bits <= 32):
            raise DzjaxError(f"target_bits must be a number of bits per weight in (0, 32], got "
                             f"{self.target_bits!r}")
        if self.n_samples < 1 or self.seq_len < 2:
            raise DzjaxError(f"need n_samples >= 1 and seq_len >= 2, got {self.n_samples}, "
                             f"{self.seq_len}")
        try:  # the settings themselves, before any work (shapes are checked per matrix)
            for embedding in (False, True):
                self.obs_config(1 << 20, embedding=embedding).format(1 << 20)
        except ValueError as e:
            raise DzjaxError(str(e)) from None

    def obs_config(self, k: int, *, embedding: bool = False, name: str | None = None
                   ) -> ObsConfig:
        """The settings of one matrix with k inputs (`embedding`: the table or the lm_head;
        `name`: a block matrix's HF name, which an allocation gives its bits and sparsity)."""
        bits, sparsity, group_size = self.bits, self.sparsity, self.group_size
        if embedding:
            own = (self.embedding_bits, self.embedding_sparsity, self.embedding_group_size)
            bits, sparsity, group_size = (b if o == "same" else o for o, b in
                                          zip(own, (bits, sparsity, group_size)))
        elif isinstance(self.allocation, dict) and name is not None:
            if name not in self.allocation:
                raise DzjaxError(f"the allocation has no entry for {name}")
            bits, sparsity = self.allocation[name]["bits"], self.allocation[name]["sparsity"]
        group = None if group_size is None or group_size >= k else group_size
        return ObsConfig(bits=bits, group_size=group, symmetric=self.symmetric,
                         act_order=self.act_order, sparsity=sparsity,
                         block_size=self.block_size, damp=self.damp)

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class _PairReader:
    """Reads one tensor at a time of two checkpoints as float32 arrays in our layout."""

    def __init__(self, base_dir: Path, ft_dir: Path, config: ModelConfig):
        self.key_map = hf_key_map(config)
        self.by_keys = {keys: (name, transposed) for name, (keys, transposed, _) in
                        self.key_map.items()}
        self.files = (checkpoint_files(base_dir), checkpoint_files(ft_dir))
        self._open: dict[Path, SafetensorsFile] = {}
        for files in self.files:  # every tensor must be a parameter (as load_base demands)
            for name, file in files.items():
                if name not in self.key_map and not (
                        name == "lm_head.weight" and config.tie_word_embeddings):
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} for "
                                          f"{config.architecture}")

    def _read(self, files, name, transposed):
        if name not in files:
            raise CheckpointError(f"{next(iter(files.values())).parent}: missing tensor {name!r}")
        sf = self._open.get(files[name]) or self._open.setdefault(files[name],
                                                                  SafetensorsFile(files[name]))
        if sf.shape(name) != self.key_map[name][2]:
            raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {sf.shape(name)}, "
                                  f"expected {self.key_map[name][2]} from config.json")
        array = np.asarray(sf.read(name), np.float32)
        return np.ascontiguousarray(array.T if transposed else array)

    def pair(self, keys) -> tuple[np.ndarray, np.ndarray]:
        name, transposed = self.by_keys[keys]
        return tuple(self._read(files, name, transposed) for files in self.files)

    def subtree(self, prefix: tuple[str, ...]) -> tuple[dict, dict]:
        """(base, fine-tune) params under `prefix`, e.g. one decoder layer."""
        base, ft = {}, {}
        for keys in self.by_keys:
            if keys[:len(prefix)] == prefix:
                base[keys[len(prefix):]], ft[keys[len(prefix):]] = self.pair(keys)
        return unflatten(base), unflatten(ft)


def check_pair(base: ModelConfig, ft: ModelConfig, base_dir: Path, ft_dir: Path) -> None:
    """The fine-tune must share the base's architecture and every shape."""
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias",
                  "o_bias", "mlp_bias", "qk_norm", "rope", "sliding_windows", "rms_norm_eps"):
        if getattr(base, field) != getattr(ft, field):
            raise DzjaxError(f"{ft_dir} is not a fine-tune of {base_dir}: {field} is "
                             f"{getattr(ft, field)!r}, the base's {getattr(base, field)!r}")


def _compress(w, h, cfg: ConvertConfig, name: str, embedding: bool = False):
    """Compress one delta matrix [K, N] (`embedding`: the table or the lm_head, with their own
    settings); returns the QuantizedTensor and its relative error."""
    k = w.shape[0]
    obs = cfg.obs_config(k, embedding=embedding, name=name)
    try:
        fmt = obs.format(k)
        fmt.check_shape(*w.shape, name)
        obs.check(fmt.padded_k(k))
    except ValueError as e:
        raise DzjaxError(f"{name}: {e}") from None
    w = jnp.asarray(w)
    lookup = h is None  # no Hessian (the embedding lookup): round to nearest, error unweighted
    if lookup:
        h = jnp.eye(k, dtype=jnp.float32)
    w_pad, h_pad = pad_problem(w, h, fmt.padded_k(k))
    rows = None if w_pad.shape[0] == k else k
    if lookup or cfg.method == "rtn":  # (its own loss is not used: the error is computed below)
        result = round_to_nearest(w_pad, obs, rows=rows)
    else:
        result = obs_prune_quantize(w_pad, h_pad, obs, rows=rows)
    q = result.to_quantized(fmt, k)
    err = float(jnp.sqrt(reconstruction_loss(w, dequantize(q), h) /
                         jnp.maximum(reconstruction_loss(w, jnp.zeros_like(w), h), 1e-30)))
    return q, err


class _Progress:
    """One line per step on stderr: the step, its loss and an ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.perf_counter()

    def step(self, what: str, error: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[convert {self.done}/{self.total}] {what}: mean rel. error {error:.4f} | "
              f"{elapsed:.1f} s, ETA {eta:.1f} s", file=sys.stderr, flush=True)


def _compress_on(device, w, h, cfg: ConvertConfig, name: str):
    """`_compress` with its inputs placed on `device` (so it runs there); the result comes back
    to the default device. The same computation on any device of one kind: the same bits."""
    if device is None:
        return _compress(w, h, cfg, name)
    home = jax.devices()[0]
    q, err = _compress(jax.device_put(jnp.asarray(w), device),
                       None if h is None else jax.device_put(h, device), cfg, name)
    return jax.device_put(q, home), err


class _Run:
    """The sequential pipeline's state: what has been compressed so far, and its errors.

    With several devices (`convert(..., mesh=...)`), the matrices of one stage, which share their
    Hessian (q/k/v, gate/up), are compressed at once, one per device, each in its own thread.
    """

    def __init__(self, config: ModelConfig, cfg: ConvertConfig, reader: _PairReader,
                 kernels: KernelOptions, devices: list | None = None):
        self.config, self.cfg, self.reader, self.kernels = config, cfg, reader, kernels
        self.devices = devices or [None]
        self.stored: dict[tuple[str, ...], object] = {}  # param path -> QuantizedTensor | exact
        self.errors: dict[str, float] = {}  # HF name -> relative reconstruction error
        self.refined: dict[str, list[float]] = {}  # layer -> refinement loss [before, after]

    def record(self, keys, value, err=None):
        self.stored[keys] = value
        if err is not None:
            self.errors[self.reader.by_keys[keys][0]] = err

    def embedding(self, tokens) -> jax.Array:
        """Compress the embedding delta (as its transpose [hidden, vocab], see delta_file);
        return the calibration activations X = embed(tokens) under base + compressed delta."""
        keys = ("model", "embed_tokens", "embedding")
        table, ft_table = self.reader.pair(keys)
        if self.cfg.compress_embeddings:
            self.record(keys, *_compress((ft_table - table).T, None, self.cfg,
                                         "model.embed_tokens.weight", embedding=True))
        else:
            self.record(keys, jnp.asarray(ft_table - table))
        del ft_table
        return embed(jnp.asarray(tokens), jnp.asarray(table), self.stored[keys])

    def layer(self, i: int, x: jax.Array) -> tuple[jax.Array, float]:
        """Compress decoder layer i on inputs x; returns its outputs and its mean error."""
        prefix = ("model", f"layers_{i}")
        layer_base, layer_ft = self.reader.subtree(prefix)
        delta = jax.tree.map(lambda f, b: jnp.asarray(f - b), layer_ft, layer_base)
        exact = jax.tree.map(lambda d: d, delta)  # the fine-tune's layer, for refinement
        del layer_ft
        run = functools.partial(layer_pass, jax.tree.map(jnp.asarray, layer_base),
                                config=self.config, window=self.config.sliding_windows[i],
                                kernels=self.kernels)
        layer_errors = []
        for module, names in STAGES:
            h = hessian(lambda xs: run(delta, xs, capture=(module, names[0]))[1], x)
            jobs = [(self.devices[j % len(self.devices)], delta[module][proj]["kernel"], h,
                     self.cfg, f"model.layers.{i}.{module}.{proj}.weight")
                    for j, proj in enumerate(names)]
            if len(self.devices) > 1:
                with concurrent.futures.ThreadPoolExecutor(len(self.devices)) as pool:
                    results = list(pool.map(lambda job: _compress_on(*job), jobs))
            else:
                results = [_compress(*job[1:]) for job in jobs]
            for proj, (q, err) in zip(names, results):
                delta[module][proj]["kernel"] = q
                self.record(prefix + (module, proj, "kernel"), q, err)
                layer_errors.append(err)
        if self.cfg.refine_steps:
            window = self.config.sliding_windows[i]

            def xla_pass(params, d, xs):
                return layer_pass(params, d, xs, config=self.config, window=window,
                                  capture=None, kernels=refine.XLA)[0]
            delta, losses = refine.refine_layer(
                xla_pass, jax.tree.map(jnp.asarray, layer_base), delta, exact, x,
                steps=self.cfg.refine_steps, lr=self.cfg.refine_lr, chunk=CHUNK)
            if losses is not None:
                self.refined[f"model.layers.{i}"] = [float(f"{v:.6g}") for v in losses]
        for keys, leaf in flatten_params(delta).items():
            if isinstance(leaf, QuantizedTensor):
                self.stored[prefix + keys] = leaf  # as refined
            else:
                self.record(prefix + keys, leaf)  # norms and biases, exact
        x = layer_outputs(run, delta, x)
        return x, float(np.mean(layer_errors))

    def head(self, x: jax.Array) -> None:
        """The final norm (exact) and an untied lm_head on the Hessian of the final states."""
        norm_base, norm_ft = self.reader.pair(("model", "norm", "weight"))
        self.record(("model", "norm", "weight"), jnp.asarray(norm_ft - norm_base))
        if self.config.tie_word_embeddings:
            return
        keys = ("lm_head", "kernel")
        head, ft_head = self.reader.pair(keys)
        if not self.cfg.compress_embeddings:
            self.record(keys, jnp.asarray(ft_head - head))
            return
        normed = RMSNorm(self.config.rms_norm_eps).apply(
            {"params": {"weight": jnp.asarray(norm_ft)}}, x)
        h = hessian_update(hessian_init(self.config.hidden_size),
                           normed.reshape(-1, normed.shape[-1])).h
        q, err = _compress(ft_head - head, h, self.cfg, "lm_head.weight", embedding=True)
        if self.cfg.refine_steps and q.scales is not None:
            q, losses = refine.refine_head(q, normed, jnp.asarray(head), jnp.asarray(ft_head),
                                           steps=self.cfg.refine_steps, lr=self.cfg.refine_lr,
                                           chunk=CHUNK)
            self.refined["lm_head"] = [float(f"{v:.6g}") for v in losses]
        self.record(keys, q, err)


def convert(base, finetune, out, bits: int = 2, sparsity=None, group_size: int | None = 128,
            calibration=None, *, name: str | None = None, progress: bool = True,
            mesh=None, implementation: str | None = None,
            checkpoint_every: float | None = resume.DEFAULT_EVERY, **options) -> Delta:
    """Compress the delta of a fine-tune against its base and write it to `out`.

    Args:
      base, finetune: HF checkpoint directories of the same architecture and shapes.
      out: the delta file to write (atomically).
      bits: 2, 3, 4, 8, or 16 (no quantization).
      sparsity: None (dense), a float in (0, 1) (unstructured), or "n:m" (e.g. "2:4").
      group_size: inputs per quantization scale; None = one scale per output channel.
      calibration: None (the embedded corpus), texts, a .txt/.jsonl path, or token ids [n, seq].
      name: the fine-tune's name in the file (default: the fine-tune directory's name).
      progress: print one line per layer.
      mesh: a `jax.sharding.Mesh` (or a list of devices): the matrices that share a Hessian
        are compressed in parallel, one per device; the file is identical to one device's.
      implementation: kernels of the compressed layers' passes (None: `DZJAX_KERNEL`, else auto).
      checkpoint_every: seconds of work between checkpoints of the progress (after a decoder
        layer, with orbax, in `.<out name>.convert/` beside `out`; 0 = after every layer, None =
        never). Started again with the same arguments, a convert that was killed resumes from
        its last checkpoint and writes the same file; the checkpoint is removed on success.
      options: further `ConvertConfig` fields (symmetric, act_order, damp, block_size, method,
        compress_embeddings, embedding_bits, embedding_sparsity, embedding_group_size, zstd,
        refine_steps, refine_lr, target_bits, allocation, n_samples, seq_len, seed).
        target_bits: the whole delta's bits per weight to fit, by choosing bits and sparsity per
        block matrix from measured sensitivity (`dzjax.compress.allocate`); the choice is
        recorded in the file. allocation: a choice to reuse (a delta file converted with
        target_bits, or its mapping), so that fine-tunes of one base share one layout and can be
        served together.
    Returns:
      The `Delta`, with `metadata["report"]` holding per-matrix relative reconstruction errors,
      bits per weight, file size and compression ratios.
    """
    start = time.perf_counter()
    if options.get("target_bits") is not None and options.get("allocation") is not None:
        raise DzjaxError("give target_bits (to choose an allocation) or allocation (a chosen "
                         "one), not both")
    cfg = ConvertConfig(bits=bits, sparsity=sparsity, group_size=group_size, **options)
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool)
                                         or not isinstance(checkpoint_every, (int, float))
                                         or not checkpoint_every >= 0):
        raise DzjaxError(f"checkpoint_every must be None or seconds >= 0, got "
                         f"{checkpoint_every!r}")
    base_dir, ft_dir, out = Path(base), Path(finetune), Path(out)
    for d in (base_dir, ft_dir):
        if not d.is_dir():
            raise DzjaxError(f"{d}: no such checkpoint directory")
    # Before any work: the output must be writable and must not destroy an input.
    check_target(out, inputs=(base_dir, ft_dir))
    remove_stale_temps(out)
    config = from_hf_config(read_hf_config(base_dir), where=str(base_dir / "config.json"))
    ft_config = from_hf_config(read_hf_config(ft_dir), where=str(ft_dir / "config.json"))
    check_pair(config, ft_config, base_dir, ft_dir)
    reader = _PairReader(base_dir, ft_dir, config)
    tokenizer = load_tokenizer(ft_dir) or load_tokenizer(base_dir)
    seq_len = min(cfg.seq_len, config.max_position_embeddings)
    tokens, source = calib.calibration_tokens(calibration, tokenizer, config.vocab_size,
                                              n_samples=cfg.n_samples, seq_len=seq_len,
                                              seed=cfg.seed)
    devices = None if mesh is None else list(np.asarray(getattr(mesh, "devices", mesh)).flat)
    kernels = KernelOptions.resolve(implementation)
    if cfg.allocation is not None:
        cfg = dataclasses.replace(cfg, allocation=allocate.check(
            allocate.read(cfg.allocation), config.num_layers))
    base_digest = checkpoint_digest(base_dir, config)
    key = None if checkpoint_every is None else resume.conversion_key(
        base=base_digest, finetune=checkpoint_digest(ft_dir, config), settings=cfg.settings(),
        config=config_to_dict(config), tokens=np.asarray(tokens), name=name or ft_dir.name,
        kernels=kernels.implementation, sources=[str(base_dir), str(ft_dir)],
        **resume.environment())
    checkpoints = resume.Checkpoints(out, key, every=checkpoint_every)
    restored = checkpoints.restore()
    if cfg.target_bits is not None:  # measured once: a resumed convert takes the saved choice
        cfg = allocate.allocated(cfg, _Run(config, cfg, reader, kernels), tokens, progress) \
            if restored is None else dataclasses.replace(cfg, allocation=restored[2]["allocation"])
    run = _Run(config, cfg, reader, kernels, devices)
    meter = _Progress(config.num_layers + 2, progress)
    if restored is None:
        first = 0
        x = run.embedding(tokens)
        meter.step("embed_tokens", run.errors.get("model.embed_tokens.weight", 0.0))
    else:
        first, run.stored, logs, x = restored
        run.errors, run.refined = logs["errors"], logs["refined"]
        meter.done = first + 1
    for i in range(first, config.num_layers):
        x, layer_error = run.layer(i, x)
        meter.step(f"layer {i}", layer_error)
        if i + 1 < config.num_layers:
            checkpoints.maybe_save(i + 1, run.stored, {"errors": run.errors, "refined":
                                                       run.refined, "allocation": cfg.allocation}, x)
    run.head(x)
    meter.step("norm, lm_head", run.errors.get("lm_head.weight", 0.0))
    stored, errors = run.stored, run.errors

    metadata = {
        "name": name or ft_dir.name, "source": str(ft_dir), "base_source": str(base_dir),
        "base_fingerprint": checkpoint_fingerprint(base_dir, config),
        "base_digest": base_digest,
        "config": config_to_dict(config), "settings": cfg.settings(),
        "calibration": source,
    }
    delta = Delta(params=unflatten(stored), metadata=metadata)
    # The file holds no timings: the same conversion writes the same bytes, resumed or not.
    report = _report(delta, config, errors, reader)
    if cfg.allocation is not None:
        report["allocation"] = {"target_bits": cfg.target_bits,
                                "matrices": allocate.summary(cfg.allocation)}
    if run.refined:  # the loss of each refined layer (MSE) and of the lm_head (KL), before, after
        report["refinement"] = run.refined
    delta = Delta(params=delta.params, metadata=dict(metadata, report=report))
    delta = save_delta(delta, out, zstd_level=19 if cfg.zstd else None)
    checkpoints.remove()
    report = dict(report, file_bytes=out.stat().st_size,
                  seconds=round(time.perf_counter() - start, 2))
    return dataclasses.replace(delta, metadata=dict(delta.metadata, report=report))


def _report(delta: Delta, config: ModelConfig, errors: dict[str, float], reader) -> dict:
    n_params = count_params(reader.key_map)
    compressed = {k: v for k, v in flatten_params(delta.params).items()
                  if isinstance(v, QuantizedTensor)}
    compressed_params = sum(q.shape[0] * q.shape[1] for q in compressed.values())
    delta_bytes = delta.stored_nbytes
    ft_bytes = sum(p.stat().st_size for p in set(reader.files[1].values()))
    return {
        "relative_error": {k: round(v, 6) for k, v in errors.items()},
        "mean_relative_error": round(float(np.mean(list(errors.values()) or [0.0])), 6),
        "params": n_params,
        "compressed_params": compressed_params,
        "delta_bytes": delta_bytes,
        "bits_per_weight": round(delta_bytes * 8 / n_params, 4),
        "bits_per_compressed_weight": round(
            sum(q.nbytes for q in compressed.values()) * 8 / max(compressed_params, 1), 4),
        "ratio_vs_bf16": round(2 * n_params / delta_bytes, 3),
        "ratio_vs_finetune_files": round(ft_bytes / delta_bytes, 3),
    }


def report_text(report: dict) -> str:
    """A few human-readable lines of a convert report."""
    worst = sorted(report["relative_error"].items(), key=lambda kv: -kv[1])[:3]
    return "\n".join([
        f"params {report['params']:,} ({report['compressed_params']:,} compressed)",
        f"delta {report['delta_bytes'] / 2**20:.2f} MiB, {report['bits_per_weight']:.2f} bits/weight "
        f"({report['bits_per_compressed_weight']:.2f} in compressed matrices)",
        f"compression ratio {report['ratio_vs_bf16']:.2f}x vs a bf16 delta, "
        f"{report['ratio_vs_finetune_files']:.2f}x vs the fine-tune's files",
        f"mean relative reconstruction error {report['mean_relative_error']:.4f}; worst: "
        + ", ".join(f"{k} {v:.4f}" for k, v in worst),
    ] + ([f"{report['seconds']:.1f} s"] if "seconds" in report else []))


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2)
