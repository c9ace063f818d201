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

Dequantization is moved past the dot, where it costs per output, not per weight. For 2/4-bit
codes and bf16/f16 x (`pairs`) a 32-bit word is two 16-bit weights at once: AND a code of each
half, shift both to the top `bits` mantissa bits and add the exponent of 2**b (a LOP3 and a LEA
for 2 weights, `pair_weights`; inline PTX in compiled kernels, so that ptxas keeps that form):
each half is exactly 2**b + c in x's dtype. Pair r takes the codes at offset r * bits of both
halves, phases r and r + phases / 2, as adjacent K: the 16-bit MMA reads the two halves of a
register as adjacent K, so the tile is the word tile as loaded. 8-bit codes (2**8 + c needs 9
significant bits) are float32, one a word lane, 1 + c / 2**b (`phase_weights`), multiplied in
TF32. Either way the dot gives acc = o * sum(x) + sum(x * c) / g (o = 2**b, g = 1 for pairs;
o = 1, g = 2**b in float32), so per scale group

  sum(x * scale * (c - zero)) = scale * (g * acc - (2**b + zero) * sum(x))

with sum(x) per group computed outside the kernel. The products are exact on the tensor cores:
2**b + c has at most 5 significant bits and x at most 8 (bf16) or 11 (f16); 1 + c / 2**b at
most 9 and x, converted to float32, at most 11, within TF32's 11. So the weights are the exact
float32 scale * (c - zero), not rounded to x's dtype as on the general route (a little more
accurate; outputs differ from the XLA path by that rounding, ~1e-3 of the delta's
contribution).

K steps are one scale group where the group allows (2-bit g128: 128 rows, 8 word rows per phase,
one MMA deep). When a group is shorter than the shortest step (2-bit g64), each phase tile
spans several groups: it is multiplied once per group with x masked to that group's rows (zeros
elsewhere, built into the permuted x), into one accumulator per group.

The dot is transposed: yT[bn, bm] += W_phase.T @ x_phase.T, the weights the MMA's A operand (16
columns x 16 K per bf16 m16n8k16, x 8 K per TF32 m16n8k8) and the rows of x its N. So a decode
tile is 8 rows, not 16: a weight costs an eighth of an MMA instruction (a quarter in TF32), and
the per-output epilogue halves too.
(The A fragment of W.T holds, per thread, the same elements as the B fragments of W for two
adjacent 8-column tiles, so nothing moves.) The kernels store yT transposed back.

2:4 sparsity (`nm_pair_tiles`, `nm_tiles`): a word holds the kept values of 16 / bits groups
of 4 inputs, two a group, and covers D = 64 / bits dense rows. The phases are the dense rows'
places in the word: phase 4a + t is input t of group a. Its tile takes the kept value whose
position is t, else the zero point (2**b + zero, or 1 + zero / 2**b), which the correction above
turns into exactly 0: two dequantizations per group instead of four, then selects. In pairs,
bitwise masks (a LOP3 of the shifted positions for every group of a word, a `prmt` to spread a
group's bit over its half) and 6 LOP3 selects make a group pair's 4 tiles; in float32, a
compare and a select per dense weight for each kept value that can sit there. Both rely on
positions increasing within a group, which the delta file loader checks. A step is at most one
scale group (its zero point fills the pruned entries), so 2:4 takes this route where a group
holds the shortest step: 4-bit g128 and longer, 8-bit g64, 2-bit g256.

Every operand of that arithmetic must come from a load or a constant, or Triton builds the
tiles in another layout and moves each through shared memory (compiled for sm_90: one more
shared load and a quarter store a weight: 8.5 instructions a weight in all instead of 6.6 at
4-bit g128 in float32). So what would be a broadcast or an iota is loaded: a code word's
positions are in meta word p // per (per = bits / 2 code words a meta word), gathered row by
row and shifted by an amount read from a small table (`nm_table`); the zero points of the
step's group are gathered as 32-bit words of four (`zero_words`, a bitcast of the stored
bytes: 8-bit loads stop Triton too) into a [p, bn] tile and shifted by the table's column
amount. A scalar read once (a constant for the pairs' exponent, say) stops Triton too.

Here: which formats and tilings the route serves, the permuted x (`phase_inputs`) and a K step
(`step`). The weights from the words are in `phase_bits.py`, the 2:4 tiles in `phases_nm.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from dzjax.pallas_kernels import packing
from dzjax.pallas_kernels.formats import Format
from dzjax.pallas_kernels.phase_bits import (HALF_FLOATS, pair_weights, phase_weights,
                                             word_rows)
from dzjax.pallas_kernels.phases_nm import (nm_pair_tiles, nm_positions, nm_tiles,
                                            nm_zero_bits)

# A phase tile's word rows are its dot's K: 8 is the K of one TF32 MMA (m16n8k8), 16 pair rows
# that of a bf16 one. (Triton's Python front end asks for 16 at TF32; its MMA lowering takes 8,
# compiled for sm_90 in the tests.)
MIN_WORD_ROWS = 8
MIN_BLOCK_M = 8  # the N of one MMA: the rows of x are the dot's columns (the route is transposed)
# The route's MMAs (m16n8k16 bf16, m16n8k8 TF32) grow with the rows: a 64-row tile on a 64-column
# strip needs more than 255 registers (32-48 bytes spill, pairs at 2 and 4 bits) and its TF32
# MMAs are 2 a weight: larger tiles take the general route.
MAX_BLOCK_M = 32
# Column strips of 64 or 32, a warp a 32 columns (or 16, `warps`): the transposed dot's M is the
# strip, and Triton makes a dot of M >= 64 on 4 warps a warpgroup MMA (wgmma), whose setup
# (descriptors, fences) costs more than the phase route saves (compiled at 2 bits, 128 x 8
# tiles: 4.5 SASS instructions a weight, against 3.4 for 64 x 8 on 2 warps).
STRIPS = (64, 32)


def warps(block_n: int, fmt: Format, *, narrow: bool = True) -> tuple[int, ...]:
    """The warps a strip of `block_n` columns may run on (see STRIPS): one a 32 columns, and
    with `narrow`, for dense codes, a 32-column strip on 2 warps too, 16 columns a warp. Each
    warp then loads all of x's operand for half the weights (3.2 SASS instructions a weight
    against 2.5 at 2 bits, M = 16), but where split-K partial sums weigh it fills the GPU with
    half the splits (M = 16 at 4096 x 4096: 4 splits of 64-column strips write 2 MB of partial
    sums for 4.6 MB of 2-bit weights). The 2:4 route, bound by issue, keeps 32 columns a warp
    (5.9 against 4.7 at 4 bits), and so does the multi-delta kernel (`narrow` False): its tiling
    is sized for one active group, but with several its programs fill the GPU anyway, and the
    instructions bound it (8 deltas of 2 rows at 2 bits: 83% of the bytes bound predicted on 2
    narrow warps, 92% on one wide)."""
    one = max(1, block_n // 32)
    return (one, 2) if narrow and fmt.nm is None and block_n == 32 else (one,)


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
    """x [M, K] (K the stored rows) -> (permuted x, float32 sums [M, K / unit]).

    The permuted x is [M, steps, units, tiles, K'] flattened: for step s, unit j and phase
    tile t the K' columns that multiply the tile, zero where word row p is not in unit j (units
    > 1 only). Float32 phases (`phase_weights`): tile r, K' = P, column p is
    x[s * block_k + phases * p + r]. 16-bit pairs (`pairs`, x's dtype): tile r, K' = 2P,
    column 2p + h is x[s * block_k + phases * p + r + h * phases / 2]."""
    m, k = x.shape
    phases, p, unit, units = layout(fmt, block_k)
    xf = x.astype(jnp.float32)
    if pairs(fmt, x.dtype):  # (p, h, r) -> (r, p, h)
        xr = x.reshape(m, k // block_k, 1, p, 2, phases // 2).transpose(0, 1, 2, 5, 3, 4)
        xr = xr.reshape(m, k // block_k, 1, phases // 2, 2 * p)
        rows = np.arange(2 * p) // 2
    else:  # (p, r) -> (r, p)
        xr = xf.reshape(m, k // block_k, 1, p, phases).transpose(0, 1, 2, 4, 3)
        rows = np.arange(p)
    if units > 1:
        member = (rows // (unit // phases))[None, :] == np.arange(units)[:, None]
        xr = jnp.where(member[None, None, :, None, :], xr, jnp.zeros((), xr.dtype))
    return xr.reshape(m, -1), xf.reshape(m, k // unit, unit).sum(axis=-1)


def pairs(fmt: Format, x_dtype) -> bool:
    """Whether the route multiplies 16-bit weight pairs (`pair_weights`, `nm_pair_tiles`) for
    `fmt` and x of `x_dtype`: 2/4-bit codes, dense or 2:4, with bf16/f16 x. Otherwise (8-bit
    codes: 2**8 + c needs 9 significant bits, bf16 has 8) float32 weights in TF32
    (`phase_weights`, `nm_tiles`)."""
    return fmt.bits in (2, 4) and jnp.dtype(x_dtype) in HALF_FLOATS


def step(qweight_ref, scales_ref, zeros_ref, xp_ref, sums_ref, kb, yt, *, fmt: Format,
         block_k: int, rows, slot=None, asm: bool = False, nm=None):
    """yt + (x[rows] @ W).T for K step `kb`, from the whole-K refs of one column strip: the
    route accumulates transposed, [block_n, block_m] (see the module docstring).

    qweight_ref  # [K' * bits / 32, bn] uint32 (with a leading slot axis when `slot` is given)
    scales_ref   # [K / group_size, bn] bf16
    zeros_ref    # [K / group_size, bn] uint8, or None when symmetric
    xp_ref       # [M', K * units] float32, or x's dtype for `pairs`: `phase_inputs`
    sums_ref     # [M', K / unit] float32, `phase_inputs`
    rows         # the rows of xp / sums this program multiplies (a slice or pl.ds)
    asm          # dequantize with inline PTX (`asm_text`): compiled kernels, not
                 # interpret mode
    nm           # 2:4 only: (meta_ref [K' / 16, bn] uint32, zero_words_ref [K / group_size,
                 # bn / 4] uint32 or None when symmetric, the loaded `nm_table`)
    """
    bits = fmt.bits
    phases, p, unit, units = layout(fmt, block_k)
    lead = () if slot is None else (slot,)
    words = qweight_ref[(*lead, pl.ds(kb * p, p), slice(None))]
    pair = pairs(fmt, xp_ref.dtype)
    x_dtype = xp_ref.dtype if pair else None
    if fmt.nm is None and pair:  # transposed (the dot's A operand), then split into halves
        tiles = ((r, pair_weights(words.T, bits, r, x_dtype, asm=asm))
                 for r in range(phases // 2))
    elif fmt.nm is None:
        tiles = ((r, phase_weights(words, bits, r, asm=asm).T) for r in range(phases))
    else:  # one unit, the step's group (`serves`)
        meta_ref, zero_words_ref, table_ref = nm
        table = table_ref[pl.ds(kb % 2 * p, p), :]
        group = kb * block_k // fmt.group_size
        zero = nm_zero_bits(zero_words_ref, lead, group, p, bits, table, x_dtype)
        positions = nm_positions(meta_ref, lead, kb, p, bits, table)
        if pair:
            zero = zero.T if zero.ndim else zero
            tiles = nm_pair_tiles(words.T, positions.T, zero, bits, x_dtype, asm=asm)
        else:
            tiles = ((r, w.T) for r, w in nm_tiles(words, positions, zero, bits, asm=asm))
    accs = [jnp.zeros(yt.shape, jnp.float32) for _ in range(units)]
    count = phases // 2 if pair else phases  # tiles a step
    for r, wt in tiles:
        width = wt.shape[1]
        for j in range(units):
            start = ((kb * units + j) * count + r) * width
            accs[j] = accs[j] + jnp.dot(wt, xp_ref[rows, pl.ds(start, width)].T,
                                        preferred_element_type=jnp.float32)
    # acc is sum(x) + sum(x * c) / 2**b (float32 phases), or 2**b sum(x) + sum(x * c) (pairs)
    top = float(2 ** bits)
    gain = 1.0 if pair else top
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
        yt = yt + scale * (gain * accs[j] - (top + zero) * total)
    return yt
