"""`QuantizedTensor`: one compressed delta matrix, as stored in the delta file and fed to kernels.

A [K, N] matrix (K = inputs, N = outputs; y = x @ W) is stored as
  qweight  uint32 [K' * bits / 32, N]   codes packed along K (see `packing`), K' = K, or K * n / m
                                        with n:m sparsity; for bits = 16 the float16 values [K', N]
  scales   bfloat16 [K / group_size, N]  one scale per group of inputs and output
  zeros    uint8 [K / group_size, N]    asymmetric zero points (symmetric: fixed 2**(bits-1))
  meta     uint32 [K' * ib / 32, N]     n:m: position of each kept value inside its group of m
and dequantizes to  W[k, n] = scales[k // group_size, n] * (code[k, n] - zero[k // group_size, n]).
Unstructured sparsity needs no mask: a pruned weight is stored as its group's zero point (0.0 at
16 bits), which dequantizes to exactly 0; its gain comes at rest, from the zstd stage.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dzjax.pallas_kernels import packing

SUPPORTED_BITS = (2, 3, 4, 8, 16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
    """How one matrix is compressed (static: part of the jit cache key)."""

    bits: int
    group_size: int  # inputs per scale; K for per-channel scales
    symmetric: bool = False
    nm: tuple[int, int] | None = None  # keep n of every m consecutive inputs
    unstructured: bool = False  # unstructured sparsity (stored densely, pruned = zero point)

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive int")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; supported: {SUPPORTED_BITS}")
        if self.nm is not None:
            n, m = self.nm
            if not 0 < n < m:
                raise ValueError(f"n:m sparsity {n}:{m} needs 0 < n < m")
            if self.group_size % m:
                raise ValueError(f"group_size={self.group_size} must be a multiple of m={m}")
        if self.nm is not None and self.unstructured:
            raise ValueError("a format is either n:m or unstructured, not both")

    def stored_rows(self, k: int) -> int:
        return k if self.nm is None else k * self.nm[0] // self.nm[1]

    def check_shape(self, k: int, n: int, what: str = "matrix") -> None:
        """Raise a ValueError naming `what` when [k, n] cannot be stored in this format."""
        if k % self.group_size:
            raise ValueError(f"{what}: group_size={self.group_size} must divide K={k}")
        if self.nm is not None and k % self.nm[1]:
            raise ValueError(f"{what}: m={self.nm[1]} must divide K={k}")
        rows = self.stored_rows(k)
        if self.bits != 16 and rows % packing.WORD_BITS:
            raise ValueError(f"{what}: {rows} stored rows are not a multiple of 32 (K={k})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A compressed [K, N] matrix; a pytree whose leaves are the stored arrays."""

    qweight: jax.Array
    scales: jax.Array | None
    zeros: jax.Array | None
    meta: jax.Array | None
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    format: Format = dataclasses.field(metadata=dict(static=True))

    def arrays(self) -> dict[str, jax.Array]:
        """The stored arrays by their file suffix (absent ones left out)."""
        names = ("qweight", "scales", "zeros", "meta")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in self.arrays().values())


def quantize_to_format(codes, scales, zeros, keep, fmt: Format) -> QuantizedTensor:
    """Pack codes [K, N] (or float values when bits = 16), scales/zeros [K/g, N] and keep [K, N].

    Pruned entries (keep False) are dropped (n:m) or stored as the zero point (unstructured).
    """
    k, n = codes.shape
    fmt.check_shape(k, n)
    meta = None
    if fmt.nm is not None:
        codes, positions = packing.compress_nm(codes, keep, *fmt.nm)
        meta = packing.pack_codes(positions, packing.index_bits(fmt.nm[1]))
    elif fmt.unstructured:
        pruned_code = (0.0 if fmt.bits == 16 else 2 ** (fmt.bits - 1) if fmt.symmetric
                       else jnp.repeat(jnp.asarray(zeros), k // zeros.shape[0], axis=0))
        codes = jnp.where(jnp.asarray(keep), jnp.asarray(codes), pruned_code)
    qweight = (jnp.asarray(codes, jnp.float16) if fmt.bits == 16
               else packing.pack_codes(codes, fmt.bits))
    return QuantizedTensor(
        qweight=qweight,
        scales=None if fmt.bits == 16 else jnp.asarray(scales, jnp.bfloat16),
        zeros=None if fmt.bits == 16 or fmt.symmetric else jnp.asarray(zeros, jnp.uint8),
        meta=meta, shape=(k, n), format=fmt)
