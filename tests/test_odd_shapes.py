"""Any shape: matrices whose input dim is not a multiple of 32, 64 or the group size (688, 576, 960:
SmolLM- and Qwen-style sizes) are stored padded (`Format.padded_k`) and computed exactly."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dzjax
from dzjax.compress import quant
from dzjax.compress.obs import (ObsConfig, hessian_init, hessian_update, obs_prune_quantize,
                                pad_problem, round_to_nearest)
from dzjax.compress.pipeline import ConvertConfig, _compress
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.llama import CausalLM
from dzjax.models.saving import save_hf
from dzjax.pallas_kernels import (DeltaMatmulConfig, delta_matmul, make_delta_batch,
                                  multi_delta_matmul, multi_delta_matmul_ref, stack_deltas)
from dzjax.pallas_kernels.formats import Format
from dzjax.pallas_kernels.reference import dequantize

N = 128
BITS = (2, 3, 4, 8, 16)
SPARSITY = (None, "2:4", 0.5)
GROUPS = (None, 128)


def _problem(k: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * k, k)).astype(np.float32) * rng.uniform(0.3, 2.0, k).astype(np.float32)
    h = hessian_update(hessian_init(k), jnp.asarray(x)).h
    w = rng.normal(scale=1e-2, size=(k, N)).astype(np.float32)
    return w, h


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(jnp.asarray(a) - b) / jnp.linalg.norm(b))


# Every bits x sparsity x group combination at each size runs in `make test-all` (each compiles
# its own OBS loop: ~2 minutes a size); the default run covers each value of each at 688.
EVERY = list(itertools.product(BITS, SPARSITY, GROUPS))
SOME = [(2, None, 128), (3, 0.5, None), (4, "2:4", 128), (8, None, None), (16, "2:4", None)]


@pytest.mark.parametrize("k,combos", [
    (688, SOME),
    pytest.param(688, EVERY, marks=pytest.mark.slow),
    pytest.param(576, EVERY, marks=pytest.mark.slow),
    pytest.param(960, EVERY, marks=pytest.mark.slow),
], ids=["688-some", "688-every", "576-every", "960-every"])
def test_every_format_stores_and_multiplies_odd_k(k, combos):
    w, h = _problem(k, k)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, k)).astype(np.float32))
    for bits, sparsity, group in combos:
        what = f"K={k} bits={bits} sparsity={sparsity} group={group}"
        q, err = _compress(w, h, ConvertConfig(bits=bits, sparsity=sparsity, group_size=group), "w")
        kp = q.padded_rows
        assert q.shape == (k, N) and kp >= k and kp % q.format.row_unit == 0, what
        for field, (shape, dtype) in q.format.stored_arrays(k, N).items():
            assert getattr(q, field).shape == shape and getattr(q, field).dtype == dtype, what
        if bits != 16 and group is not None:  # a short last group has a scale of its own
            assert q.scales.shape[0] == -(-k // group), what
        full = dequantize(q.padded)
        assert full.shape == (kp, N) and not np.asarray(full[k:]).any(), what  # padding is 0
        d = dequantize(q)
        np.testing.assert_array_equal(d, full[:k])
        assert 0 < err < {2: 0.75, 3: 0.45, 4: 0.4, 8: 0.35, 16: 0.3}[bits], (what, err)
        assert _rel(delta_matmul(x, q, implementation="xla"), x @ d) < 1e-6, what


def test_short_last_group_gets_the_grid_of_its_own_rows():
    k, g = 688, 128  # five groups of 128, then 48 real rows
    w, h = _problem(k, 0)
    q, _ = _compress(w, h, ConvertConfig(bits=4, sparsity=None, group_size=g, method="rtn"), "w")
    scale, zero = quant.minmax_grid(jnp.asarray(w[640:]), bits=4, symmetric=False)
    np.testing.assert_array_equal(np.asarray(q.scales[-1], np.float32), scale)
    np.testing.assert_array_equal(np.asarray(q.zeros[-1]), zero.astype(np.uint8))


@pytest.mark.parametrize("method", ["obs", "rtn"])
def test_unstructured_sparsity_counts_only_the_real_rows(method):
    k = 200  # padded to 224 rows (per channel): a block of 128 real rows, then 72 and 24 padding
    w, h = _problem(k, 7)
    cfg = ObsConfig(bits=4, group_size=None, sparsity=0.5)
    padded = pad_problem(jnp.asarray(w), h, 224)
    result = (obs_prune_quantize(*padded, cfg, rows=k) if method == "obs"
              else round_to_nearest(padded[0], cfg, padded[1], rows=k))
    assert int((~result.mask[:k]).sum()) == k * N // 2  # half of the real weights, exactly
    assert not np.asarray(result.w_hat[k:]).any()


def test_padding_does_not_change_the_real_rows():
    """OBS on a padded problem compresses the real rows as OBS on them alone."""
    k = 640
    w, h = _problem(k, 3)
    cfg = ObsConfig(bits=4, group_size=None, sparsity="2:4")
    alone = obs_prune_quantize(jnp.asarray(w), h, cfg)
    padded = obs_prune_quantize(*pad_problem(jnp.asarray(w), h, 704), cfg)
    assert not np.asarray(padded.w_hat[k:]).any()
    assert _rel(padded.w_hat[:k], alone.w_hat) < 1e-3
    assert np.mean(np.asarray(padded.codes[:k]) == np.asarray(alone.codes)) > 0.999


@pytest.mark.parametrize("bits,sparsity,group", [
    (2, None, 128),
    pytest.param(4, "2:4", 128, marks=pytest.mark.slow),  # interpret mode: ~20 s each
    pytest.param(8, None, None, marks=pytest.mark.slow),
    pytest.param(4, None, None, marks=pytest.mark.slow)])
def test_kernels_on_odd_k_match_the_reference(bits, sparsity, group):
    k = 688
    w, h = _problem(k, 5)
    cfg = ConvertConfig(bits=bits, sparsity=sparsity, group_size=group)
    qs = [_compress(w * s, h, cfg, "w")[0] for s in (1.0, -0.5)]
    rng = np.random.default_rng(2)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.normal(size=(5, k)), dtype)
        # The kernels' phase route multiplies by the float32 weights, not rounded to x's dtype.
        exact = DeltaMatmulConfig.heuristic(5, qs[0].padded_rows, qs[0].shape[1], qs[0].format,
                                            dtype).phases
        rounded = jnp.float32 if exact else dtype
        ref = jnp.dot(x.astype(jnp.float32),
                      dequantize(qs[0]).astype(rounded).astype(jnp.float32))
        assert _rel(delta_matmul(x, qs[0], implementation="interpret"), ref) < 1e-5
        stack = stack_deltas(qs)
        batch = make_delta_batch(jnp.asarray([1, -1, 0, 1, 0]), 2)
        want = multi_delta_matmul_ref(x.astype(rounded), stack, batch)
        got = multi_delta_matmul(x, stack, batch, implementation="interpret")
        assert _rel(got, want) < 1e-5


def test_odd_k_kernels_lower_for_cuda():
    """The padded matrix is what Triton sees: power-of-two tiles, on a CPU-only host."""
    from dzjax.pallas_kernels import compiled
    from dzjax.pallas_kernels.multi_delta import multi_delta_matmul_pallas
    from dzjax.pallas_kernels.single_delta import delta_matmul_pallas

    for k, fmt in ((688, Format.for_matrix(688, bits=4, sparsity="2:4", group_size=128)),
                   (960, Format.for_matrix(960, bits=2, group_size=128)),
                   (576, Format.for_matrix(576, bits=8)),
                   (688, Format.for_matrix(688, bits=4))):
        q = compiled.abstract_delta(k, 256, fmt)
        assert "triton" in compiled.lower_for_cuda(delta_matmul_pallas,
                                                   jnp.ones((1, k), jnp.bfloat16), q)
    stack = jax.tree.map(lambda a: jax.ShapeDtypeStruct((4,) + a.shape, a.dtype), q)
    batch = make_delta_batch(jnp.asarray([0, 3, -1]), 4)
    assert "triton" in compiled.lower_for_cuda(multi_delta_matmul_pallas,
                                               jnp.ones((3, 688), jnp.bfloat16), stack, batch)


def test_bad_per_channel_group_is_refused():
    fmt = Format(bits=4, group_size=1024)  # a file claiming one group far beyond K
    with pytest.raises(ValueError, match="group_size=1024 is larger than K=688"):
        fmt.check_shape(688, 64, "w")


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """A bf16 Llama with hidden 72, intermediate 172, head_dim 36, vocab 300, and a fine-tune of it
    that moves every weight by ~3% of its norm."""
    root = tmp_path_factory.mktemp("odd")
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=300, hidden_size=72,
                         intermediate_size=172, num_layers=2, num_heads=2, num_kv_heads=1,
                         head_dim=36, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                         max_position_embeddings=128)
    ids = jnp.zeros((1, 1), jnp.int32)
    params = CausalLM(config).init(jax.random.key(0), ids, ids)["params"]
    save_hf(root / "base", config, params, dtype=jnp.bfloat16)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    params = jax.tree.map(lambda p: p * (1 + 0.03 * jax.random.normal(next(keys), p.shape)), params)
    save_hf(root / "ft", config, params, dtype=jnp.bfloat16)
    return root


@pytest.mark.parametrize("settings", [
    dict(bits=2, sparsity=None, group_size=128),  # the defaults
    pytest.param(dict(bits=4, sparsity="2:4", group_size=32), marks=pytest.mark.slow)])
def test_convert_an_odd_shaped_model(odd_model, settings):
    out = odd_model / f"d{settings['bits']}.dz"
    dzjax.convert(odd_model / "base", odd_model / "ft", out, n_samples=8, seq_len=32,
                  progress=False, calibration=np.random.default_rng(0).integers(0, 300, (8, 32)),
                  **settings)
    base = dzjax.load_base(odd_model / "base", dtype=jnp.float32)
    ft = dzjax.load_base(odd_model / "ft", dtype=jnp.float32)
    delta = dzjax.load_delta(out, base=base)
    ids = np.random.default_rng(1).integers(0, 300, (2, 16))
    got, want, before = (dzjax.logits(base, ids, delta=delta), dzjax.logits(ft, ids),
                         dzjax.logits(base, ids))
    assert _rel(got, want) < 0.5 * _rel(before, want)  # most of the way to the fine-tune
    merged = dzjax.load_base(dzjax.export_hf(base, delta, odd_model / f"m{settings['bits']}"),
                             dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(dzjax.logits(merged, ids) - got))) < 1e-4


# Slow (CI time, ~30 s of serving programs for this model); the padded multi-delta kernels are in
# the default run (test_kernels_on_odd_k_match_the_reference).
@pytest.mark.slow
def test_serve_an_odd_shaped_model(odd_model):
    out = odd_model / "served.dz"
    dzjax.convert(odd_model / "base", odd_model / "ft", out, n_samples=8, seq_len=32,
                  progress=False, calibration=np.random.default_rng(0).integers(0, 300, (8, 32)))
    base = dzjax.load_base(odd_model / "base", dtype=jnp.float32)
    delta = dzjax.load_delta(out, base=base)
    with dzjax.serve(base, {"ft": delta}, max_batch=2, max_seq_len=64) as server:
        served = server.generate([[1, 2, 3], [4, 5, 6]], model=["ft", None], max_tokens=4,
                                 ignore_eos=True)
    alone = [dzjax.generate(base, [[1, 2, 3]], max_tokens=4, delta=delta, stop_at_eos=False)[0],
             dzjax.generate(base, [[4, 5, 6]], max_tokens=4, stop_at_eos=False)[0]]
    assert [list(s) for s in served] == alone
