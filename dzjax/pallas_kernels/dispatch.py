"""Choosing an implementation: `implementation=` on every public function, or `DZJAX_KERNEL`.

  "xla"        pure jnp (`delta_matmul_xla`, `multi_delta_matmul_xla`): any backend, every format.
  "pallas"     the compiled Pallas (Triton) kernels: a GPU, bits 2/4/8, dense or n:m.
  "interpret"  the same Pallas kernels in interpret mode, on any backend (tests, debugging).
  "auto"/None  `DZJAX_KERNEL` if set, else: "pallas" on a GPU when the kernels serve the format and
               shape, "xla" otherwise (CPU, or a format such as 3-bit that only XLA serves).
An explicit "pallas" or "interpret" for a format or shape the kernels do not serve raises a
ValueError saying why; nothing silently falls back. The choice is made when the function is
called, or traced when called under jit: set `DZJAX_KERNEL` before the first trace.

The prefill route: with "pallas" or "interpret", a call with at least `PREFILL_ROWS` rows (256:
a prompt chunk, not a decode batch) dequantizes each used delta once and multiplies its rows with
a dense matmul (cuBLAS through XLA) in tiles of `PREFILL_TILE` rows, instead of the fused kernel,
which dequantizes every column strip again for each tile of 64 rows. Its weights are rounded
to x's dtype as on the XLA path; the fused kernels' phase route (2/4/8-bit codes, dense or 2:4
in long enough scale groups, 16-bit x, up to 32-row tiles; `phases.py`) multiplies by the
float32 weights instead, so a decode step
and a prompt chunk of the same delta differ by that rounding (~1e-3 of the delta's
contribution); elsewhere they agree to float32 rounding.
"""

from __future__ import annotations

import os

import jax

from dzjax.pallas_kernels.single_delta import delta_matmul_pallas, delta_matmul_xla
from dzjax.pallas_kernels.tiling import check_pallas_format, pick_block_k, pick_block_n
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.multi_delta import (DeltaBatch, multi_delta_matmul_pallas,
                                              multi_delta_matmul_xla)

ENV_VAR = "DZJAX_KERNEL"
IMPLEMENTATIONS = ("auto", "xla", "pallas", "interpret")
PREFILL_ROWS = 256  # from this many rows of x on, the Pallas implementations take the prefill route
PREFILL_TILE = 128  # rows per dense matmul of the prefill route


def requested_implementation(implementation: str | None = None) -> str:
    """The argument, else `DZJAX_KERNEL`, else "auto"; validated."""
    impl = implementation if implementation is not None else os.environ.get(ENV_VAR, "auto")
    if impl not in IMPLEMENTATIONS:
        source = "implementation" if implementation is not None else ENV_VAR
        raise ValueError(f"{source}={impl!r} is not one of {IMPLEMENTATIONS}")
    return impl


def pallas_unsupported_reason(x_shape, q: QuantizedTensor) -> str | None:
    """Why the Pallas kernels cannot compute x @ q, or None when they can."""
    k, n = q.shape
    try:
        check_pallas_format(q.format)
        pick_block_n(n, 64)
        pick_block_k(q.padded_rows, q.format)
    except ValueError as e:
        return str(e)
    if x_shape[-1] != k:
        return f"x has K={x_shape[-1]} but the delta is [{k}, {n}]"
    return None


def resolve(implementation: str | None, x_shape, q: QuantizedTensor) -> str:
    """The implementation to run: "xla", "pallas" or "interpret" (raises if it cannot serve q)."""
    impl = requested_implementation(implementation)
    reason = pallas_unsupported_reason(x_shape, q)
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" and reason is None else "xla"
    if impl != "xla" and reason is not None:
        raise ValueError(f"implementation={impl!r} cannot serve this delta: {reason}")
    return impl


def prefill_route(x_shape) -> bool:
    """Whether a Pallas implementation multiplies these rows by the prefill route (see above)."""
    rows = 1
    for d in x_shape[:-1]:
        rows *= d
    return rows >= PREFILL_ROWS


def delta_matmul(x: jax.Array, q: QuantizedTensor, *, implementation: str | None = None) -> jax.Array:
    """x @ dequantize(q) for one compressed delta.

    Args:
      x: [..., K] bfloat16, float16 or float32 activations.
      q: a compressed [K, N] delta (`QuantizedTensor`).
      implementation: "xla", "pallas", "interpret" or None/"auto" (see the module docstring).
    Returns:
      [..., N] float32: the weights are dequantized in float32, rounded to x's dtype (but on
      the kernels' phase route, see above), and multiplied with float32 accumulation.
    """
    impl = resolve(implementation, x.shape, q)
    if impl == "xla" or prefill_route(x.shape):
        return delta_matmul_xla(x, q)
    lead = x.shape[:-1]
    y = delta_matmul_pallas(x.reshape(-1, x.shape[-1]), q, interpret=impl == "interpret")
    return y.reshape(*lead, q.shape[1])


def multi_delta_matmul(x: jax.Array, stack: QuantizedTensor, batch: DeltaBatch, *,
                       implementation: str | None = None) -> jax.Array:
    """Each row of x times its own delta from a stack of slots, in one launch.

    Args:
      x: [M, K] bfloat16, float16 or float32 rows in serving order.
      stack: `stack_deltas([...])`, S slots of [K, N] deltas of one format.
      batch: `make_delta_batch(slots, S)`: each row's slot, -1 = base only.
      implementation: "xla", "pallas", "interpret" or None/"auto" (see the module docstring).
    Returns:
      [M, N] float32 in serving order: x[r] @ dequantize(stack[slot(r)]), exactly 0 for slot -1.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    impl = resolve(implementation, x.shape, stack)
    if impl == "xla":
        return multi_delta_matmul_xla(x, stack, batch)
    if prefill_route(x.shape):
        return multi_delta_matmul_xla(x, stack, batch, row_tile=PREFILL_TILE)
    return multi_delta_matmul_pallas(x, stack, batch, interpret=impl == "interpret")
