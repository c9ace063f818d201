"""The two jitted functions of the serving engine: prefill new rows, and decode every slot.

The engine keeps B batch slots. Each slot has a row of the KV cache [layers, B, max_len, ...] and
a delta slot (an index into the pool's stacks, -1 = base only). A step takes the base params, the
pool's stacks (`dzjax.models.delta_stacks`) and the rows' slots as ordinary jit arguments, so
requests joining and leaving, and deltas being loaded into or evicted from the pool, never change
a shape: decode compiles once, prefill once per (new rows, prompt length) bucket (and once more
when the first delta is added to a server that started with none: the stacks appear).
`TRACE_COUNTS` (shared with `dzjax.models.forward`) counts traces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dzjax.models import sharding
from dzjax.models.config import ModelConfig
from dzjax.models.delta_stacks import row_deltas
from dzjax.models.forward import TRACE_COUNTS
from dzjax.models.kernel_options import KernelOptions
from dzjax.models.llama import CausalLM, KVCache
from dzjax.models.sampling import sample

_STATIC = ("config", "dtype", "kernels")


def _placed(cache: KVCache, mesh) -> KVCache:
    """The cache kept split by kv heads on a tensor-parallel mesh (so that the next step sees
    the same input sharding and does not recompile)."""
    if mesh is None:
        return cache
    where = jax.sharding.NamedSharding(mesh, sharding.cache_spec())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, where), cache)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def prefill(params, stacks, cache: KVCache, ids, lengths, rows, slots, sampling, *,
            config: ModelConfig, dtype, kernels: KernelOptions):
    """Run new prompts and write their keys/values into their cache rows.

    Args:
      ids: int32 [n, T] right-padded prompts (T <= cache.max_len); lengths: int32 [n].
      rows: int32 [n], each prompt's cache row; B (out of range) for padding rows, dropped.
      slots: int32 [n] delta slots (-1 = base only).
      sampling: (seeds, counters, temperature, top_p), each [n] (see `dzjax.models.sample`).
      kernels: the delta kernels and the tensor-parallel mesh everything is placed on.
    Returns:
      (first generated token [n], cache).
    """
    TRACE_COUNTS["serve_prefill"] += 1
    n, t = ids.shape
    small = KVCache.zeros(config, n, t, cache.k.dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    logits, small = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, ids, positions, row_deltas(stacks, slots), small,
        logits_at=lengths - 1)
    tokens = sample(logits[:, 0], *sampling)
    # Positions >= length hold padding; decode overwrites each before any query can see it.
    cache = KVCache(cache.k.at[:, rows, :t].set(small.k, mode="drop"),
                    cache.v.at[:, rows, :t].set(small.v, mode="drop"))
    return tokens, _placed(cache, kernels.mesh)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def decode(params, stacks, cache: KVCache, tokens, positions, slots, sampling, *,
           config: ModelConfig, dtype, kernels: KernelOptions):
    """One token for every batch slot.

    Args:
      tokens: int32 [B] each slot's last token; positions: int32 [B] where it goes (an idle slot
        passes cache.max_len: its write is dropped and its output ignored).
      slots: int32 [B] delta slots; sampling: (seeds, counters, temperature, top_p), each [B].
    Returns:
      (next token [B], cache).
    """
    TRACE_COUNTS["serve_decode"] += 1
    logits, cache = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, tokens[:, None], positions[:, None], row_deltas(stacks, slots), cache)
    return sample(logits[:, 0], *sampling), _placed(cache, kernels.mesh)
