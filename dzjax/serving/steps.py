"""The two jitted functions of the serving engine: prefill new rows, and decode every row.

The engine keeps B batch rows over one pool of KV pages (`dzjax.models.kv_cache.KVPages`): each
running request owns pages, listed in its row of the block tables [B, max_pages] (unused entries
hold P, out of range, so writes there are dropped). A step takes the base params, the pool's
delta stacks (`dzjax.models.delta_stacks`), the pages (donated: updated in place), the block
tables and the rows' delta slots as ordinary jit arguments, so requests joining and leaving and
deltas being loaded or evicted never change a shape. Prefill compiles once per (new rows, prompt
length) bucket; decode once per bucket of pages read (`num_pages`, a power of two: the longest
live row's pages, rounded up; the block tables are padded to a power of two), so its cost follows
the tokens in the cache, not its capacity.
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
from dzjax.models.kv_cache import KVCache, KVPages, PagedKVCache
from dzjax.models.llama import CausalLM
from dzjax.models.sampling import sample

_STATIC = ("config", "dtype", "kernels")


def _placed(pages: KVPages, mesh) -> KVPages:
    """The pages kept split by kv heads on a tensor-parallel mesh (so that the next step sees
    the same input sharding and does not recompile)."""
    if mesh is None:
        return pages
    where = jax.sharding.NamedSharding(mesh, sharding.pages_spec())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, where), pages)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("pages",))
def prefill(params, stacks, pages: KVPages, ids, lengths, tables, slots, sampling, *,
            config: ModelConfig, dtype, kernels: KernelOptions):
    """Run new prompts and write their keys/values into their pages.

    Args:
      ids: int32 [n, T] right-padded prompts; lengths: int32 [n].
      tables: int32 [n, max_pages], each prompt's block table (padding rows: all out of range).
      slots: int32 [n] delta slots (-1 = base only).
      sampling: (seeds, counters, temperature, top_p), each [n] (see `dzjax.models.sample`).
      kernels: the delta kernels and the tensor-parallel mesh everything is placed on.
    Returns:
      (first generated token [n], pages).
    """
    TRACE_COUNTS["serve_prefill"] += 1
    n, t = ids.shape
    small = KVCache.zeros(config, n, t, pages.k[0].dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    logits, small = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, ids, positions, row_deltas(stacks, slots), small,
        logits_at=lengths - 1)
    tokens = sample(logits[:, 0], *sampling)
    return tokens, _placed(pages.write_prompts(small, tables, lengths), kernels.mesh)


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_pages",),
                   donate_argnames=("pages",))
def decode(params, stacks, pages: KVPages, tables, tokens, positions, slots, sampling, *,
           config: ModelConfig, dtype, kernels: KernelOptions, num_pages: int):
    """One token for every batch row.

    Args:
      tables: int32 [B, max_pages] block tables (idle rows: all out of range).
      tokens: int32 [B] each row's last token; positions: int32 [B] where it goes.
      slots: int32 [B] delta slots; sampling: (seeds, counters, temperature, top_p), each [B].
      num_pages: how many pages of each row attention reads (>= the longest live row's).
    Returns:
      (next token [B], pages).
    """
    TRACE_COUNTS["serve_decode"] += 1
    logits, cache = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, tokens[:, None], positions[:, None], row_deltas(stacks, slots),
        PagedKVCache(pages, tables, num_pages))
    return sample(logits[:, 0], *sampling), _placed(cache.pages, kernels.mesh)
