"""The KV cache: paged attention (jax's Pallas kernel in interpret mode) against its pure-jnp
reference, prompts written into pages, and the decode step updating the cache in place (its
optimized HLO holds no copy or concatenation of a cache buffer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir

import dzjax
from dzjax.models import KernelOptions
from dzjax.models.forward import forward_cached
from dzjax.models.kv_cache import (KVCache, KVPages, _paged_attention_pallas,
                                   _paged_attention_xla, attention)
from dzjax.serving import steps


def random_pages(rng, kv_heads=2, pages=24, page_size=16, head_dim=32, dtype=np.float32):
    shape = (kv_heads, pages, page_size, head_dim)
    return (jnp.asarray(rng.standard_normal(shape), dtype),
            jnp.asarray(rng.standard_normal(shape), dtype))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_the_paged_attention_kernel_matches_its_reference(dtype, tol):
    rng = np.random.default_rng(0)
    b, heads, n = 3, 4, 4
    kp, vp = random_pages(rng, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((b, 1, heads, kp.shape[-1])), dtype)
    tables = jnp.asarray(rng.permutation(kp.shape[1])[:b * n].reshape(b, n), jnp.int32)
    positions = jnp.asarray([5, 37, 63], jnp.int32)  # the last one fills all 4 pages
    ref = _paged_attention_xla(q, kp, vp, tables, positions[:, None], None)
    out = _paged_attention_pallas(q[:, 0], kp, vp, tables, positions + 1,
                                 KernelOptions(implementation="interpret"))
    assert rel_err(out.reshape(ref.shape), ref) < tol


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs a GPU")
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-3), (jnp.bfloat16, 2e-2)])
def test_the_compiled_paged_attention_kernel_matches_its_reference(dtype, tol):
    rng = np.random.default_rng(5)
    b, heads, n = 8, 32, 16
    kp, vp = random_pages(rng, kv_heads=8, pages=256, page_size=16, head_dim=128, dtype=dtype)
    q = jnp.asarray(rng.standard_normal((b, 1, heads, 128)), dtype)
    tables = jnp.asarray(rng.permutation(256)[:b * n].reshape(b, n), jnp.int32)
    positions = jnp.asarray(rng.integers(1, n * 16, b), jnp.int32)
    ref = _paged_attention_xla(q, kp, vp, tables, positions[:, None], None)
    out = _paged_attention_pallas(q[:, 0], kp, vp, tables, positions + 1,
                                 KernelOptions(implementation="pallas"))
    assert rel_err(out.reshape(ref.shape), ref) < tol


def test_the_xla_path_is_contiguous_attention_over_each_rows_pages():
    """The reference itself, against plain attention over the tokens gathered by hand."""
    rng = np.random.default_rng(1)
    kp, vp = random_pages(rng)
    b = 2
    q = jnp.asarray(rng.standard_normal((b, 1, 4, kp.shape[-1])), jnp.float32)
    tables = np.array([[7, 2, 9], [0, 11, 24]], np.int32)  # 24: unused (out of range)
    positions = np.array([[40], [20]], np.int32)
    got = _paged_attention_xla(q, kp, vp, jnp.asarray(tables), positions, window=None)
    for row in range(b):
        used = tables[row][tables[row] < kp.shape[1]]
        keys = jnp.concatenate([kp[:, p] for p in used], axis=1)  # [kvH, len, D]
        values = jnp.concatenate([vp[:, p] for p in used], axis=1)
        k_pos = jnp.arange(keys.shape[1])[None]
        want = attention(q[row:row + 1], jnp.moveaxis(keys, 0, 1)[None],
                         jnp.moveaxis(values, 0, 1)[None], positions[row:row + 1], k_pos, None)
        assert rel_err(got[row:row + 1], want) < 1e-6


def test_prompts_are_written_into_their_pages():
    rng = np.random.default_rng(2)
    config = dzjax.load_base(fixture_dir("llama")).config
    small = KVCache(*(tuple(jnp.asarray(rng.standard_normal((2, 20, config.num_kv_heads,
                                                             config.head_dim)), jnp.float32)
                            for _ in range(config.num_layers)) for _ in range(2)))
    pages = KVPages.zeros(config, 8, 16, jnp.float32)
    tables = jnp.asarray([[5, 2, 8, 8], [1, 8, 8, 8]], jnp.int32)  # 8: unused
    lengths = jnp.asarray([20, 13], jnp.int32)
    out = pages.write_prompts(small, tables, lengths)
    for layer in range(config.num_layers):
        k = np.asarray(out.k[layer])
        np.testing.assert_array_equal(k[:, 5], np.moveaxis(small.k[layer][0, :16], 1, 0))
        np.testing.assert_array_equal(k[:, 2, :4], np.moveaxis(small.k[layer][0, 16:20], 1, 0))
        np.testing.assert_array_equal(k[:, 1, :13], np.moveaxis(small.k[layer][1, :13], 1, 0))
        assert not k[:, 1, 13:].any() and not k[:, 2, 4:].any()  # padding is never written
        assert not k[:, [0, 3, 4, 6, 7]].any()


def test_which_layers_and_shapes_take_the_pallas_kernel():
    from dzjax.models.kv_cache import use_pallas_attention

    assert not use_pallas_attention("interpret", 8, 16, 64, 4)  # a window: always XLA
    assert use_pallas_attention("interpret", None, 16, 64, 4)
    assert not use_pallas_attention("auto", None, 16, 64, 4)  # on this CPU
    assert not use_pallas_attention("xla", None, 16, 64, 4)
    for bad, why in [((8, 64, 4), "page_size=8"), ((16, 80, 4), "head_dim=80"),
                     ((16, 64, 20), "20 pages")]:
        with pytest.raises(ValueError, match=why):
            use_pallas_attention("pallas", None, *bad)


def test_the_engine_refuses_a_cache_the_pallas_kernel_cannot_serve_up_front():
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    with pytest.raises(dzjax.DzjaxError, match="page_size=4 is not a power of two >= 16"):
        dzjax.serve(base, {}, page_size=4, implementation="interpret")


def hlo_buffers(hlo: str, shape: str, op: str) -> int:
    """How many `op` instructions of the optimized HLO produce a buffer of `shape`."""
    return sum(1 for line in hlo.split("\n")
               if f" {op}(" in line and "=" in line and shape in line.split("=", 1)[1].split(op)[0])


def test_decode_updates_the_cache_in_place():
    """No copy or concatenation of a cache-sized buffer in the optimized decode step: each layer's
    pages take their new keys and values by an in-place scatter into the donated buffer (and the
    same for the contiguous cache of `generate`). The old stacked cache was copied every step."""
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    c, b, ps, total = base.config, 4, 16, 64
    pages = KVPages.zeros(c, total, ps, jnp.float32)
    sampling = (np.zeros(b, np.uint32), np.zeros(b, np.int32), np.zeros(b, np.float32),
                np.ones(b, np.float32))
    hlo = steps.decode.lower(
        base.params, None, pages, np.full((b, 8), total, np.int32), np.zeros(b, np.int32),
        np.zeros(b, np.int32), np.full(b, -1, np.int32), sampling, config=c, dtype=jnp.float32,
        kernels=KernelOptions(implementation="xla"), num_pages=2).compile().as_text()
    page_shape = f"f32[{c.num_kv_heads},{total},{ps},{c.head_dim}]"
    assert hlo_buffers(hlo, page_shape, "scatter") == 2 * c.num_layers  # the writes
    for op in ("copy", "concatenate", "dynamic-update-slice"):
        assert hlo_buffers(hlo, page_shape, op) == 0, op
    cache = KVCache.zeros(c, b, 64, jnp.float32)
    hlo = forward_cached.lower(base.params, np.zeros((b, 1), np.int32), np.zeros((b, 1), np.int32),
                               cache, config=c).compile().as_text()
    layer_shape = f"f32[{b},64,{c.num_kv_heads},{c.head_dim}]"
    for op in ("copy", "concatenate"):
        assert hlo_buffers(hlo, layer_shape, op) == 0, op
    assert hlo_buffers(hlo, layer_shape, "scatter") == 2 * c.num_layers
