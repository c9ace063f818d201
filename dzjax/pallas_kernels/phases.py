"""The register-resident route of both delta kernels: dense 2/4/8-bit codes, 16-bit activations.

The canonical packing (`packing.py`) puts stored rows p * (32 / bits) + r of a column into word
p at bit offset r * bits. The general route unpacks a K step's words [P, bn] into [block_k, bn]
weights, a reshape that interleaves rows, which Triton can only do by storing the tile to shared
memory and reading it back in the dot's operand layout (a 2-byte store and a transposing
`ldmatrix` per weight). This route never builds that tile. It splits each K step by *phase*: phase
r of a word tile is the tile of codes at bit offset r * bits, rows r, r + 32/bits, ... of the
step, obtained by an elementwise shift and mask of the words as loaded. Each phase is one dot
with the matching columns of x, so the activations are permuted instead of the weights: outside
the kernel (XLA, one small fusion over [M, K]) each step's columns are reordered phase by phase
(`phase_inputs`). Everything between the word tile and the dot is elementwise, so Triton reads
the words from shared memory straight into the dot's operand registers and dequantizes there.

Dequantization is moved past the dot, where it costs per output, not per weight. A code c of b
bits placed in the top mantissa bits of 1.0 (OR into 0x3F800000 after a shift) is, reinterpreted,
exactly 1 + c / 2**b: one shift and one AND-OR (a single LOP3) per weight, no conversion. Its dot
with x gives acc = sum(x) + sum(x * c) / 2**b, so per scale group

  sum(x * scale * (c - zero)) = scale * (2**b * acc - (2**b + zero) * sum(x))

with sum(x) per group also computed outside the kernel. The dot runs in TF32 on the tensor cores,
and is exact there: 1 + c / 2**b has at most 9 significant bits (8-bit codes) and x (bf16 or
f16, converted to float32 outside) at most 11, within TF32's 11; their products fit float32. So the weights are the exact float32
scale * (c - zero), not rounded to x's dtype as on the general route (a little more accurate;
outputs differ from the XLA path by that rounding, ~1e-3 of the delta's contribution).

K steps are one scale group where the group allows (2-bit g128: 128 rows, 8 word rows per phase,
one TF32 MMA deep). When a group is shorter than the shortest step (2-bit g64), each phase tile
spans several groups: it is multiplied once per group with x masked to that group's rows (zeros
elsewhere, built into the permuted x), into one accumulator per group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dzjax.pallas_kernels import packing
from dzjax.pallas_kernels.formats import Format

# A phase tile's word rows are its dot's K: 8 is the K of one TF32 MMA (m16n8k8). (Triton's
# Python front end asks for 16; its MMA lowering takes 8, compiled for sm_90 in the tests.)
MIN_WORD_ROWS = 8
MAX_BLOCK_M = 32  # row tiles whose dot stays a warp-level MMA, with operands in registers
_ONE_BITS = 0x3F800000  # 1.0f


def serves(fmt: Format, x_dtype) -> bool:
    """Whether this route serves `fmt` for activations of `x_dtype` (given a K step it can use,
    see `min_block_k`, and row tiles of at most `MAX_BLOCK_M`): dense codes of 2, 4 or 8 bits in
    scale groups of whole words (a word's codes share a group), bf16 or f16 activations (float32
    activations would be rounded to TF32 by the dot: they take the general route)."""
    return (fmt.nm is None and fmt.bits in (2, 4, 8) and fmt.group_size % (32 // fmt.bits) == 0
            and jnp.dtype(x_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))


def min_block_k(fmt: Format) -> int:
    """The shortest K step whose phase tiles have `MIN_WORD_ROWS` word rows."""
    return MIN_WORD_ROWS * 32 // fmt.bits


def max_block_k(fmt: Format, target: int) -> int:
    """The longest K step to consider: `target`, but no longer than a scale group where a group
    holds a step (a step of several groups multiplies each phase tile once per group)."""
    return max(min_block_k(fmt), min(target, fmt.group_size))


def layout(fmt: Format, block_k: int) -> tuple[int, int, int, int]:
    """(phases, word rows per phase tile, rows per scale unit, scale units per step): a unit is
    a group, or the whole step when the group is at least a step."""
    phases = 32 // fmt.bits
    unit = min(fmt.group_size, block_k)
    return phases, block_k // phases, unit, block_k // unit


def phase_inputs(x: jax.Array, fmt: Format, block_k: int) -> tuple[jax.Array, jax.Array]:
    """x [M, K] (K the stored rows) -> (permuted float32 x, float32 sums [M, K / unit]).

    The permuted x is [M, steps, units, phases, P] flattened: for step s, unit j and phase r the
    P columns that multiply phase r's tile, x[s * block_k + phases * p + r], zero where word row p
    is not in unit j (units > 1 only)."""
    m, k = x.shape
    phases, p, unit, units = layout(fmt, block_k)
    xf = x.astype(jnp.float32)
    xr = xf.reshape(m, k // block_k, 1, p, phases).transpose(0, 1, 2, 4, 3)
    if units > 1:
        member = (np.arange(p) // (unit // phases))[None, :] == np.arange(units)[:, None]
        xr = jnp.where(member[None, None, :, None, :], xr, 0.0)
    return xr.reshape(m, -1), xf.reshape(m, k // unit, unit).sum(axis=-1)


def _phase_weights(words, bits: int, phase: int):
    """1 + c / 2**bits for the codes at bit offset phase * bits of uint32 `words`, as float32
    (a shift and an AND-OR of the bit pattern)."""
    shift = 23 - bits - phase * bits
    moved = words << jnp.uint32(shift) if shift >= 0 else words >> jnp.uint32(-shift)
    mantissa = jnp.uint32(((1 << bits) - 1) << (23 - bits))
    return lax.bitcast_convert_type((moved & mantissa) | jnp.uint32(_ONE_BITS), jnp.float32)


def step(qweight_ref, scales_ref, zeros_ref, xp_ref, sums_ref, kb, y, *, fmt: Format,
         block_k: int, rows, slot=None):
    """y + x[rows] @ W for K step `kb`, from the whole-K refs of one column strip.

    qweight_ref  # [K * bits / 32, bn] uint32 (with a leading slot axis when `slot` is given)
    scales_ref   # [K / group_size, bn] bf16
    zeros_ref    # [K / group_size, bn] uint8, or None when symmetric
    xp_ref       # [M', K * units] float32, `phase_inputs`
    sums_ref     # [M', K / unit] float32, `phase_inputs`
    rows         # the rows of xp / sums this program multiplies (a slice or pl.ds)
    """
    bits = fmt.bits
    phases, p, unit, units = layout(fmt, block_k)
    lead = () if slot is None else (slot,)
    words = qweight_ref[(*lead, pl.ds(kb * p, p), slice(None))]
    accs = [jnp.zeros(y.shape, jnp.float32) for _ in range(units)]
    for r in range(phases):
        w = _phase_weights(words, bits, r)
        for j in range(units):
            start = ((kb * units + j) * phases + r) * p
            accs[j] = accs[j] + jnp.dot(xp_ref[rows, pl.ds(start, p)], w,
                                        preferred_element_type=jnp.float32)
    top = float(2 ** bits)
    for j in range(units):
        u = kb * units + j  # this unit's index along K
        group = pl.ds(u * unit // fmt.group_size, 1)
        scale = scales_ref[(*lead, group, slice(None))].astype(jnp.float32)
        if zeros_ref is None:
            zero = jnp.float32(2 ** (bits - 1))
        else:
            z = zeros_ref[(*lead, group, slice(None))].astype(jnp.uint32)
            zero = packing.biased_float(z) - packing.MAGIC
        total = sums_ref[rows, pl.ds(u, 1)]
        y = y + scale * (top * accs[j] - (top + zero) * total)
    return y
