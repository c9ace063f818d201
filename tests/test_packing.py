"""The canonical packing and the dequantize reference, against plain NumPy."""

import itertools

import ml_dtypes
import numpy as np
import pytest

from dzjax.pallas_kernels import packing
from dzjax.pallas_kernels.formats import Format, quantize_to_format
from dzjax.pallas_kernels.reference import dequantize, delta_matmul_ref


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_unpack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (96, 7))
    packed = packing.pack_codes(codes, bits)
    assert packed.shape == (96 * bits // 32, 7) and packed.dtype == np.uint32
    np.testing.assert_array_equal(packing.unpack_codes(packed, bits, 96), codes)


def test_bit_stream_layout():
    """Row r of a 32-row block sits at bits [r*b, (r+1)*b) of the block's b words."""
    bits = 3
    codes = np.random.default_rng(0).integers(0, 8, (32, 2))
    packed = np.asarray(packing.pack_codes(codes, bits))
    stream = sum(int(packed[w, 1]) << (32 * w) for w in range(bits))
    for r in range(32):
        assert (stream >> (r * bits)) & 7 == codes[r, 1]


def test_pack_rejects_rows_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack_codes(np.zeros((48, 2), int), 4)


def _random_nm_mask(rng, k, n_cols, n, m):
    mask = np.zeros((k, n_cols), bool)
    for g, c in itertools.product(range(k // m), range(n_cols)):
        mask[g * m + rng.choice(m, n, replace=False), c] = True
    return mask


def _numpy_dequant(codes, scales, zeros, keep, group, bits, symmetric):
    zero = 2 ** (bits - 1) if symmetric else np.repeat(zeros, group, 0)
    dense = np.repeat(scales.astype(ml_dtypes.bfloat16).astype(np.float64), group, 0) * (codes - zero)
    return np.where(keep, dense, 0.0)


FORMATS = [
    dict(bits=b, group=g, symmetric=s, sparsity=sp)
    for b in (2, 3, 4, 8) for g in (32, None) for s in (False, True)
    for sp in (None, (2, 4), "unstructured")
]


@pytest.mark.parametrize("case", FORMATS, ids=lambda c: "-".join(map(str, c.values())))
def test_dequantize_matches_numpy(case):
    rng = np.random.default_rng(7)
    k, n = 128, 24
    bits, symmetric = case["bits"], case["symmetric"]
    group = case["group"] or k
    codes = rng.integers(0, 2 ** bits, (k, n))
    scales = rng.uniform(0.01, 0.1, (k // group, n)).astype(np.float32)
    zeros = rng.integers(0, 2 ** bits, (k // group, n))
    keep = np.ones((k, n), bool)
    if case["sparsity"] == (2, 4):
        keep = _random_nm_mask(rng, k, n, 2, 4)
    elif case["sparsity"] == "unstructured":
        keep = rng.random((k, n)) < 0.4
    fmt = Format(bits=bits, group_size=group, symmetric=symmetric,
                 nm=case["sparsity"] if isinstance(case["sparsity"], tuple) else None,
                 unstructured=case["sparsity"] == "unstructured")
    q = quantize_to_format(codes, scales, zeros, keep, fmt)
    expected = _numpy_dequant(codes, scales, zeros, keep, group, bits, symmetric)
    np.testing.assert_allclose(dequantize(q), expected, rtol=1e-6, atol=1e-7)
    if case["sparsity"] == (2, 4):
        assert q.nbytes * 8 / (k * n) <= bits / 2 + 1 + 16 * 2 / group  # ~ (bits + 2) / 2 per weight
    x = rng.normal(size=(3, k)).astype(np.float32)
    y = np.asarray(delta_matmul_ref(x, q))
    rel = np.linalg.norm(y - x @ expected) / np.linalg.norm(x @ expected)
    assert rel < 1e-5


def test_sixteen_bit_format_keeps_values():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(64, 8)).astype(np.float32)
    keep = _random_nm_mask(rng, 64, 8, 2, 4)
    q = quantize_to_format(values, None, None, keep, Format(bits=16, group_size=64, nm=(2, 4)))
    expected = np.where(keep, values.astype(np.float16).astype(np.float32), 0)
    np.testing.assert_array_equal(dequantize(q), expected)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=5, group_size=32), "bits=5"),
    (dict(bits=4, group_size=30, nm=(2, 4)), "multiple of m=4"),
    (dict(bits=4, group_size=32, nm=(4, 4)), "0 < n < m"),
])
def test_bad_formats(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Format(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    # padding to whole groups and words must stay under one of them (a hostile file could
    # otherwise claim a format that dequantizes to many times its matrix)
    (dict(bits=4, group_size=48), "multiple or a divisor of 32"),
    (dict(bits=4, group_size=4095), "multiple or a divisor of 32"),
    (dict(bits=4, group_size=2 ** 21, nm=(1, 65536)), "m must be at most 32"),
])
def test_formats_that_would_pad_beyond_a_group_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Format(**kwargs)


def test_group_larger_than_k_must_be_per_channel():
    Format(bits=4, group_size=96).check_shape(96, 8, "q_proj")  # per channel
    Format(bits=4, group_size=128).check_shape(100, 8, "q_proj")  # per channel, padded to 128
    with pytest.raises(ValueError, match="q_proj: group_size=128 is larger than K=96"):
        Format(bits=4, group_size=128).check_shape(96, 8, "q_proj")


@pytest.mark.parametrize("kwargs,k,kp", [
    (dict(bits=4, group_size=128), 688, 768),  # whole groups
    (dict(bits=4, group_size=32), 688, 704),
    (dict(bits=4, group_size=128, nm=(2, 4)), 640, 640),  # already whole: unchanged
    (dict(bits=2, group_size=64, nm=(2, 4)), 576, 576),
    (dict(bits=8, group_size=64, nm=(2, 4)), 600, 640),  # 2:4 packs 64 rows a word column
    (dict(bits=16, group_size=1), 37, 37),  # float16 values: nothing packed
    (dict(bits=16, group_size=4, nm=(2, 4)), 37, 64),  # but n:m positions are
])
def test_padded_k(kwargs, k, kp):
    fmt = Format(**kwargs)
    assert fmt.padded_k(k) == kp and fmt.padded_k(kp) == kp
    per_channel = Format.for_matrix(k, bits=kwargs["bits"], sparsity=kwargs.get("nm"))
    assert per_channel.padded_k(k) == per_channel.group_size >= k


def run_ptx(asm: str, words: np.ndarray) -> np.ndarray:
    """Execute the integer PTX of `phase_bits.phase_asm` ($1 in, $0 out, scratch registers) on
    uint32 `words`; any other instruction fails the test."""
    import re

    regs = {"$1": words.astype(np.uint32)}
    ops = {"and.b32": np.bitwise_and, "shl.b32": np.left_shift, "shr.u32": np.right_shift,
           "add.u32": np.add}
    for op, dst, a, b in re.findall(r"([a-z]+\.[a-z0-9]+) (\S+), (\S+), (\S+);", asm):
        value = lambda s: regs[s] if s in regs else np.uint32(int(s, 0))
        assert op in ops, f"unexpected instruction {op} in {asm!r}"
        regs[dst] = ops[op](value(a), value(b)).astype(np.uint32)
    assert re.sub(r"\.reg \.b32 \w+;|[a-z]+\.[a-z0-9]+ \S+, \S+, \S+;|[{} ]", "", asm) == "", asm
    return regs["$0"]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_phase_asm_builds_the_bits_interpret_mode_builds(bits):
    """Compiled kernels dequantize the phase route with inline PTX (`phase_bits.phase_asm`), which
    no CPU runs: run its instructions here on random words, bit for bit against the jnp form
    interpret mode runs, and against 1 + c / 2**bits."""
    import jax.numpy as jnp

    from dzjax.pallas_kernels import phase_bits

    words = np.random.default_rng(bits).integers(0, 2**32, size=256, dtype=np.uint32)
    for phase in range(32 // bits):
        got = run_ptx(phase_bits.phase_asm(bits, phase), words)
        jnp_form = phase_bits.phase_weights(jnp.asarray(words), bits, phase, asm=False)
        np.testing.assert_array_equal(got, np.asarray(jnp_form).view(np.uint32))
        codes = (words >> (phase * bits)) & ((1 << bits) - 1)
        np.testing.assert_array_equal(got.view(np.float32), 1 + codes / 2.0 ** bits)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_pair_asm_builds_the_bits_interpret_mode_builds(bits, dtype):
    """The 16-bit pair route (`phase_bits.pair_asm`): its PTX run on random words, bit for bit
    against the jnp form interpret mode runs, and each half against 2**bits + c in x's dtype;
    `pair_weights` puts half h of word j at column 2j + h."""
    import jax.numpy as jnp

    from dzjax.pallas_kernels import phase_bits

    rng = np.random.default_rng(bits + len(dtype))
    words = rng.integers(0, 2**32, size=(24, 8), dtype=np.uint32)
    x_dtype = jnp.dtype(dtype)
    for pair in range(16 // bits):
        mask, shift, add = phase_bits.pair_bits(bits, pair, x_dtype)
        got = run_ptx(phase_bits.pair_asm(bits, pair, x_dtype), words)
        np.testing.assert_array_equal(
            got, np.asarray(phase_bits.moved(jnp.asarray(words), mask, shift, add, asm=False)))
        tile = np.asarray(phase_bits.pair_weights(jnp.asarray(words), bits, pair, x_dtype,
                                              asm=False).astype(jnp.float32))
        for h in (0, 1):
            codes = (words >> (16 * h + pair * bits)) & ((1 << bits) - 1)
            halves = (got >> (16 * h)) & 0xFFFF
            value = np.asarray(jnp.asarray(halves.astype(np.uint16)).view(x_dtype), np.float32)
            np.testing.assert_array_equal(value, 2.0 ** bits + codes)
            np.testing.assert_array_equal(tile[:, h::2], 2.0 ** bits + codes)


def run_prmt(asm: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PTX `prmt.b32 d, a, b, selector` (default mode): byte i of d is byte s & 7 of the eight
    bytes of (a, b), s the selector's nibble i, or that byte's top bit replicated if s & 8."""
    import re

    sel = int(re.fullmatch(r"prmt\.b32 \$0, \$1, \$2, (\d+);", asm).group(1))
    source = np.concatenate([a[..., None], b[..., None]], axis=-1).astype(np.uint32)
    src_bytes = [(source[..., j // 4] >> 8 * (j % 4)) & 0xFF for j in range(8)]
    out = np.zeros(a.shape, np.uint32)
    for i in range(4):
        nibble = sel >> 4 * i & 0xF
        byte = src_bytes[nibble & 7]
        if nibble & 8:
            byte = np.where(byte & 0x80, 0xFF, 0).astype(np.uint32)
        out |= byte << 8 * i
    return out


@pytest.mark.parametrize("bits", [2, 4])
def test_the_prmt_masks_match_interpret_mode(bits):
    """The 2:4 pair route's masks (`phases_nm.masks`): the `prmt` compiled kernels run, executed
    here on random conditions, equal the jnp form interpret mode runs; every half is 0xFFFF or
    0, and it is 0xFFFF where its group's condition bit (4g + 3) is set."""
    import jax.numpy as jnp

    from dzjax.pallas_kernels import phases_nm

    cond = np.random.default_rng(bits).integers(0, 2**32, size=512, dtype=np.uint32)
    if bits == 4:  # the route's positions copy (16 bits, and the same 20 bits up)
        cond = (cond & 0xFFFF) * np.uint32(0x100001)
    second = cond if bits == 4 else cond << np.uint32(4)
    groups = 16 // bits
    for pair in range(groups // 2):
        got = run_prmt(phases_nm.prmt_asm(bits, pair), cond, second)
        np.testing.assert_array_equal(
            got, np.asarray(phases_nm.masks(jnp.asarray(cond), bits, pair, asm=False)))
        for h, g in enumerate((pair, pair + groups // 2)):
            want = np.where(cond >> (4 * g + 3) & 1, 0xFFFF, 0)
            np.testing.assert_array_equal(got >> 16 * h & 0xFFFF, want)
