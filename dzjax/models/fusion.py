"""Fused projections: q/k/v as one matmul, gate/up as one matmul (serving).

Each decoder layer computes three projections of the same input for attention and two for the
MLP. Served separately, each is its own base matmul and its own delta kernel launch; fused, the
weights of a group sit side by side along their outputs and one matmul computes them all:

  self_attn  q_proj, k_proj, v_proj  ->  qkv_proj      [hidden, (H + 2 kvH) * head_dim]
  mlp        gate_proj, up_proj      ->  gate_up_proj  [hidden, 2 * intermediate]

`fuse` does it for the base params (once, at load) and for a delta's params (once per delta,
when the serving pool reads it: compressed matrices are stored along their
inputs, so a fused compressed matrix is its parts' stored arrays side by side, in one format).
The model computes the fused projection when its `KernelOptions` say `fused_projections` and
splits the product back with `split_columns`.

On a tensor-parallel mesh of `shards` devices the columns are interleaved by device (device d
holds [q_d, k_d, v_d], its own heads of each), so that splitting the columns of the
column-parallel product needs no communication; with one device it is a plain concatenation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models.config import ModelConfig
from dzjax.pallas_kernels.formats import QuantizedTensor

# module -> (fused name, its parts in column order)
GROUPS = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
          "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}


def part_sizes(config: ModelConfig, module: str) -> tuple[int, ...]:
    """Output columns of each part of a group, in order."""
    c = config
    if module == "self_attn":
        return (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                c.num_kv_heads * c.head_dim)
    return (c.intermediate_size, c.intermediate_size)


def _concat(parts, shards: int):
    """Arrays [..., n_i] side by side along the last axis, interleaved by shard."""
    xp = np if all(isinstance(p, np.ndarray) for p in parts) else jnp
    if shards == 1:
        return xp.concatenate(parts, axis=-1)
    for p in parts:
        if p.shape[-1] % shards:
            raise DzjaxError(f"{p.shape[-1]} columns do not split over {shards} devices")
    split = [p.reshape(*p.shape[:-1], shards, p.shape[-1] // shards) for p in parts]
    out = xp.concatenate(split, axis=-1)
    return out.reshape(*out.shape[:-2], -1)


def split_columns(y: jax.Array, sizes, shards: int = 1) -> list[jax.Array]:
    """The parts of a fused product y [..., sum(sizes)] (the inverse of the fusion's layout)."""
    if shards == 1:
        return jnp.split(y, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    y = y.reshape(*y.shape[:-1], shards, -1)
    local = [s // shards for s in sizes]
    return [p.reshape(*p.shape[:-2], -1)
            for p in jnp.split(y, np.cumsum(local)[:-1].tolist(), axis=-1)]


def _concat_quantized(parts: list[QuantizedTensor], shards: int) -> QuantizedTensor:
    arrays = {name: _concat([p.arrays()[name] for p in parts], shards)
              for name in parts[0].arrays()}
    fields = {name: arrays.get(name) for name in ("qweight", "scales", "zeros", "meta")}
    return QuantizedTensor(**fields, shape=(parts[0].shape[0], sum(p.shape[1] for p in parts)),
                           format=parts[0].format)


def _zero_quantized(like: QuantizedTensor, n: int, host: bool) -> QuantizedTensor:
    """A compressed [K, n] zero matrix in `like`'s format (every scale zero)."""
    xp = np if host else jnp
    arrays = {name: xp.zeros(shape, dtype)
              for name, (shape, dtype) in like.format.stored_arrays(like.shape[0], n).items()}
    fields = {name: arrays.get(name) for name in ("qweight", "scales", "zeros", "meta")}
    return QuantizedTensor(**fields, shape=(like.shape[0], n), format=like.format)


def _fuse_leaves(leaves: list, sizes, shards: int, where: str):
    """One fused tensor from the parts' tensors (None: that part has no delta there)."""
    present = [x for x in leaves if x is not None]
    if isinstance(present[0], QuantizedTensor):
        if not all(isinstance(x, QuantizedTensor) for x in present):
            raise DzjaxError(f"{where}: some parts are compressed and some exact; fused "
                             f"projections need one kind (or serve with "
                             f"fuse_projections=False)")
        formats = {x.format for x in present}
        if len(formats) > 1:
            raise DzjaxError(f"{where}: the parts are stored in different formats "
                             f"({', '.join(sorted(map(str, formats)))}); fused projections need "
                             f"one format (convert with the same settings for all of them, or "
                             f"serve with fuse_projections=False)")
        host = all(isinstance(a, np.ndarray) for a in present[0].arrays().values())
        full = [x if x is not None else _zero_quantized(present[0], n, host)
                for x, n in zip(leaves, sizes)]
        return _concat_quantized(full, shards)
    if any(isinstance(x, QuantizedTensor) for x in present):
        raise DzjaxError(f"{where}: some parts are compressed and some exact; fused "
                         f"projections need one kind (or serve with fuse_projections=False)")
    like = present[0]
    xp = np if isinstance(like, np.ndarray) else jnp
    full = [x if x is not None else xp.zeros(like.shape[:-1] + (n,), like.dtype)
            for x, n in zip(leaves, sizes)]
    return _concat(full, shards)


def _fuse_module(module: dict, group: str, sizes, shards: int, where: str) -> dict:
    fused_name, names = GROUPS[group]
    parts = [module.get(n) for n in names]
    if all(p is None for p in parts):
        return module
    if fused_name in module:
        raise DzjaxError(f"{where}: already has {fused_name}")
    out = {k: v for k, v in module.items() if k not in names}
    fused = {}
    for leaf in sorted({k for p in parts if p is not None for k in p}):
        fused[leaf] = _fuse_leaves([None if p is None else p.get(leaf) for p in parts], sizes,
                                   shards, f"{where}.{'/'.join(names)}.{leaf}")
    out[fused_name] = fused
    return out


def fuse(params, config: ModelConfig, shards: int = 1):
    """Params (the base's, or a delta's) with each layer's q/k/v and gate/up tensors fused.

    In a delta, a part it does not touch is filled with zeros (for a compressed part: a zero
    matrix in the others' format). Raises a DzjaxError naming the tensors when the parts of one
    group are of different kinds or formats.
    """
    if params is None or "model" not in params:
        return params
    model = dict(params["model"])
    for i in range(config.num_layers):
        layer = model.get(f"layers_{i}")
        if layer is None:
            continue
        layer = dict(layer)
        for group in GROUPS:
            if layer.get(group) is not None:
                layer[group] = _fuse_module(dict(layer[group]), group, part_sizes(config, group),
                                            shards, f"model.layers_{i}.{group}")
        model[f"layers_{i}"] = layer
    return {**params, "model": model}
