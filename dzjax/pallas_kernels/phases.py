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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dzjax.pallas_kernels import packing
from dzjax.pallas_kernels.formats import Format

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


def phase_bits(bits: int, phase: int) -> tuple[int, int]:
    """(mask, shift) of phase `phase`: the codes at bit offset phase * bits are `words & mask`,
    and moved by `shift` (left when positive) they sit in the top `bits` mantissa bits."""
    return ((1 << bits) - 1) << (phase * bits), 23 - bits - phase * bits


def _asm(mask: int, shift: int, add: int) -> str:
    """PTX of (($1 & mask) moved by `shift`, left when positive) + add: ptxas makes it a LOP3
    and a LEA (or LEA.HI, or an add where there is no shift), with immediates."""
    move = f"shl.b32 t, t, {shift};" if shift > 0 else \
        f"shr.u32 t, t, {-shift};" if shift < 0 else ""
    return f"{{ .reg .b32 t; and.b32 t, $1, {mask}; {move} add.u32 $0, t, {add}; }}"


def phase_asm(bits: int, phase: int) -> str:
    """The PTX of `phase_weights` for one word: AND, shift, then add 1.0f (the bits are
    disjoint, so the add is the OR)."""
    return _asm(*phase_bits(bits, phase), _ONE_BITS)


def _moved(words, mask: int, shift: int, add: int, *, asm: bool):
    """uint32 ((words & mask) moved by `shift`) + add: `_asm` in compiled kernels, jnp in
    interpret mode (`tests/test_packing.py` holds the two to the same bits)."""
    if asm:
        from jax.experimental.pallas import triton as pl_triton

        moved, = pl_triton.elementwise_inline_asm(
            _asm(mask, shift, add), args=[lax.bitcast_convert_type(words, jnp.int32)],
            constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int32)])
        return lax.bitcast_convert_type(moved, jnp.uint32)
    picked = words & jnp.uint32(mask)
    moved = picked << jnp.uint32(shift) if shift >= 0 else picked >> jnp.uint32(-shift)
    return moved + jnp.uint32(add)


# The 16-bit pair route: (mantissa bits, exponent bias) of the activations' dtype.
_HALF_FLOATS = {jnp.dtype(jnp.bfloat16): (7, 127), jnp.dtype(jnp.float16): (10, 15)}


def pairs(fmt: Format, x_dtype) -> bool:
    """Whether the route multiplies 16-bit weight pairs (`pair_weights`, `nm_pair_tiles`) for
    `fmt` and x of `x_dtype`: 2/4-bit codes, dense or 2:4, with bf16/f16 x. Otherwise (8-bit
    codes: 2**8 + c needs 9 significant bits, bf16 has 8) float32 weights in TF32
    (`phase_weights`, `nm_tiles`)."""
    return fmt.bits in (2, 4) and jnp.dtype(x_dtype) in _HALF_FLOATS


def pair_bits(bits: int, pair: int, x_dtype) -> tuple[int, int, int]:
    """(mask, shift, add) of `pair`: the codes at bit offset pair * bits of both 16-bit halves
    of a word are `words & mask`; moved by `shift` they sit in the top `bits` mantissa bits of
    each half, and `add` sets each half's exponent to that of 2**bits, so that each half is,
    in `x_dtype`, exactly 2**bits + c."""
    mantissa, bias = _HALF_FLOATS[jnp.dtype(x_dtype)]
    mask = ((1 << bits) - 1) << (pair * bits)
    magic = (bias + bits) << mantissa
    return mask | mask << 16, mantissa - bits - pair * bits, magic | magic << 16


def pair_asm(bits: int, pair: int, x_dtype) -> str:
    """The PTX of `pair_weights` for one word: AND, shift, add (a LOP3 and a LEA, 2
    instructions for 2 weights)."""
    return _asm(*pair_bits(bits, pair, x_dtype))


def pair_weights(words_t, bits: int, pair: int, x_dtype, *, asm: bool):
    """[bn, p] uint32 words (transposed) -> [bn, 2p] weights of `x_dtype`, 2**bits + c: column
    2j + h is the code at bit offset pair * bits of half h of word j."""
    return halves(_moved(words_t, *pair_bits(bits, pair, x_dtype), asm=asm), x_dtype)


def halves(pairs_t, x_dtype):
    """[bn, p] uint32 -> [bn, 2p] of 16-bit `x_dtype`: column 2j + h is half h of column j,
    the dot's K order (the 16-bit MMA takes the two halves of a 32-bit register as adjacent
    K: the tile is the word tile as loaded, nothing moves)."""
    bn, p = pairs_t.shape
    half = lambda h: lax.bitcast_convert_type(
        (pairs_t >> jnp.uint32(16 * h)).astype(jnp.uint16), x_dtype)
    return jnp.stack([half(0), half(1)], axis=-1).reshape(bn, 2 * p)


def phase_weights(words, bits: int, phase: int, *, asm: bool):
    """1 + c / 2**bits for the codes at bit offset phase * bits of uint32 `words`, as float32.

    Mask first, then shift and add 1.0f: ptxas makes the shift and add one LEA with an
    immediate, so a weight costs 2 instructions (LOP3, LEA). Written in jnp, LLVM turns it back
    into shift, AND, OR, which ptxas makes one LOP3 with two constants, the second in a register
    it rematerializes with a move before most uses (2.6 instructions a weight). So the compiled
    kernel (`asm`) states it in PTX (`phase_asm`); interpret mode runs the same operations in
    jnp."""
    return lax.bitcast_convert_type(
        _moved(words, *phase_bits(bits, phase), _ONE_BITS, asm=asm), jnp.float32)


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


def nm_zero_bits(zero_words_ref, lead, group, p: int, bits: int, table, x_dtype=None):
    """[p, bn] uint32: the bits of the weight that dequantizes to 0 for each column of scale
    group `group`, every row alike (a gather from `zero_words`); a constant for symmetric
    formats (`zero_words_ref` None, zero 2**(bits - 1)). Float32 1 + zero / 2**bits, or with
    `x_dtype` (`pairs`) 2**bits + zero in both 16-bit halves."""
    if x_dtype is None:
        one, shift = _ONE_BITS, 23 - bits
    else:
        mantissa, bias = _HALF_FLOATS[jnp.dtype(x_dtype)]
        one, shift = (bias + bits) << mantissa, mantissa - bits
    if zero_words_ref is None:
        weight = one + (2 ** (bits - 1) << shift)
        return jnp.uint32(weight if x_dtype is None else weight * 0x10001)
    bn = table.shape[1]
    rows = jnp.zeros((p, 1), jnp.int32) + group
    cols = lax.broadcasted_iota(jnp.int32, (1, bn), 1) // 4
    z = (zero_words_ref[(*lead, rows, cols)] >> (table >> jnp.uint32(8))) & jnp.uint32(255)
    weight = (z << jnp.uint32(shift)) + jnp.uint32(one)
    return weight if x_dtype is None else weight | weight << jnp.uint32(16)


def nm_tiles(words, positions, zero_bits, bits: int, *, asm: bool):
    """(phase, [p, bn] float32 weights) of each dense phase of 2:4 code words: phase 4a + t is
    input t of the word's group a, 1 + c / 2**bits where one of the group's kept values sits
    there, else the zero point's (`zero_bits`: the bits of 1 + zero / 2**bits)."""
    for a in range(16 // bits):  # the groups of 4 inputs a word holds
        kept = [_moved(words, *phase_bits(bits, 2 * a + i), _ONE_BITS, asm=asm)
                for i in (0, 1)]
        fields = [positions & jnp.uint32(3 << 4 * a + 2 * i) for i in (0, 1)]
        for t in range(4):
            w = zero_bits
            # Increasing positions: kept value 1 is never at input 0, nor kept value 0 at 3.
            if t > 0:
                w = jnp.where(fields[1] == jnp.uint32(t << 4 * a + 2), kept[1], w)
            if t < 3:
                w = jnp.where(fields[0] == jnp.uint32(t << 4 * a), kept[0], w)
            yield 4 * a + t, lax.bitcast_convert_type(w, jnp.float32)


def _cond_byte(bits: int, g: int) -> int:
    """The byte (of the 8 `prmt` reads) whose top bit is group g's condition (see
    `nm_pair_tiles`): odd groups' bit 4g + 3 is the top of byte g // 2 of the conditions;
    even groups' is moved up by a copy of the positions 20 bits up at 4 bits (16 bits hold a
    word's positions), else by a second register, the conditions << 4 (bytes 4-7)."""
    return g // 2 if g % 2 else (2 if bits == 4 else 4) + g // 2


def prmt_sign(bits: int, pair: int) -> int:
    """The `prmt` selector of `nm_pair_tiles`' masks for group pair `pair`: each output byte
    replicates the top bit of a byte (`_cond_byte`), half 0's two from group `pair`'s, half
    1's from group pair + G / 2's (G = 16 / bits)."""
    low, high = (8 | _cond_byte(bits, g) for g in (pair, pair + 8 // bits))  # 8: the sign
    return low | low << 4 | high << 8 | high << 12


def prmt_asm(bits: int, pair: int) -> str:
    """The PTX of `_masks`: $1 the conditions, $2 the second register (`_cond_byte`)."""
    return f"prmt.b32 $0, $1, $2, {prmt_sign(bits, pair)};"


def _masks(cond, bits: int, pair: int, *, asm: bool):
    """[bn, p] uint32 of 0xFFFF or 0 in each half: group pair `pair`'s condition bits of cond
    (`prmt_sign`), one `prmt` in compiled kernels, its jnp equivalent in interpret mode."""
    sel = prmt_sign(bits, pair)
    shifted = cond if bits == 4 else cond << jnp.uint32(4)
    if asm:
        from jax.experimental.pallas import triton as pl_triton

        out, = pl_triton.elementwise_inline_asm(
            prmt_asm(bits, pair),
            args=[lax.bitcast_convert_type(a, jnp.int32) for a in (cond, shifted)],
            constraints="=r,r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(cond.shape, jnp.int32)])
        return lax.bitcast_convert_type(out, jnp.uint32)
    masks = jnp.uint32(0)
    for h in (0, 1):
        byte = sel >> 8 * h & 7
        top = (shifted if byte & 4 else cond) >> jnp.uint32(8 * (byte & 3) + 7) & jnp.uint32(1)
        masks = masks | top * jnp.uint32(0xFFFF << 16 * h)
    return masks


def _select(mask, a, b):
    """a where mask's bits are set, else b (one LOP3)."""
    return (mask & a) | (~mask & b)


def nm_pair_tiles(words_t, positions_t, zero_pair, bits: int, x_dtype, *, asm: bool):
    """(pair, [bn, 2p] weights of `x_dtype`) of 2:4 code words (transposed, [bn, p]) for
    `pairs`: pair 4a + t is input t of group a in half 0 of each word (column 2j) and of
    group a + G / 2 in half 1 (column 2j + 1), G = 16 / bits groups a word, the dense pair
    route's K order with word_rows phases. Each half is 2**bits + c where one of its group's
    kept values sits there, else the zero point's (`zero_pair`, both halves).

    Bitwise on both halves at once: the kept values of the group pair are dequantized as
    dense pairs 2a and 2a + 1 (`pair_bits`), and each input's tile is selected from them and
    the zero point by a mask. With positions p0 < p1 (bits A1 A0, B1 B0; the loader checks
    that they increase), input 0 is kept where p0 = 0, input 3 where p1 = 3, input 1 where A0
    or p1 = 1 (not B1, B0), input 2 where A1 or p1 = 2 (B1, not B0); input 1 holds kept value
    1 where input 0 is kept, input 2 kept value 0 where input 3 is. Each condition is one
    LOP3 of the positions shifted so that every group's bits meet at its B1 (bit 4g + 3), for
    all of a word's groups at once; a `prmt` spreads a group pair's condition bits to masks
    (`_masks`). 6 selects (LOP3) then make the 4 tiles of a group pair."""
    if bits == 4:  # and a copy 20 bits up (`_cond_byte`)
        positions_t = (positions_t & jnp.uint32(0xFFFF)) * jnp.uint32(0x100001)
    b1, b0, a1, a0 = (positions_t << jnp.uint32(k) for k in range(4))
    conds = (~a1 & ~a0, a0 | (~b1 & b0), a1 | (b1 & ~b0), b1 & b0)  # inputs 0-3 kept
    for a in range(8 // bits):
        v0, v1 = (_moved(words_t, *pair_bits(bits, 2 * a + i, x_dtype), asm=asm) for i in (0, 1))
        first, second, third, last = (_masks(c, bits, a, asm=asm) for c in conds)
        yield 4 * a, halves(_select(first, v0, zero_pair), x_dtype)
        yield 4 * a + 1, halves(_select(second, _select(first, v1, v0), zero_pair), x_dtype)
        yield 4 * a + 2, halves(_select(third, _select(last, v0, v1), zero_pair), x_dtype)
        yield 4 * a + 3, halves(_select(last, v1, zero_pair), x_dtype)


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
    asm          # dequantize with inline PTX (`_asm`): compiled kernels, not
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
