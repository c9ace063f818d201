"""Small reference generation loop: prefill the prompts, then decode one token per jitted step.

This is the single-model path that the demo and the tests use; the serving engine batches many
requests and deltas, and is checked against this.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models import sharding
from dzjax.models.forward import check_input_ids, forward_cached, resolve_delta
from dzjax.models.llama import KVCache
from dzjax.pallas_kernels.dispatch import requested_implementation
from dzjax.models.loading import Base


@jax.jit
def sample_tokens(logits, key, temperature, top_p):
    """One token per row from logits [B, V]: greedy where temperature == 0, else nucleus sampling.

    temperature and top_p are [B] (per row) or scalars.
    """
    b = logits.shape[0]
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (b,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (b,))
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    # Keep the smallest set of most likely tokens whose mass reaches top_p.
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    threshold = jnp.min(jnp.where(mass_before < top_p[:, None], ordered, jnp.inf), -1, keepdims=True)
    sampled = jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, -1)).astype(jnp.int32)


def bucket(n: int, smallest: int = 1, largest: int | None = None) -> int:
    """Next power of two >= n, at least `smallest`, at most `largest`: batches, prompts and caches
    of nearby sizes share one compiled program (here and in the serving engine)."""
    b = max(smallest, 1 << (max(n, 1) - 1).bit_length())
    return b if largest is None else min(largest, b)


def eos_ids(base: Base) -> set[int]:
    ids = set(base.config.eos_token_ids)
    if base.tokenizer is not None and base.tokenizer.eos_token_id is not None:
        ids.add(base.tokenizer.eos_token_id)
    return ids


def _encode(base: Base, prompts) -> tuple[list[list[int]], bool]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if all(isinstance(p, str) for p in prompts):
        if base.tokenizer is None:
            raise DzjaxError(f"{base.path}: the base has no tokenizer; pass token ids instead of text")
        return [list(base.tokenizer(p)["input_ids"]) for p in prompts], True
    ids = [[int(t) for t in np.asarray(p).reshape(-1)] for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise DzjaxError(f"prompt {i} is empty")
        check_input_ids(p, base.config.vocab_size)
    return ids, False


def generate(base: Base, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             delta=None, dtype=jnp.float32, stop_at_eos: bool = True,
             implementation: str | None = None, mesh=None):
    """Generate continuations of prompts (texts or token id lists), greedy by default.

    Args:
      base: the loaded base model.
      prompts: one text, a list of texts (needs the base's tokenizer) or a list of token-id lists.
      max_tokens: tokens generated per prompt at most.
      temperature, top_p: sampling; temperature 0 is greedy.
      seed: random seed for sampling.
      delta: None, a `dzjax.Delta` or a dense delta pytree (see `dzjax.logits`).
      dtype: activation dtype.
      stop_at_eos: stop a row at its first end-of-sequence token (which is not returned).
      implementation: kernels for a compressed delta: "xla", "pallas", "interpret" or None =
        `DZJAX_KERNEL`, else auto (Pallas on GPU, XLA elsewhere).
      mesh: a tensor-parallel mesh (`dzjax.models.sharding`): the params, delta and cache are
        split over it. Its devices may belong to several processes (`jax.distributed`): then
        every process calls `generate` with the same arguments, and each gets the result.
    Returns:
      A list of generated texts for text prompts, else a list of generated token-id lists.
    """
    if max_tokens < 1:
        raise DzjaxError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise DzjaxError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    delta = resolve_delta(base, delta)
    token_lists, as_text = _encode(base, prompts)
    lengths = np.array([len(p) for p in token_lists])
    limit = base.config.max_position_embeddings
    if lengths.max() + max_tokens > limit:
        raise DzjaxError(f"prompt of {lengths.max()} tokens + max_tokens={max_tokens} exceeds the "
                         f"model's context of {limit} positions")
    batch = len(token_lists)
    padded = np.zeros((batch, bucket(int(lengths.max()), 16)), np.int32)
    for i, p in enumerate(token_lists):
        padded[i, :len(p)] = p
    cache = KVCache.zeros(base.config, batch, bucket(int(lengths.max()) + max_tokens, 16),
                          dtype)
    params = base.params
    if mesh is not None:
        params, delta, cache = sharding.place(mesh, base.config, params, delta, cache)
    step = functools.partial(forward_cached, params, delta=delta, config=base.config,
                             dtype=dtype, implementation=requested_implementation(implementation))
    positions = np.broadcast_to(np.arange(padded.shape[1], dtype=np.int32), padded.shape)
    logits, cache = step(padded, positions, cache)
    logits = logits[jnp.arange(batch), lengths - 1]  # each prompt's last real position
    key = jax.random.key(seed)
    stop = eos_ids(base) if stop_at_eos else set()
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    for i in range(max_tokens):
        key, sub = jax.random.split(key)
        tokens = sharding.to_host(sample_tokens(logits, sub, temperature, top_p))
        for row, token in enumerate(tokens):
            if not done[row]:
                done[row] = int(token) in stop
                if not done[row]:
                    out[row].append(int(token))
        if done.all() or i == max_tokens - 1:
            break
        logits, cache = step(tokens[:, None], (lengths + i)[:, None].astype(np.int32), cache)
        logits = logits[:, 0]
    if as_text:
        return [base.tokenizer.decode(o, skip_special_tokens=True) for o in out]
    return out
