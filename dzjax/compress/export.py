"""`export_hf`: base + decompressed delta as a standard HF checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from dzjax.compress.delta_file import Delta
from dzjax.models.forward import resolve_delta
from dzjax.models.loading import Base, flatten_params
from dzjax.models.safetensors_io import check_target
from dzjax.models.saving import save_hf
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.reference import dequantize


def add(param, d, name: str):
    """One parameter of base + delta, in the parameter's dtype (the sum in float32)."""
    if d is None:
        return param
    if isinstance(d, QuantizedTensor):
        d = dequantize(d)
        d = d.T if name == "embedding" else d  # the embedding is stored [hidden, vocab]
    return (param.astype(jnp.float32) + d.astype(jnp.float32)).astype(param.dtype)


def export_hf(base: Base, delta: Delta, out: str | Path, overwrite: bool = False) -> Path:
    """Write base + decompressed `delta` as a HF checkpoint (config, safetensors, tokenizer).

    The weights are stored in the base's dtype; the directory is written atomically. An existing
    non-empty `out` is refused unless `overwrite` (then it is replaced).
    """
    if base.path is not None:  # replacing the base's own folder would destroy it
        check_target(Path(out) / "config.json", inputs=(base.path,))
    flat = flatten_params(resolve_delta(base, delta) or {})
    hf_config = base.hf_config.to_dict() if base.hf_config is not None else None
    # Each merged tensor is computed as it is written: no merged copy of the model is held.
    return save_hf(out, base.config, base.params, dtype=base.dtype, hf_config=hf_config,
                   tokenizer=base.tokenizer, overwrite=overwrite,
                   transform=lambda keys, leaf: add(leaf, flat.get(keys), keys[-1]))
