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
