"""Pure-jnp references: dequantize a `QuantizedTensor` and multiply by it. Every kernel is tested
against these, and they are the XLA path that CPU users and CI run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dzjax.pallas_kernels import packing
from dzjax.pallas_kernels.formats import QuantizedTensor


def dequantize(q: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
    """The dense [K, N] matrix that `q` stores, in `dtype` (computed in float32)."""
    fmt, k, kp = q.format, q.shape[0], q.padded_rows
    rows = fmt.stored_rows(kp)
    if fmt.bits == 16:
        values = q.qweight.astype(jnp.float32)
    else:
        codes = packing.unpack_codes(q.qweight, fmt.bits, rows).astype(jnp.float32)
        # Stored row i belongs to scale group (original row) // group_size; with n:m, the kept
        # rows of one group of m inputs are n consecutive stored rows.
        rows_per_group = fmt.group_size if fmt.nm is None else fmt.group_size * fmt.nm[0] // fmt.nm[1]
        scales = jnp.repeat(q.scales.astype(jnp.float32), rows_per_group, axis=0)
        zeros = (jnp.full((), 2 ** (fmt.bits - 1), jnp.float32) if fmt.symmetric
                 else jnp.repeat(q.zeros.astype(jnp.float32), rows_per_group, axis=0))
        values = scales * (codes - zeros)
    if fmt.nm is not None:
        positions = packing.unpack_codes(q.meta, packing.index_bits(fmt.nm[1]), rows)
        values = packing.expand_nm(values, positions, *fmt.nm)
    return values[:k].astype(dtype)  # the padding rows (see formats) are not part of it


def delta_matmul_ref(x: jax.Array, q: QuantizedTensor) -> jax.Array:
    """x [..., K] @ dequantize(q) [K, N] -> [..., N] float32."""
    return jnp.dot(x, dequantize(q, x.dtype), preferred_element_type=jnp.float32)


def dequantize_columns(q: QuantizedTensor, columns: jax.Array, dtype=jnp.float32) -> jax.Array:
    """dequantize(q)[:, columns] -> [K, len(columns)], reading only those columns.

    Every stored array is laid out [..., N], so a column gather of each gives a smaller tensor of
    the same format (an embedding lookup in a table stored as [hidden, vocab]).
    """
    gathered = {name: jnp.take(a, columns, axis=1) for name, a in q.arrays().items()}
    small = dataclasses.replace(q, **gathered, shape=(q.shape[0], columns.shape[0]))
    return dequantize(small, dtype)
