"""The models the benchmark serves: a random base and deltas, or real checkpoints; and the merged
checkpoints of the baselines. Built once, cached by what they are made from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.compress.delta_file import load_delta
from dzjax.compress.export import export_hf
from dzjax.compress.pipeline import convert
from dzjax.errors import DzjaxError
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.llama import CausalLM
from dzjax.models.loading import load_base
from dzjax.models.saving import save_hf


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """A random Llama base and `deltas` random fine-tunes of it (base + noise), compressed."""

    layers: int = 4
    hidden: int = 512
    intermediate: int = 1408
    vocab: int = 4096
    heads: int = 8
    kv_heads: int | None = None  # None = heads
    context: int = 2048
    deltas: int = 8
    bits: int = 4
    sparsity: str | float | None = "2:4"
    group_size: int | None = 128
    weights_dtype: str = "bfloat16"
    noise: float = 0.01  # each fine-tune moves every tensor by this much of its spread
    seed: int = 0

    def model_config(self) -> ModelConfig:
        if self.hidden % self.heads:
            raise DzjaxError(f"hidden={self.hidden} must be a multiple of heads={self.heads}")
        return ModelConfig(architecture="LlamaForCausalLM", vocab_size=self.vocab,
                           hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_layers=self.layers, num_heads=self.heads,
                           num_kv_heads=self.kv_heads or self.heads,
                           head_dim=self.hidden // self.heads, rms_norm_eps=1e-5,
                           rope=RopeConfig(theta=10000.0),
                           max_position_embeddings=self.context)


@dataclasses.dataclass(frozen=True)
class Models:
    """What the systems serve: the base, the delta files, and each delta's merged checkpoint."""

    base_dir: Path
    deltas: dict[str, Path]
    merged: dict[str, Path]
    build_s: float = 0.0  # 0 when everything was found ready


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build_synthetic(config: SyntheticConfig, root: Path) -> Models:
    """Build (once; cached under root by the config's hash) the random base, its deltas
    (`dzjax.convert`, round-to-nearest for speed) and their merged checkpoints (`export_hf`)."""
    out = Path(root) / f"synthetic-{_key(dataclasses.asdict(config))}"
    names = [f"delta{i}" for i in range(config.deltas)]
    models = Models(out / "base", {n: out / f"{n}.dz.safetensors" for n in names},
                    {n: out / f"merged-{n}" for n in names})
    if (out / "config.json").exists():
        return models
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_config, dtype = config.model_config(), jnp.dtype(config.weights_dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = CausalLM(model_config, param_dtype=jnp.float32).init(
        jax.random.key(config.seed), ids, ids)["params"]
    save_hf(tmp / "base", model_config, params, dtype=dtype)
    base = load_base(tmp / "base", dtype=dtype)
    calibration = np.random.default_rng(config.seed).integers(0, config.vocab, (2, 16))
    for i, name in enumerate(names):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(config.seed + 1 + i), len(leaves))
        moved = [p + config.noise * (jnp.std(p) + 1e-2) * jax.random.normal(k, p.shape)
                 for p, k in zip(leaves, keys)]
        save_hf(tmp / "finetune", model_config, jax.tree.unflatten(treedef, moved), dtype=dtype)
        delta = convert(tmp / "base", tmp / "finetune", tmp / f"{name}.dz.safetensors",
                        bits=config.bits, sparsity=config.sparsity, group_size=config.group_size,
                        calibration=calibration, method="rtn", progress=False, name=name)
        shutil.rmtree(tmp / "finetune")
        export_hf(base, delta, tmp / f"merged-{name}")
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    os.replace(tmp, out)
    return dataclasses.replace(models, build_s=time.perf_counter() - start)


def prepare_real(base_dir: Path, deltas: dict[str, Path], weights_dtype: str,
                 root: Path) -> Models:
    """Real checkpoints: the merged checkpoints the swap baseline loads, exported once from the
    deltas (`export_hf`, in the base's dtype) under root, keyed by the files they come from."""
    files = {n: (str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime)
             for n, p in deltas.items()}
    out = Path(root) / f"real-{_key([str(Path(base_dir).resolve()), files, weights_dtype])}"
    merged = {n: out / f"merged-{n}" for n in deltas}
    start, base = time.perf_counter(), None
    for name, path in deltas.items():
        if not (merged[name] / "config.json").exists():
            base = base or load_base(base_dir, dtype=jnp.dtype(weights_dtype))
            export_hf(base, load_delta(path), merged[name], overwrite=True)
    return Models(Path(base_dir), dict(deltas), merged,
                  build_s=time.perf_counter() - start if base is not None else 0.0)
