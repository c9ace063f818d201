"""Tilings of the delta kernels: which K steps and column strips a format allows, the heuristic
that picks them (`tiling`, `route_tiling`), and `DeltaMatmulConfig`, the single-delta kernel's
static configuration (the multi-delta kernel's `MultiDeltaConfig` extends it)."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from dzjax.pallas_kernels import packing, phases
from dzjax.pallas_kernels.formats import Format

PALLAS_BITS = (2, 4, 8)
MIN_BLOCK = 16  # Triton's dot needs every dimension >= 16
SMS = 132  # an H100 / H200
WARPS_FILLED = 4 * SMS  # warps that fill it: one per scheduler (4 a SM)


def filled(programs: int, num_warps: int) -> float:
    """The share of the GPU that `programs` of `num_warps` warps fill (WARPS_FILLED: all)."""
    return min(1.0, programs * num_warps / WARPS_FILLED)


def _pow2_floor(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


def pow2_ceil(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def row_tile(m: int) -> int:
    """block_m for M rows of x: a power of two covering M, at least MIN_BLOCK, at most 64."""
    return min(max(pow2_ceil(m), MIN_BLOCK), 64)


# ----------------------------------------------------------------------------------------------
# Format support shared with the multi-delta kernel.


def check_pallas_format(fmt: Format) -> None:
    """Raise a ValueError naming the reason when the Pallas kernels cannot serve `fmt`."""
    if fmt.bits not in PALLAS_BITS:
        raise ValueError(
            f"the Pallas delta kernels support bits in {PALLAS_BITS}, not bits={fmt.bits} "
            "(3-bit codes cross 32-bit words); use implementation='xla'")
    if fmt.nm is not None:
        n, m = fmt.nm
        ib = packing.index_bits(m)
        if m & (m - 1) or (32 // fmt.bits) % n or (32 // ib) % n:
            raise ValueError(f"the Pallas delta kernels support n:m sparsity with m a power of two "
                             f"and n dividing the codes per word; got {n}:{m} at {fmt.bits} bits")


def block_k_ok(block_k: int, k: int, fmt: Format) -> bool:
    """Whether a K step of `block_k` inputs holds whole packed words, scale groups and n:m groups."""
    n, m = fmt.nm or (1, 1)
    stored = block_k * n // m
    g = fmt.group_size
    return (block_k >= MIN_BLOCK and block_k & (block_k - 1) == 0 and k % block_k == 0
            and block_k % m == 0 and (stored * fmt.bits) % 32 == 0
            and (fmt.nm is None or (stored * packing.index_bits(m)) % 32 == 0)
            and (g % block_k == 0 or (block_k % g == 0 and g % m == 0 and g & (g - 1) == 0)))


def pick_block_k(k: int, fmt: Format, target: int | None = None) -> int:
    """The largest power-of-two K step <= target that `block_k_ok` accepts, or a ValueError."""
    # Long K steps spread each step's fixed work (addresses, pipeline, scale loads) over more
    # weights: instructions per weight from the compiled PTX, `benchmarks/kernels.py --ptx`.
    target = target or pick_block_k_target(fmt)
    bk = _pow2_floor(min(target, k))
    while bk >= MIN_BLOCK:
        if block_k_ok(bk, k, fmt):
            return bk
        bk //= 2
    raise ValueError(f"no power-of-two block_k >= {MIN_BLOCK} divides K={k} and fits "
                     f"group_size={fmt.group_size}, bits={fmt.bits}, nm={fmt.nm}")


def pick_block_k_target(fmt: Format) -> int:
    return {2: 256, 4: 128, 8: 128}.get(fmt.bits, 128)


def pick_block_n(n: int, target: int) -> int:
    bn = _pow2_floor(min(target, n))
    while bn >= MIN_BLOCK and n % bn:
        bn //= 2
    if bn < MIN_BLOCK:
        raise ValueError(f"N={n} must be a multiple of {MIN_BLOCK} for the Pallas delta kernels")
    return bn


# ----------------------------------------------------------------------------------------------
# Config.


def tiling(m: int, k: int, n: int, fmt: Format, *, row_tiles: int,
           min_block_k: int = 64, max_block_k: int | None = None, block_m: int | None = None,
           strips: tuple[int, ...] = (128, 64), warps=None) -> dict[str, int]:
    """The heuristic tiling of both kernels for M rows of x (`row_tiles` tiles of block_m rows
    per column strip, each reading the strip's weights). block_m covers M (at most 64 rows). Of
    the column strips (128 or 64), K steps (`pick_block_k`'s, halved down to 64) and K splits
    (1, 2, 4 or 8, into whole steps, `split_steps`), the one with the least predicted time: the
    bytes read (weights per row tile, and again for the steps a ragged split runs past K, plus
    split-K partial sums written and read back) over the share of the SMs its
    programs' warps fill, WARPS_FILLED filling all; within 10% of the least, the widest strip
    and longest step: the compiled PTX (`benchmarks/kernels.py --ptx`) shows 128-column strips
    issuing 8-35% fewer instructions per weight than 64-column ones, and the decode kernels are
    bound by instruction issue more than by bytes; then the fewest warps a strip. K steps lie
    within [`min_block_k`, `max_block_k`] (the phase route's bounds; by default >= 64 and
    `pick_block_k`'s target). The phase route passes its own row tile, strips and the warps
    a strip may take (`warps`: block_n -> a tuple; by default `warps_for`'s one)."""
    block_m = block_m or row_tile(m)
    weight_bytes = sum(int(np.prod(shape)) * dtype.itemsize
                       for shape, dtype in fmt.stored_arrays(k, n).values())
    warps = warps or (lambda block_n: (warps_for(block_m, block_n),))
    candidates = []
    for block_n, num_warps in ((bn, w) for bn in dict.fromkeys(pick_block_n(n, t) for t in strips)
                               for w in warps(bn)):
        block_k = pick_block_k(k, fmt, max_block_k or pick_block_k_target(fmt))
        while True:
            steps = k // block_k
            for split_k in (1, 2, 4, 8):
                per = split_steps(steps, split_k)
                if per is None:
                    continue
                run = split_k * per  # steps run, some past K
                programs = row_tiles * (n // block_n) * split_k
                partials = 0 if split_k == 1 else split_k * 2 * m * n * 4
                cost = ((row_tiles * weight_bytes * run / steps + partials)
                        / filled(programs, num_warps))
                candidates.append((cost, -block_n, num_warps, -block_k, split_k))
            if block_k // 2 < max(64, min_block_k) or not block_k_ok(block_k // 2, k, fmt):
                break
            block_k //= 2
    least = min(c[0] for c in candidates)
    # Widest strip, then fewest warps, then longest step, then least cost, among the near-best.
    _, neg_n, num_warps, neg_k, split_k = min((c for c in candidates if c[0] <= 1.1 * least),
                                              key=lambda c: (*c[1:4], c[0]))
    return dict(block_m=block_m, block_n=-neg_n, block_k=-neg_k, split_k=split_k,
                num_warps=num_warps,
                num_stages=stages_for(fmt, -neg_n, -neg_k))


def split_steps(steps: int, split_k: int) -> int | None:
    """K steps per program when `steps` are split `split_k` ways: ceil(steps / split_k), the
    last split running past K (its extra steps are computed and masked off: a ragged split, so
    that K = 11008, 86 steps of 128 = 2 x 43, still splits 4 or 8 ways); None when a split
    would have no step of its own."""
    if split_k < 1:
        return None
    per = -(-steps // split_k)
    return per if (split_k - 1) * per < steps else None


def k_split(steps: int, split_k: int) -> tuple[int, int | None]:
    """(K steps a program runs, the `total` for `k_loop_body`: `steps` when the split is
    ragged, None when the splits share them exactly)."""
    per = split_steps(steps, split_k)
    return per, (steps if per * split_k != steps else None)


def k_loop_body(advance, first, total: int | None):
    """The K loop's body: `advance(kb, acc)` for step kb = first + step. With `total` (the K
    steps of a ragged split, `split_steps`), a step past them leaves acc as it is (it is
    computed on the last step, then masked off)."""
    def body(step, acc):
        kb = first + step
        if total is None:
            return advance(kb, acc)
        return jnp.where(kb < total, advance(jnp.minimum(kb, total - 1), acc), acc)
    return body


def route_tiling(m: int, k: int, n: int, fmt: Format, x_dtype, *, row_tiles: int,
                 split_rows: bool = False) -> dict:
    """`tiling` plus the route: the phase route (`phases.py`) where it serves the format and
    activations and K has a step long enough for it, else the general one. M above the phase
    route's row tile takes the general route, or with `split_rows` (the multi-delta kernel,
    whose M rows are usually several deltas' groups of fewer) the phase route's largest row
    tile, M / block_m of them reading the weights: 32 rows, 16 for 8-bit codes (float32
    weights: at 32 rows the multi-delta kernel spills, 132 bytes dense, 40 at 2:4)."""
    most = phases.MAX_BLOCK_M
    if split_rows and not phases.pairs(fmt, x_dtype):
        most = phases.MAX_BLOCK_M // 2  # float32 weights
    capped = split_rows and row_tile(m) > most
    if capped:
        row_tiles = -(-m // most)
    if phases.serves(fmt, x_dtype) and (row_tile(m) <= most or capped):
        low, high = phases.min_block_k(fmt), phases.max_block_k(fmt, pick_block_k_target(fmt))
        try:
            bk = pick_block_k(k, fmt, high)
        except ValueError:
            bk = 0
        if bk >= low:
            block_m = phases.MIN_BLOCK_M if m <= phases.MIN_BLOCK_M else min(row_tile(m), most)
            out = dict(tiling(m, k, n, fmt, row_tiles=row_tiles, min_block_k=low,
                              max_block_k=high, block_m=block_m, strips=phases.STRIPS,
                              warps=functools.partial(phases.warps, fmt=fmt,
                                                      narrow=not split_rows)), phases=True)
            if fmt.nm is not None and fmt.bits == 8:
                # With 3 stages ptxas spills the multi-delta kernel (24 bytes at 4096 x 4096,
                # 16 rows; none with 2, 238 registers): the compiler check in the tests.
                out["num_stages"] = 2
            return out
    return tiling(m, k, n, fmt, row_tiles=1 if capped else row_tiles)


def stages_for(fmt: Format, block_n: int, block_k: int) -> int:
    """3 pipeline stages, but 2 for the n:m expansion in 64-row K steps of 128-column strips:
    with 3, ptxas spills there (96 registers and 20 bytes of spill at 11008 x 4096; with 2, 116
    registers and none: the compiler check in the tests)."""
    return 2 if fmt.nm is not None and block_k <= 64 and block_n >= 128 else 3


def warps_for(block_m: int, block_n: int) -> int:
    """4 warps for decode tiles, 8 from 64 x 128 outputs on (the prefill tile): at 4 warps that
    tile's accumulator and dequantized operand take 255 registers per thread."""
    return 8 if block_m * block_n >= 64 * 128 else 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaMatmulConfig:
    """Tiling of the single-delta kernel: see the module docstring."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    phases: bool = False  # the register-resident route (`phases.py`), else the general one

    @classmethod
    def heuristic(cls, m: int, k: int, n: int, fmt: Format,
                  x_dtype=jnp.bfloat16) -> DeltaMatmulConfig:
        """Decode-oriented: `route_tiling`, each row tile of block_m rows reading the weights."""
        return cls(**route_tiling(m, k, n, fmt, x_dtype, row_tiles=-(-m // row_tile(m))))

    def validate(self, k: int, n: int, fmt: Format, x_dtype) -> None:
        """Raise a ValueError naming what this tiling cannot do for a [K, N] delta of `fmt`
        and activations of `x_dtype`."""
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            low = phases.MIN_BLOCK_M if name == "block_m" and self.phases else MIN_BLOCK
            if v < low or v & (v - 1):
                note = " (8 on the phase route)" if name == "block_m" and not self.phases else ""
                raise ValueError(f"{name}={v} must be a power of two >= {low}{note}")
        if n % self.block_n:
            raise ValueError(f"block_n={self.block_n} must divide N={n}")
        if not block_k_ok(self.block_k, k, fmt):
            raise ValueError(f"block_k={self.block_k} must divide K={k} and hold whole packed words "
                             f"and scale groups (group_size={fmt.group_size}, nm={fmt.nm})")
        if split_steps(k // self.block_k, self.split_k) is None:
            raise ValueError(f"split_k={self.split_k} leaves a K split without a step of the "
                             f"{k // self.block_k}")
        if self.phases and self.block_k < phases.min_block_k(fmt):
            raise ValueError(f"the phase route needs block_k >= {phases.min_block_k(fmt)} at "
                             f"{fmt.bits} bits, got {self.block_k}")
        if self.phases and not phases.serves(fmt, x_dtype):
            raise ValueError(f"the phase route serves 2/4/8-bit codes, dense or 2:4 in groups of "
                             f"at least {phases.min_block_k(fmt)} rows, with bf16/f16 "
                             f"activations, not {fmt} with {jnp.dtype(x_dtype)} activations")
        if self.phases and fmt.nm is not None and self.block_k > fmt.group_size:
            raise ValueError(f"the phase route's 2:4 steps are at most a scale group "
                             f"({fmt.group_size} rows), got block_k={self.block_k}")
