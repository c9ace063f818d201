"""Fused projections (`dzjax.models.fusion`): q/k/v and gate/up computed as one matmul each give
the unfused model's logits and tokens, for the base and for compressed and exact deltas, with
fewer dots in the decode step; parts a delta does not touch are zero; parts stored in different
formats are refused, naming the tensors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, make_deltas

import dzjax
from dzjax.compress.delta_file import load_delta
from dzjax.models import KernelOptions, fusion
from dzjax.models.kv_cache import KVPages
from dzjax.models.llama import CausalLM
from dzjax.serving import steps

UNFUSED = KernelOptions(implementation="xla")
FUSED = KernelOptions(implementation="xla", fused_projections=True)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """Qwen2 (q/k/v biases, GQA), a compressed delta of it (4-bit 2:4), one in another format
    (8-bit dense), and a second 4-bit 2:4 delta."""
    tmp = tmp_path_factory.mktemp("fusion")
    base = dzjax.load_base(fixture_dir("qwen2"), dtype=jnp.float32)
    four = make_deltas(fixture_dir("qwen2"), tmp / "a", 2)
    eight = make_deltas(fixture_dir("qwen2"), tmp / "b", 1, bits=8, sparsity=None)["ft0"]
    return (base, load_delta(four["ft0"], base=base), load_delta(eight, base=base),
            load_delta(four["ft1"], base=base))


def logits(base, delta_params, kernels):
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), ids.shape)
    params, delta = base.params, delta_params
    if kernels.fused_projections:
        params, delta = fusion.fuse(params, base.config), fusion.fuse(delta, base.config)
    out, _ = CausalLM(base.config, jnp.float32, kernels=kernels).apply(
        {"params": params}, ids, positions, delta)
    return out


def test_the_fused_columns_split_back_into_the_parts():
    rng = np.random.default_rng(1)
    sizes = (64, 16, 16)
    parts = [rng.standard_normal((8, n)).astype(np.float32) for n in sizes]
    x = rng.standard_normal((3, 8)).astype(np.float32)
    for shards in (1, 2, 8):
        fused = fusion._concat(parts, shards)
        got = fusion.split_columns(jnp.asarray(x @ fused), sizes, shards)
        for g, p in zip(got, parts):
            np.testing.assert_allclose(g, x @ p, rtol=1e-5)
        if shards > 1:  # device d's block holds its own columns of every part
            block = fused[:, :sum(sizes) // shards]
            np.testing.assert_array_equal(block[:, :64 // shards], parts[0][:, :64 // shards])


def test_the_fused_model_gives_the_unfused_logits(qwen2):
    base, four, eight, _ = qwen2
    for delta in (None, four.params, eight.params):
        want = logits(base, delta, UNFUSED)
        assert rel_err(logits(base, delta, FUSED), want) < 1e-5
    fused = fusion.fuse(four.params, base.config)
    attn = fused["model"]["layers_0"]["self_attn"]
    assert set(attn) >= {"qkv_proj", "o_proj"} and "q_proj" not in attn
    c = base.config
    assert attn["qkv_proj"]["kernel"].shape == (c.hidden_size,
                                                (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
    assert attn["qkv_proj"]["bias"].shape == ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim,)


def test_a_part_the_delta_does_not_touch_is_zero(qwen2):
    base, four, _, _ = qwen2
    params = jax.tree.map(lambda a: a, four.params, is_leaf=lambda x: not isinstance(x, dict))
    layer = params["model"]["layers_0"]
    del layer["self_attn"]["k_proj"]  # compressed kernel and exact bias gone
    del layer["mlp"]["up_proj"]
    want = logits(base, params, UNFUSED)
    assert rel_err(logits(base, params, FUSED), want) < 1e-5
    assert rel_err(want, logits(base, four.params, UNFUSED)) > 1e-4  # the removal mattered


def test_parts_in_different_formats_are_refused_naming_them(qwen2):
    base, four, eight, _ = qwen2
    mixed = jax.tree.map(lambda a: a, four.params, is_leaf=lambda x: not isinstance(x, dict))
    mixed["model"]["layers_1"]["self_attn"]["v_proj"] = \
        eight.params["model"]["layers_1"]["self_attn"]["v_proj"]
    with pytest.raises(dzjax.DzjaxError, match=r"model.layers_1.self_attn.q_proj/k_proj/v_proj"
                       r".kernel: the parts are stored in different formats"):
        fusion.fuse(mixed, base.config)
    delta = dataclasses.replace(four, params=mixed)
    with pytest.raises(dzjax.DzjaxError, match="delta 'mixed'.*fuse_projections=False"):
        dzjax.serve(base, {"mixed": delta}, max_batch=2, max_seq_len=32)
    with dzjax.serve(base, {"mixed": delta}, max_batch=2, max_seq_len=32,
                     fuse_projections=False) as server:  # unfused, it is served
        assert len(server.generate([[5, 6, 7]], model="mixed", max_tokens=2)[0]) == 2
    with pytest.raises(dzjax.DzjaxError, match="fuse_projections must be True or False"):
        dzjax.serve(base, max_batch=2, max_seq_len=32, fuse_projections="yes")


def test_the_fused_decode_step_has_three_fewer_dots_per_layer():
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    c, b, total = base.config, 4, 64
    sampling = (np.zeros(b, np.uint32), np.zeros(b, np.int32), np.zeros(b, np.float32),
                np.ones(b, np.float32))
    dots = {}
    for kernels in (UNFUSED, FUSED):
        params = fusion.fuse(base.params, c) if kernels.fused_projections else base.params
        hlo = steps.decode.lower(
            params, None, KVPages.zeros(c, total, 16, jnp.float32),
            np.full((b, 8), total, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32),
            np.full(b, -1, np.int32), sampling, config=c, dtype=jnp.float32, kernels=kernels,
            num_pages=2).compile().as_text()
        dots[kernels.fused_projections] = sum(" dot(" in line for line in hlo.split("\n"))
    assert dots[False] - dots[True] == 3 * c.num_layers  # q/k/v: 3 -> 1, gate/up: 2 -> 1


@pytest.mark.slow  # (CI time: the serving tests already compare fused serving with generate)
def test_serving_gives_the_same_tokens_with_and_without_fusion(qwen2, tmp_path):
    base, four, _, other = qwen2
    deltas = {"four": four, "other": other}
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(3, 200, int(m))] for m in rng.integers(2, 30, 6)]
    names = ["four", None, "other", "four", "other", None]
    out = {}
    for fuse in (False, True):
        with dzjax.serve(base, deltas, max_batch=4, max_seq_len=64,
                         fuse_projections=fuse) as server:
            out[fuse] = server.generate(prompts, model=names, max_tokens=10, ignore_eos=True)
    assert out[True] == out[False]
