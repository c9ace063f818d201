"""Small reference generation loop: prefill the prompts, then decode one token per jitted step.

This is the single-model path that the demo and the tests use; the serving engine batches many
requests and deltas, and is checked against this. Both use the same prompt encoder, end-of-sequence
set and sampler (prompt i with seed + i), so they give the same tokens for the same seed.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models import kv_heads, sharding
from dzjax.models.forward import default_dtype, forward_cached, resolve_delta
from dzjax.models.kernel_options import KernelOptions
from dzjax.models.llama import KVCache
from dzjax.models.loading import Base
from dzjax.models.sampling import sample_jit
from dzjax.models.text import encode_prompt, eos_ids


def bucket(n: int, smallest: int = 1, largest: int | None = None) -> int:
    """Next power of two >= n, at least `smallest`, at most `largest`: batches, prompts and caches
    of nearby sizes share one compiled program (here and in the serving engine)."""
    b = max(smallest, 1 << (max(n, 1) - 1).bit_length())
    return b if largest is None else min(largest, b)


def generate(base: Base, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             delta=None, dtype=None, stop_at_eos: bool = True,
             implementation: str | None = None, mesh=None):
    """Generate continuations of prompts (texts or token id lists), greedy by default.

    Args:
      base: the loaded base model.
      prompts: one text, one token-id list, a list of texts (needs the base's tokenizer) or a
        list of token-id lists.
      max_tokens: tokens generated per prompt at most.
      temperature, top_p: sampling; temperature 0 is greedy.
      seed: prompt i samples with seed + i (as `Server.generate`: the same tokens).
      delta: None, a `dzjax.Delta` or a dense delta pytree (see `dzjax.logits`).
      dtype: activations and KV cache; None: bfloat16 on a GPU, float32 elsewhere.
      stop_at_eos: stop a row at its first end-of-sequence token (which is not returned).
      implementation: kernels for a compressed delta: "xla", "pallas", "interpret" or None =
        `DZJAX_KERNEL`, else auto (Pallas on GPU, XLA elsewhere).
      mesh: a tensor-parallel mesh (one axis, from `jax.make_mesh` or
        `dzjax.models.sharding.make_mesh`; see `sharding.as_tp_mesh`): the params, delta and
        cache are split over it. Its devices may belong to several processes (`jax.distributed`): then
        every process calls `generate` with the same arguments, and each gets the result.
    Returns:
      A list of generated texts for text prompts, else a list of generated token-id lists.
    """
    dtype = jnp.dtype(dtype or default_dtype())
    if max_tokens < 1:
        raise DzjaxError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise DzjaxError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        prompts = [prompts]  # one prompt (a text, or one list of token ids)
    if not 0 <= seed <= 2**32 - len(prompts):
        raise DzjaxError(f"seed must be in [0, 2**32 - number of prompts], got {seed}")
    delta = resolve_delta(base, delta)
    as_text = all(isinstance(p, str) for p in prompts)
    token_lists = [encode_prompt(base, p, f"prompt {i}") for i, p in enumerate(prompts)]
    lengths = np.array([len(p) for p in token_lists])
    limit = base.config.max_position_embeddings
    if lengths.max() + max_tokens > limit:
        raise DzjaxError(f"prompt of {lengths.max()} tokens + max_tokens={max_tokens} exceeds the "
                         f"model's context of {limit} positions")
    batch = len(token_lists)
    padded = np.zeros((batch, bucket(int(lengths.max()), 16)), np.int32)
    for i, p in enumerate(token_lists):
        padded[i, :len(p)] = p
    params, config = base.params, base.config
    if mesh is not None:  # (more devices than KV heads: each KV head replicated, `kv_heads`)
        mesh = sharding.as_tp_mesh(mesh)
        r = kv_heads.replicas(config, sharding.tp_size(mesh))
        params, delta = (kv_heads.replicate(t, config, r) for t in (params, delta))
        config = kv_heads.replicated_config(config, r)
    cache = KVCache.zeros(config, batch, bucket(int(lengths.max()) + max_tokens, 16), dtype)
    if mesh is not None:
        params, delta, cache = sharding.place(mesh, config, params, delta, cache)
    step = functools.partial(forward_cached, params, delta=delta, config=config,
                             dtype=dtype, kernels=KernelOptions.resolve(implementation, mesh))
    positions = np.broadcast_to(np.arange(padded.shape[1], dtype=np.int32), padded.shape)
    logits, cache = step(padded, positions, cache)
    logits = logits[jnp.arange(batch), lengths - 1]  # each prompt's last real position
    seeds = np.arange(batch, dtype=np.uint32) + np.uint32(seed)
    temperatures = np.full(batch, temperature, np.float32)
    top_ps = np.full(batch, top_p, np.float32)
    stop = eos_ids(base.config, base.tokenizer) if stop_at_eos else frozenset()
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    for i in range(max_tokens):
        counters = np.full(batch, i, np.int32)
        tokens = sharding.to_host(sample_jit(logits, seeds, counters, temperatures, top_ps))
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
