"""The one description of how a delta matrix is compressed: `Format` (what the settings mean,
which are supported, how they are written in a delta file's JSON, which arrays they store) and
`QuantizedTensor`, one compressed matrix as stored in the delta file and fed to the kernels.

A [K, N] matrix (K = inputs, N = outputs; y = x @ W) is stored padded to Kp = `padded_k(K)` rows
(the next multiple of what packing, n:m groups and scale groups need; Kp = K for the usual sizes):
  qweight  uint32 [K' * bits / 32, N]   codes packed along K (see `packing`), K' = Kp, or Kp * n / m
                                        with n:m sparsity; for bits = 16 the float16 values [K', N]
  scales   bfloat16 [Kp / group_size, N] one scale per group of inputs and output
  zeros    uint8 [Kp / group_size, N]   asymmetric zero points (symmetric: fixed 2**(bits-1))
  meta     uint32 [K' * ib / 32, N]     n:m: position of each kept value inside its group of m
and dequantizes to  W[k, n] = scales[k // group_size, n] * (code[k, n] - zero[k // group_size, n]).
The padding rows hold the zero point (they dequantize to exactly 0) and the last scale group may
cover fewer than group_size real inputs: it has its own scale, fitted to them. A per-channel format
has group_size = Kp. `QuantizedTensor.shape` is the real [K, N]; the kernels see the padded matrix
(`QuantizedTensor.padded`, with x padded by zeros), the references slice the real rows.
Unstructured sparsity needs no mask: a pruned weight is stored as its group's zero point (0.0 at
16 bits), which dequantizes to exactly 0; its gain comes at rest, from the zstd stage.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dzjax.pallas_kernels import packing

SUPPORTED_BITS = (2, 3, 4, 8, 16)  # 16 = no quantization (float16 values; for ablations)
MAX_M = 32  # n:m groups of at most 32 inputs (5-bit positions)
FIELDS = ("qweight", "scales", "zeros", "meta")  # a QuantizedTensor's arrays, by file suffix


def _round_up(k: int, unit: int) -> int:
    return -(-k // unit) * unit


def _row_unit(bits: int, nm: tuple[int, int] | None) -> int:
    """The smallest row count that whole n:m groups and whole packed words need."""
    if bits == 16 and nm is None:  # float16 values, nothing packed
        return 1
    m, n = (nm[1], nm[0]) if nm else (1, 1)
    # stored rows k * n / m (codes, n:m positions) must fill whole words: k a multiple of
    # m * 32 / gcd(n, 32)
    return m * packing.WORD_BITS // math.gcd(n, packing.WORD_BITS)


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
            if m > MAX_M:
                raise ValueError(f"n:m sparsity {n}:{m}: m must be at most {MAX_M}")
            if self.group_size % m:
                raise ValueError(f"group_size={self.group_size} must be a multiple of m={m}")
        unit = self.row_unit
        if self.bits != 16 and self.group_size % unit and unit % self.group_size:
            # else padding to whole groups and words could take more rows than either
            raise ValueError(f"group_size={self.group_size} must be a multiple or a divisor of "
                             f"{unit}, the rows one packed word column holds in this format")
        if self.nm is not None and self.unstructured:
            raise ValueError("a format is either n:m or unstructured, not both")

    @classmethod
    def for_matrix(cls, k: int, *, bits: int, sparsity=None, group_size: int | None = None,
                   symmetric: bool = False) -> Format:
        """The format of a [k, N] matrix compressed with these settings: `sparsity` as
        `parse_sparsity` reads it, `group_size` None (or >= k) = one scale per output channel."""
        sparsity = parse_sparsity(sparsity)
        nm = sparsity if isinstance(sparsity, tuple) else None
        group = group_size
        if group_size is None or group_size >= k:  # per channel: one group of all padded rows
            group = _round_up(k, _row_unit(bits, nm))
        return cls(bits=check_bits(bits), group_size=group, symmetric=symmetric, nm=nm,
                   unstructured=isinstance(sparsity, float))

    @property
    def row_unit(self) -> int:
        """The stored rows must be a multiple of this (packing and n:m groups)."""
        return _row_unit(self.bits, self.nm)

    def padded_k(self, k: int) -> int:
        """The rows a matrix of k inputs is stored with: k rounded up to whole scale groups and
        packing units (k itself when it is already a multiple of both)."""
        group = self.group_size if self.bits != 16 else 1  # 16 bits: no scales
        return _round_up(k, math.lcm(group, self.row_unit))

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
        kp = self.padded_k(k)
        rows = self.stored_rows(kp)
        groups = kp // self.group_size
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

    def nbytes(self, k: int, n: int) -> int:
        """Bytes a [k, n] matrix in this format stores."""
        return sum(int(np.prod(shape)) * dtype.itemsize
                   for shape, dtype in self.stored_arrays(k, n).values())

    def stored_rows(self, kp: int) -> int:
        """Stored rows of a matrix padded to kp rows (`padded_k`)."""
        return kp if self.nm is None else kp * self.nm[0] // self.nm[1]

    def check_shape(self, k: int, n: int, what: str = "matrix") -> None:
        """Raise a ValueError naming `what` when [k, n] cannot be stored in this format: a
        per-channel group must be the padded K itself (any other size larger than K is not a
        format dzjax writes)."""
        if k < 1 or n < 1:
            raise ValueError(f"{what}: shape [{k}, {n}] must be positive")
        if self.group_size > k and self.group_size != _round_up(k, self.row_unit):
            raise ValueError(f"{what}: group_size={self.group_size} is larger than K={k} but is "
                             f"not its padded per-channel size {_round_up(k, self.row_unit)}")


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

    @property
    def padded_rows(self) -> int:
        """The rows it is stored with (`Format.padded_k`): the kernels' K."""
        return self.format.padded_k(self.shape[0])

    @property
    def padded(self) -> QuantizedTensor:
        """The same arrays seen as the stored [Kp, N] matrix, whose extra rows are exactly 0
        (what the kernels multiply, with x padded by zeros to Kp)."""
        kp = self.padded_rows
        return self if kp == self.shape[0] else dataclasses.replace(self, shape=(kp, self.shape[1]))


def pad_rows(x: jax.Array, q: QuantizedTensor) -> tuple[jax.Array, QuantizedTensor]:
    """x [..., K] and q [K, N] (or a stack of them) as the kernels multiply them: x padded with
    zero columns to the stored rows Kp, and `q.padded`."""
    pad = q.padded_rows - q.shape[0]
    if not pad:
        return x, q
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]), q.padded


def quantize_to_format(codes, scales, zeros, keep, fmt: Format, k: int | None = None
                       ) -> QuantizedTensor:
    """Pack codes [Kp, N] (or float values when bits = 16), scales/zeros [Kp/g, N] and keep
    [Kp, N] of a matrix with k real inputs (default Kp; see `Format.padded_k`).

    Pruned entries (keep False) are dropped (n:m) or stored as the zero point (unstructured).
    """
    kp, n = codes.shape
    k = kp if k is None else k
    fmt.check_shape(k, n)
    if fmt.padded_k(k) != kp:
        raise ValueError(f"{kp} rows of codes for a matrix of {k} inputs: the format stores "
                         f"{fmt.padded_k(k)}")
    meta = None
    if fmt.nm is not None:
        codes, positions = packing.compress_nm(codes, keep, *fmt.nm)
        meta = packing.pack_codes(positions, packing.index_bits(fmt.nm[1]))
    elif fmt.unstructured:
        pruned_code = (0.0 if fmt.bits == 16 else 2 ** (fmt.bits - 1) if fmt.symmetric
                       else jnp.repeat(jnp.asarray(zeros), kp // zeros.shape[0], axis=0))
        codes = jnp.where(jnp.asarray(keep), jnp.asarray(codes), pruned_code)
    qweight = (jnp.asarray(codes, jnp.float16) if fmt.bits == 16
               else packing.pack_codes(codes, fmt.bits))
    return QuantizedTensor(
        qweight=qweight,
        scales=None if fmt.bits == 16 else jnp.asarray(scales, jnp.bfloat16),
        zeros=None if fmt.bits == 16 or fmt.symmetric else jnp.asarray(zeros, jnp.uint8),
        meta=meta, shape=(k, n), format=fmt)
