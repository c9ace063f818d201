"""`export_hf`: base + decompressed delta as a standard HF checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from dzjax.compress.delta_file import Delta
from dzjax.models.forward import resolve_delta
from dzjax.models.loading import Base
from dzjax.models.saving import save_hf
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.reference import dequantize


def merge(base: Base, delta) -> dict:
    """Params of base + delta, in the base's dtype (each sum computed in float32)."""
    tree = resolve_delta(base, delta)

    def add(param, d, name):
        if d is None:
            return param
        if isinstance(d, QuantizedTensor):
            d = dequantize(d)
            d = d.T if name == "embedding" else d  # the embedding is stored [hidden, vocab]
        return (param.astype(jnp.float32) + d.astype(jnp.float32)).astype(param.dtype)

    def walk(params, d, name=""):
        if d is None:
            return params
        if isinstance(params, dict):
            return {k: walk(v, d.get(k), k) for k, v in params.items()}
        return add(params, d, name)

    return walk(base.params, tree)


def export_hf(base: Base, delta: Delta, out: str | Path, overwrite: bool = False) -> Path:
    """Write base + decompressed `delta` as a HF checkpoint (config, safetensors, tokenizer).

    The weights are stored in the base's dtype; the directory is written atomically. An existing
    non-empty `out` is refused unless `overwrite` (then it is replaced).
    """
    merged = merge(base, delta)
    hf_config = base.hf_config.to_dict() if base.hf_config is not None else None
    return save_hf(out, base.config, merged, dtype=jax.tree.leaves(merged)[0].dtype,
                   hf_config=hf_config, tokenizer=base.tokenizer, overwrite=overwrite)
