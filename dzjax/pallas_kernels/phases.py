"""The register-resident route of both delta kernels: 2/4/8-bit codes, dense or 2:4, 16-bit x.

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

2:4 sparsity (`nm_tiles`): a word holds the kept values of 16 / bits groups of 4 inputs, two
a group, and covers D = 64 / bits dense rows. The phases are the dense rows' places in the word:
phase 4a + t is input t of group a. Its tile takes kept value 0 of group a where that value's
position is t, else kept value 1 where its position is t, else the zero point as 1 + zero /
2**b, which the correction above turns into exactly 0: two dequantizations per group instead of
four, then a compare and a select per dense weight for each kept value that can sit there
(positions increase within a group, which the delta file loader checks: kept value 1 is never
at input 0, nor kept value 0 at input 3). A step is at most one scale group (its zero point
fills the pruned entries), so 2:4 takes this route where a group holds the shortest step: 4-bit
g128 and longer, 8-bit g64, 2-bit g256.

Every operand of that arithmetic must come from a load or a constant, or Triton builds the
tiles in another layout and moves each through shared memory (compiled for sm_90: one more
shared load and a quarter store a weight, 8.5 instructions a weight in all instead of 6.6 at
4-bit g128). So what would be a broadcast or an iota is loaded: a code word's positions are in
meta word p // per (per = bits / 2 code words a meta word), gathered row by row and shifted by
an amount read from a small table (`nm_table`); the zero points of the step's group are gathered
as 32-bit words of four (`zero_words`, a bitcast of the stored bytes: 8-bit loads stop Triton
too) into a [p, bn] tile and shifted by the table's column amount.
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
    see `min_block_k`, and row tiles of at most `MAX_BLOCK_M`): codes of 2, 4 or 8 bits, dense in
    scale groups of whole words (a word's codes share a group) or 2:4 in groups of at least the
    shortest step (`step_nm`), with bf16 or f16 activations (float32 activations would be
    rounded to TF32 by the dot: they take the general route)."""
    if fmt.bits not in (2, 4, 8) or \
            jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if fmt.nm is None:
        return fmt.group_size % (32 // fmt.bits) == 0
    return fmt.nm == (2, 4) and fmt.group_size >= min_block_k(fmt)


def word_rows(fmt: Format) -> int:
    """The dense rows one code word covers: its codes, twice that with 2:4."""
    n, m = fmt.nm or (1, 1)
    return 32 // fmt.bits * m // n


def min_block_k(fmt: Format) -> int:
    """The shortest K step whose phase tiles have `MIN_WORD_ROWS` word rows."""
    return MIN_WORD_ROWS * word_rows(fmt)


def max_block_k(fmt: Format, target: int) -> int:
    """The longest K step to consider: `target`, but no longer than a scale group where a group
    holds a step (a step of several groups multiplies each phase tile once per group)."""
    return max(min_block_k(fmt), min(target, fmt.group_size))


def layout(fmt: Format, block_k: int) -> tuple[int, int, int, int]:
    """(phases, word rows per phase tile, rows per scale unit, scale units per step): a unit is
    a group, or the whole step when the group is at least a step."""
    phases = word_rows(fmt)
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


def nm_table(fmt: Format, block_k: int, block_n: int) -> np.ndarray:
    """[2p, bn] uint32 constants of the 2:4 route (see `nm_positions` and `nm_zero_bits`), two
    copies of [p, bn], step kb reading copy kb % 2: bits
    0-4 the right shift that brings row p's code word's positions to the bottom of its meta
    word, (32 / per) * (p % per) with per = bits / 2 code words a meta word; bits 8-12 the right
    shift of column n's zero point in its word of four, 8 * (n % 4).

    A kernel input, not an iota: Triton builds the weight tiles in the dot's operand layout only
    when every operand of the arithmetic comes from a load or a constant; an iota among them
    (or a broadcast, a reshape, an 8-bit load) makes it build each tile in another layout and
    move it through shared memory, every phase (compiled for sm_90: 1 LDS and 0.25 STS a weight
    more). Two copies, so that the load varies with the step: hoisted out of the K loop, the
    table is defined outside it, and that also keeps Triton from it (the same round trip)."""
    _, p, _, _ = layout(fmt, block_k)
    per = fmt.bits // 2
    rows = (32 // per) * (np.arange(p) % per)
    cols = 8 * (np.arange(block_n) % 4)
    return np.tile(rows[:, None] | cols[None, :] << 8, (2, 1)).astype(np.uint32)


def zero_words(zeros: jax.Array) -> jax.Array:
    """uint8 zero points [..., G, N] seen as uint32 [..., G, N / 4], four columns a word (a
    bitcast, no copy): 32-bit loads for `nm_zero_bits`."""
    *lead, g, n = zeros.shape
    return lax.bitcast_convert_type(zeros.reshape(*lead, g, n // 4, 4), jnp.uint32)


def nm_operands(zeros, fmt: Format, block_k: int, block_n: int) -> list[jax.Array]:
    """The 2:4 route's extra kernel inputs, in kernel order: `zero_words(zeros)` (asymmetric
    formats only) and `nm_table`."""
    extra = [] if fmt.symmetric else [zero_words(zeros)]
    return extra + [jnp.asarray(nm_table(fmt, block_k, block_n))]


def nm_positions(meta_ref, lead, kb, p: int, bits: int, table):
    """[p, bn] uint32: for each of step kb's p code words (2:4), the meta word holding its kept
    values' positions, shifted so that they sit at the bottom (stored row j of the code word at
    bits 2j; bits above belong to other code words). A meta word holds the positions of
    per = bits / 2 code words: it is loaded once for each (a gather of rows) and shifted by
    `nm_table`'s amount."""
    per = bits // 2
    if per == 1:
        return meta_ref[(*lead, pl.ds(kb * p, p), slice(None))]
    rows = kb * (p // per) + lax.broadcasted_iota(jnp.int32, (p,), 0) // per
    return meta_ref[(*lead, rows, slice(None))] >> (table & jnp.uint32(31))


def nm_zero_bits(zero_words_ref, lead, group, p: int, bits: int, table):
    """[p, bn] uint32: the bits of 1 + zero / 2**bits (the weight that dequantizes to 0) for
    each column of scale group `group`, every row alike (a gather from `zero_words`); a
    constant for symmetric formats (`zero_words_ref` None, zero 2**(bits - 1))."""
    if zero_words_ref is None:
        return jnp.uint32(_ONE_BITS + (2 ** (bits - 1) << 23 - bits))
    bn = table.shape[1]
    rows = jnp.zeros((p, 1), jnp.int32) + group
    cols = lax.broadcasted_iota(jnp.int32, (1, bn), 1) // 4
    z = (zero_words_ref[(*lead, rows, cols)] >> (table >> jnp.uint32(8))) & jnp.uint32(255)
    return (z << jnp.uint32(23 - bits)) + jnp.uint32(_ONE_BITS)


def nm_tiles(words, positions, zero_bits, bits: int, *, asm: bool):
    """(phase, [p, bn] float32 weights) of each dense phase of 2:4 code words: phase 4a + t is
    input t of the word's group a, 1 + c / 2**bits where one of the group's kept values sits
    there, else the zero point's (`zero_bits`: the bits of 1 + zero / 2**bits)."""
    for a in range(16 // bits):  # the groups of 4 inputs a word holds
        kept = [lax.bitcast_convert_type(phase_weights(words, bits, 2 * a + i, asm=asm),
                                         jnp.uint32) for i in (0, 1)]
        fields = [positions & jnp.uint32(3 << 4 * a + 2 * i) for i in (0, 1)]
        for t in range(4):
            w = zero_bits
            # Increasing positions: kept value 1 is never at input 0, nor kept value 0 at 3.
            if t > 0:
                w = jnp.where(fields[1] == jnp.uint32(t << 4 * a + 2), kept[1], w)
            if t < 3:
                w = jnp.where(fields[0] == jnp.uint32(t << 4 * a), kept[0], w)
            yield 4 * a + t, lax.bitcast_convert_type(w, jnp.float32)


def step(qweight_ref, scales_ref, zeros_ref, xp_ref, sums_ref, kb, yt, *, fmt: Format,
         block_k: int, rows, slot=None, asm: bool = False, nm=None):
    """yt + (x[rows] @ W).T for K step `kb`, from the whole-K refs of one column strip: the
    route accumulates transposed, [block_n, block_m] (see the module docstring).

    qweight_ref  # [K' * bits / 32, bn] uint32 (with a leading slot axis when `slot` is given)
    scales_ref   # [K / group_size, bn] bf16
    zeros_ref    # [K / group_size, bn] uint8, or None when symmetric
    xp_ref       # [M', K * units] float32, `phase_inputs`
    sums_ref     # [M', K / unit] float32, `phase_inputs`
    rows         # the rows of xp / sums this program multiplies (a slice or pl.ds)
    asm          # dequantize with inline PTX (`phase_weights`): compiled kernels, not
                 # interpret mode
    nm           # 2:4 only: (meta_ref [K' / 16, bn] uint32, zero_words_ref [K / group_size,
                 # bn / 4] uint32 or None when symmetric, the loaded `nm_table`)
    """
    bits = fmt.bits
    phases, p, unit, units = layout(fmt, block_k)
    lead = () if slot is None else (slot,)
    words = qweight_ref[(*lead, pl.ds(kb * p, p), slice(None))]
    if fmt.nm is None:
        tiles = ((r, phase_weights(words, bits, r, asm=asm)) for r in range(phases))
    else:  # one unit, the step's group (`serves`)
        meta_ref, zero_words_ref, table_ref = nm
        table = table_ref[pl.ds(kb % 2 * p, p), :]
        group = kb * block_k // fmt.group_size
        zero_bits = nm_zero_bits(zero_words_ref, lead, group, p, bits, table)
        tiles = nm_tiles(words, nm_positions(meta_ref, lead, kb, p, bits, table), zero_bits,
                         bits, asm=asm)
    accs = [jnp.zeros(yt.shape, jnp.float32) for _ in range(units)]
    for r, w in tiles:
        wt = w.T
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
