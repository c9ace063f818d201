"""Tensor parallelism on a `jax.sharding.Mesh` with one axis, "tp": where every array lives (a
user's mesh, e.g. from `jax.make_mesh`, is turned into one by `as_tp_mesh`).

Megatron-style layout, expressed as shardings and left to XLA's SPMD partitioner:
  q/k/v, gate/up kernels [in, out]   column-parallel: out split      P(None, "tp")
  (fused qkv, gate_up: the same, their columns interleaved by device, `dzjax.models.fusion`)
  o/down kernels [in, out]           row-parallel: in split           P("tp", None)
  lm_head [hidden, vocab]            vocab split                      P(None, "tp")
  embedding, norms, o/down biases    replicated
  KV cache, per layer [B, S, kvH, D] split by kv heads                P(None, None, "tp", None)
  KV pages, per layer [kvH, P, ps, D] split by kv heads               P("tp", None, None, None)
Compressed deltas are packed along their input dimension, so every one is split along its output
columns, whatever the base weight does ([S, rows, out] -> P(None, None, "tp")): any device count
that divides the output dimensions works from the same delta file, with no re-packing. For the
row-parallel o/down projections this means the (small) activations are gathered before the delta
matmul. The delta kernels run per shard under `shard_map` (`linear.CompressedRows`, told the mesh
by `KernelOptions`), each device on its own columns; exact tensors (norms, biases) are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dzjax.errors import DzjaxError
from dzjax.models.config import ModelConfig
from dzjax.pallas_kernels.formats import QuantizedTensor

AXIS = "tp"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head",
                   "qkv_proj", "gate_up_proj")  # (fused: `dzjax.models.fusion`)
ROW_PARALLEL = ("o_proj", "down_proj")


def make_mesh(devices: int | list | None = None) -> Mesh:
    """A one-axis ("tp") mesh over `devices` (a count of the first local devices, a list, or
    None for all)."""
    if devices is None or isinstance(devices, int):
        available = jax.devices()
        n = len(available) if devices is None else devices
        if not 1 <= n <= len(available):
            raise DzjaxError(f"a mesh of {n} devices: only {len(available)} are available")
        devices = available[:n]
    return Mesh(np.asarray(devices), (AXIS,))


def as_tp_mesh(mesh, axis: str | None = None) -> Mesh:
    """The one-axis mesh dzjax computes on ("tp", an Auto axis), from a user's mesh: one of
    `make_mesh`, or of `jax.make_mesh` (whose axes are Explicit by default), of any axis name.
    A mesh of several axes needs `axis`, the one to split the model over (default: "tp" if it
    has one); its other axes must have size 1 (one server, or one `generate`, is one replica of
    the model). Raises a DzjaxError saying what does not fit."""
    if not isinstance(mesh, Mesh):
        raise DzjaxError(f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((n,), ('tp',)) "
                         f"or dzjax.models.sharding.make_mesh(n)), got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if axis is None:
        if len(names) == 1 or AXIS in names:
            axis = names[0] if len(names) == 1 else AXIS
        else:
            raise DzjaxError(f"the mesh has axes {names}: name the one to split the model over "
                             f"(tp_axis=...)")
    if axis not in names:
        raise DzjaxError(f"tp_axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    wider = {n: size for n, size in mesh.shape.items() if n != axis and size > 1}
    if wider:
        raise DzjaxError(f"the mesh's axes {wider} other than {axis!r} have more than one "
                         f"device: dzjax splits one replica over {axis!r} only; build the mesh "
                         f"of one replica's devices (one server per replica)")
    if names == (AXIS,) and all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices.reshape(-1), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[AXIS]


def check_mesh(mesh: Mesh, config: ModelConfig) -> None:
    """Raise a DzjaxError naming the dimension that the mesh does not divide."""
    if tuple(mesh.axis_names) != (AXIS,):
        raise DzjaxError(f"the mesh must have the single axis {AXIS!r}, got {mesh.axis_names}")
    n = tp_size(mesh)
    dims = {"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "intermediate_size": config.intermediate_size}
    if not config.tie_word_embeddings:
        dims["vocab_size"] = config.vocab_size
    for name, size in dims.items():
        if size % n:
            raise DzjaxError(f"a mesh of {n} devices does not divide the model's {name}={size}: "
                             f"tensor parallelism splits it evenly; use a divisor of {size}")


def _module(path) -> str:
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    return names[-2] if len(names) >= 2 else ""


def param_spec(path, leaf) -> P:
    """Where a base parameter lives (see the module docstring)."""
    module, name = _module(path), getattr(path[-1], "key", "")
    if name == "kernel" and module in COLUMN_PARALLEL:
        return P(None, AXIS)
    if name == "kernel" and module in ROW_PARALLEL:
        return P(AXIS, None)
    if name == "bias" and module in COLUMN_PARALLEL:
        return P(AXIS)
    return P()


def cache_spec() -> P:
    """A contiguous cache layer [B, S, kv_heads, D]."""
    return P(None, None, AXIS, None)


def pages_spec() -> P:
    """A layer of KV pages [kv_heads, P, page_size, D]."""
    return P(AXIS, None, None, None)


def _put(a, where: NamedSharding):
    # Through the host: with several processes, each passes its (identical) copy of the value.
    return jax.device_put(np.asarray(a), where)


def put(a, where: NamedSharding) -> jax.Array:
    """A host array placed as `where` says, from this process's copy alone: no collective, so
    that one process may place arrays while another is busy (`jax.device_put` first checks
    that every process passes the same value, a collective, on a mesh over several processes).
    """
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, where, lambda index: a[index])


def shard_params(params, mesh: Mesh):
    """The base params placed on the mesh."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: _put(a, NamedSharding(mesh, param_spec(path, a))), params)


def place(mesh: Mesh, config: ModelConfig, params, delta, cache):
    """Params, one delta (replicated: XLA partitions its matmuls) and a cache on the mesh, for
    the single-model path (`generate`)."""
    check_mesh(mesh, config)
    replicated = NamedSharding(mesh, P())
    delta = None if delta is None else jax.tree.map(lambda a: _put(a, replicated), delta)
    cache = jax.tree.map(lambda a: _put(a, NamedSharding(mesh, cache_spec())), cache)
    return shard_params(params, mesh), delta, cache


def zeros_like_placed(tree):
    """Zeros of every array's shape, dtype and placement (also for deleted arrays: after a failed
    step consumed donated buffers)."""
    return jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype, device=a.sharding), tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array's value, also when its devices span several processes."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if not x.sharding.is_fully_replicated:  # a shard would be only part of the value
        raise DzjaxError(f"expected a replicated array, got one sharded as {x.sharding}")
    return np.asarray(x.addressable_data(0))


def stack_shardings(stacks, mesh: Mesh, slot_axis: bool = True):
    """NamedShardings for the pool's stacks (a pytree with `QuantizedTensor` stacks): compressed
    matrices split by output column, exact tensors replicated; with `slot_axis` False, for one
    delta's params (a slot of the stacks)."""
    columns = P(None, None, AXIS) if slot_axis else P(None, AXIS)

    def one(leaf):
        if isinstance(leaf, QuantizedTensor):
            return jax.tree.map(lambda a: NamedSharding(mesh, columns), leaf)
        return NamedSharding(mesh, P())
    return jax.tree.map(one, stacks, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def slot_shardings(params, mesh: Mesh):
    """NamedShardings for one delta's params placed as a slot of the pool's stacks."""
    return stack_shardings(params, mesh, slot_axis=False)


def check_delta_columns(stacks, mesh: Mesh) -> None:
    """Every compressed matrix's output columns must split evenly over the mesh."""
    n = tp_size(mesh)
    leaves = jax.tree_util.tree_flatten_with_path(
        stacks, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0]
    for path, leaf in leaves:
        if isinstance(leaf, QuantizedTensor) and leaf.shape[1] % n:
            raise DzjaxError(f"delta tensor {jax.tree_util.keystr(path)} has {leaf.shape[1]} "
                             f"output columns, which a mesh of {n} devices does not divide")
