"""Tensor parallelism over more devices than the model has KV heads, as vLLM does it: each KV
head is replicated over the devices that share it.

With T devices and K < T KV heads (T a multiple of K), every KV head's k/v columns are repeated
r = T / K times, consecutively: the model then has K * r KV heads, one per device, and as query
head h attends to KV head h // (H / (K * r)), which is a copy of its original KV head
h // (H / K), attention computes exactly what it did. The KV cache holds r copies (per device:
one head, as with K = T). Base params and every delta (dense or compressed: a compressed matrix's
stored arrays all end in its output columns) are replicated alike, before fusion; a delta is
validated against the base as converted, and replicated when the pool reads it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dzjax.models import fusion
from dzjax.models.config import ModelConfig
from dzjax.pallas_kernels.formats import QuantizedTensor


def replicas(config: ModelConfig, devices: int) -> int:
    """Copies of each KV head that `devices` need: 1 when they divide the KV heads, else
    devices / KV heads when that is whole and the devices divide the query heads (else 1, and
    the mesh check refuses the mesh, naming the dimension)."""
    kv = config.num_kv_heads
    fits = devices > kv and devices % kv == 0 and config.num_heads % devices == 0
    return devices // kv if fits else 1


def replicated_config(config: ModelConfig, r: int) -> ModelConfig:
    """The config of the model with r copies of each KV head."""
    return config if r == 1 else dataclasses.replace(config, num_kv_heads=config.num_kv_heads * r)


def _columns(a, head_dim: int, r: int):
    """a [..., K * head_dim] -> [..., K * r * head_dim], each head's columns repeated r times."""
    xp = np if isinstance(a, np.ndarray) else jnp
    heads = a.reshape(*a.shape[:-1], -1, head_dim)
    return xp.repeat(heads, r, axis=-2).reshape(*a.shape[:-1], -1)


def _leaf(leaf, head_dim: int, r: int):
    if isinstance(leaf, QuantizedTensor):
        arrays = {name: _columns(a, head_dim, r) for name, a in leaf.arrays().items()}
        return dataclasses.replace(leaf, **arrays, shape=(leaf.shape[0], leaf.shape[1] * r))
    return _columns(leaf, head_dim, r)


def replicate(params, config: ModelConfig, r: int):
    """params (the base's or a delta's, unfused) with each KV head's k/v columns (kernels and
    biases) repeated r times; the rest is shared, not copied."""
    if r == 1 or params is None:
        return params
    model = params.get("model")
    if not model:
        return params
    layers = {}
    for name, layer in model.items():
        attention = layer.get("self_attn") if name.startswith("layers_") else None
        if not attention:
            layers[name] = layer
            continue
        attention = dict(attention)
        for proj in ("k_proj", "v_proj"):
            if proj in attention:
                attention[proj] = {k: _leaf(v, config.head_dim, r)
                                   for k, v in attention[proj].items()}
        layers[name] = {**layer, "self_attn": attention}
    return {**params, "model": layers}


def preparation(config: ModelConfig, r: int, shards: int, fuse: bool):
    """params -> params as the serving engine's model computes them: KV heads replicated r
    times, then q/k/v and gate/up fused (`fusion`) if `fuse`; None when that changes nothing."""
    if r == 1 and not fuse:
        return None
    model = replicated_config(config, r)

    def prepare(params):
        params = replicate(params, config, r)
        return fusion.fuse(params, config=model, shards=shards) if fuse else params
    return prepare
