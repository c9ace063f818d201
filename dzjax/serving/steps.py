"""The two jitted functions of the serving engine: prefill new rows, and decode every slot.

The engine keeps B batch slots. Each slot has a row of the KV cache [layers, B, max_len, ...] and
a delta slot (an index into the pool's stacks, -1 = base only). A step takes the base params, the
pool's stacks (a pytree mirroring the delta files, every leaf with a leading [S] axis) and the rows'
slots as ordinary jit arguments, so requests joining and leaving, and deltas being loaded into or
evicted from the pool, never change a shape: decode compiles once, prefill once per
(new rows, prompt length) bucket (and once more when the first delta is added to a server that
started with none: the stacks appear). `TRACE_COUNTS` (shared with `dzjax.models.forward`)
counts traces.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dzjax.models.config import ModelConfig
from dzjax.models.forward import TRACE_COUNTS
from dzjax.models import sharding
from dzjax.models.linear import RowDelta, kernel_implementation, tensor_parallel
from dzjax.models.llama import CausalLM, KVCache
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.multi_delta import make_delta_batch


_HEAD = ("lm_head", "embed_tokens")  # the output projection (tied: the embedding table)


def row_deltas(stacks, slots: jax.Array, seq_len: int):
    """The delta pytree for a [B, seq_len] call with logits at one position per row: every leaf
    a `RowDelta` over `stacks`, grouping the B * seq_len rows of the layers, and the B rows of
    the output projection.

    Args:
      stacks: None (base only) or the pool's pytree of [S]-slot stacks.
      slots: int32 [B], each batch row's delta slot; -1 = base only.
    """
    if stacks is None:
        return None
    is_leaf = lambda x: isinstance(x, QuantizedTensor)
    first = jax.tree.leaves(stacks, is_leaf=is_leaf)[0]
    num_slots = (first.qweight if isinstance(first, QuantizedTensor) else first).shape[0]
    layers = make_delta_batch(jnp.repeat(slots, seq_len), num_slots)
    head = make_delta_batch(slots, num_slots)  # the lookup of the embedding uses `slots` only

    def leaf(path, stack):
        names = {getattr(k, "key", None) for k in path}
        return RowDelta(stack, slots, head if names & set(_HEAD) else layers)
    return jax.tree_util.tree_map_with_path(leaf, stacks, is_leaf=is_leaf)


def sample_rows(logits, seeds, counters, temperature, top_p):
    """One token per row of logits [B, V]: greedy where temperature == 0, else nucleus sampling
    with the row's own key fold_in(key(seed), counter), so that a request samples the same tokens
    whatever else shares its batch. All other arguments are [B]."""

    def one(row, seed, counter, temp, p):
        key = jax.random.fold_in(jax.random.key(seed), counter)
        scaled = row / jnp.maximum(temp, 1e-6)
        ordered = jnp.sort(scaled)[::-1]
        probs = jax.nn.softmax(ordered)
        mass_before = jnp.cumsum(probs) - probs
        threshold = jnp.min(jnp.where(mass_before < p, ordered, jnp.inf))
        sampled = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf))
        return jnp.where(temp > 0, sampled, jnp.argmax(row)).astype(jnp.int32)

    return jax.vmap(one)(logits, seeds, counters, temperature, top_p)


_STATIC = ("config", "dtype", "implementation", "mesh")


def _placed(cache: KVCache, mesh) -> KVCache:
    """The cache kept split by kv heads on a tensor-parallel mesh (so that the next step sees
    the same input sharding and does not recompile)."""
    if mesh is None:
        return cache
    where = jax.sharding.NamedSharding(mesh, sharding.cache_spec())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, where), cache)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def prefill(params, stacks, cache: KVCache, ids, lengths, rows, slots, sampling, *,
            config: ModelConfig, dtype, implementation: str | None, mesh=None):
    """Run new prompts and write their keys/values into their cache rows.

    Args:
      ids: int32 [n, T] right-padded prompts (T <= cache.max_len); lengths: int32 [n].
      rows: int32 [n], each prompt's cache row; B (out of range) for padding rows, dropped.
      slots: int32 [n] delta slots (-1 = base only).
      sampling: (seeds, counters, temperature, top_p), each [n].
      mesh: the tensor-parallel mesh the params, stacks and cache are placed on, or None.
    Returns:
      (first generated token [n], cache).
    """
    TRACE_COUNTS["serve_prefill"] += 1
    n, t = ids.shape
    small = KVCache.zeros(config, n, t, cache.k.dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    with kernel_implementation(implementation), tensor_parallel(mesh):
        logits, small = CausalLM(config, dtype).apply(
            {"params": params}, ids, positions, row_deltas(stacks, slots, t), small,
            logits_at=lengths - 1)
    tokens = sample_rows(logits[:, 0], *sampling)
    # Positions >= length hold padding; decode overwrites each before any query can see it.
    cache = KVCache(cache.k.at[:, rows, :t].set(small.k, mode="drop"),
                    cache.v.at[:, rows, :t].set(small.v, mode="drop"))
    return tokens, _placed(cache, mesh)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def decode(params, stacks, cache: KVCache, tokens, positions, slots, sampling, *,
           config: ModelConfig, dtype, implementation: str | None, mesh=None):
    """One token for every batch slot.

    Args:
      tokens: int32 [B] each slot's last token; positions: int32 [B] where it goes (an idle slot
        passes cache.max_len: its write is dropped and its output ignored).
      slots: int32 [B] delta slots; sampling: (seeds, counters, temperature, top_p), each [B].
    Returns:
      (next token [B], cache).
    """
    TRACE_COUNTS["serve_decode"] += 1
    with kernel_implementation(implementation), tensor_parallel(mesh):
        logits, cache = CausalLM(config, dtype).apply(
            {"params": params}, tokens[:, None], positions[:, None],
            row_deltas(stacks, slots, 1), cache)
    return sample_rows(logits[:, 0], *sampling), _placed(cache, mesh)


@functools.partial(jax.jit, donate_argnames=("stacks",))
def write_slot(stacks, slot, params):
    """The pool's stacks with one delta's tensors written into `slot` (traced: one compile)."""
    return jax.tree.map(lambda s, d: s.at[slot].set(d.astype(s.dtype)), stacks, params)


def zeros_like_placed(tree):
    """Zeros of every array's shape, dtype and placement (also for deleted arrays: after a failed
    step consumed donated buffers)."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), tree)
