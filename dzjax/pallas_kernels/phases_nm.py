"""The phase route's 2:4 tiles (see "2:4 sparsity" in `phases.py`): each dense input's weight
tile selected from a group's two kept values and its zero point, by bitwise masks on 16-bit
pairs (`nm_pair_tiles`) or by compares on float32 weights (`nm_tiles`), and the operands that
bring the positions and zero points into the dot's operand layout through loads only
(`nm_table`, `zero_words`, `nm_positions`, `nm_zero_bits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from dzjax.pallas_kernels.formats import Format
from dzjax.pallas_kernels.phase_bits import (HALF_FLOATS, ONE_BITS, halves, moved, pair_bits,
                                             phase_bits, word_rows)

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
    p = block_k // word_rows(fmt)  # word rows of a phase tile (`phases.layout`)
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
        one, shift = ONE_BITS, 23 - bits
    else:
        mantissa, bias = HALF_FLOATS[jnp.dtype(x_dtype)]
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
        kept = [moved(words, *phase_bits(bits, 2 * a + i), ONE_BITS, asm=asm)
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
    """The PTX of `masks`: $1 the conditions, $2 the second register (`_cond_byte`)."""
    return f"prmt.b32 $0, $1, $2, {prmt_sign(bits, pair)};"


def masks(cond, bits: int, pair: int, *, asm: bool):
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
    (`masks`). 6 selects (LOP3) then make the 4 tiles of a group pair."""
    if bits == 4:  # and a copy 20 bits up (`_cond_byte`)
        positions_t = (positions_t & jnp.uint32(0xFFFF)) * jnp.uint32(0x100001)
    b1, b0, a1, a0 = (positions_t << jnp.uint32(k) for k in range(4))
    conds = (~a1 & ~a0, a0 | (~b1 & b0), a1 | (b1 & ~b0), b1 & b0)  # inputs 0-3 kept
    for a in range(8 // bits):
        v0, v1 = (moved(words_t, *pair_bits(bits, 2 * a + i, x_dtype), asm=asm) for i in (0, 1))
        first, second, third, last = (masks(c, bits, a, asm=asm) for c in conds)
        yield 4 * a, halves(_select(first, v0, zero_pair), x_dtype)
        yield 4 * a + 1, halves(_select(second, _select(first, v1, v0), zero_pair), x_dtype)
        yield 4 * a + 2, halves(_select(third, _select(last, v0, v1), zero_pair), x_dtype)
        yield 4 * a + 3, halves(_select(last, v1, zero_pair), x_dtype)
