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
bits placed in the top mantissa bits of 1.0 (masked, shifted and added to 0x3F800000) is,
reinterpreted, exactly 1 + c / 2**b: an AND and a shift-and-add (LOP3 and LEA) per weight, no
conversion (`phase_weights`; inline PTX in compiled kernels, so that ptxas keeps that form). Its
dot with x gives acc = sum(x) + sum(x * c) / 2**b, so per scale group

  sum(x * scale * (c - zero)) = scale * (2**b * acc - (2**b + zero) * sum(x))

with sum(x) per group also computed outside the kernel. The dot runs in TF32 on the tensor cores,
and is exact there: 1 + c / 2**b has at most 9 significant bits (8-bit codes) and x (bf16 or
f16, converted to float32 outside) at most 11, within TF32's 11; their products fit float32. So
the weights are the exact float32 scale * (c - zero), not rounded to x's dtype as on the general
route (a little more accurate; outputs differ from the XLA path by that rounding, ~1e-3 of the
delta's contribution).

K steps are one scale group where the group allows (2-bit g128: 128 rows, 8 word rows per phase,
one TF32 MMA deep). When a group is shorter than the shortest step (2-bit g64), each phase tile
spans several groups: it is multiplied once per group with x masked to that group's rows (zeros
elsewhere, built into the permuted x), into one accumulator per group.

The dot is transposed: yT[bn, bm] += W_phase.T @ x_phase.T, the weights the MMA's A operand (16
columns x 8 K per m16n8k8) and the rows of x its N. So a decode tile is 8 rows, not 16: a weight
costs a quarter of an MMA instruction instead of half, and the per-output epilogue halves too.
(The A fragment of W.T holds, per thread, the same elements as the B fragments of W for two
adjacent 8-column tiles, so nothing moves.) The kernels store yT transposed back.
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
MIN_BLOCK_M = 8  # the N of one MMA: the rows of x are the dot's columns (the route is transposed)
# The route's MMAs are TF32, m16n8k8: their count per weight grows with the rows. At 64 rows it
# is 2 a weight (7.7 SASS instructions in all at 2 bits), more than the general route's bf16
# wgmma tile issues (6.7 in PTX): larger tiles take the general route.
MAX_BLOCK_M = 32
# Column strips of 64 or 32, one warp per 32 columns: the transposed dot's M is the strip, and
# Triton makes a dot of M >= 64 on 4 warps a warpgroup MMA (wgmma), whose setup (descriptors,
# fences) costs more than the phase route saves (compiled at 2 bits, 128 x 8 tiles: 4.5 SASS
# instructions a weight, against 3.4 for 64 x 8 on 2 warps).
STRIPS = (64, 32)


def warps(block_n: int) -> int:
    """Warps for a strip of `block_n` columns on this route (see STRIPS)."""
    return max(1, block_n // 32)


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


def phase_bits(bits: int, phase: int) -> tuple[int, int]:
    """(mask, shift) of phase `phase`: the codes at bit offset phase * bits are `words & mask`,
    and moved by `shift` (left when positive) they sit in the top `bits` mantissa bits."""
    return ((1 << bits) - 1) << (phase * bits), 23 - bits - phase * bits


def phase_asm(bits: int, phase: int) -> str:
    """The PTX of `phase_weights` for one word: AND, shift, then add 1.0f (the bits are
    disjoint, so the add is the OR)."""
    mask, shift = phase_bits(bits, phase)
    move = f"shl.b32 t, t, {shift};" if shift >= 0 else f"shr.u32 t, t, {-shift};"
    return f"{{ .reg .b32 t; and.b32 t, $1, {mask}; {move} add.u32 $0, t, {_ONE_BITS}; }}"


def phase_weights(words, bits: int, phase: int, *, asm: bool):
    """1 + c / 2**bits for the codes at bit offset phase * bits of uint32 `words`, as float32.

    Mask first, then shift and add 1.0f: ptxas makes the shift and add one LEA with an
    immediate, so a weight costs 2 instructions (LOP3, LEA). Written in jnp, LLVM turns it back
    into shift, AND, OR, which ptxas makes one LOP3 with two constants, the second in a register
    it rematerializes with a move before most uses (2.6 instructions a weight). So the compiled
    kernel (`asm`) states it in PTX (`phase_asm`); interpret mode runs the same operations in
    jnp (`tests/test_packing.py` holds the two to the same bits)."""
    if asm:
        from jax.experimental.pallas import triton as pl_triton

        moved, = pl_triton.elementwise_inline_asm(
            phase_asm(bits, phase), args=[lax.bitcast_convert_type(words, jnp.int32)],
            constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int32)])
        return lax.bitcast_convert_type(moved, jnp.float32)
    mask, shift = phase_bits(bits, phase)
    picked = words & jnp.uint32(mask)
    moved = picked << jnp.uint32(shift) if shift >= 0 else picked >> jnp.uint32(-shift)
    return lax.bitcast_convert_type(moved + jnp.uint32(_ONE_BITS), jnp.float32)


def step(qweight_ref, scales_ref, zeros_ref, xp_ref, sums_ref, kb, yt, *, fmt: Format,
         block_k: int, rows, slot=None, asm: bool = False):
    """yt + (x[rows] @ W).T for K step `kb`, from the whole-K refs of one column strip: the
    route accumulates transposed, [block_n, block_m] (see the module docstring).

    qweight_ref  # [K * bits / 32, bn] uint32 (with a leading slot axis when `slot` is given)
    scales_ref   # [K / group_size, bn] bf16
    zeros_ref    # [K / group_size, bn] uint8, or None when symmetric
    xp_ref       # [M', K * units] float32, `phase_inputs`
    sums_ref     # [M', K / unit] float32, `phase_inputs`
    rows         # the rows of xp / sums this program multiplies (a slice or pl.ds)
    asm          # dequantize with inline PTX (`phase_weights`): compiled kernels, not
                 # interpret mode
    """
    bits = fmt.bits
    phases, p, unit, units = layout(fmt, block_k)
    lead = () if slot is None else (slot,)
    words = qweight_ref[(*lead, pl.ds(kb * p, p), slice(None))]
    accs = [jnp.zeros(yt.shape, jnp.float32) for _ in range(units)]
    for r in range(phases):
        wt = phase_weights(words, bits, r, asm=asm).T
        for j in range(units):
            start = ((kb * units + j) * phases + r) * p
            accs[j] = accs[j] + jnp.dot(wt, xp_ref[rows, pl.ds(start, p)].T,
                                        preferred_element_type=jnp.float32)
    top = float(2 ** bits)
    for j in range(units):
        u = kb * units + j  # this unit's index along K
        group = pl.ds(u * unit // fmt.group_size, 1)
        scale = scales_ref[(*lead, group, slice(None))].astype(jnp.float32).T
        if zeros_ref is None:
            zero = jnp.float32(2 ** (bits - 1))
        else:
            z = zeros_ref[(*lead, group, slice(None))].astype(jnp.uint32)
            zero = (packing.biased_float(z) - packing.MAGIC).T
        total = sums_ref[rows, pl.ds(u, 1)].T
        yt = yt + scale * (top * accs[j] - (top + zero) * total)
    return yt
