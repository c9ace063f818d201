"""Stacks of resident deltas, and the per-row deltas a serving step builds from them.

A delta pool holds S deltas on the device as one pytree mirroring a delta's params, every leaf
with a leading [S] slot axis: a `QuantizedTensor` whose arrays are [S, ...] for a compressed
matrix, an [S, *shape] array for an exact tensor. A step passes the stacks and each batch row's
slot (-1 = base only) as ordinary jit arguments and the model sees per-row deltas
(`CompressedRows`, `ExactRows`), so loading, evicting or mixing deltas never changes a shape.

All deltas of one stack share a `layout`: the same tensors, shapes and formats.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import DzjaxError
from dzjax.models import sharding
from dzjax.models.linear import CompressedRows, ExactRows
from dzjax.pallas_kernels.formats import QuantizedTensor


def is_leaf(x) -> bool:
    """Leaves of a delta pytree: compressed matrices count as one."""
    return isinstance(x, QuantizedTensor)


def layout(params) -> tuple:
    """What must agree between deltas that share a stack: every tensor's name, shape, format."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]:
        if isinstance(leaf, QuantizedTensor):
            out.append((jax.tree_util.keystr(path), leaf.shape, leaf.format))
        else:
            out.append((jax.tree_util.keystr(path), tuple(np.shape(leaf)), "exact"))
    return tuple(out)


def describe_difference(stacked: tuple, other: tuple) -> str:
    """The first tensor whose layout differs, for an error message."""
    a, b = {x[0]: x for x in stacked}, {x[0]: x for x in other}
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            return (f"tensor {name}: {b.get(name, 'absent')[1:]} here, "
                    f"{a.get(name, 'absent')[1:]} in the pool")
    return "layouts differ"


def empty_stacks(params, capacity: int, mesh=None):
    """Zero stacks of `capacity` slots for deltas shaped like `params`; on a tensor-parallel mesh,
    split by output column (see `dzjax.models.sharding`)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct((capacity,) + a.shape, a.dtype), params)
    if mesh is None:
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
    sharding.check_delta_columns(shapes, mesh)
    return jax.tree.map(lambda a, where: jnp.zeros(a.shape, a.dtype, device=where),
                        shapes, sharding.stack_shardings(shapes, mesh))


@functools.partial(jax.jit, donate_argnames=("stacks",))
def write_slot(stacks, slot, params):
    """The stacks with one delta's tensors written into `slot` (traced: one compile)."""
    return jax.tree.map(lambda s, d: s.at[slot].set(d.astype(s.dtype)), stacks, params)


def row_deltas(stacks, slots: jax.Array):
    """The delta pytree of a batch whose row b uses slot `slots[b]` (-1 = base only): every leaf
    a `CompressedRows` or `ExactRows` over its stack. None stacks: base only."""
    if stacks is None:
        return None

    def leaf(stack):
        rows = CompressedRows if isinstance(stack, QuantizedTensor) else ExactRows
        return rows(stack, slots)
    return jax.tree.map(leaf, stacks, is_leaf=is_leaf)


def check_fits(stacks_layout: tuple | None, name: str, own: tuple) -> None:
    """Raise naming the first difference when a delta of layout `own` cannot join stacks of
    `stacks_layout` (None: no stacks yet, anything fits)."""
    if stacks_layout is not None and own != stacks_layout:
        raise DzjaxError(f"delta {name!r} is stored differently from the deltas already served "
                         f"({describe_difference(stacks_layout, own)}); one server serves "
                         f"deltas converted with the same settings")
