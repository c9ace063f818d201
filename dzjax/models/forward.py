"""Jitted entry points of the model: a full forward pass, prefill and one-token decode, and
`logits`, the public one.

Each is compiled once per (config, dtype, kernel options, shapes): the base params and the delta
are ordinary jit arguments, so swapping one delta for another of the same shapes reuses the
compiled program. `TRACE_COUNTS` counts how often each entry point was traced (tests and serving
stats read it).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models.config import ModelConfig
from dzjax.models.kernel_options import DEFAULT_KERNELS, KernelOptions
from dzjax.models.llama import CausalLM, KVCache
from dzjax.pallas_kernels.formats import QuantizedTensor

TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def default_dtype() -> str:
    """Activations and KV cache by default: bfloat16 on a GPU (tensor cores, half the cache
    bytes), float32 elsewhere (bfloat16 matmuls are slow on CPUs)."""
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


@functools.partial(jax.jit, static_argnames=("config", "dtype", "kernels"))
def forward(params, input_ids, positions, delta=None, *, config: ModelConfig, dtype=jnp.float32,
            kernels: KernelOptions = DEFAULT_KERNELS):
    """Logits [B, T, V] float32 of the whole sequence, no cache.

    `kernels` says how compressed deltas are computed (`KernelOptions`).
    """
    TRACE_COUNTS["forward"] += 1
    logits, _ = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, input_ids, positions, delta)
    return logits


@functools.partial(jax.jit, static_argnames=("config", "dtype", "kernels"),
                   donate_argnames=("cache",))
def forward_cached(params, input_ids, positions, cache: KVCache, delta=None, *,
                   config: ModelConfig, dtype=jnp.float32,
                   kernels: KernelOptions = DEFAULT_KERNELS):
    """Write input_ids [B, T] at `positions` into the cache; returns (logits [B, T, V], cache).

    Prefill is a call with the (right-padded) prompts; decode is a call with T = 1.
    """
    TRACE_COUNTS["forward_cached"] += 1
    return CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, input_ids, positions, delta, cache)


def logits(base, input_ids, delta=None, dtype=jnp.float32, implementation=None) -> jax.Array:
    """Logits [B, T, V] float32 of token ids [B, T] (or [T]) under base + delta.

    Args:
      base: a `Base` from `load_base`.
      input_ids: integer token ids, [batch, seq] or [seq].
      delta: None; a compressed `Delta` (from `convert` or `load_delta`; it must have been made
        on this base); or a dense delta, a pytree mirroring (part of) `base.params` holding
        W_finetune - W_base (see `dense_delta`).
      dtype: activation dtype of the forward pass.
      implementation: kernels for a compressed delta: "xla", "pallas", "interpret" or None =
        `DZJAX_KERNEL`, else auto (Pallas on GPU, XLA elsewhere).
    """
    ids = check_input_ids(input_ids, base.config.vocab_size)
    delta = resolve_delta(base, delta)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    return forward(base.params, ids, positions, delta, config=base.config, dtype=dtype,
                   kernels=KernelOptions.resolve(implementation))


def check_input_ids(input_ids, vocab_size: int) -> np.ndarray:
    """Token ids as an int32 [B, T] array; a 1-D sequence becomes a batch of one."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise DzjaxError(f"input_ids must be integer token ids of shape [batch, seq] with seq > 0, "
                         f"got shape {ids.shape} and dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise DzjaxError(f"input_ids must lie in [0, {vocab_size}), got values from {ids.min()} "
                         f"to {ids.max()}")
    return ids.astype(np.int32)


def check_delta(params, delta) -> None:
    """A delta pytree must mirror (part of) the params tree: same names, matching shapes.

    Dense leaves have the parameter's shape; compressed ones (`QuantizedTensor`) the kernel's
    [in, out], or [hidden, vocab] for the embedding table.
    """
    if delta is None:
        return
    flat_params = {p: leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    leaves = jax.tree_util.tree_flatten_with_path(
        delta, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0]
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if path not in flat_params:
            raise DzjaxError(f"delta tensor {name} has no base parameter of that name")
        want = flat_params[path].shape
        ok = (tuple(leaf.shape) in (want, want[::-1]) if isinstance(leaf, QuantizedTensor)
              else np.shape(leaf) == want)
        if not ok:
            raise DzjaxError(f"delta tensor {name} has shape {tuple(np.shape(leaf))}, "
                             f"the base parameter {want}")


def resolve_delta(base, delta):
    """The delta pytree to run with: a `Delta` is checked against the base it is used with."""
    if hasattr(delta, "check_base"):  # dzjax.Delta (compress imports models, not the reverse)
        delta.check_base(base)
        delta = delta.params
    check_delta(base.params, delta)
    return delta


def dense_delta(base_params, finetune_params) -> dict:
    """W_finetune - W_base for every parameter, in float32 (a dense delta for `logits`)."""
    return jax.tree.map(lambda b, f: f.astype(jnp.float32) - b.astype(jnp.float32),
                        base_params, finetune_params)
