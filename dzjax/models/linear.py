"""The one place where the model touches its weights: base weight plus an optional delta.

The forward pass reaches every projection through `linear`, the embedding table through `embed`
and every small tensor (norm weights, biases) through `add_delta`, so that supporting a new kind of
delta (dense today, compressed and multi-delta later) never touches the model definition.

A delta for one weight is `None` (base only), a dense array of the weight's shape holding
`W_finetune - W_base`, or a compressed `QuantizedTensor` of the weight in kernel layout [in, out]
(the embedding table's as [hidden, vocab]).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from dzjax.pallas_kernels import delta_matmul
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.reference import dequantize_columns

# The kernel implementation for compressed deltas ("xla", "pallas", "interpret", "auto"), set by
# the jitted entry points around tracing; they take it as a static argument, so that a change of
# implementation compiles anew instead of reusing a program traced with another.
_IMPLEMENTATION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dzjax_kernel_implementation", default=None)


@contextlib.contextmanager
def kernel_implementation(implementation: str | None):
    """Within this context, `linear` computes compressed deltas with `implementation`."""
    token = _IMPLEMENTATION.set(implementation)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def _check_dense(w: jax.Array, delta, what: str) -> None:
    if delta.shape != w.shape:
        raise ValueError(f"{what}: delta shape {delta.shape} does not match weight shape {w.shape}")


def linear(x: jax.Array, kernel: jax.Array, delta=None, bias=None, bias_delta=None) -> jax.Array:
    """y = x @ (kernel + delta) + (bias + bias_delta), in x's dtype with float32 accumulation.

    Args:
      x: [..., K] activations.
      kernel: [K, N] base weight (any float dtype; cast to x's dtype for the matmul).
      delta: None or a dense [K, N] delta.
      bias, bias_delta: optional [N] base bias and its delta.
    Returns:
      [..., N] in x.dtype.
    """
    y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if isinstance(delta, QuantizedTensor):
        _check_dense(kernel, delta, "linear")
        y = y + delta_matmul(x, delta, implementation=_IMPLEMENTATION.get())
    elif delta is not None:
        _check_dense(kernel, delta, "linear")
        y = y + jnp.dot(x, delta.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + add_delta(bias, bias_delta).astype(jnp.float32)
    return y.astype(x.dtype)


def embed(ids: jax.Array, table: jax.Array, delta=None) -> jax.Array:
    """Rows of (table + delta) for token ids [...] -> [..., D], in the table's dtype."""
    rows = jnp.take(table, ids, axis=0)
    if isinstance(delta, QuantizedTensor):  # stored as [hidden, vocab]: gather columns
        _check_dense(table.T, delta, "embed")
        delta_rows = dequantize_columns(delta, ids.reshape(-1)).T.reshape(rows.shape)
        rows = (rows.astype(jnp.float32) + delta_rows).astype(table.dtype)
    elif delta is not None:
        _check_dense(table, delta, "embed")
        delta_rows = jnp.take(delta, ids, axis=0)
        rows = (rows.astype(jnp.float32) + delta_rows.astype(jnp.float32)).astype(table.dtype)
    return rows


def unembed(h: jax.Array, table: jax.Array, delta=None) -> jax.Array:
    """Tied output projection h @ (table + delta)^T -> [..., vocab] in h's dtype."""
    if delta is not None and not isinstance(delta, QuantizedTensor):
        delta = delta.T  # dense deltas mirror the table [vocab, hidden]; compressed ones are stored
    return linear(h, table.T, delta)  # transposed already


def add_delta(w: jax.Array, delta=None) -> jax.Array:
    """A small tensor (norm weight, bias) of the fine-tune: stored exactly, so simply w + delta."""
    if delta is None:
        return w
    _check_dense(w, delta, "add_delta")
    # In float32, so that a bf16 base plus an exact delta gives back the bf16 fine-tune exactly.
    return (w.astype(jnp.float32) + delta.astype(jnp.float32)).astype(w.dtype)
