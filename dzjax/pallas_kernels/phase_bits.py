"""The phase route's weights from packed code words, bit by bit (see `phases.py`): the codes at
one bit offset of a word tile, ANDed, shifted and given an exponent so that each is exactly a
float (`phase_weights`, float32 1 + c / 2**bits) or a 16-bit weight of a pair (`pair_weights`,
2**bits + c in x's dtype), in inline PTX in compiled kernels (`phase_asm`, `pair_asm`) and in
jnp in interpret mode (`moved`: `tests/test_packing.py` holds the two to the same bits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dzjax.pallas_kernels.formats import Format

ONE_BITS = 0x3F800000  # 1.0f


def word_rows(fmt: Format) -> int:
    """The dense rows one code word covers: its codes, twice that with 2:4."""
    n, m = fmt.nm or (1, 1)
    return 32 // fmt.bits * m // n


def phase_bits(bits: int, phase: int) -> tuple[int, int]:
    """(mask, shift) of phase `phase`: the codes at bit offset phase * bits are `words & mask`,
    and moved by `shift` (left when positive) they sit in the top `bits` mantissa bits."""
    return ((1 << bits) - 1) << (phase * bits), 23 - bits - phase * bits


def asm_text(mask: int, shift: int, add: int) -> str:
    """PTX of (($1 & mask) moved by `shift`, left when positive) + add: ptxas makes it a LOP3
    and a LEA (or LEA.HI, or an add where there is no shift), with immediates."""
    move = f"shl.b32 t, t, {shift};" if shift > 0 else \
        f"shr.u32 t, t, {-shift};" if shift < 0 else ""
    return f"{{ .reg .b32 t; and.b32 t, $1, {mask}; {move} add.u32 $0, t, {add}; }}"


def phase_asm(bits: int, phase: int) -> str:
    """The PTX of `phase_weights` for one word: AND, shift, then add 1.0f (the bits are
    disjoint, so the add is the OR)."""
    return asm_text(*phase_bits(bits, phase), ONE_BITS)


def moved(words, mask: int, shift: int, add: int, *, asm: bool):
    """uint32 ((words & mask) moved by `shift`) + add: `asm_text` in compiled kernels, jnp in
    interpret mode (`tests/test_packing.py` holds the two to the same bits)."""
    if asm:
        from jax.experimental.pallas import triton as pl_triton

        out, = pl_triton.elementwise_inline_asm(
            asm_text(mask, shift, add), args=[lax.bitcast_convert_type(words, jnp.int32)],
            constraints="=r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int32)])
        return lax.bitcast_convert_type(out, jnp.uint32)
    picked = words & jnp.uint32(mask)
    shifted = picked << jnp.uint32(shift) if shift >= 0 else picked >> jnp.uint32(-shift)
    return shifted + jnp.uint32(add)


# The 16-bit pair route: (mantissa bits, exponent bias) of the activations' dtype.
HALF_FLOATS = {jnp.dtype(jnp.bfloat16): (7, 127), jnp.dtype(jnp.float16): (10, 15)}


def pair_bits(bits: int, pair: int, x_dtype) -> tuple[int, int, int]:
    """(mask, shift, add) of `pair`: the codes at bit offset pair * bits of both 16-bit halves
    of a word are `words & mask`; moved by `shift` they sit in the top `bits` mantissa bits of
    each half, and `add` sets each half's exponent to that of 2**bits, so that each half is,
    in `x_dtype`, exactly 2**bits + c."""
    mantissa, bias = HALF_FLOATS[jnp.dtype(x_dtype)]
    mask = ((1 << bits) - 1) << (pair * bits)
    magic = (bias + bits) << mantissa
    return mask | mask << 16, mantissa - bits - pair * bits, magic | magic << 16


def pair_asm(bits: int, pair: int, x_dtype) -> str:
    """The PTX of `pair_weights` for one word: AND, shift, add (a LOP3 and a LEA, 2
    instructions for 2 weights)."""
    return asm_text(*pair_bits(bits, pair, x_dtype))


def pair_weights(words_t, bits: int, pair: int, x_dtype, *, asm: bool):
    """[bn, p] uint32 words (transposed) -> [bn, 2p] weights of `x_dtype`, 2**bits + c: column
    2j + h is the code at bit offset pair * bits of half h of word j."""
    return halves(moved(words_t, *pair_bits(bits, pair, x_dtype), asm=asm), x_dtype)


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
        moved(words, *phase_bits(bits, phase), ONE_BITS, asm=asm), jnp.float32)
