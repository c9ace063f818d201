"""Many deltas in one launch: each row of x times its own compressed delta (a grouped matmul).

Serving keeps up to S deltas resident in a fixed-size stack of device slots: a `QuantizedTensor`
whose arrays have a leading slot axis ([S, ...]); loading a different delta overwrites a slot
(`write_slot`), so shapes, and hence the compiled step, never change. Each request row names a slot,
or -1 for "base model only". `make_delta_batch` sorts the rows by slot (static shapes, jit-friendly)
and `multi_delta_matmul_pallas` computes, in one `pallas_call`:

  y[r] = x[r] @ dequantize(stack[slot(r)])    (exactly 0 for rows with slot -1)

Kernel mapping: the grid runs over the compact list of slots that have rows
(`DeltaBatch.active_slots`, min(M, S) entries: no program for an idle slot or the base-only
rows), output column strips of block_n, and K splits. Program (g, j, s) takes the g-th active
slot, walks its rows in tiles of block_m starting at the group's first sorted row (a dynamic,
unaligned start; on the phase route the smallest power-of-two tile of 8 rows on that holds the
group, `row_tile_sizes`), streams that slot's packed weights for strip j and split s once per
row tile (once in total when the group has at most block_m rows, the decode case) and stores
only the rows of its group (masked store), so each output row is written by exactly one
program per split. Padding entries of the list run zero iterations. Split-K is sized so that ONE
active delta fills the GPU (`MultiDeltaConfig.heuristic`); with more active deltas the same split
just makes more, shorter programs. Rows of the base-only group are never written: they are set
to 0 afterwards.

Many rows per group (prefill) take another route: `dispatch.multi_delta_matmul` dequantizes each
used slot once and multiplies its rows with a dense matmul (`multi_delta_matmul_xla`), from
`PREFILL_ROWS` rows on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dzjax.pallas_kernels import phases, phases_nm
from dzjax.pallas_kernels.single_delta import (check_inputs, dequant_block, dequant_dtype,
                                               dequantize_xla, dot_precision, dot_tile,
                                               pallas_operands, round_to)
from dzjax.pallas_kernels.tiling import (DeltaMatmulConfig, k_loop_body, k_split,
                                        route_tiling)
from dzjax.pallas_kernels.formats import QuantizedTensor, pad_rows
from dzjax.pallas_kernels.reference import dequantize

_ARRAYS = ("qweight", "scales", "zeros", "meta")


# ----------------------------------------------------------------------------------------------
# The slot stack.


def stack_deltas(deltas: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack same-format, same-shape deltas along a new leading slot axis."""
    if not deltas:
        raise ValueError("need at least one delta to stack")
    first = deltas[0]
    for i, d in enumerate(deltas):
        if d.shape != first.shape or d.format != first.format:
            raise ValueError(f"delta {i} is {d.shape} {d.format}, slot 0 is {first.shape} {first.format}")
    stacked = {name: (None if getattr(first, name) is None
                      else jnp.stack([getattr(d, name) for d in deltas])) for name in _ARRAYS}
    return QuantizedTensor(**stacked, shape=first.shape, format=first.format)


def num_slots(stack: QuantizedTensor) -> int:
    return stack.qweight.shape[0]


def unstack_deltas(stack: QuantizedTensor) -> list[QuantizedTensor]:
    return [jax.tree.map(lambda a, i=i: a[i], stack) for i in range(num_slots(stack))]


def write_slot(stack: QuantizedTensor, slot, delta: QuantizedTensor) -> QuantizedTensor:
    """A new stack with `delta` in `slot` (may be traced); shapes unchanged, so nothing retraces."""
    if delta.shape != stack.shape or delta.format != stack.format:
        raise ValueError(f"delta {delta.shape} {delta.format} does not fit a stack of "
                         f"{stack.shape} {stack.format}")
    return jax.tree.map(lambda s, d: s.at[slot].set(d.astype(s.dtype)), stack, delta)


# ----------------------------------------------------------------------------------------------
# Batch metadata.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaBatch:
    """Rows grouped by delta slot; all arrays have static shapes (M rows, S slots).

    Running example, S = 3 slots, rows in serving order with slots [2, -1, 0, 2]:
      sorted_slots  [0, 2, 2, -1]          rows sorted by slot, base-only (-1) rows last
      group_sizes   [1, 0, 2, 1]           rows per slot 0..S-1, then the base-only rows  [S + 1]
      group_starts  [0, 1, 1, 3, 4]        exclusive running sum of group_sizes         [S + 2]
      order         [2, 0, 3, 1]           sorted row r is serving row order[r]
      inverse       [1, 3, 0, 2]           serving row i is sorted row inverse[i]
      active_slots  [0, 2, 3]              slots with rows, then S as padding      [min(M, S)]
    Slot 1 is an empty group: it costs nothing.
    """

    sorted_slots: jax.Array  # int32 [M]
    group_sizes: jax.Array  # int32 [S + 1]
    group_starts: jax.Array  # int32 [S + 2]
    order: jax.Array  # int32 [M]
    inverse: jax.Array  # int32 [M]
    active_slots: jax.Array  # int32 [min(M, S)]

    @property
    def num_slots(self) -> int:
        return self.group_sizes.shape[0] - 1

    def sort_rows(self, x):
        return jnp.take(x, self.order, axis=0)

    def unsort_rows(self, y):
        return jnp.take(y, self.inverse, axis=0)


def make_delta_batch(delta_slots, num_slots: int) -> DeltaBatch:
    """Per-row slots in serving order (int [M], -1 = base only, unsorted) -> `DeltaBatch`.

    jit-friendly: shapes depend only on M and `num_slots`. Concrete slots outside
    [-1, num_slots) raise; under jit (traced slots, which cannot raise) they count as -1.
    """
    if not isinstance(delta_slots, jax.core.Tracer):
        check_slots(delta_slots, num_slots)
    slots = jnp.asarray(delta_slots, jnp.int32)
    if slots.ndim != 1:
        raise ValueError(f"delta slots must be [M], got shape {slots.shape}")
    key = jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots)  # base-only sorts last
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sorted_key = key[order]
    sizes = jnp.zeros(num_slots + 1, jnp.int32).at[sorted_key].add(1)
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes, dtype=jnp.int32)])
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    # At most min(M, S) slots have rows: their ids in order, padded with S (no slot).
    active = jnp.nonzero(sizes[:num_slots] > 0, size=min(slots.shape[0], num_slots),
                         fill_value=num_slots)[0].astype(jnp.int32)
    return DeltaBatch(sorted_slots=jnp.where(sorted_key == num_slots, -1, sorted_key),
                      group_sizes=sizes, group_starts=starts, order=order, inverse=inverse,
                      active_slots=active)


def check_slots(delta_slots, num_slots: int) -> None:
    """Raise a ValueError when concrete slot ids fall outside [-1, num_slots)."""
    s = np.asarray(delta_slots)
    bad = s[(s < -1) | (s >= num_slots)]
    if bad.size:
        raise ValueError(f"delta slots {sorted(set(bad.tolist()))} outside [-1, {num_slots})")


# ----------------------------------------------------------------------------------------------
# Reference and XLA path (pure jnp).


def multi_delta_matmul_ref(x: jax.Array, stack: QuantizedTensor, batch: DeltaBatch) -> jax.Array:
    """Reference: `jax.lax.ragged_dot` of the sorted rows with every slot dequantized.

    Args:
      x: [M, K] rows in serving order. stack: [S]-slot stack of [K, N] deltas. batch: its rows.
    Returns:
      [M, N] float32 in serving order; rows with slot -1 are 0.
    """
    weights = jax.vmap(lambda q: dequantize(q, x.dtype))(stack)  # [S, K, N]
    xs = batch.sort_rows(x)
    # ragged_dot needs the groups to cover all rows: give the base-only rows a zero "slot".
    weights = jnp.concatenate([weights, jnp.zeros_like(weights[:1])])
    y = lax.ragged_dot(xs, weights, batch.group_sizes, preferred_element_type=jnp.float32)
    return batch.unsort_rows(y)


def multi_delta_matmul_xla(x: jax.Array, stack: QuantizedTensor, batch: DeltaBatch, *,
                           row_tile: int | None = None) -> jax.Array:
    """The XLA path: one slot at a time, skipping empty slots, so only resident-and-used deltas
    are dequantized (one [K, N] at a time, never the whole stack), and each multiplies only its
    own rows: the sorted rows of its group, in tiles of `row_tile` (default `xla_row_tile(M)`)
    from the group's start. Same contract as the reference; also the kernels' prefill route."""
    s, m, n = num_slots(stack), x.shape[0], stack.shape[1]
    tile = max(1, min(row_tile or xla_row_tile(m), m))
    xs = jnp.pad(batch.sort_rows(x), ((0, tile), (0, 0)))  # a tile may start at any row

    def one_slot(i, y):
        start, size = batch.group_starts[i], batch.group_sizes[i]

        def compute(y):
            # Only this slot's [K, N] is dequantized, rounded to x's dtype like everywhere.
            w = round_to(dequantize_xla(jax.tree.map(lambda a: a[i], stack)), x.dtype)

            def one_tile(t, y):
                row0 = start + t * tile
                yt = jnp.dot(lax.dynamic_slice_in_dim(xs, row0, tile), w,
                             preferred_element_type=jnp.float32, precision=dot_precision(x.dtype))
                mine = (jnp.arange(tile) < size - t * tile)[:, None]  # not the next group's
                old = lax.dynamic_slice_in_dim(y, row0, tile)
                return lax.dynamic_update_slice_in_dim(y, jnp.where(mine, yt, old), row0, 0)

            return lax.fori_loop(0, (size + tile - 1) // tile, one_tile, y)
        return lax.cond(size > 0, compute, lambda y: y, y)

    y = lax.fori_loop(0, s, one_slot, jnp.zeros((m + tile, n), jnp.float32))
    return batch.unsort_rows(y[:m])


def xla_row_tile(m: int) -> int:
    """Rows per matmul of the XLA path: all of a decode batch, 16 at a time for prefill."""
    return m if m <= 16 else 16


# ----------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiDeltaConfig(DeltaMatmulConfig):
    """Tiling of the multi-delta kernel: row tile per group, column strip, K step and split
    (the single-delta kernel's fields and validation, with its own heuristic)."""

    @classmethod
    def heuristic(cls, m: int, k: int, n: int, slots: int, fmt,
                  x_dtype=jnp.bfloat16) -> MultiDeltaConfig:
        """`route_tiling` as if ONE group of all M rows were active, in one row tile: how many
        groups are active is only known at run time, and one must fill the GPU alone (more
        make more programs). But above the phase route's row tile, its largest tiles where it
        serves (`split_rows`: 32 rows, 16 at 8 bits): at M = 64, 8 deltas of 8 rows each run
        one phase-route tile, not a 64-row tile of the general route, and of the tiles the
        kernel holds (`row_tile_sizes`) the 8-row one (SASS instructions a weight at 4096 x
        4096: 4.6 against 12.5 at 4-bit 2:4)."""
        return cls(**route_tiling(m, k, n, fmt, x_dtype, row_tiles=1, split_rows=True))


# ----------------------------------------------------------------------------------------------
# Kernel.


def _multi_delta_kernel(*refs, fmt, block_m: int, block_k: int, steps: int,
                        total: int | None, slots: int, has_zeros: bool, has_meta: bool,
                        phase: bool, asm: bool):
    # steps, total: as in `single_delta._delta_matmul_kernel`
    # asm: compiled, not interpret mode (`phases.step`)
    # active_ref   # [G] int32: active_slots (G = min(M, S)), padded with S
    # starts_ref   # [S + 2] int32: group_starts
    # sizes_ref    # [S + 1] int32: group_sizes
    # x_ref        # [M + block_m, K]  sorted rows, padded by one row tile; on the phase route
    #              # two refs, the permuted rows (float32, or x's dtype in pairs) and their
    #              # sums (`phases.phase_inputs`)
    # qweight_ref  # [S, K' * bits / 32, block_n] uint32  every slot's column strip
    # scales_ref   # [S, K / group_size, block_n] bf16
    # zeros_ref    # [S, K / group_size, block_n] uint8   (asymmetric only)
    # meta_ref     # [S, K' * index_bits / 32, block_n] uint32   (n:m only)
    # zero_words_ref, table_ref  # the 2:4 phase route's `phases_nm.nm_operands` (zero words
    #              # with a slot axis, the table without)
    # o_ref        # [M + block_m, block_n] float32: this K split's partial sums
    active_ref, starts_ref, sizes_ref, x_ref, *rest, o_ref = refs
    sums_ref = rest.pop(0) if phase else None
    qweight_ref, scales_ref = rest.pop(0), rest.pop(0)
    zeros_ref = rest.pop(0) if has_zeros else None
    meta_ref = rest.pop(0) if has_meta else None
    nm = None
    if phase and has_meta:
        zero_words_ref = rest.pop(0) if has_zeros else None
        nm = (meta_ref, zero_words_ref, rest.pop(0))
    slot = active_ref[pl.program_id(0)]
    start, size = starts_ref[slot], sizes_ref[slot]
    mine = jnp.minimum(slot, slots - 1)  # in bounds even for padding, which reads nothing
    first = pl.program_id(2) * steps

    def row_tiles(block_m):
        """The group's rows in tiles of block_m from its first, a K loop each."""
        # A padding entry (slot == S) runs no row tile. (Integer arithmetic, not
        # where(slot < S, ...): a boolean lowers to an i1 loop bound in Triton.)
        tiles = (size + block_m - 1) // block_m * jnp.minimum(slots - slot, 1)
        lax.fori_loop(0, tiles, functools.partial(row_tile, block_m), 0)

    def row_tile(block_m, t, carry):
        rows = lax.broadcasted_iota(jnp.int32, (block_m, o_ref.shape[1]), 0)
        row0 = start + t * block_m
        in_group = rows < start + size - row0  # rows of the next group are computed, not stored

        def advance(kb, acc):
            if phase:
                return phases.step(qweight_ref, scales_ref, zeros_ref, x_ref, sums_ref, kb, acc,
                                   fmt=fmt, block_k=block_k, rows=pl.ds(row0, block_m),
                                   slot=mine, asm=asm, nm=nm)
            w = dequant_block(qweight_ref, scales_ref, zeros_ref, meta_ref, kb, fmt=fmt,
                              block_k=block_k, dtype=dequant_dtype(fmt, x_ref.dtype), slot=mine)
            x = x_ref[pl.ds(row0, block_m), pl.ds(kb * block_k, block_k)]
            return acc + dot_tile(x, w)

        k_step = k_loop_body(advance, first, total)
        tile = (block_m, o_ref.shape[1])
        if phase:  # transposed (`phases.step`)
            acc = lax.fori_loop(0, steps, k_step, jnp.zeros(tile[::-1], jnp.float32)).T
        else:
            acc = lax.fori_loop(0, steps, k_step, jnp.zeros(tile, jnp.float32))
        plgpu.store(o_ref.at[pl.ds(row0, block_m), :], acc, mask=in_group)
        return carry

    sizes = row_tile_sizes(block_m, phase)
    if len(sizes) == 1:
        row_tiles(block_m)
    else:
        lax.switch(row_tile_index(size, sizes), [functools.partial(row_tiles, t) for t in sizes])


def row_tile_sizes(block_m: int, phase: bool) -> tuple[int, ...]:
    """The row tiles of a multi-delta program: block_m, but on the phase route each power of two
    from `phases.MIN_BLOCK_M` to block_m, a K loop each in the kernel, the program taking the
    smallest that holds its group. So the tile follows the run-time mix with one compiled
    kernel for every mix: 8 deltas of 8 rows at block_m = 32 run the 8-row loop, a quarter of
    the MMAs and epilogues of the 32-row one."""
    if not phase:
        return (block_m,)
    return tuple(phases.MIN_BLOCK_M << i
                 for i in range((block_m // phases.MIN_BLOCK_M).bit_length()))


def row_tile_index(size, sizes: tuple[int, ...]):
    """The index in `sizes` (increasing) of the smallest row tile that holds `size` rows, else
    of the largest: int32 arithmetic (a boolean lowers to an i1 that Triton's loops refuse)."""
    return sum(jnp.minimum(jnp.maximum(size - t, 0), 1) for t in sizes[:-1])


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def multi_delta_matmul_pallas(x: jax.Array, stack: QuantizedTensor, batch: DeltaBatch, *,
                              config: MultiDeltaConfig | None = None,
                              interpret: bool = False) -> jax.Array:
    """y[r] = x[r] @ dequantize(stack[slot(r)]) for every row, in one Pallas launch.

    Args:
      x: [M, K] bfloat16, float16 or float32 rows in serving order (sorted here by `batch.order`).
      stack: [S]-slot stack of [K, N] deltas (`stack_deltas`), a format `delta_matmul_pallas` supports.
      batch: `make_delta_batch(slots, S)` for these M rows.
      config: tiling; `MultiDeltaConfig.heuristic` when None.
      interpret: run the kernel in Pallas interpret mode (any backend).
    Returns:
      [M, N] float32 in serving order; rows with slot -1 are exactly 0.
    """
    check_inputs(x, stack)
    x, stack = pad_rows(x, stack)
    (m, k), n = x.shape, stack.shape[1]
    slots, fmt = num_slots(stack), stack.format
    if batch.group_sizes.shape != (slots + 1,) or batch.order.shape != (m,):
        raise ValueError(f"batch is for {batch.order.shape[0]} rows and "
                         f"{batch.group_sizes.shape[0] - 1} slots; x has {m} rows, stack {slots} slots")
    config = config or MultiDeltaConfig.heuristic(m, k, n, slots, fmt, x.dtype)
    config.validate(k, n, fmt, x.dtype)
    if m == 0:
        return jnp.zeros((0, n), jnp.float32)
    bm, bn, split = config.block_m, config.block_n, config.split_k
    steps, total = k_split(k // config.block_k, split)  # total: None unless ragged
    # One spare row tile so that a tile starting at any row stays in bounds.
    xs = jnp.pad(batch.sort_rows(x), ((0, bm), (0, 0)))
    xs = list(phases.phase_inputs(xs, fmt, config.block_k)) if config.phases else [xs]

    operands = pallas_operands(stack)
    # Every slot's column strip j; the kernel picks its active slot's.
    weight_specs = [pl.BlockSpec((slots, a.shape[1], bn), lambda g, j, s: (0, 0, j))
                    for a in operands]
    if config.phases and fmt.nm is not None:
        *words, table = phases_nm.nm_operands(stack.zeros, fmt, config.block_k, bn)
        operands += [*words, table]
        weight_specs += [pl.BlockSpec((slots, a.shape[1], bn // 4), lambda g, j, s: (0, 0, j))
                         for a in words]
        weight_specs.append(pl.BlockSpec(table.shape, lambda g, j, s: (0, 0)))
    kernel = functools.partial(
        _multi_delta_kernel, fmt=fmt, block_m=bm, block_k=config.block_k, steps=steps,
        total=total,
        slots=slots, has_zeros=not fmt.symmetric, has_meta=fmt.nm is not None,
        phase=config.phases, asm=not interpret)
    whole = lambda shape: pl.BlockSpec(shape, lambda g, j, s: (0,) * len(shape))
    partial_sums = pl.pallas_call(
        kernel,
        grid=(batch.active_slots.shape[0], n // bn, split),
        in_specs=[whole(batch.active_slots.shape), whole(batch.group_starts.shape),
                  whole(batch.group_sizes.shape), *(whole(a.shape) for a in xs), *weight_specs],
        out_specs=pl.BlockSpec((None, m + bm, bn), lambda g, j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split, m + bm, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="multi_delta_matmul",
    )(batch.active_slots, batch.group_starts, batch.group_sizes, *xs, *operands)
    # The sum reads the M rows only, not the spare row tile (8 rows of padding for 1 at M = 1).
    partial_sums = partial_sums[:, :m]
    y = partial_sums[0] if split == 1 else partial_sums.sum(axis=0)
    # The base-only rows were never written (no program runs for them): exactly 0 here.
    y = jnp.where((batch.sorted_slots >= 0)[:, None], y, 0.0)
    return batch.unsort_rows(y)
