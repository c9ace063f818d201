"""The uniform min-max quantization grid shared by OBS (GPTQ) and round-to-nearest.

Layout: a kernel w [K, N] = [in, out]; a grid has one (scale, zero) per output channel per group of
`group_size` consecutive inputs, stored as scales, zeros [K // group_size, N] ([1, N] per channel).
A code c in [0, 2^bits) stands for the value scale * (c - zero); zero is an integer in [0, 2^bits), so
0.0 is always exactly on the grid (pruned weights are code == zero).
"""

import jax
import jax.numpy as jnp


def minmax_grid(x: jax.Array, *, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """GPTQ's min-max grid of x [..., G, N] over its inputs (axis -2). Returns scale, zero [..., N].

    The range always includes 0. Asymmetric: zero = round(-min / scale). Symmetric: the range is
    [-a, a] with a = max|x| and zero = 2^(bits-1). (GPTQ keeps min = 0 for an all-positive symmetric
    group, which halves its usable range; we take [-a, a] always.) An all-zero group gets [-1, 1].
    """
    maxq = 2**bits - 1
    xmin = jnp.minimum(x.min(axis=-2), 0.0)
    xmax = jnp.maximum(x.max(axis=-2), 0.0)
    if symmetric:
        xmax = jnp.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    # Scales are stored in bfloat16: float16 would underflow for the small values of a delta
    # (1e-4 / 255 is subnormal in float16). Round here, so the grid is exactly what is stored.
    scale = ((xmax - xmin) / maxq).astype(jnp.bfloat16).astype(jnp.float32)
    if symmetric:
        zero = jnp.full_like(scale, 2 ** (bits - 1))
    else:
        # Clipped: the bf16 rounding of the scale can push round(-min / scale) to 2^bits.
        zero = jnp.clip(jnp.round(-xmin / scale), 0, maxq)
    return scale, zero


def quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int) -> jax.Array:
    """Codes (float32, integer-valued in [0, 2^bits)) of x on the grid (scale, zero), broadcasting."""
    return jnp.clip(jnp.round(x / scale) + zero, 0, 2**bits - 1)


def grid_values(codes: jax.Array, scales: jax.Array, zeros: jax.Array) -> jax.Array:
    """The values that codes stand for on their grid (the compressed weights, before packing):
    w_hat [K, N] = scales * (codes - zeros), the group of row k being k // (K // len(scales))."""
    group_size = codes.shape[0] // scales.shape[0]
    scales = jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)
    zeros = jnp.repeat(zeros.astype(jnp.float32), group_size, axis=0)
    return scales * (codes.astype(jnp.float32) - zeros)
