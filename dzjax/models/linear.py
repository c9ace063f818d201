"""The one place where the model touches its weights: a base weight plus an optional delta.

The forward pass reaches every projection through `linear`, the embedding table through `embed`
(and a tied output projection through `unembed`), and every small tensor (norm weights, biases)
through `add_delta`. Each kind of delta has the same small interface, so supporting a new kind
never touches the model definition:

  kind            what it holds                                   made by
  Dense           W_finetune - W_base, the weight's own shape     `dense_delta`, exact file tensors
  Compressed      a `QuantizedTensor` [in, out] (an embedding's   `convert`, `load_delta`
                  as [hidden, vocab])
  CompressedRows  per batch row, one of S resident compressed     `delta_stacks.row_deltas` (serving)
                  deltas: stack [S, ...] and slots [B]
  ExactRows       per batch row, one of S exact tensors:          `delta_stacks.row_deltas` (serving)
                  stack [S, *shape] and slots [B]

  shape                the weight shape it fits ([hidden, vocab] for a compressed embedding:
                       `stores_table_transposed`)
  matmul(x, kernels)   x [..., K] @ delta [K, N] -> [..., N] float32
  lookup(ids)          rows of an embedding table's delta [V, D] for ids [B, ...] -> [..., D] f32
  as_head()            given the embedding table's delta, the delta of the tied output
                       projection table^T
  added_to(w, ndim)    w + delta, for small tensors (exact kinds only)
A slot of -1 means "base only": that row's delta is zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dzjax.models.kernel_options import DEFAULT_KERNELS, KernelOptions
from dzjax.pallas_kernels import delta_matmul, make_delta_batch, multi_delta_matmul
from dzjax.pallas_kernels.formats import QuantizedTensor
from dzjax.pallas_kernels.reference import dequantize, dequantize_columns

def _check_shape(got, want, what: str) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(f"{what}: delta shape {tuple(got)} does not match weight shape "
                         f"{tuple(want)}")


def _exact_only(kind: str):
    raise TypeError(f"a {kind} delta is a compressed matrix: it has no small-tensor form")


@dataclasses.dataclass(frozen=True)
class Dense:
    """A dense delta of the weight's own shape."""

    delta: jax.Array
    stores_table_transposed = False

    def matmul(self, x, kernels):
        with jax.named_scope("dense_delta_matmul"):
            return jnp.dot(x, self.delta.astype(x.dtype), preferred_element_type=jnp.float32)

    def lookup(self, ids):
        return jnp.take(self.delta, ids, axis=0).astype(jnp.float32)

    def as_head(self):
        return Dense(self.delta.T)

    def added_to(self, w, ndim):
        # In float32, so that a bf16 base plus an exact delta gives back the bf16 fine-tune.
        return (w.astype(jnp.float32) + self.delta.astype(jnp.float32)).astype(w.dtype)

    @property
    def shape(self):
        return self.delta.shape


@dataclasses.dataclass(frozen=True)
class Compressed:
    """One compressed matrix; the embedding table's is stored as its transpose [hidden, vocab]."""

    q: QuantizedTensor
    stores_table_transposed = True

    def matmul(self, x, kernels):
        with jax.named_scope("delta_matmul"):
            return delta_matmul(x, self.q, implementation=kernels.implementation)

    def lookup(self, ids):  # one stored column per token
        rows = dequantize_columns(self.q, ids.reshape(-1)).T
        return rows.reshape(*ids.shape, self.q.shape[0])

    def as_head(self):
        return self  # stored [hidden, vocab]: already the head's [in, out] layout

    def added_to(self, w, ndim):
        _exact_only("compressed")

    @property
    def shape(self):
        return self.q.shape


def _token_slots(slots, lead_shape) -> jax.Array:
    """Each token's slot for activations with leading shape [B, T, ...], flattened."""
    return jnp.broadcast_to(slots.reshape((-1,) + (1,) * (len(lead_shape) - 1)),
                            lead_shape).reshape(-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressedRows:
    """Row b of the batch uses compressed delta `stack[slots[b]]` (none when -1)."""

    stack: QuantizedTensor  # arrays [S, ...]
    slots: jax.Array  # int32 [B]
    stores_table_transposed = True

    def matmul(self, x, kernels):
        k, n = self.stack.shape
        rows = x.reshape(-1, k)
        # Rows grouped by slot for the multi-delta kernel; identical for every projection of one
        # step, so XLA computes it once.
        batch = make_delta_batch(_token_slots(self.slots, x.shape[:-1]),
                                 self.stack.qweight.shape[0])
        impl = kernels.implementation
        with jax.named_scope("multi_delta_matmul"):
            if not kernels.sharded:
                y = multi_delta_matmul(rows, self.stack, batch, implementation=impl)
            else:  # every device multiplies all rows by its own output columns of the deltas
                mesh = kernels.mesh

                def local(rows, stack, batch):
                    stack = dataclasses.replace(stack, shape=(k, n // mesh.size))
                    return multi_delta_matmul(rows, stack, batch, implementation=impl)
                axis = mesh.axis_names[0]
                columns = jax.tree.map(lambda _: P(None, None, axis), self.stack)
                y = jax.shard_map(local, mesh=mesh, in_specs=(P(), columns, P()),
                                  out_specs=P(None, axis), check_vma=False)(rows, self.stack, batch)
        return y.reshape(*x.shape[:-1], n)

    def lookup(self, ids):  # [S, hidden, vocab]: one column of its own slot per token
        slots = _token_slots(self.slots, ids.shape)
        flat_ids = ids.reshape(-1)
        safe = jnp.maximum(slots, 0)
        gathered = {name: a[safe, :, flat_ids].T for name, a in self.stack.arrays().items()}
        small = dataclasses.replace(self.stack, **gathered,
                                    shape=(self.stack.shape[0], flat_ids.shape[0]))
        picked = jnp.where((slots >= 0)[:, None], dequantize(small).T, 0.0)
        return picked.reshape(*ids.shape, self.stack.shape[0])

    def as_head(self):
        return self  # stored [hidden, vocab], as `Compressed`

    def added_to(self, w, ndim):
        _exact_only("compressed")

    @property
    def shape(self):
        return self.stack.shape


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExactRows:
    """Row b of the batch uses exact tensor `stack[slots[b]]` (none when -1)."""

    stack: jax.Array  # [S, *shape]
    slots: jax.Array  # int32 [B]
    stores_table_transposed = False

    def rows(self, ndim: int | None = None) -> jax.Array:
        """Each row's tensor [B, *shape] in float32 (zero for base-only rows); with `ndim`,
        reshaped to broadcast against an [B, ..., *shape] activation of that rank."""
        picked = jnp.take(self.stack, jnp.maximum(self.slots, 0), axis=0).astype(jnp.float32)
        picked = jnp.where((self.slots >= 0).reshape((-1,) + (1,) * (picked.ndim - 1)), picked, 0)
        if ndim is None:
            return picked
        return picked.reshape(picked.shape[:1] + (1,) * (ndim - picked.ndim) + picked.shape[1:])

    def matmul(self, x, kernels):  # each row by its own gathered [K, N] matrix
        with jax.named_scope("exact_rows_matmul"):
            w = self.rows().astype(x.dtype)
            return jnp.einsum("b...k,bkn->b...n", x, w, preferred_element_type=jnp.float32)

    def lookup(self, ids):
        slots = _token_slots(self.slots, ids.shape)
        picked = self.stack[jnp.maximum(slots, 0), ids.reshape(-1)].astype(jnp.float32)
        return jnp.where((slots >= 0)[:, None], picked, 0.0).reshape(*ids.shape, -1)

    def as_head(self):
        return ExactRows(jnp.swapaxes(self.stack, 1, 2), self.slots)

    def added_to(self, w, ndim):
        return (w.astype(jnp.float32) + self.rows(ndim)).astype(w.dtype)

    @property
    def shape(self):
        return self.stack.shape[1:]


def kind(delta):
    """The delta of one weight as one of the kinds above (None stays None)."""
    if delta is None or isinstance(delta, (Dense, Compressed, CompressedRows, ExactRows)):
        return delta
    if isinstance(delta, QuantizedTensor):
        return Compressed(delta)
    return Dense(jnp.asarray(delta))


def linear(x: jax.Array, kernel: jax.Array, delta=None, bias=None, bias_delta=None, *,
           kernels: KernelOptions = DEFAULT_KERNELS) -> jax.Array:
    """y = x @ (kernel + delta) + (bias + bias_delta), in x's dtype with float32 accumulation.

    Args:
      x: [..., K] activations.
      kernel: [K, N] base weight (any float dtype; cast to x's dtype for the matmul).
      delta: None or a delta of any kind (see the module docstring) of a [K, N] weight.
      bias, bias_delta: optional [N] base bias and its (exact) delta.
      kernels: how compressed deltas are computed (`KernelOptions`).
    Returns:
      [..., N] in x.dtype.
    """
    y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    delta = kind(delta)
    if delta is not None:
        _check_shape(delta.shape, kernel.shape, "linear")
        y = y + delta.matmul(x, kernels)
    if bias is not None:
        y = y + add_delta(bias, bias_delta, ndim=y.ndim).astype(jnp.float32)
    return y.astype(x.dtype)


def embed(ids: jax.Array, table: jax.Array, delta=None) -> jax.Array:
    """Rows of (table + delta) for token ids [B, ...] -> [B, ..., D], in the table's dtype."""
    rows = jnp.take(table, ids, axis=0)
    delta = kind(delta)
    if delta is None:
        return rows
    _check_shape(delta.shape, table.shape[::-1] if delta.stores_table_transposed else table.shape,
                 "embed")
    with jax.named_scope("delta_embed"):
        return (rows.astype(jnp.float32) + delta.lookup(ids)).astype(table.dtype)


def unembed(h: jax.Array, table: jax.Array, delta=None, *,
            kernels: KernelOptions = DEFAULT_KERNELS) -> jax.Array:
    """Tied output projection h @ (table + delta)^T -> [..., vocab] in h's dtype."""
    delta = kind(delta)
    return linear(h, table.T, None if delta is None else delta.as_head(), kernels=kernels)


def add_delta(w: jax.Array, delta=None, ndim: int | None = None) -> jax.Array:
    """A small tensor (norm weight, bias) of the fine-tune, stored exactly: w + delta.

    A per-row delta gives each batch row its own tensor, shaped to broadcast against an
    activation of rank `ndim` ([B, 1, ..., *w.shape]).
    """
    delta = kind(delta)
    if delta is None:
        return w
    _check_shape(delta.shape, w.shape, "add_delta")
    return delta.added_to(w, ndim)
