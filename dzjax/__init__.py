"""dzjax: serve many compressed full-parameter fine-tunes of one base LLM at once, in JAX."""

import jax.numpy as jnp

from dzjax.compress import Delta, DeltaFileError, convert, export_hf, load_delta
from dzjax.errors import CheckpointError, DzjaxError, UnsupportedConfigError
from dzjax.models import Base, dense_delta, generate, load_base
from dzjax.models.forward import check_input_ids, forward, resolve_delta
from dzjax.pallas_kernels.dispatch import requested_implementation
from dzjax.serving import Server, serve

__version__ = "0.1.0"


def logits(base: Base, input_ids, delta=None, dtype=jnp.float32, implementation=None):
    """Logits [B, T, V] float32 of token ids [B, T] (or [T]) under base + delta.

    Args:
      base: a `Base` from `load_base`.
      input_ids: integer token ids, [batch, seq] or [seq].
      delta: None; a compressed `Delta` (from `convert` or `load_delta`; it must have been made
        on this base); or a dense delta, a pytree mirroring (part of) `base.params` holding
        W_finetune - W_base (see `dense_delta`).
      dtype: activation dtype of the forward pass.
      implementation: kernels for a compressed delta: "xla", "pallas", "interpret" or None =
        `DZJAX_KERNEL`, else auto (Pallas on GPU, XLA elsewhere).
    """
    ids = check_input_ids(input_ids, base.config.vocab_size)
    delta = resolve_delta(base, delta)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    return forward(base.params, ids, positions, delta, config=base.config, dtype=dtype,
                   implementation=requested_implementation(implementation))


__all__ = ["Base", "CheckpointError", "Delta", "DeltaFileError", "DzjaxError",
           "Server", "UnsupportedConfigError", "convert", "dense_delta", "export_hf", "generate",
           "load_base", "load_delta", "logits", "serve"]
