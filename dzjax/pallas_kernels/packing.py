"""The canonical packing of quantization codes, shared by the delta file, the references and kernels.

Codes of `bits` bits are packed along the input dimension (axis 0 of a [K, N] kernel) as a bit
stream in little-endian uint32 words: every 32 consecutive rows fill `bits` words, row r of such
a block occupying bits [r * bits, (r + 1) * bits) of the block. For 2, 4 and 8 bits no code crosses
a word (4-bit word j holds rows 8j..8j+7, GPTQ's layout); 3-bit codes do, and are unpacked by the
same arithmetic. So a packed tensor is uint32 [K * bits / 32, N], and K must be a multiple of 32.

n:m sparsity keeps n values in every m consecutive inputs: the kept values are stored densely,
[K * n / m, N], and their positions inside each group of m as `ceil(log2 m)`-bit indices packed
the same way (2:4 at 4 bits: 4 + 2 = 6 bits per 2 weights, 3 bits per weight).

`biased_float` makes codes float32 from their bit pattern, with no conversion instruction (the
kernels' dequantization). Everything here is pure jnp, works under jit and on any backend.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

WORD_BITS = 32


def _check_rows(rows: int, bits: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"{bits=} must lie in [1, 16]")
    if rows % WORD_BITS:
        raise ValueError(f"{rows=} must be a multiple of {WORD_BITS} to pack {bits}-bit codes")


def pack_codes(codes, bits: int):
    """codes [K, N] (integers in [0, 2**bits)) -> uint32 [K * bits / 32, N]."""
    k, n = codes.shape
    _check_rows(k, bits)
    codes = jnp.asarray(codes).astype(jnp.uint32).reshape(k // WORD_BITS, WORD_BITS, n)
    start = np.arange(WORD_BITS) * bits  # bit offset of each row inside its block
    words = []
    for w in range(bits):
        word = jnp.zeros((k // WORD_BITS, n), jnp.uint32)
        for r in range(WORD_BITS):  # rows whose bits fall (partly) into word w
            lo, hi = start[r] - w * WORD_BITS, start[r] + bits - w * WORD_BITS
            if hi <= 0 or lo >= WORD_BITS:
                continue
            part = codes[:, r] << lo if lo >= 0 else codes[:, r] >> -lo
            word = word | part.astype(jnp.uint32)
        words.append(word)
    return jnp.stack(words, axis=1).reshape(k // WORD_BITS * bits, n)


def unpack_codes(packed, bits: int, rows: int):
    """uint32 [rows * bits / 32, N] -> int32 codes [rows, N] (the inverse of `pack_codes`)."""
    _check_rows(rows, bits)
    n = packed.shape[-1]
    if packed.shape[0] * WORD_BITS != rows * bits:
        raise ValueError(f"packed rows {packed.shape[0]} do not hold {rows} {bits}-bit codes")
    words = jnp.asarray(packed).astype(jnp.uint32).reshape(rows // WORD_BITS, bits, n)
    start = np.arange(WORD_BITS) * bits
    first, offset = start // WORD_BITS, start % WORD_BITS
    low = words[:, first] >> offset[None, :, None].astype(np.uint32)
    # A code crossing into the next word takes its high bits from there.
    spill = np.minimum(first + 1, bits - 1)
    crosses = (offset + bits > WORD_BITS)[None, :, None]
    shift = np.where(offset > 0, WORD_BITS - offset, 0).astype(np.uint32)[None, :, None]
    high = jnp.where(crosses, words[:, spill] << shift, 0)
    mask = np.uint32((1 << bits) - 1)
    return ((low | high) & mask).astype(jnp.int32).reshape(rows, n)


# Conversion-free dequantization: an unsigned integer c < 2**23 OR-ed into the mantissa of the
# float32 2**23 (bits 0x4B000000) is, reinterpreted, exactly the float 2**23 + c. Codes and zero
# points both biased so, (2**23 + c) - (2**23 + z) = c - z exactly (floats in [2**23, 2**24) are
# the integers): the same value as converting c and z to float and subtracting, bit for bit, with
# an OR and a reinterpretation per element instead of a conversion instruction (which issues at a
# fraction of the rate of integer and float arithmetic on a GPU).
MAGIC_BITS = 0x4B000000
MAGIC = 2.0 ** 23


def biased_float(codes_u32):
    """uint32 values < 2**23 -> float32 2**23 + value, from the bit pattern."""
    return lax.bitcast_convert_type(codes_u32 | jnp.uint32(MAGIC_BITS), jnp.float32)


def index_bits(m: int) -> int:
    """Bits of one position index inside a group of m."""
    return max(1, int(np.ceil(np.log2(m))))


def compress_nm(values, mask, n: int, m: int):
    """Keep the n values per m consecutive rows that `mask` marks.

    Args:
      values: [K, N]; mask: bool [K, N] with exactly n True in every group of m rows.
    Returns:
      (kept [K * n / m, N], positions int32 [K * n / m, N] in [0, m)), groups in order, and the
      kept values of a group in increasing row order.
    """
    k, cols = values.shape
    if k % m:
        raise ValueError(f"{k=} must be a multiple of m={m} for {n}:{m} sparsity")
    grouped = jnp.asarray(mask).reshape(k // m, m, cols)
    # Stable order: kept rows first, in row order (argsort of "not kept" is stable).
    order = jnp.argsort(~grouped, axis=1, stable=True)[:, :n]
    kept = jnp.take_along_axis(jnp.asarray(values).reshape(k // m, m, cols), order, axis=1)
    return kept.reshape(k // m * n, cols), order.astype(jnp.int32).reshape(k // m * n, cols)


def expand_nm(kept, positions, n: int, m: int):
    """[K * n / m, N] kept values at their positions -> dense [K, N] with zeros elsewhere."""
    rows, cols = kept.shape
    groups = rows // n
    one_hot = positions.reshape(groups, n, 1, cols) == jnp.arange(m)[None, None, :, None]
    dense = jnp.sum(jnp.where(one_hot, kept.reshape(groups, n, 1, cols), 0), axis=1)
    return dense.reshape(groups * m, cols).astype(kept.dtype)
