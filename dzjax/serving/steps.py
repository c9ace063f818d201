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
from dzjax.models.llama import CausalLM, log_probs
from dzjax.models.sampling import penalize, sample
from dzjax.models.scoring import MAX_TOP_LOGPROBS

_STATIC = ("config", "dtype", "kernels")


def _placed(pages: KVPages, mesh) -> KVPages:
    """The pages kept split by kv heads on a tensor-parallel mesh (so that the next step sees
    the same input sharding and does not recompile)."""
    if mesh is None:
        return pages
    where = jax.sharding.NamedSharding(mesh, sharding.pages_spec())
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, where), pages)


@functools.partial(jax.jit, static_argnames=_STATIC + ("logprobs", "prompt_top"),
                   donate_argnames=("pages",))
def prefill(params, stacks, pages: KVPages, ids, lengths, tables, slots, sampling,
            penalties=None, *, config: ModelConfig, dtype, kernels: KernelOptions,
            logprobs: bool = False, prompt_top: int | None = None):
    """Run new prompts and write their keys/values into their pages.

    Args:
      ids: int32 [n, T] right-padded prompts; lengths: int32 [n].
      tables: int32 [n, max_pages], each prompt's block table (padding rows: all out of range).
      slots: int32 [n] delta slots (-1 = base only).
      sampling: the arguments of `dzjax.models.sample` after the logits, each with [n] rows.
      penalties: None, or `_penalized`'s arrays (a separate compiled variant: only batches with
        a row that asks for penalties or logit_bias pay for them).
      kernels: the delta kernels and the tensor-parallel mesh everything is placed on.
      logprobs: also return each first token's `log_probs` (with MAX_TOP_LOGPROBS alternatives).
      prompt_top: also score every prompt position, with this many alternatives (None: no).
    Returns:
      (first generated token [n], pages); with logprobs or prompt_top, (tokens, extras, pages):
      extras["token"] = (logprob [n], top ids [n, K], top logprobs [n, K]), and
      extras["prompt"] = position t's log-prob of ids[:, t + 1], [n, T] (and [n, T, prompt_top]).
    """
    TRACE_COUNTS["serve_prefill"] += 1
    n, t = ids.shape
    small = KVCache.zeros(config, n, t, pages.k[0].dtype)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    score = None
    if prompt_top is not None:
        score = (jnp.concatenate([ids[:, 1:], jnp.zeros((n, 1), ids.dtype)], axis=1), prompt_top)
    out, small = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, ids, positions, row_deltas(stacks, slots), small,
        logits_at=lengths - 1, score=score)
    scored, logits = (None, out) if score is None else out
    tokens = sample(_penalized(logits[:, 0], penalties, None), *sampling)
    pages = _placed(pages.write_prompts(small, tables, lengths), kernels.mesh)
    if not logprobs and scored is None:
        return tokens, pages
    extras = {}
    if logprobs:
        extras["token"] = log_probs(logits[:, 0], tokens, MAX_TOP_LOGPROBS)
    if scored is not None:
        extras["prompt"] = scored
    return tokens, extras, pages


@functools.partial(jax.jit, static_argnames=_STATIC + ("num_pages", "logprobs"),
                   donate_argnames=("pages",))
def decode(params, stacks, pages: KVPages, tables, tokens, positions, slots, sampling,
           penalties=None, *, config: ModelConfig, dtype, kernels: KernelOptions,
           num_pages: int, logprobs: bool = False):
    """One token for every batch row.

    Args:
      tables: int32 [B, max_pages] block tables (idle rows: all out of range).
      tokens: int32 [B] each row's last token; positions: int32 [B] where it goes.
      slots: int32 [B] delta slots; sampling: `dzjax.models.sample`'s arguments, [B] rows.
      penalties: as prefill's; a row whose input token is in flight counts it as output.
      num_pages: how many pages of each row attention reads (>= the longest live row's).
      logprobs: also return the tokens' `log_probs` (with MAX_TOP_LOGPROBS alternatives).
    Returns:
      (next token [B], pages); with logprobs ((next token, logprob [B], top ids [B, K],
      top logprobs [B, K]), pages).
    """
    TRACE_COUNTS["serve_decode"] += 1
    logits, cache = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, tokens[:, None], positions[:, None], row_deltas(stacks, slots),
        PagedKVCache(pages, tables, num_pages))
    tokens = sample(_penalized(logits[:, 0], penalties, tokens), *sampling)
    pages = _placed(cache.pages, kernels.mesh)
    if logprobs:
        return (tokens, *log_probs(logits[:, 0], tokens, MAX_TOP_LOGPROBS)), pages
    return tokens, pages


def _penalized(logits, penalties, inputs):
    """logits [n, V] with the rows' penalties and logit biases (`dzjax.models.sampling.penalize`).
    penalties: None, or (history [n, L], output_start [n], in_flight bool [n], repetition,
    frequency, presence [n], bias_ids [n, K], bias_values [n, K]); a row in flight has its
    input token (of `inputs`, still on the device) as one more output token."""
    if penalties is None:
        return logits
    history, output_start, in_flight, *rest = penalties
    extra = jnp.full(in_flight.shape, -1, jnp.int32) if inputs is None \
        else jnp.where(in_flight, inputs, -1)
    return penalize(logits, history, output_start, extra, *rest)
