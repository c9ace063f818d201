"""Scoring: the log-probability of every token of a batch under base + delta, where each row may
use a different delta, in one jitted pass (`dzjax.score`). For evaluating fine-tunes from a JAX
pipeline (log-likelihoods, perplexity, multiple choice) without HTTP.

    scores = dzjax.score(base, ids, deltas=[code, prose], rows=[0, 1, -1, 0])
    scores.token_logprobs      # [B, T]: log p(ids[b, t] | ids[b, :t]); NaN at t = 0 and padding
    scores.sum(start=[3, 3, 5, 2])   # summed log-probs of each row's continuation, and is_greedy

The deltas of one call are stacked like the serving engine's slots (`delta_stacks`): they must
share one layout (the same tensors, shapes and formats); `rows[b]` picks row b's delta, -1 the
base alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models import delta_stacks
from dzjax.models.forward import TRACE_COUNTS, check_input_ids, resolve_delta
from dzjax.models.kernel_options import DEFAULT_KERNELS, KernelOptions
from dzjax.models.llama import CausalLM
from dzjax.pallas_kernels import stack_deltas
from dzjax.pallas_kernels.formats import QuantizedTensor

MAX_TOP_LOGPROBS = 20  # alternatives per position at most (OpenAI's limit)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "kernels", "top"))
def score_tokens(params, ids, delta=None, *, config, dtype=jnp.float32,
                 kernels: KernelOptions = DEFAULT_KERNELS, top: int = 0):
    """(logprob [B, T], top ids [B, T, top], top logprobs [B, T, top]) where position t scores
    ids[:, t + 1] given ids[:, :t + 1] (the last position scores token 0: meaningless, for the
    caller to drop or shift). `delta` may be per-row (`delta_stacks.row_deltas`)."""
    TRACE_COUNTS["score"] += 1
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((b, 1), ids.dtype)], axis=1)
    out, _ = CausalLM(config, dtype, kernels=kernels).apply(
        {"params": params}, ids, positions, delta, score=(targets, top))
    return out


@dataclasses.dataclass(frozen=True)
class Scores:
    """What `score` returns (NumPy arrays).

    token_logprobs: float32 [B, T], log p(ids[b, t] | ids[b, :t]); NaN at t = 0 (nothing to
      condition on) and at t >= lengths[b] (padding).
    top_ids, top_logprobs: [B, T, k] the k likeliest tokens at each position and their
      log-probabilities (k = `top_logprobs` asked; 0 by default), aligned with token_logprobs
      (at t: the alternatives to ids[b, t]).
    lengths: int [B].
    """

    token_logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    lengths: np.ndarray
    best_logprobs: np.ndarray  # [B, T] the likeliest token's log-prob at each position

    def sum(self, start) -> tuple[np.ndarray, np.ndarray]:
        """(summed log-probability of tokens start[b]..lengths[b]-1, whether each of those
        tokens was the likeliest one) per row: lm-eval's log-likelihood of a continuation that
        begins at token start[b] (>= 1)."""
        start = np.broadcast_to(np.asarray(start), self.lengths.shape)
        if (start < 1).any() or (start > self.lengths).any():
            raise DzjaxError(f"start must lie in [1, length] for every row; got {start.tolist()} "
                             f"for lengths {self.lengths.tolist()}")
        t = np.arange(self.token_logprobs.shape[1])
        mine = (t >= start[:, None]) & (t < self.lengths[:, None])
        total = np.where(mine, self.token_logprobs, 0.0).sum(axis=1)
        greedy = np.where(mine, self.best_logprobs <= self.token_logprobs + 1e-6,
                          True).all(axis=1)
        return total, greedy


def score(base, input_ids, *, deltas=None, rows=None, lengths=None, top_logprobs: int = 0,
          dtype=jnp.float32, implementation: str | None = None) -> Scores:
    """Log-probabilities of every token of a batch, each row under its own delta, in one pass.

    Args:
      base: a `Base` from `load_base`.
      input_ids: token ids [B, T] (right-padded; see `lengths`), [T], or a list of token-id
        lists of any lengths (padded here).
      deltas: None (base only), one delta for every row, or a list of deltas (`dzjax.Delta`, or
        dense delta pytrees) that share one layout.
      rows: with a list of deltas, int [B]: row b's index into it, -1 for the base alone.
      lengths: int [B], each row's tokens (default: all T, or each list's length).
      top_logprobs: also return the k likeliest tokens at each position (0..20).
      dtype, implementation: as in `dzjax.logits`.
    Returns:
      `Scores`: per-token log-probabilities (and alternatives), matching
      `log_softmax(dzjax.logits(base, ids, delta_of_row))` to float error.
    """
    if isinstance(input_ids, (list, tuple)) and input_ids and \
            isinstance(input_ids[0], (list, tuple, np.ndarray)):
        given = [len(r) for r in input_ids]
        padded = np.zeros((len(input_ids), max(given)), np.int64)
        for i, r in enumerate(input_ids):
            padded[i, :len(r)] = r
        input_ids, lengths = padded, given if lengths is None else lengths
    ids = check_input_ids(input_ids, base.config.vocab_size)
    b, t = ids.shape
    lengths = np.full(b, t) if lengths is None else np.asarray(lengths)
    if lengths.shape != (b,) or (lengths < 1).any() or (lengths > t).any():
        raise DzjaxError(f"lengths must be {b} integers in [1, {t}], got {lengths.tolist()}")
    if not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise DzjaxError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got "
                         f"{top_logprobs!r}")
    delta = _row_deltas(base, deltas, rows, b)
    lp, top_ids, top_lp = score_tokens(  # at least the likeliest token, for Scores.sum's greedy
        base.params, jnp.asarray(ids), delta, config=base.config, dtype=jnp.dtype(dtype),
        kernels=KernelOptions.resolve(implementation), top=max(top_logprobs, 1))
    # Position t scored token t + 1: shift right so that column t is token t's own.
    shift = lambda a, fill: np.concatenate([np.full_like(a[:, :1], fill), a[:, :-1]], axis=1)
    lp = shift(np.asarray(lp), np.nan)
    lp[np.arange(t)[None, :] >= lengths[:, None]] = np.nan
    best = shift(np.asarray(top_lp[..., 0]), np.nan)
    return Scores(lp, shift(np.asarray(top_ids), 0)[..., :top_logprobs],
                  shift(np.asarray(top_lp), np.nan)[..., :top_logprobs], lengths, best)


def _row_deltas(base, deltas, rows, batch: int):
    """The delta argument of `score_tokens`: None, one delta for all rows, or per-row stacks."""
    if deltas is None or not isinstance(deltas, Sequence):
        if rows is not None:
            raise DzjaxError("rows picks among a list of deltas; pass deltas=[...] with it")
        return resolve_delta(base, deltas)
    if not deltas:
        raise DzjaxError("deltas is an empty list")
    if rows is None:
        raise DzjaxError(f"with a list of {len(deltas)} deltas, rows must say which one each of "
                         f"the {batch} rows uses (-1: the base alone)")
    rows = np.asarray(rows)
    if rows.shape != (batch,) or (rows < -1).any() or (rows >= len(deltas)).any():
        raise DzjaxError(f"rows must be {batch} integers in [-1, {len(deltas)}), got "
                         f"{rows.tolist()}")
    params = [resolve_delta(base, d) for d in deltas]
    if any(p is None for p in params):
        raise DzjaxError("a delta in the list is None; use rows = -1 for the base alone")
    first = delta_stacks.layout(params[0])
    for i, p in enumerate(params[1:], 1):
        if delta_stacks.layout(p) != first:
            raise DzjaxError(f"deltas[{i}] does not share deltas[0]'s layout: "
                             f"{delta_stacks.describe_difference(first, delta_stacks.layout(p))}")
    def stack(*leaves):
        if isinstance(leaves[0], QuantizedTensor):
            return stack_deltas(list(leaves))
        return jnp.stack([jnp.asarray(x) for x in leaves])
    stacks = jax.tree.map(stack, *params, is_leaf=delta_stacks.is_leaf)
    return delta_stacks.row_deltas(stacks, jnp.asarray(rows, jnp.int32))
