"""The one place where the model touches its weights: base weight plus an optional delta.

The forward pass reaches every projection through `linear`, the embedding table through `embed`
and every small tensor (norm weights, biases) through `add_delta`, so that supporting a new kind of
delta (dense today, compressed and multi-delta later) never touches the model definition.

A delta for one weight is `None` (base only), a dense array of the weight's shape holding
`W_finetune - W_base`, a compressed `QuantizedTensor` of the weight in kernel layout [in, out]
(the embedding table's as [hidden, vocab]), or a `RowDelta`: one of those per batch row, picked
from a stack of resident deltas (serving many fine-tunes in one batch).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dzjax.pallas_kernels import delta_matmul, multi_delta_matmul
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.multi_delta import DeltaBatch
from dzjax.pallas_kernels.reference import dequantize, dequantize_columns

# The kernel implementation for compressed deltas ("xla", "pallas", "interpret", "auto"), set by
# the jitted entry points around tracing; they take it as a static argument, so that a change of
# implementation compiles anew instead of reusing a program traced with another.
_IMPLEMENTATION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dzjax_kernel_implementation", default=None)
# The tensor-parallel mesh of a traced serving step (see `dzjax.models.sharding`), or None.
_MESH: contextvars.ContextVar = contextvars.ContextVar("dzjax_mesh", default=None)


@contextlib.contextmanager
def kernel_implementation(implementation: str | None):
    """Within this context, `linear` computes compressed deltas with `implementation`."""
    token = _IMPLEMENTATION.set(implementation)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowDelta:
    """A delta per batch row: row b of the batch uses `stack[slots[b]]`, or none when -1.

    `stack` holds S resident deltas of one tensor with a leading slot axis: a `QuantizedTensor`
    whose arrays are [S, ...] (a compressed matrix) or an [S, *shape] array (an exact tensor).
    `batch` groups the B * T rows of the call's [B, T, ...] activations by slot (each batch
    row's slot repeated T times) for the multi-delta kernel.
    """

    stack: QuantizedTensor | jax.Array
    slots: jax.Array  # int32 [B]
    batch: DeltaBatch  # over the B * T flattened rows

    def rows(self, ndim: int | None = None) -> jax.Array:
        """The exact tensor of each row, [B, *shape] (zero for base-only rows), float32; with
        `ndim`, reshaped to broadcast against an [B, ..., *shape] activation of that rank."""
        stack = self.stack if not isinstance(self.stack, QuantizedTensor) else None
        if stack is None:
            raise TypeError("rows() is for exact tensors; compressed ones go through a kernel")
        picked = jnp.take(stack, jnp.maximum(self.slots, 0), axis=0).astype(jnp.float32)
        picked = jnp.where((self.slots >= 0).reshape((-1,) + (1,) * (picked.ndim - 1)), picked, 0)
        if ndim is None:
            return picked
        return picked.reshape(picked.shape[:1] + (1,) * (ndim - picked.ndim) + picked.shape[1:])

    def token_slots(self, lead_shape) -> jax.Array:
        """Each token's slot for activations with leading shape [B, T, ...], flattened."""
        return jnp.broadcast_to(self.slots.reshape((-1,) + (1,) * (len(lead_shape) - 1)),
                                lead_shape).reshape(-1)


@contextlib.contextmanager
def tensor_parallel(mesh):
    """Within this context, per-row delta kernels run per shard of `mesh` (None: no mesh)."""
    token = _MESH.set(mesh)
    try:
        yield
    finally:
        _MESH.reset(token)


def _one_slot(delta: RowDelta) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(delta.stack.shape[1:], delta.stack.dtype)


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
    if isinstance(delta, RowDelta):
        y = y + _row_delta_matmul(x, kernel, delta)
    elif isinstance(delta, QuantizedTensor):
        _check_dense(kernel, delta, "linear")
        y = y + delta_matmul(x, delta, implementation=_IMPLEMENTATION.get())
    elif delta is not None:
        _check_dense(kernel, delta, "linear")
        y = y + jnp.dot(x, delta.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + add_delta(bias, bias_delta, ndim=y.ndim).astype(jnp.float32)
    return y.astype(x.dtype)


def _row_delta_matmul(x: jax.Array, kernel: jax.Array, delta: RowDelta) -> jax.Array:
    """Each row's x @ its own delta -> [..., N] float32 (0 for base-only rows)."""
    k, n = kernel.shape
    if isinstance(delta.stack, QuantizedTensor):
        _check_dense(kernel, delta.stack, "linear")
        implementation, mesh = _IMPLEMENTATION.get(), _MESH.get()
        rows = x.reshape(-1, k)
        if mesh is None or mesh.size == 1:
            y = multi_delta_matmul(rows, delta.stack, delta.batch, implementation=implementation)
        else:  # every device multiplies all rows by its own output columns of the deltas
            def local(rows, stack, batch):
                stack = dataclasses.replace(stack, shape=(k, n // mesh.size))
                return multi_delta_matmul(rows, stack, batch, implementation=implementation)
            axis = mesh.axis_names[0]
            columns = jax.tree.map(lambda _: P(None, None, axis), delta.stack)
            y = jax.shard_map(local, mesh=mesh, in_specs=(P(), columns, P()),
                              out_specs=P(None, axis), check_vma=False)(
                rows, delta.stack, delta.batch)
        return y.reshape(*x.shape[:-1], n)
    _check_dense(kernel, _one_slot(delta), "linear")  # exact matrices: gathered per row
    w = delta.rows().astype(x.dtype)  # [B, K, N]
    return jnp.einsum("b...k,bkn->b...n", x, w, preferred_element_type=jnp.float32)


def embed(ids: jax.Array, table: jax.Array, delta=None) -> jax.Array:
    """Rows of (table + delta) for token ids [...] -> [..., D], in the table's dtype."""
    rows = jnp.take(table, ids, axis=0)
    if isinstance(delta, RowDelta):
        delta_rows = _row_delta_embed(ids, table, delta).reshape(rows.shape)
        rows = (rows.astype(jnp.float32) + delta_rows).astype(table.dtype)
    elif isinstance(delta, QuantizedTensor):  # stored as [hidden, vocab]: gather columns
        _check_dense(table.T, delta, "embed")
        delta_rows = dequantize_columns(delta, ids.reshape(-1)).T.reshape(rows.shape)
        rows = (rows.astype(jnp.float32) + delta_rows).astype(table.dtype)
    elif delta is not None:
        _check_dense(table, delta, "embed")
        delta_rows = jnp.take(delta, ids, axis=0)
        rows = (rows.astype(jnp.float32) + delta_rows.astype(jnp.float32)).astype(table.dtype)
    return rows


def _row_delta_embed(ids: jax.Array, table: jax.Array, delta: RowDelta) -> jax.Array:
    """Each token's row of its own delta table -> [tokens, D] float32 (0 for base-only rows)."""
    slots = delta.token_slots(ids.shape)
    flat_ids = ids.reshape(-1)
    safe = jnp.maximum(slots, 0)
    if isinstance(delta.stack, QuantizedTensor):  # [S, hidden, vocab]: one column per token
        _check_dense(table.T, delta.stack, "embed")
        gathered = {name: a[safe, :, flat_ids].T for name, a in delta.stack.arrays().items()}
        small = dataclasses.replace(delta.stack, **gathered,
                                    shape=(table.shape[1], flat_ids.shape[0]))
        picked = dequantize(small).T
    else:
        _check_dense(table, _one_slot(delta), "embed")
        picked = delta.stack[safe, flat_ids].astype(jnp.float32)
    return jnp.where((slots >= 0)[:, None], picked, 0.0)


def unembed(h: jax.Array, table: jax.Array, delta=None) -> jax.Array:
    """Tied output projection h @ (table + delta)^T -> [..., vocab] in h's dtype."""
    if isinstance(delta, RowDelta) and not isinstance(delta.stack, QuantizedTensor):
        delta = dataclasses.replace(delta, stack=jnp.swapaxes(delta.stack, 1, 2))
    elif delta is not None and not isinstance(delta, (QuantizedTensor, RowDelta)):
        delta = delta.T  # dense deltas mirror the table [vocab, hidden]; compressed ones are stored
    return linear(h, table.T, delta)  # transposed already


def add_delta(w: jax.Array, delta=None, ndim: int | None = None) -> jax.Array:
    """A small tensor (norm weight, bias) of the fine-tune: stored exactly, so simply w + delta.

    A `RowDelta` gives each batch row its own tensor, shaped to broadcast against an activation
    of rank `ndim` ([B, 1, ..., *w.shape]).
    """
    if delta is None:
        return w
    if isinstance(delta, RowDelta):
        _check_dense(w, _one_slot(delta), "add_delta")
        return (w.astype(jnp.float32) + delta.rows(ndim)).astype(w.dtype)
    _check_dense(w, delta, "add_delta")
    # In float32, so that a bf16 base plus an exact delta gives back the bf16 fine-tune exactly.
    return (w.astype(jnp.float32) + delta.astype(jnp.float32)).astype(w.dtype)
