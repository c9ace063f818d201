"""The one sampler, shared by `dzjax.generate` and the serving engine.

Row b of a batch draws its n-th token with the key fold_in(key(seeds[b]), n): what a request
samples depends only on its own seed and position, never on what shares its batch, so
`generate` and `serve` give the same tokens for the same prompt, settings and seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _one(logits, seed, counter, temperature, top_p):
    key = jax.random.fold_in(jax.random.key(seed), counter)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    # Keep the smallest set of most likely tokens whose mass reaches top_p (nucleus sampling).
    ordered = jnp.sort(scaled)[::-1]
    probs = jax.nn.softmax(ordered)
    mass_before = jnp.cumsum(probs) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf))
    sampled = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


def sample(logits, seeds, counters, temperature, top_p) -> jax.Array:
    """One token per row of logits [B, V]: greedy where temperature == 0, else nucleus sampling.

    Args:
      logits: [B, V] float.
      seeds: uint32 [B], each row's seed; counters: int32 [B], tokens the row generated so far.
      temperature, top_p: float32 [B].
    Returns:
      int32 [B].
    """
    return jax.vmap(_one)(logits, jnp.asarray(seeds, jnp.uint32), jnp.asarray(counters, jnp.int32),
                          jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32))


sample_jit = jax.jit(sample)
