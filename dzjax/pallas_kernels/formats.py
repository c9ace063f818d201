"""The one description of how a delta matrix is compressed: `Format` (what the settings mean,
which are supported, how they are written in a delta file's JSON, which arrays they store) and
`QuantizedTensor`, one compressed matrix as stored in the delta file and fed to the kernels.

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
import ml_dtypes
import numpy as np

from dzjax.pallas_kernels import packing

SUPPORTED_BITS = (2, 3, 4, 8, 16)  # 16 = no quantization (float16 values; for ablations)
FIELDS = ("qweight", "scales", "zeros", "meta")  # a QuantizedTensor's arrays, by file suffix


def parse_sparsity(s):
    """None / "none" / "dense" (dense), a fraction in (0, 1) or its text (unstructured), or n:m
    as "n:m" or (n, m) -> None, a float, or an (n, m) tuple. Raises ValueError naming the value."""
    if s is None or (isinstance(s, str) and s.lower() in ("none", "dense")):
        return None
    if isinstance(s, str):
        parts = s.split(":")
        try:
            s = tuple(int(p) for p in parts) if len(parts) == 2 else float(s)
        except ValueError:
            raise ValueError(f"sparsity must be a fraction in (0, 1), 'n:m' or none, got {s!r}") \
                from None
    if isinstance(s, (tuple, list)):
        if len(s) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in s):
            raise ValueError(f"n:m sparsity must be two ints (n, m), got {s!r}")
        n, m = s
        if not 0 < n < m:
            raise ValueError(f"n:m sparsity keeps n of every m inputs and needs 0 < n < m, "
                             f"got {n}:{m}")
        return (n, m)
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1:
        raise ValueError(f"unstructured sparsity must be a fraction in (0, 1), got {s!r}")
    return float(s)


def check_bits(bits) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (16 = no quantization), "
                         f"got bits={bits!r}")
    return int(bits)


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
        check_bits(self.bits)
        if self.nm is not None:
            n, m = self.nm
            if not 0 < n < m:
                raise ValueError(f"n:m sparsity {n}:{m} needs 0 < n < m")
            if self.group_size % m:
                raise ValueError(f"group_size={self.group_size} must be a multiple of m={m}")
        if self.nm is not None and self.unstructured:
            raise ValueError("a format is either n:m or unstructured, not both")

    @classmethod
    def for_matrix(cls, k: int, *, bits: int, sparsity=None, group_size: int | None = None,
                   symmetric: bool = False) -> Format:
        """The format of a [k, N] matrix compressed with these settings: `sparsity` as
        `parse_sparsity` reads it, `group_size` None (or >= k) = one scale per output channel."""
        sparsity = parse_sparsity(sparsity)
        group = k if group_size is None or group_size >= k else group_size
        return cls(bits=check_bits(bits), group_size=group, symmetric=symmetric,
                   nm=sparsity if isinstance(sparsity, tuple) else None,
                   unstructured=isinstance(sparsity, float))

    @property
    def sparsity(self) -> str | None:
        """How the delta file's JSON names the sparsity: "n:m", "unstructured" or None."""
        return (f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured" if self.unstructured
                else None)

    def to_json(self, shape) -> dict:
        """A compressed tensor's entry in the delta file's metadata."""
        return {"kind": "quantized", "shape": [int(d) for d in shape], "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "sparsity": self.sparsity}

    @classmethod
    def from_json(cls, entry: dict) -> Format:
        """The inverse of `to_json` (the shape is read by the caller); ValueError, KeyError or
        TypeError on a malformed entry."""
        sparsity = entry["sparsity"]
        nm = None
        if sparsity not in (None, "unstructured"):  # exactly what `to_json` writes
            nm = parse_sparsity(sparsity) if isinstance(sparsity, str) and ":" in sparsity \
                else None
            if nm is None or f"{nm[0]}:{nm[1]}" != sparsity:
                raise ValueError(f"sparsity {sparsity!r} is not None, 'unstructured' or 'n:m'")
        if not isinstance(entry["symmetric"], bool):
            raise TypeError(f"symmetric {entry['symmetric']!r}")
        bits, group = entry["bits"], entry["group_size"]
        if isinstance(bits, bool) or not isinstance(bits, int) or isinstance(group, bool) \
                or not isinstance(group, int):
            raise TypeError(f"bits {bits!r} and group_size {group!r} must be integers")
        return cls(bits=bits, group_size=group, symmetric=entry["symmetric"], nm=nm,
                   unstructured=sparsity == "unstructured")

    def stored_arrays(self, k: int, n: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{field: (shape, dtype)} of the arrays a [k, n] matrix in this format stores."""
        rows = self.stored_rows(k)
        groups = k // self.group_size
        out = {}
        if self.bits == 16:
            out["qweight"] = ((rows, n), np.dtype(np.float16))
        else:
            out["qweight"] = ((rows * self.bits // packing.WORD_BITS, n), np.dtype(np.uint32))
            out["scales"] = ((groups, n), np.dtype(ml_dtypes.bfloat16))
            if not self.symmetric:
                out["zeros"] = ((groups, n), np.dtype(np.uint8))
        if self.nm is not None:
            ib = packing.index_bits(self.nm[1])
            out["meta"] = ((rows * ib // packing.WORD_BITS, n), np.dtype(np.uint32))
        return out

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
        return {n: getattr(self, n) for n in FIELDS if getattr(self, n) is not None}

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
