"""One suite for every implementation of the delta matmuls: XLA reference, Pallas in interpret mode,
compiled Pallas (GPU only); plus CUDA lowering of every kernel configuration on a CPU-only host.

Expected values are computed independently in float64 NumPy from the codes/scales/zeros the test
drew (not through `dequantize`). Pallas interpret mode fills outputs with NaN before the kernel
runs, so an element the kernel forgets to write fails the finiteness / comparison checks.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dzjax.pallas_kernels import (DeltaMatmulConfig, Format, MultiDeltaConfig, delta_matmul,
                                  delta_matmul_ref,
                                  delta_matmul_pallas, make_delta_batch, multi_delta_matmul,
                                  multi_delta_matmul_pallas, multi_delta_matmul_ref,
                                  quantize_to_format, stack_deltas, unstack_deltas, write_slot)
from dzjax.pallas_kernels import compiled, dispatch
from dzjax.pallas_kernels.multi_delta import row_tile_index, row_tile_sizes
from dzjax.pallas_kernels.phases import pairs
from dzjax.pallas_kernels.reference import dequantize

ON_GPU = jax.default_backend() == "gpu"
TOL = 1e-4  # relative (Frobenius) error; products are exact in float32, sums are float32


# ----------------------------------------------------------------------------------------------
# Random deltas with a float64 NumPy ground truth.


def random_delta(rng, k: int, n: int, fmt: Format):
    """(QuantizedTensor, dense float64 [K, N] it stores), codes/scales/zeros drawn at random."""
    g = fmt.group_size
    codes = rng.integers(0, 2 ** fmt.bits, (k, n))
    scales = np.asarray(jnp.asarray(rng.uniform(0.5, 1.5, (k // g, n)) / 2 ** fmt.bits,
                                    jnp.bfloat16), np.float64)
    zeros = rng.integers(0, 2 ** fmt.bits, (k // g, n))
    if fmt.nm is None:
        keep = np.ones((k, n), bool)
    else:
        n_keep, m = fmt.nm
        rank = np.argsort(rng.random((k // m, m, n)), axis=1)
        keep = (rank < n_keep).reshape(k, n)
    zero = np.full_like(zeros, 2 ** (fmt.bits - 1)) if fmt.symmetric else zeros
    dense = np.where(keep, np.repeat(scales, g, 0) * (codes - np.repeat(zero, g, 0)), 0.0)
    return quantize_to_format(codes, scales, zeros, keep, fmt), dense


def random_x(rng, m: int, k: int, dtype):
    return jnp.asarray(rng.standard_normal((m, k)), dtype)


def expected(x, w64: np.ndarray, exact: bool = False) -> np.ndarray:
    """x @ W in float64, with W rounded to x's dtype first (as every implementation does but the
    kernels' phase route, `exact`, which multiplies by the float32 weights themselves)."""
    w = w64 if exact else np.asarray(
        jnp.asarray(w64, jnp.float32).astype(x.dtype).astype(jnp.float32), np.float64)
    return np.asarray(x.astype(jnp.float32), np.float64) @ w


def phase_route(implementation: str, fmt: Format, x, n: int) -> bool:
    """Whether `implementation` multiplies x by a delta of `fmt` on the kernels' phase route."""
    if implementation not in ("interpret", "pallas") or dispatch.prefill_route(x.shape):
        return False
    rows = int(np.prod(x.shape[:-1]))
    return DeltaMatmulConfig.heuristic(rows, fmt.padded_k(x.shape[-1]), n, fmt, x.dtype).phases


def assert_close(y, want, tol=TOL):
    y = np.asarray(y)
    assert y.dtype == np.float32, y.dtype
    assert y.shape == want.shape, (y.shape, want.shape)
    assert np.isfinite(y).all(), "non-finite output: an element was not written"
    err = np.linalg.norm(y - want) / max(np.linalg.norm(want), 1e-30)
    assert err < tol, f"relative error {err:.3g} >= {tol}"


def fmt_id(f: Format) -> str:
    sp = "dense" if f.nm is None else f"{f.nm[0]}:{f.nm[1]}"
    return f"b{f.bits}-{sp}-g{f.group_size}-{'sym' if f.symmetric else 'asym'}"


K, N = 256, 64


def all_formats(k=K):
    """Every bits x sparsity x group (64 / per-channel) x symmetry combination."""
    for bits, nm, g, sym in itertools.product((2, 3, 4, 8), (None, (2, 4)), (64, k), (True, False)):
        yield Format(bits=bits, group_size=g, nm=nm, symmetric=sym)


def format_params(bits_allowed=(2, 3, 4, 8)):
    """All combinations; the default run keeps half (symmetric iff per-channel), the rest is slow."""
    out = []
    for f in all_formats():
        if f.bits not in bits_allowed:
            continue
        default = f.symmetric == (f.group_size == K)
        marks = () if default else (pytest.mark.slow,)
        out.append(pytest.param(f, id=fmt_id(f), marks=marks))
    return out


# ----------------------------------------------------------------------------------------------
# Single delta: one suite, bound to each implementation by a subclass.


class DeltaMatmulSuite:
    """Shared tests; subclasses set IMPLEMENTATION (the function under test is `self.fn`)."""

    IMPLEMENTATION: str
    PALLAS_ONLY_BITS = False  # kernels serve 2/4/8 bits; 3-bit must raise

    def fn(self, x, q):
        return delta_matmul(x, q, implementation=self.IMPLEMENTATION)

    def want(self, x, w, q):
        impl = getattr(self, "IMPLEMENTATION", "reference")
        return expected(x, w, exact=phase_route(impl, q.format, x, q.shape[1]))

    @pytest.mark.parametrize("fmt", format_params())
    def test_formats(self, fmt):
        rng = np.random.default_rng(zlib.crc32(fmt_id(fmt).encode()))
        q, w = random_delta(rng, K, N, fmt)
        x = random_x(rng, 5, K, jnp.bfloat16)
        if self.PALLAS_ONLY_BITS and fmt.bits == 3:
            with pytest.raises(ValueError, match="bits=3"):
                self.fn(x, q)
            return
        assert_close(self.fn(x, q), self.want(x, w, q))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
    @pytest.mark.parametrize("m", [1, 37])
    def test_rows_and_dtypes(self, m, dtype):
        rng = np.random.default_rng(m)
        q, w = random_delta(rng, K, N, Format(bits=4, group_size=64))
        x = random_x(rng, m, K, dtype)
        assert_close(self.fn(x, q), self.want(x, w, q))

    @pytest.mark.parametrize("fmt", [Format(bits=2, group_size=32, symmetric=True),
                                     Format(bits=4, group_size=64, nm=(2, 4))], ids=fmt_id)
    def test_smallest_shapes(self, fmt):
        """K at its smallest for the format (32 dense, 64 with 2:4), N = 16."""
        k = 32 if fmt.nm is None else 64
        rng = np.random.default_rng(k)
        q, w = random_delta(rng, k, 16, fmt)
        x = random_x(rng, 3, k, jnp.bfloat16)
        assert_close(self.fn(x, q), self.want(x, w, q))

    def test_leading_dims(self):
        rng = np.random.default_rng(7)
        q, w = random_delta(rng, K, N, Format(bits=8, group_size=128))
        x = random_x(rng, 6, K, jnp.bfloat16)
        y = self.fn(x.reshape(2, 3, K), q)
        assert y.shape == (2, 3, N)
        assert_close(y.reshape(6, N), self.want(x, w, q))


class TestDeltaMatmulReference(DeltaMatmulSuite):
    def fn(self, x, q):
        return delta_matmul_ref(x, q)


class TestDeltaMatmulXla(DeltaMatmulSuite):
    IMPLEMENTATION = "xla"


class TestDeltaMatmulInterpret(DeltaMatmulSuite):
    IMPLEMENTATION = "interpret"
    PALLAS_ONLY_BITS = True


@pytest.mark.skipif(not ON_GPU, reason="compiled Pallas kernels need a GPU")
class TestDeltaMatmulPallas(DeltaMatmulSuite):
    IMPLEMENTATION = "pallas"
    PALLAS_ONLY_BITS = True


class TestDeltaMatmulKernelEdges:
    """Explicit errors and tilings the shared suite does not reach (interpret mode)."""

    def test_unsupported_n(self):
        q, _ = random_delta(np.random.default_rng(0), 64, 24, Format(bits=4, group_size=64))
        x = random_x(np.random.default_rng(1), 2, 64, jnp.bfloat16)
        with pytest.raises(ValueError, match="N=24 must be a multiple of 16"):
            delta_matmul(x, q, implementation="interpret")
        assert np.isfinite(np.asarray(delta_matmul(x, q, implementation="xla"))).all()

    def test_wrong_k(self):
        q, _ = random_delta(np.random.default_rng(0), 64, 16, Format(bits=4, group_size=64))
        with pytest.raises(ValueError, match="K=96"):
            delta_matmul_pallas(jnp.ones((2, 96), jnp.bfloat16), q, interpret=True)

    def test_unstructured_is_served_and_16_bit_raises(self):
        rng = np.random.default_rng(0)
        keep = rng.random((64, 16)) < 0.5
        zeros = rng.integers(0, 16, (1, 16))
        q = quantize_to_format(rng.integers(0, 16, (64, 16)), np.full((1, 16), 0.5), zeros,
                               keep, Format(bits=4, group_size=64, unstructured=True))
        x = jnp.asarray(rng.standard_normal((2, 64)), jnp.float32)
        y = delta_matmul(x, q, implementation="interpret")
        np.testing.assert_allclose(y, delta_matmul_ref(x, q), rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(dequantize(q)[~keep]).max()) == 0.0  # pruned weights are exact 0
        q16 = quantize_to_format(rng.standard_normal((64, 16)), None, None, None,
                                 Format(bits=16, group_size=64))
        with pytest.raises(ValueError, match="bits=16"):
            delta_matmul(jnp.ones((2, 64), jnp.bfloat16), q16, implementation="pallas")

    @pytest.mark.parametrize("config", [
        DeltaMatmulConfig(block_m=16, block_n=16, block_k=32, split_k=4),  # many K steps, split
        DeltaMatmulConfig(block_m=32, block_n=32, block_k=128, split_k=1),  # group 64 < block_k
    ], ids=["bk32-split4", "bk128"])
    def test_tilings(self, config):
        rng = np.random.default_rng(3)
        q, w = random_delta(rng, K, N, Format(bits=4, group_size=64, nm=(2, 4)))
        x = random_x(rng, 40, K, jnp.bfloat16)
        assert_close(delta_matmul_pallas(x, q, config=config, interpret=True), expected(x, w))

    def test_the_route_each_case_takes(self):
        """The phase route: 2/4/8-bit codes, dense (unstructured sparsity too) or 2:4, 16-bit x,
        row tiles of at most 32 rows (from 64 on the sm_90 dot is a wgmma that reads its B
        operand from shared memory)."""
        route = lambda m, fmt, dtype=jnp.bfloat16: DeltaMatmulConfig.heuristic(
            m, 4096, 4096, fmt, dtype).phases
        for bits in (2, 4, 8):
            assert route(1, Format(bits=bits, group_size=128))
            assert route(32, Format(bits=bits, group_size=4096), jnp.float16)
            assert not route(33, Format(bits=bits, group_size=128))
            assert not route(1, Format(bits=bits, group_size=128), jnp.float32)
        # 2:4 where a scale group holds the shortest step (8 word rows: 128 inputs at 4 bits).
        for bits, served, short in ((4, 128, 64), (8, 64, 32), (2, 256, 128)):
            assert route(1, Format(bits=bits, group_size=served, nm=(2, 4)))
            assert route(16, Format(bits=bits, group_size=4096, nm=(2, 4), symmetric=True))
            assert not route(1, Format(bits=bits, group_size=short, nm=(2, 4)))
            assert not route(1, Format(bits=bits, group_size=served, nm=(2, 4)), jnp.float32)
        assert not route(1, Format(bits=4, group_size=128, nm=(1, 4)))  # only 2:4
        assert route(1, Format(bits=4, group_size=128, unstructured=True))  # zero points: dense
        # Scale groups shorter than a word's codes take the general route, and are served right.
        for fmt in (Format(bits=2, group_size=8), Format(bits=4, group_size=4),
                    Format(bits=8, group_size=2)):
            assert not route(1, fmt)
            rng = np.random.default_rng(fmt.bits)
            q, w = random_delta(rng, K, N, fmt)
            x = random_x(rng, 3, K, jnp.bfloat16)
            assert_close(delta_matmul(x, q, implementation="interpret"), expected(x, w))
        # K steps are one scale group where the group allows: 2-bit g128 steps 128 rows.
        assert DeltaMatmulConfig.heuristic(1, 4096, 4096, Format(bits=2, group_size=128)).block_k == 128

    @pytest.mark.parametrize("bits", [2, 4])
    def test_partial_sums_stay_small(self, bits):
        """At M = 16 the split-K partial sums (written and read back, 4 bytes an output a split)
        stay under a quarter of the stored weights' bytes while the programs' warps still fill
        an H100: 32-column strips on 2 warps, half the splits of 64-column ones on 2. M = 1 keeps
        64-column strips (its partial sums are small); 2:4 keeps a warp a 32 columns. (At 4 bits
        the 64-column tiling costs 11.2 MB-equivalents against a 10%-of-the-least window of
        11.15: near the edge, so a change to `tiling`'s cost shows here.)"""
        from dzjax.pallas_kernels.tiling import WARPS_FILLED
        fmt = Format(bits=bits, group_size=128)
        k = n = 4096
        c = DeltaMatmulConfig.heuristic(16, k, n, fmt)
        weights = sum(int(np.prod(s)) * d.itemsize for s, d in fmt.stored_arrays(k, n).values())
        assert c.split_k * 2 * 16 * n * 4 < weights / 4, c
        assert n // c.block_n * c.split_k * c.num_warps >= 0.95 * WARPS_FILLED, c
        assert (c.block_n, c.num_warps) == (32, 2)
        assert DeltaMatmulConfig.heuristic(1, k, n, fmt).block_n == 64
        nm = DeltaMatmulConfig.heuristic(16, k, n, Format(bits=4, group_size=128, nm=(2, 4)))
        assert nm.num_warps == nm.block_n // 32, nm

    @pytest.mark.parametrize("fmt", [Format(bits=2, group_size=128), Format(bits=4, group_size=64),
                                     Format(bits=8, group_size=256, symmetric=True),
                                     Format(bits=4, group_size=128, nm=(2, 4)),
                                     Format(bits=8, group_size=512, nm=(2, 4), symmetric=True)],
                             ids=fmt_id)
    def test_both_routes_agree(self, fmt):
        """The same tiling on either route: the general one rounds the weights to bf16, the
        phase route does not; each matches its own float64 ground truth, on fresh inputs."""
        rng = np.random.default_rng(zlib.crc32(fmt_id(fmt).encode()) + 1)
        q, w = random_delta(rng, 512, N, fmt)
        x = random_x(rng, 9, 512, jnp.bfloat16)
        for phases, exact in ((False, False), (True, True)):
            config = DeltaMatmulConfig(block_m=16, block_n=32, block_k=min(256, fmt.group_size),
                                       split_k=2, phases=phases)
            assert_close(delta_matmul_pallas(x, q, config=config, interpret=True),
                         expected(x, w, exact=exact))
        with pytest.raises(ValueError, match="phase route serves"):
            delta_matmul_pallas(x.astype(jnp.float32), q, config=config, interpret=True)

    @pytest.mark.parametrize("fmt", [Format(bits=4, group_size=128, nm=(2, 4)),
                                     Format(bits=2, group_size=128)], ids=fmt_id)
    def test_ragged_split(self, fmt):
        """7 K steps split 2 and 4 ways (4 and 2 steps a split): the last split's step past K
        is masked off, on both routes, one delta and several."""
        rng = np.random.default_rng(zlib.crc32(fmt_id(fmt).encode()) + 2)
        k = 896
        qs, ws = zip(*[random_delta(rng, k, N, fmt) for _ in range(3)])
        x = random_x(rng, 7, k, jnp.bfloat16)
        slots = [2, 0, -1, 2, 1, 2, 0]
        stack, batch = stack_deltas(list(qs)), make_delta_batch(jnp.asarray(slots), 3)
        for phases, split in itertools.product((False, True), (2, 4)):
            config = DeltaMatmulConfig(block_m=8 if phases else 16, block_n=32, block_k=128,
                                       split_k=split, phases=phases)
            assert_close(delta_matmul_pallas(x, qs[0], config=config, interpret=True),
                         expected(x, ws[0], exact=phases))
            multi = MultiDeltaConfig(**dataclasses.asdict(config))
            assert_close(multi_delta_matmul_pallas(x, stack, batch, config=multi, interpret=True),
                         expected_multi(x, ws, slots, exact=phases))

    def test_bad_config(self):
        q, _ = random_delta(np.random.default_rng(0), K, N, Format(bits=4, group_size=64))
        # 8 K steps split 6 ways: 2 a split, the last one without a step of its own
        with pytest.raises(ValueError, match="split_k=6 leaves a K split without a step"):
            delta_matmul_pallas(jnp.ones((2, K), jnp.bfloat16), q, interpret=True,
                                config=DeltaMatmulConfig(block_m=16, block_n=16, block_k=32, split_k=6))
        q, _ = random_delta(np.random.default_rng(0), K, N, Format(bits=4, group_size=128,
                                                                   nm=(2, 4)))
        with pytest.raises(ValueError, match="2:4 steps are at most a scale group"):
            delta_matmul_pallas(jnp.ones((2, K), jnp.bfloat16), q, interpret=True,
                                config=DeltaMatmulConfig(block_m=8, block_n=32, block_k=256,
                                                         phases=True))


@pytest.mark.parametrize("fmt", [f for f in all_formats() if f.bits != 3], ids=fmt_id)
def test_conversion_free_dequantization_is_bit_identical(fmt):
    """The kernels' dequantization builds floats from bit patterns (code OR-ed into the mantissa
    of 2**23, zero point likewise) instead of converting; every weight is bit for bit what
    converting gives: float(code) - float(zero) in float32, times the scale. Extreme codes and
    zero points (0 and 2**bits - 1) included."""
    from dzjax.pallas_kernels.single_delta import dequantize_xla, kernel_weights

    rng = np.random.default_rng(zlib.crc32(fmt_id(fmt).encode()))
    g, top = fmt.group_size, 2 ** fmt.bits - 1
    codes = rng.integers(0, top + 1, (K, N))
    codes[:4], codes[4:8] = 0, top
    zeros = rng.integers(0, top + 1, (K // g, N))
    zeros[0, :8], zeros[-1, :8] = 0, top
    scales = rng.uniform(0.5, 1.5, (K // g, N)) / 2 ** fmt.bits
    keep = np.ones((K, N), bool)
    if fmt.nm is not None:
        n_keep, m = fmt.nm
        keep = (np.argsort(rng.random((K // m, m, N)), axis=1) < n_keep).reshape(K, N)
    q = quantize_to_format(codes, scales, zeros, keep, fmt)
    # Converted the plain way, in float32, from the stored arrays (scales as stored, in bf16).
    scale = np.repeat(np.asarray(q.scales, np.float32), g, axis=0)
    zero = (np.float32(2 ** (fmt.bits - 1)) if fmt.symmetric
            else np.repeat(np.asarray(q.zeros).astype(np.float32), g, axis=0))
    want = np.where(keep, scale * (codes.astype(np.float32) - zero), np.float32(0))
    got = np.asarray(dequantize_xla(q))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    # The weights the kernels feed the dot, per activation dtype: for bf16 at 2/4 bits built
    # directly in bf16 (codes biased into the mantissa of 2**7), the others rounded from float32;
    # bit for bit the float32 values rounded once to that dtype.
    for dtype in (jnp.bfloat16, jnp.float16):
        built = np.asarray(kernel_weights(q, dtype))
        assert built.dtype == dtype
        np.testing.assert_array_equal(built.view(np.uint16), want.astype(dtype).view(np.uint16))


# ----------------------------------------------------------------------------------------------
# Multi-delta.


def random_stack(rng, slots: int, fmt: Format, k=K, n=N):
    made = [random_delta(rng, k, n, fmt) for _ in range(slots)]
    return stack_deltas([q for q, _ in made]), [w for _, w in made]


def expected_multi(x, ws, slots, exact: bool = False) -> np.ndarray:
    rows = [np.zeros(ws[0].shape[1]) if s < 0 else expected(x[i:i + 1], ws[s], exact)[0]
            for i, s in enumerate(slots)]
    return np.stack(rows)


MULTI_FMT = Format(bits=4, group_size=64, nm=(2, 4))


class MultiDeltaSuite:
    """Shared multi-delta tests; subclasses set IMPLEMENTATION."""

    IMPLEMENTATION: str

    def fn(self, x, stack, batch):
        return multi_delta_matmul(x, stack, batch, implementation=self.IMPLEMENTATION)

    def check(self, slots, num_slots, fmt=MULTI_FMT, dtype=jnp.bfloat16, seed=0):
        rng = np.random.default_rng(seed)
        stack, ws = random_stack(rng, num_slots, fmt)
        x = random_x(rng, len(slots), K, dtype)
        y = self.fn(x, stack, make_delta_batch(jnp.asarray(slots), num_slots))
        impl = getattr(self, "IMPLEMENTATION", "reference")
        assert_close(y, expected_multi(x, ws, slots, phase_route(impl, fmt, x, stack.shape[1])))
        base_rows = np.asarray(slots) < 0
        assert (np.asarray(y)[base_rows] == 0).all(), "rows with slot -1 must be exactly 0"

    def test_mixed_with_empty_group_and_base_rows(self):
        self.check([2, -1, 0, 2, 3, -1, 2], num_slots=4)  # slot 1 is empty

    def test_single_row(self):
        self.check([1], num_slots=2)

    def test_all_base_rows(self):
        self.check([-1] * 5, num_slots=3)

    def test_one_delta(self):
        self.check([0] * 6, num_slots=1)

    def test_one_active_of_many_slots(self):
        self.check([5, 5, -1, 5], num_slots=8, seed=2)  # the decode case "1 of 8 active"

    def test_skewed_popularity(self):
        slots = [1] * 30 + [0, 3, 1, -1, 2, 1, 1, 1, 1, 1]  # 36 of 40 rows on slot 1
        self.check(slots, num_slots=4, seed=1)

    @pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
    def test_dtypes(self, dtype):
        self.check([0, 1, -1, 1], num_slots=2, dtype=dtype)

    @pytest.mark.parametrize("fmt", format_params(bits_allowed=(2, 4, 8)))
    def test_formats(self, fmt):
        self.check([1, 0, -1, 1, 2], num_slots=3, fmt=fmt, seed=zlib.crc32(fmt_id(fmt).encode()))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_2_4_phase_route(self, dtype):
        """4-bit 2:4 g128, asymmetric (the phase route's 2:4 steps, per-slot zero points; 16-bit
        pairs in x's dtype), with an empty slot and base rows; symmetric and per channel in
        `test_formats`."""
        fmt = Format(bits=4, group_size=128, nm=(2, 4))
        self.check([3, -1, 0, 3, 3, 0, -1, 3, 0], num_slots=4, fmt=fmt, dtype=dtype, seed=11)


class TestMultiDeltaReference(MultiDeltaSuite):
    def fn(self, x, stack, batch):
        return multi_delta_matmul_ref(x, stack, batch)


class TestMultiDeltaXla(MultiDeltaSuite):
    IMPLEMENTATION = "xla"


class TestMultiDeltaInterpret(MultiDeltaSuite):
    IMPLEMENTATION = "interpret"


@pytest.mark.skipif(not ON_GPU, reason="compiled Pallas kernels need a GPU")
class TestMultiDeltaPallas(MultiDeltaSuite):
    IMPLEMENTATION = "pallas"


class TestMultiDeltaKernelEdges:
    def test_groups_longer_than_a_row_tile(self):
        """block_m = 16 with a 30-row group: several row tiles per group, unaligned starts."""
        rng = np.random.default_rng(5)
        stack, ws = random_stack(rng, 3, MULTI_FMT)
        slots = [2] * 3 + [0] * 30 + [-1] * 4 + [1] * 3
        rng.shuffle(slots)
        x = random_x(rng, len(slots), K, jnp.bfloat16)
        config = MultiDeltaConfig(block_m=16, block_n=32, block_k=64, split_k=2)
        y = multi_delta_matmul_pallas(x, stack, make_delta_batch(jnp.asarray(slots), 3),
                                      config=config, interpret=True)
        assert_close(y, expected_multi(x, ws, slots))

    @pytest.mark.parametrize("fmt", [Format(bits=4, group_size=128, nm=(2, 4)),
                                     Format(bits=2, group_size=128)], ids=fmt_id)
    def test_row_tile_follows_the_group(self, fmt):
        """On the phase route a program takes the smallest row tile that holds its group (8,
        16 or 32 rows at block_m = 32, one kernel): groups of 3, 8, 12, 16, 25, 32 and 40 rows
        (two 32-row tiles), each against the float64 product; compiled where a GPU is."""
        rng = np.random.default_rng(9)
        stack, ws = random_stack(rng, 7, fmt)
        slots = [0] * 3 + [1] * 12 + [2] * 25 + [4] * 40 + [3] * 8 + [5] * 16 + [6] * 32 + [-1] * 2
        rng.shuffle(slots)
        x = random_x(rng, len(slots), K, jnp.bfloat16)
        config = MultiDeltaConfig(block_m=32, block_n=32, block_k=128, split_k=2, num_warps=1,
                                  phases=True)
        y = multi_delta_matmul_pallas(x, stack, make_delta_batch(jnp.asarray(slots), 7),
                                      config=config, interpret=not ON_GPU)  # compiled on a GPU
        assert_close(y, expected_multi(x, ws, slots, exact=True))
        sizes = row_tile_sizes(32, phase=True)
        assert sizes == (8, 16, 32) and row_tile_sizes(32, phase=False) == (32,)
        picked = [int(row_tile_index(jnp.int32(r), sizes)) for r in (0, 1, 8, 9, 16, 17, 32, 40)]
        assert picked == [0, 0, 0, 1, 1, 2, 2, 2]

    def test_batch_shape_mismatch(self):
        stack, _ = random_stack(np.random.default_rng(0), 2, MULTI_FMT)
        with pytest.raises(ValueError, match="slots"):
            multi_delta_matmul_pallas(jnp.ones((3, K), jnp.bfloat16), stack,
                                      make_delta_batch(jnp.array([0, 1, -1]), 5), interpret=True)


def pallas_grid(fn, *args) -> tuple[int, ...]:
    """The grid of the one pallas_call in fn(*args)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    grids = [e.params["grid_mapping"].grid for e in jaxpr.jaxpr.eqns if e.primitive.name == "pallas_call"]
    if not grids:  # inside the jit of the public function
        grids = [e.params["grid_mapping"].grid for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns
                 if e.primitive.name == "pallas_call"]
    assert len(grids) == 1, grids
    return grids[0]


class TestMultiDeltaGrid:
    """The launch covers the slots that have rows, and one active delta alone fills the GPU."""

    def test_no_program_for_idle_slots_or_base_rows(self):
        stack, _ = random_stack(np.random.default_rng(0), 8, MULTI_FMT)
        x = jnp.ones((3, K), jnp.bfloat16)
        batch = make_delta_batch(jnp.array([4, -1, 4]), 8)
        grid = pallas_grid(lambda x, s, b: multi_delta_matmul_pallas(x, s, b, interpret=True),
                           x, stack, batch)
        config = MultiDeltaConfig.heuristic(3, K, N, 8, MULTI_FMT)
        # min(M, S) = 3 group entries (not S + 1 = 9), the column strips, the K splits.
        assert grid == (3, N // config.block_n, config.split_k)

    def test_split_k_sum_reads_the_rows_only(self):
        """The split-K partial sums are summed over the M rows, not the spare row tile the
        kernel's output carries (at M = 1 that tile is 8 rows: 9x the bytes read)."""
        stack, _ = random_stack(np.random.default_rng(0), 4, MULTI_FMT)
        x = jnp.ones((3, K), jnp.bfloat16)
        config = MultiDeltaConfig(block_m=16, block_n=32, block_k=64, split_k=2)
        jaxpr = jax.make_jaxpr(lambda x, s, b: multi_delta_matmul_pallas(
            x, s, b, config=config, interpret=True))(x, stack, make_delta_batch(
                jnp.array([1, -1, 1]), 4))
        eqns = jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns  # inside the public function's jit
        sums = [e.invars[0].aval.shape for e in eqns if e.primitive.name == "reduce_sum"]
        assert (2, 3, N) in sums and not any(shape[1:2] == (3 + 16,) for shape in sums), sums

    @pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
    @pytest.mark.parametrize("m", [1, 4, 16])
    def test_one_active_delta_fills_the_sms(self, k, n, m):
        """Split-K is sized for one active delta: its programs alone cover (nearly) an H100's
        132 SMs. K = 11008 has 86 K steps of 128 = 2 x 43: a ragged split, 8 ways of 11 steps."""
        fmt = Format(bits=4, group_size=128, nm=(2, 4))
        c = MultiDeltaConfig.heuristic(m, k, n, 8, fmt)
        assert n // c.block_n * c.split_k >= 128, c


class TestDeltaBatchAndSlots:
    def test_running_example(self):
        b = make_delta_batch(jnp.array([2, -1, 0, 2]), 3)
        np.testing.assert_array_equal(b.sorted_slots, [0, 2, 2, -1])
        np.testing.assert_array_equal(b.group_sizes, [1, 0, 2, 1])
        np.testing.assert_array_equal(b.group_starts, [0, 1, 1, 3, 4])
        np.testing.assert_array_equal(b.order, [2, 0, 3, 1])
        np.testing.assert_array_equal(b.inverse, [1, 3, 0, 2])
        np.testing.assert_array_equal(b.active_slots, [0, 2, 3])  # slot 1 idle, 3 = padding
        # At most min(M, S) slots have rows: two rows of eight slots list two.
        np.testing.assert_array_equal(make_delta_batch(jnp.array([6, -1]), 8).active_slots, [6, 8])

    def test_random_ids_roundtrip_under_jit(self):
        ids = np.random.default_rng(0).integers(-1, 6, 50)
        b = jax.jit(make_delta_batch, static_argnums=1)(jnp.asarray(ids), 6)
        assert (np.diff(np.where(b.sorted_slots < 0, 6, b.sorted_slots)) >= 0).all()
        np.testing.assert_array_equal(np.asarray(b.sorted_slots)[b.inverse], ids)
        np.testing.assert_array_equal(b.group_sizes, np.bincount(np.where(ids < 0, 6, ids), minlength=7))

    def test_write_slot_keeps_shapes_and_does_not_retrace(self):
        rng = np.random.default_rng(2)
        stack, ws = random_stack(rng, 3, MULTI_FMT)
        new, w_new = random_delta(rng, K, N, MULTI_FMT)
        traces = []

        @jax.jit
        def step(stack, x, batch):
            traces.append(1)
            return multi_delta_matmul(x, stack, batch, implementation="xla")

        x = random_x(rng, 4, K, jnp.bfloat16)
        batch = make_delta_batch(jnp.array([1, 1, 0, -1]), 3)
        step(stack, x, batch)
        stack2 = jax.jit(write_slot)(stack, 1, new)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), stack2) == \
            jax.tree.map(lambda a: (a.shape, a.dtype), stack)
        y = step(stack2, x, batch)
        assert len(traces) == 1
        assert_close(y, expected_multi(x, [ws[0], w_new, ws[2]], [1, 1, 0, -1]))
        assert jax.tree.leaves(unstack_deltas(stack2)[1]) and \
            all((a == b).all() for a, b in zip(jax.tree.leaves(unstack_deltas(stack2)[1]),
                                               jax.tree.leaves(new)))


# ----------------------------------------------------------------------------------------------
# Dispatch.


class TestDispatch:
    def test_env_var(self, monkeypatch):
        monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
        assert dispatch.requested_implementation() == "interpret"
        assert dispatch.requested_implementation("xla") == "xla"  # the argument wins
        monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
        with pytest.raises(ValueError, match="DZJAX_KERNEL='cuda'"):
            dispatch.requested_implementation()
        with pytest.raises(ValueError, match="implementation='fast'"):
            dispatch.requested_implementation("fast")

    def test_auto(self, monkeypatch):
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        q, _ = random_delta(np.random.default_rng(0), 64, 16, Format(bits=4, group_size=64))
        q3, _ = random_delta(np.random.default_rng(0), 64, 16, Format(bits=3, group_size=64))
        assert dispatch.resolve(None, (2, 64), q) == ("pallas" if ON_GPU else "xla")
        assert dispatch.resolve(None, (2, 64), q3) == "xla"  # only XLA serves 3-bit
        with pytest.raises(ValueError, match="bits=3"):
            dispatch.resolve("pallas", (2, 64), q3)

    def test_env_routes_calls(self, monkeypatch):
        rng = np.random.default_rng(4)
        q, w = random_delta(rng, 64, 16, Format(bits=3, group_size=64))
        x = random_x(rng, 2, 64, jnp.bfloat16)
        monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
        with pytest.raises(ValueError, match="bits=3"):  # the env var is honoured: no fallback
            delta_matmul(x, q)
        monkeypatch.setenv(dispatch.ENV_VAR, "xla")
        assert_close(delta_matmul(x, q), expected(x, w))

    @pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
    def test_prefill_route(self, multi, monkeypatch):
        """From PREFILL_ROWS rows on, "interpret"/"pallas" dequantize once and use a dense
        matmul; below, the fused kernel. Both agree with the float64 ground truth."""
        rng = np.random.default_rng(6)
        calls = []
        name = "multi_delta_matmul_pallas" if multi else "delta_matmul_pallas"
        kernel = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
        stack, ws = random_stack(rng, 3, MULTI_FMT)
        kernel_calls = []
        for rows in (dispatch.PREFILL_ROWS - 1, dispatch.PREFILL_ROWS):
            x = random_x(rng, rows, K, jnp.bfloat16)
            if multi:
                slots = rng.integers(-1, 3, rows)
                y = multi_delta_matmul(x, stack, make_delta_batch(jnp.asarray(slots), 3),
                                       implementation="interpret")
                assert_close(y, expected_multi(x, ws, slots))
            else:
                y = delta_matmul(x, unstack_deltas(stack)[1], implementation="interpret")
                assert_close(y, expected(x, ws[1]))
            kernel_calls.append(len(calls))
        assert kernel_calls == [1, 1]  # the kernel ran for PREFILL_ROWS - 1 rows, not for more


# ----------------------------------------------------------------------------------------------
# CUDA lowering on a CPU-only host: JAX -> Triton IR for an abstract H100, no GPU or CUDA plugin.


def lower_for_cuda(fn, *args):
    """The StableHLO text of fn(*args) lowered for CUDA, with an abstract H100 as the device."""
    try:
        return compiled.lower_for_cuda(fn, *args)
    except ImportError:  # pragma: no cover - older jax
        pytest.skip("this jax has no AbstractDevice to lower for CUDA without a GPU")


def lowering_params():
    out = []
    for f in all_formats():
        if f.bits == 3:
            continue
        for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
            # Every format in bf16 by default; the other dtypes for one format, the rest slow.
            default = dtype == jnp.bfloat16 or fmt_id(f) == "b4-2:4-g64-asym"
            out.append(pytest.param(f, dtype, id=f"{fmt_id(f)}-{jnp.dtype(dtype).name}",
                                    marks=() if default else (pytest.mark.slow,)))
    return out


@pytest.mark.skipif(ON_GPU, reason="the compiled suite covers the GPU")
class TestCudaLowering:
    @pytest.mark.parametrize("fmt,dtype", lowering_params())
    def test_delta_matmul(self, fmt, dtype):
        q, _ = random_delta(np.random.default_rng(0), K, N, fmt)
        for m in (1, 64):  # decode (split K) and a bigger batch tile
            text = lower_for_cuda(delta_matmul_pallas, jnp.ones((m, K), dtype), q)
            assert "__gpu$xla.gpu.triton" in text

    @pytest.mark.parametrize("fmt,dtype", lowering_params())
    def test_multi_delta_matmul(self, fmt, dtype):
        stack, _ = random_stack(np.random.default_rng(0), 3, fmt)
        batch = make_delta_batch(jnp.array([0, 2, -1, 2, 1]), 3)
        text = lower_for_cuda(multi_delta_matmul_pallas, jnp.ones((5, K), dtype), stack, batch)
        assert "__gpu$xla.gpu.triton" in text

    @pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
    def test_llama_shapes(self, k, n):
        """The benchmark shapes (K = 11008 is not a power of two) with their heuristic configs."""
        q = abstract_delta(k, n, Format(bits=4, group_size=128, nm=(2, 4)))
        for m in (1, 16, 64):
            assert "triton" in lower_for_cuda(delta_matmul_pallas, jnp.ones((m, k), jnp.bfloat16), q)
        stack = jax.tree.map(lambda a: jax.ShapeDtypeStruct((8, *a.shape), a.dtype), q)
        batch = make_delta_batch(jnp.arange(16) % 9 - 1, 8)
        assert "triton" in lower_for_cuda(multi_delta_matmul_pallas,
                                          jnp.ones((16, k), jnp.bfloat16), stack, batch)


abstract_delta = compiled.abstract_delta


# ----------------------------------------------------------------------------------------------
# Triton compilation to a cubin for sm_90 without a GPU, when the `triton` package is importable
# (it is not a dependency: e.g. `pip install --target /tmp/triton triton` and PYTHONPATH=/tmp/triton).
# This runs Triton's own passes (layouts, dot shapes, pipelining, ptxas) on the IR that
# `lower_for_cuda` produced, catching what the JAX-side lowering alone cannot.


def triton_ir_for_cuda(fn, *args) -> list[str]:
    """The Triton IR text of every pallas_call in fn(*args), lowered for an abstract H100."""
    try:  # private API: skip, not fail, if a jax version moves it
        return compiled.triton_ir(fn, *args)
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(str(e))


def compile_params():
    out = []
    for f in all_formats():
        if f.bits == 3:
            continue
        for kernel in ("single-m1", "single-m64", "multi"):
            default = (kernel, fmt_id(f)) in {("single-m1", "b4-2:4-g64-asym"),
                                              ("single-m1", "b4-dense-g64-asym"),
                                              ("multi", "b2-dense-g256-sym"),
                                              ("single-m1", "b4-2:4-g256-asym"),
                                              ("multi", "b8-2:4-g256-asym")}
            out.append(pytest.param(f, kernel, (K, N), id=f"{kernel}-{fmt_id(f)}",
                                    marks=() if default else (pytest.mark.slow,)))
    # Llama-7B projection shapes with their heuristic configs (K = 11008 is not a power of two;
    # the 64-row tile runs 8 warps): registers and spills at the sizes that are served.
    # The multi-delta kernel at 32 and 64 rows: the phase route's 32-row tiles (16 at 8 bits:
    # float32 weights, ptxas spills 132 bytes dense at 32 rows, 40 at 2:4).
    # Dense 2/4-bit codes at 16 rows: 32-column strips on 2 warps (`phases.warps`).
    for llama in (Format(bits=4, group_size=128, nm=(2, 4)), Format(bits=2, group_size=128),
                  Format(bits=8, group_size=128, nm=(2, 4)), Format(bits=8, group_size=4096),
                  Format(bits=4, group_size=128)):
        for kernel in ("single-m1", "single-m16", "single-m64", "multi-m16", "multi-m32",
                       "multi-m64"):
            for k, n in ((4096, 4096), (11008, 4096)):
                # By default the 2:4 phase route's K loop (at K = 256 each program runs a step).
                default = (kernel, k, llama.bits) in {("single-m1", 4096, 4),
                                                      ("single-m16", 4096, 2),
                                                      ("multi-m16", 4096, 8),
                                                      ("multi-m64", 4096, 4),
                                                      ("multi-m32", 4096, 8)}
                if llama.nm is None and llama.bits == 8 and kernel != "multi-m32":
                    continue
                if llama.nm is None and llama.bits == 4 and kernel not in ("single-m16",
                                                                            "multi-m16"):
                    continue
                out.append(pytest.param(llama, kernel, (k, n), id=f"{kernel}-{k}x{n}-{fmt_id(llama)}",
                                        marks=() if default else (pytest.mark.slow,)))
    return out


@pytest.mark.skipif(ON_GPU, reason="the compiled suite covers the GPU")
class TestTritonCompile:
    @pytest.mark.parametrize("fmt,kernel,shape", compile_params())
    def test_compiles_for_sm90(self, fmt, kernel, shape, tmp_path, monkeypatch):
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))  # really compile
        k, n = shape
        q = abstract_delta(k, n, fmt)
        if kernel.startswith("multi"):
            m, slots = (int(kernel.split("-m")[1]), 8) if "-m" in kernel else (5, 3)
            stack = jax.tree.map(lambda a: jax.ShapeDtypeStruct((slots, *a.shape), a.dtype), q)
            batch = make_delta_batch(jnp.arange(m) % (slots + 1) - 1, slots)
            ir = triton_ir_for_cuda(multi_delta_matmul_pallas, jnp.ones((m, k), jnp.bfloat16),
                                    stack, batch)
            config = MultiDeltaConfig.heuristic(m, k, n, slots, fmt)
        else:
            m = int(kernel.split("-m")[1])
            ir = triton_ir_for_cuda(delta_matmul_pallas, jnp.ones((m, k), jnp.bfloat16), q)
            config = DeltaMatmulConfig.heuristic(m, k, n, fmt)
        for text in ir:
            kernel_bin = compiled.compile_sm90(text, num_warps=config.num_warps,
                                               num_stages=config.num_stages)
            assert kernel_bin["cubin"]
            weights = config.block_k * config.block_n / (32 * config.num_warps)
            check_ptx(kernel_bin["ptx"], bf16_weights=fmt.bits <= 4, phases=config.phases,
                      weights=weights)
            if config.phases:
                check_phase_sass(kernel_bin["cubin"], config, fmt)


def check_phase_sass(cubin: bytes, config, fmt) -> None:
    """The phase route's machine code: a stored weight (a kept one with 2:4) costs an AND and a
    shift-and-add (LOP3, LEA), a pair of 16-bit weights (`phases.pairs`: 2/4-bit codes, bf16
    x; bf16 MMAs) the same two, and no dequantization constant (a mask, 1.0f) is moved into a
    register inside the K loop (ptxas did that before most weights when the kernel stated the
    dequantization in jnp: 0.55 moves a weight, see `phase_bits.phase_weights`), but one a step.
    One exception, bounded: 8-bit 2:4 (float32 weights, TF32 MMAs), where ptxas moves the
    first kept value's shifted mask (0x7f8000) before up to a quarter of the kept weights (7.2
    SASS instructions a weight at 4096 x 4096, M = 1, against 11.0 on the general route)."""
    loops = compiled.sass_loops(cubin)
    sizes = row_tile_sizes(config.block_m, phase=True)
    if loops and isinstance(config, MultiDeltaConfig) and len(sizes) > 1:  # a K loop a row tile,
        # its MMAs in proportion to its rows (what `benchmarks/kernels.py --ptx` relies on)
        mma = [sum("HMMA" in line for line in loop) for loop in loops]
        assert len(loops) == len(sizes) and all(m * sizes[0] == mma[0] * t
                                                for m, t in zip(mma, sizes)), (mma, sizes)
    for loop in loops:  # none with one K step a program
        check_phase_loop(loop, config, fmt)


def check_phase_loop(loop: list[str], config, fmt) -> None:
    """`check_phase_sass` on one K loop."""
    import re

    n, m = fmt.nm or (1, 1)
    weights = config.block_k * n // m * config.block_n / (32 * config.num_warps)  # a thread's
    moved = [line.strip() for line in loop if re.search(r"MOV\S*\s+R\d+, .*0x[0-9a-f]{5,}", line)]
    # one a K step is not a weight's: the 2:4 pair route copies the zero point into both
    # halves with an IMAD by 0x10001
    allowed = weights / 4 if fmt.nm is not None and fmt.bits == 8 else 1
    assert len(moved) <= allowed, \
        f"{len(moved)} constants moved into registers in the K loop: {moved[:4]}"
    sass = compiled.sass_loop_instructions(loop)
    pair = pairs(fmt, jnp.bfloat16)
    assert sass["LEA"] + sass["LEA.HI"] >= 0.9 * weights / (2 if pair else 1), dict(sass)
    mma = "HMMA.16816.F32.BF16" if pair else "HMMA.1688.F32.TF32"
    assert sass[mma] and sum(v for op, v in sass.items() if op.startswith("HMMA")) == sass[mma]


def check_ptx(ptx: str, *, bf16_weights: bool, phases: bool, weights: float = 0) -> None:
    """What the compiled kernel must look like: codes dequantized without conversion
    instructions (no integer-to-float `cvt`: they issue at a fraction of the ALU rate and were
    64 per thread per K step at 4 bits; and for 2/4-bit codes with bf16 activations, built
    in bf16, no float32-to-bf16 rounding either), tensor-core instructions for the dot, and at
    most 255 registers with no spill (ptxas's own report). On the phase route, the weights never
    pass through shared memory as a tile: no 16-bit shared store, no transposing `ldmatrix`
    and no vector shared store (nor 32-bit ones for a quarter of a thread's dense `weights` a K
    step) in the K loop: the words are read from shared memory into the dot's operand
    registers. (A tile built in another layout, as the 2:4 tiles were before `phases_nm.nm_table`,
    is stored and loaded back: 1 load and 0.25 stores a weight.)"""
    import re

    if phases:
        import collections
        # The K loop; a kernel of one K step per program has none: then the whole kernel, whose
        # epilogue moves the output tile through shared memory (only 16-bit stores and
        # transposing loads are weights there).
        whole = collections.Counter(re.findall(r"^\s+(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M))
        for loop in compiled.ptx_loops(ptx) or [None]:  # a K loop a multi-delta row tile
            tile = {op: v for op, v in (loop or whole).items()
                    if op.startswith("st.shared.b16")
                    or (op.startswith("ldmatrix") and ".trans" in op)}
            if loop:  # a tile built in another layout is stored whole, in vector stores (or
                # one 32-bit store a weight); the loop's few 32-bit stores move per-column
                # scales and zero points into the accumulator's layout
                stores = {op: v for op, v in loop.items()
                          if op.startswith(("st.shared", "stmatrix"))}
                if set(stores) - {"st.shared.b32"} or stores.get("st.shared.b32", 0) > weights / 4:
                    tile.update(stores)
            assert not tile, f"the weight tile goes through shared memory: {tile}"

    to_float = re.findall(r"cvt(?:\.rn|\.rz)?\.f(?:16|32)\.[us](?:8|16|32)\b", ptx)
    assert not to_float, f"integer-to-float conversions in the kernel: {sorted(set(to_float))}"
    if bf16_weights:
        rounding = re.findall(r"cvt\.rn\.bf16(?:x2)?\.f32\b", ptx)
        assert not rounding, f"{len(rounding)} float32-to-bf16 conversions in the kernel"
    assert re.search(r"\b(?:mma|wgmma)\.", ptx), "no tensor-core instruction in the kernel"
    report = compiled.ptxas_report(ptx)
    assert report["registers"] <= 255 and report["spill_bytes"] == 0, report


def test_concrete_out_of_range_slots_raise():
    with pytest.raises(ValueError, match=r"delta slots \[3, 7\] outside \[-1, 3\)"):
        make_delta_batch(jnp.array([0, 3, -1, 7]), 3)
