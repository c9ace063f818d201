"""The one sampler, shared by `dzjax.generate` and the serving engine.

Row b of a batch draws its n-th token with the key fold_in(key(seeds[b]), n): what a request
samples depends only on its own seed and position, never on what shares its batch, so
`generate` and `serve` give the same tokens for the same prompt, settings and seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _one(logits, seed, counter, temperature, top_p, top_k, min_p, suppress):
    key = jax.random.fold_in(jax.random.key(seed), counter)
    # Tokens this row may not produce now (e.g. end-of-sequence before min_tokens): -inf.
    hit = (jnp.arange(logits.shape[-1])[:, None] == suppress[None, :]).any(axis=1)
    logits = jnp.where(hit, -jnp.inf, logits)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    # As HF and vLLM: keep the top_k likeliest tokens (0: no limit) and those at least min_p
    # times as likely as the likeliest one, then, of those renormalised, the smallest set whose
    # mass reaches top_p (nucleus sampling). Ties with the last kept token are kept.
    ordered = jnp.sort(scaled)[::-1]
    rank = jnp.arange(ordered.shape[0])
    kept = ((top_k <= 0) | (rank < top_k)) & \
        ((min_p <= 0) | (ordered >= ordered[0] + jnp.log(jnp.maximum(min_p, 1e-30))))
    ordered_kept = jnp.where(kept, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered_kept)
    mass_before = jnp.cumsum(probs) - probs
    threshold = jnp.min(jnp.where(kept & (mass_before < top_p), ordered, jnp.inf))
    sampled = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


def sample(logits, seeds, counters, temperature, top_p, top_k=None, min_p=None,
           suppress=None) -> jax.Array:
    """One token per row of logits [B, V]: greedy where temperature == 0, else sampling from
    the nucleus (top_p), at most top_k tokens and those at least min_p times the likeliest's
    probability.

    Args:
      logits: [B, V] float.
      seeds: uint32 [B], each row's seed; counters: int32 [B], tokens the row generated so far.
      temperature, top_p: float32 [B]; top_k: int32 [B] (0 = no limit; default none);
      min_p: float32 [B] (default 0).
      suppress: int32 [B, S], token ids each row may not produce at this step (-1: padding),
        applied to greedy rows too; default none.
    Returns:
      int32 [B].
    """
    b = logits.shape[0]
    top_k = jnp.zeros(b, jnp.int32) if top_k is None else jnp.asarray(top_k, jnp.int32)
    min_p = jnp.zeros(b, jnp.float32) if min_p is None else jnp.asarray(min_p, jnp.float32)
    suppress = jnp.full((b, 1), -1, jnp.int32) if suppress is None \
        else jnp.asarray(suppress, jnp.int32)
    return jax.vmap(_one)(logits, jnp.asarray(seeds, jnp.uint32), jnp.asarray(counters, jnp.int32),
                          jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32),
                          top_k, min_p, suppress)


sample_jit = jax.jit(sample)


def penalize(logits, history, output_start, extra, repetition, frequency, presence, bias_ids,
             bias_values) -> jax.Array:
    """Logits [B, V] with the biases and penalties of each row applied, in vLLM's order
    (before temperature and the sampling filters; greedy rows too):

      logit_bias: a value added to the logit of each listed token (first: the penalties below
        see the biased logits);
      repetition_penalty r: a token seen in the prompt or the output so far has its logit
        divided by r where positive, multiplied by r where negative (1: off);
      frequency_penalty f, presence_penalty p: logit - f * (times the token is in the output)
        - p * (whether it is), output tokens only (0: off).

    Args:
      history: int32 [B, L], each row's context known on the host (prompt, then output; -1:
        padding); output_start: int32 [B], where its output starts in it.
      extra: int32 [B], one more output token per row not in history (its token in flight on
        the device), -1 for none.
      repetition, frequency, presence: float32 [B].
      bias_ids: int32 [B, K] token ids (-1: padding); bias_values: float32 [B, K].
    """
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]
    position = jnp.arange(history.shape[1])[None, :]
    real = history >= 0
    tokens = jnp.where(real, history, 0)
    outputs = (real & (position >= output_start[:, None])).astype(jnp.int32)
    counts = jnp.zeros((b, v), jnp.int32).at[rows, tokens].add(outputs)
    counts = counts.at[jnp.arange(b), jnp.maximum(extra, 0)].add((extra >= 0).astype(jnp.int32))
    seen = jnp.zeros((b, v), bool).at[rows, tokens].max(real) | (counts > 0)
    logits = logits.astype(jnp.float32).at[rows, jnp.maximum(bias_ids, 0)].add(
        jnp.where(bias_ids >= 0, bias_values, 0.0))
    r = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)
