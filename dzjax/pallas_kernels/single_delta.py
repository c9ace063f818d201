"""Fused unpack + dequantize + matmul for one compressed delta: y = x @ dequantize(q), in Pallas.

Tiling (Triton backend): one program per (block_m rows of x, block_n output columns, K split).
Each program walks its share of K in steps of block_k; a step loads the packed uint32 tile
[block_k * bits / 32, block_n] (compressed bytes only: never a dense weight in HBM), unpacks it
in registers, dequantizes with the step's scales and zero points and feeds one `dot` with float32
accumulation. With `split_k` > 1 the partial sums [split_k, M, N] are added by XLA afterwards, so
that decode shapes (a few rows) still launch enough programs to fill the GPU. x is not padded: a
row tile that overhangs M is read and written under Pallas's bounds mask. `tiling` picks the
tile sizes (shared with the multi-delta kernel); 8 warps from 64 x 128 output tiles on.

Dequantization builds the floats from bit patterns, with no conversion instruction: in float32
(codes biased into the mantissa of 2**23), or for 2/4-bit codes with bf16 activations directly in
bf16 (2**7), so the operand tile needs no float32-to-bf16 rounding either; both bit for bit the
plain `scale * (float(code) - float(zero))` rounded once to x's dtype.

Unpacking without gathers: in the canonical packing (`packing.py`) word p of a column holds stored
rows p * (32 / bits) + r at bit offset r * bits. So a tile of words [P, bn] is broadcast to
[P, 32 / bits, bn], shifted right by an iota along the middle axis times `bits`, masked, and
reshaped to [P * 32 / bits, bn]: rows come out in order. Only broadcasts, shifts, masks and a
reshape that merges leading axes, all of which Triton lowers; every tensor is a power of two.

n:m sparsity (2:4): the n kept values of a group of m inputs are n consecutive stored rows. The
same shift trick with stride n and phase i extracts "the i-th kept value of every group" as
[block_k / m, bn], and likewise its position index from `meta`. The dense block is built as
[block_k / m, m, bn] with `where(position_i == iota_m, value_i, ...)` and reshaped to
[block_k, bn]: again no gather and no concatenation.

3-bit codes cross word boundaries; they are served by the XLA path only (an explicit error here).
The XLA path (`delta_matmul_xla`) runs the same gather-free unpacking on the whole matrix, in
float32 (XLA on a CPU runs bf16 arithmetic several times slower), then rounds: the same bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dzjax.pallas_kernels import packing, phases, phases_nm
from dzjax.pallas_kernels.tiling import (DeltaMatmulConfig, check_pallas_format,
                                        k_loop_body, k_split)
from dzjax.pallas_kernels.formats import Format, QuantizedTensor, pad_rows
from dzjax.pallas_kernels.reference import dequantize



# ----------------------------------------------------------------------------------------------
# In-kernel unpacking and dequantization (traced inside kernel bodies).


def _unpack_bits(words, bits: int, stride: int, phase: int):
    """uint32 words [P, bn] -> uint32 codes of stored rows phase, phase + stride, ...
    [P * 32/bits/stride, bn]."""
    p, bn = words.shape
    sel = 32 // bits // stride
    wide = lax.broadcast_in_dim(words, (p, sel, bn), (0, 2))
    shift = (lax.broadcasted_iota(jnp.uint32, (p, sel, bn), 1) * stride + phase) * bits
    codes = (wide >> shift) & jnp.uint32((1 << bits) - 1)
    return codes.reshape(p * sel, bn)


def _unpack_rows(words, bits: int, stride: int, phase: int):
    """`_unpack_bits` as int32 (a reinterpretation: the codes are small)."""
    return _unpack_bits(words, bits, stride, phase).astype(jnp.int32)


# Conversion-free dequantization in float32: `packing.biased_float` (2**23 + c from the bits).
# The same in bfloat16 for codes and zero points below 2**7 (2- and 4-bit formats): 2**7 + c is
# exact in bf16 (8 significant bits), so is the difference of two such values, and the product
# scale * (c - z) of a bf16 scale and an integer of at most 5 bits is exact in float32: one bf16
# multiply rounds it exactly as rounding the float32 product does. So for bf16 activations the
# operand tile is built in bf16 with no conversion at all (no float32 -> bf16 rounding either),
# bit for bit the float32 route rounded to bf16.
_MAGIC_BF16_BITS = 0x4300
_MAGIC_BF16 = 2.0 ** 7


def _biased_bf16(codes_u32):
    """uint32 values < 2**7 -> bfloat16 2**7 + value, from the bit pattern."""
    return lax.bitcast_convert_type((codes_u32 | jnp.uint32(_MAGIC_BF16_BITS)).astype(jnp.uint16),
                                    jnp.bfloat16)


def dequant_dtype(fmt: Format, x_dtype) -> jnp.dtype:
    """The dtype `dequant_tile` builds weights in for activations of `x_dtype`: bf16 when the
    codes allow the exact bf16 route (bits <= 4 with bf16 activations), else float32."""
    return jnp.dtype(jnp.bfloat16 if x_dtype == jnp.bfloat16 and fmt.bits <= 4 else jnp.float32)


def _repeat_rows(a, times: int):
    """[r, bn] -> [r * times, bn], each row repeated `times` times (a broadcast and a reshape)."""
    if times == 1:
        return a
    r, bn = a.shape
    return lax.broadcast_in_dim(a, (r, times, bn), (0, 2)).reshape(r * times, bn)


def dequant_tile(words, scale_rows, zero_rows, positions, *, fmt: Format, block_k: int,
                 dtype=jnp.float32):
    """Dense [block_k, bn] weights of `dtype` from one K step's stored arrays (kernel or XLA).

    words       # [block_k * n / m * bits / 32, bn] uint32 packed codes
    scale_rows  # [block_k / group_size, bn] or [1, bn] (group_size >= block_k) scales
    zero_rows   # like scale_rows (uint8), or None when symmetric
    positions   # [block_k * n / m * index_bits / 32, bn] uint32 n:m indices, or None when dense
    dtype       # float32, or bfloat16 for bits <= 4 (see `dequant_dtype`)
    Values are scale * (code - zero) as `reference.dequantize` computes them in float32 (rounded
    once to bf16 for dtype bfloat16), with no integer-to-float conversion of a code
    (`packing.biased_float`, `_biased_bf16`).
    """
    n, m = fmt.nm or (1, 1)
    g, bits = fmt.group_size, fmt.bits
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        if bits > 4:
            raise ValueError(f"bf16 dequantization needs bits <= 4, got {bits}")
        biased, magic = _biased_bf16, _MAGIC_BF16
    elif dtype == jnp.float32:
        biased, magic = packing.biased_float, packing.MAGIC
    else:
        raise ValueError(f"dequant_tile builds float32 or bfloat16 weights, not {dtype}")
    # One scale / zero row per group of m inputs ([block_k / m, bn]) or one for the step ([1, bn]).
    times = 1 if g % block_k == 0 else g // m
    scale = _repeat_rows(scale_rows.astype(dtype), times)
    # Zero points biased like the codes: code - zero stays exact.
    if zero_rows is None:
        zero = jnp.asarray(magic + 2 ** (bits - 1), dtype)
    else:
        zero = _repeat_rows(biased(zero_rows.astype(jnp.uint32)), times)
    if fmt.nm is None:
        return scale * (biased(_unpack_bits(words, bits, 1, 0)) - zero)
    ib = packing.index_bits(m)
    groups, bn = block_k // m, words.shape[1]
    slot = lax.broadcasted_iota(jnp.int32, (groups, m, bn), 1)
    dense = jnp.zeros((groups, m, bn), dtype)
    for i in range(n):  # the i-th kept value of every group of m, and where it goes
        value = scale * (biased(_unpack_bits(words, bits, n, i)) - zero)
        where = _unpack_rows(positions, ib, n, i)
        hit = lax.broadcast_in_dim(where, (groups, m, bn), (0, 2)) == slot
        dense = jnp.where(hit, lax.broadcast_in_dim(value, (groups, m, bn), (0, 2)), dense)
    return dense.reshape(block_k, bn)


def dequant_block(qweight_ref, scales_ref, zeros_ref, meta_ref, kb, *, fmt: Format, block_k: int,
                  dtype=jnp.float32, slot=None):
    """`dequant_tile` of K step `kb`, loaded from the whole-K refs of one column strip.

    qweight_ref  # [K' * bits / 32, bn] uint32
    scales_ref   # [K / group_size, bn] bf16
    zeros_ref    # [K / group_size, bn] uint8, or None when symmetric
    meta_ref     # [K' * index_bits / 32, bn] uint32, or None when dense
    With `slot` (a scalar, may be traced) every ref has a leading slot axis and that slot is read.
    """
    n, m = fmt.nm or (1, 1)
    g = fmt.group_size
    stored = block_k * n // m
    lead = () if slot is None else (slot,)

    def load(ref, start, size):
        return ref[(*lead, pl.ds(start, size), slice(None))]

    words_per_step = stored * fmt.bits // 32
    words = load(qweight_ref, kb * words_per_step, words_per_step)
    rows, start = (1, kb * block_k // g) if g % block_k == 0 else (block_k // g, kb * (block_k // g))
    scale_rows = load(scales_ref, start, rows)
    zero_rows = None if zeros_ref is None else load(zeros_ref, start, rows)
    positions = None
    if meta_ref is not None:
        meta_words = stored * packing.index_bits(m) // 32
        positions = load(meta_ref, kb * meta_words, meta_words)
    return dequant_tile(words, scale_rows, zero_rows, positions, fmt=fmt, block_k=block_k,
                        dtype=dtype)


def _dequantize_whole(q: QuantizedTensor, dtype) -> jax.Array:
    """`dequant_tile` of the whole [K, N] matrix (its stored padding rows cut off)."""
    fmt = q.format
    zeros = None if fmt.symmetric else q.zeros
    meta = q.meta if fmt.nm is not None else None
    w = dequant_tile(q.qweight, q.scales, zeros, meta, fmt=fmt, block_k=q.padded_rows,
                     dtype=dtype)
    return w[:q.shape[0]]


def dequantize_xla(q: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
    """`reference.dequantize` with the kernels' gather-free unpacking (bits 2/4/8, dense or n:m):
    the same values, several times faster on CPU. Other formats go through the reference."""
    try:
        check_pallas_format(q.format)
    except ValueError:
        return dequantize(q, dtype)
    return _dequantize_whole(q, jnp.float32).astype(dtype)


def kernel_weights(q: QuantizedTensor, x_dtype) -> jax.Array:
    """The [K, N] weights the kernels feed the dot for activations of `x_dtype`, built the way
    they build them (in bf16 where `dequant_dtype` says so), on the whole matrix: for checking
    that route against `dequantize_xla` rounded to x's dtype (the same bits). The XLA path itself
    rounds from float32, which XLA on a CPU runs several times faster."""
    dtype = dequant_dtype(q.format, x_dtype)
    w = _dequantize_whole(q, dtype)
    return round_to(w, x_dtype) if dtype == jnp.float32 else w


def round_to(w: jax.Array, dtype) -> jax.Array:
    """float32 w rounded to `dtype` for a dot with x of that dtype. reduce_precision first: XLA
    may drop a float32 -> bf16 -> float32 convert pair as "excess precision", never this."""
    if dtype == jnp.float32:
        return w
    info = jnp.finfo(dtype)
    return lax.reduce_precision(w, exponent_bits=info.nexp, mantissa_bits=info.nmant).astype(dtype)


def delta_matmul_xla(x: jax.Array, q: QuantizedTensor) -> jax.Array:
    """The XLA path: x [..., K] @ dequantize_xla(q) rounded to x's dtype -> [..., N] float32."""
    w = round_to(dequantize_xla(q, jnp.float32), x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32, precision=dot_precision(x.dtype))


def dot_tile(x, w):
    """x [M, K] @ w [K, N] rounded to x's dtype, float32 accumulation (kernel bodies)."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32,
                   precision=dot_precision(x.dtype))


def dot_precision(dtype):
    # float32 activations: full-precision dot (IEEE), not TF32, to match the reference.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


# ----------------------------------------------------------------------------------------------
# Kernel.


def _delta_matmul_kernel(*refs, fmt: Format, block_k: int, steps: int,
                         total: int | None, has_zeros: bool, has_meta: bool, phase: bool,
                         asm: bool):
    # steps: K steps a program runs (`tiling.split_steps`); total: all K steps, or None when
    #   the splits share them exactly
    # asm: compiled, not interpret mode (`phases.step`)
    # x_ref        # [block_m, K]  activations (bf16 / f16 / f32); on the phase route two refs,
    #              # the permuted x (float32, or x's dtype in pairs) and its sums
    #              # (`phases.phase_inputs`)
    # qweight_ref  # [K' * bits / 32, block_n] uint32
    # scales_ref   # [K / group_size, block_n] bf16
    # zeros_ref    # [K / group_size, block_n] uint8   (asymmetric formats only)
    # meta_ref     # [K' * index_bits / 32, block_n] uint32   (n:m formats only)
    # zero_words_ref, table_ref  # the 2:4 phase route's `phases_nm.nm_operands`
    # o_ref        # [block_m, block_n] float32: this K split's partial sum
    x_ref, *rest, o_ref = refs
    sums_ref = rest.pop(0) if phase else None
    qweight_ref, scales_ref = rest.pop(0), rest.pop(0)
    zeros_ref = rest.pop(0) if has_zeros else None
    meta_ref = rest.pop(0) if has_meta else None
    nm = None
    if phase and has_meta:
        zero_words_ref = rest.pop(0) if has_zeros else None
        nm = (meta_ref, zero_words_ref, rest.pop(0))
    first = pl.program_id(2) * steps

    def advance(kb, acc):
        if phase:
            return phases.step(qweight_ref, scales_ref, zeros_ref, x_ref, sums_ref, kb, acc,
                               fmt=fmt, block_k=block_k, rows=slice(None), asm=asm, nm=nm)
        w = dequant_block(qweight_ref, scales_ref, zeros_ref, meta_ref, kb, fmt=fmt,
                          block_k=block_k, dtype=dequant_dtype(fmt, x_ref.dtype))
        x = x_ref[:, pl.ds(kb * block_k, block_k)]
        return acc + dot_tile(x, w)

    body = k_loop_body(advance, first, total)

    if phase:  # transposed (`phases.step`)
        o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape[::-1], jnp.float32)).T
    else:
        o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))


def check_inputs(x: jax.Array, q: QuantizedTensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    k, n = q.shape
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but the delta is [{k}, {n}]")
    check_pallas_format(q.format)


def pallas_operands(q: QuantizedTensor) -> list[jax.Array]:
    """The refs the kernels read, in kernel order: qweight, scales, [zeros], [meta]."""
    ops = [q.qweight, q.scales]
    if not q.format.symmetric:
        ops.append(q.zeros)
    if q.format.nm is not None:
        ops.append(q.meta)
    return ops


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def delta_matmul_pallas(x: jax.Array, q: QuantizedTensor, *,
                        config: DeltaMatmulConfig | None = None,
                        interpret: bool = False) -> jax.Array:
    """y = x @ dequantize(q) with the fused Pallas kernel.

    Args:
      x: [M, K] bfloat16, float16 or float32 activations.
      q: a [K, N] `QuantizedTensor` with bits in (2, 4, 8), dense or n:m (2:4), any group size
        compatible with a power-of-two K step, symmetric or asymmetric.
      config: tiling; `DeltaMatmulConfig.heuristic` when None.
      interpret: run the kernel in Pallas interpret mode (any backend).
    Returns:
      [M, N] float32. On the general route the weights are those of
      `reference.delta_matmul_ref`, float32 values rounded once to x's dtype (built directly in
      bf16 where `dequant_dtype` allows: the same bits); on the phase route (`config.phases`,
      the default for 2/4/8-bit codes, dense or 2:4, and 16-bit x) the exact float32 weights.
      Accumulation is float32.
    """
    check_inputs(x, q)
    x, q = pad_rows(x, q)
    (m, k), n = x.shape, q.shape[1]
    fmt = q.format
    config = config or DeltaMatmulConfig.heuristic(m, k, n, fmt, x.dtype)
    config.validate(k, n, fmt, x.dtype)
    if m == 0:
        return jnp.zeros((0, n), jnp.float32)
    bm, bn, split = config.block_m, config.block_n, config.split_k
    # No padding of x or of the partial sums to whole row tiles: a last tile that overhangs M
    # (all of it at M = 1) is loaded and stored under the bounds mask Pallas adds.
    steps, total = k_split(k // config.block_k, split)  # total: None unless ragged

    operands = pallas_operands(q)
    # Whole-K column strips of every stored array; the kernel walks K itself.
    weight_specs = [pl.BlockSpec((a.shape[0], bn), lambda i, j, s: (0, j)) for a in operands]
    if config.phases and fmt.nm is not None:
        *words, table = phases_nm.nm_operands(q.zeros, fmt, config.block_k, bn)
        operands += [*words, table]
        weight_specs += [pl.BlockSpec((a.shape[0], bn // 4), lambda i, j, s: (0, j))
                         for a in words]
        weight_specs.append(pl.BlockSpec(table.shape, lambda i, j, s: (0, 0)))
    xs = list(phases.phase_inputs(x, fmt, config.block_k)) if config.phases else [x]
    kernel = functools.partial(
        _delta_matmul_kernel, fmt=fmt, block_k=config.block_k, steps=steps,
        total=total,
        has_zeros=not fmt.symmetric, has_meta=fmt.nm is not None, phase=config.phases,
        asm=not interpret)
    partial_sums = pl.pallas_call(
        kernel,
        grid=(-(-m // bm), n // bn, split),
        in_specs=[*(pl.BlockSpec((bm, a.shape[1]), lambda i, j, s: (i, 0)) for a in xs),
                  *weight_specs],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                             num_stages=config.num_stages),
        interpret=interpret,
        name="delta_matmul",
    )(*xs, *operands)
    return partial_sums[0] if split == 1 else partial_sums.sum(axis=0)
