"""Tensor parallelism on a mesh of CPU devices (8, see conftest): serving and converting on a
mesh give exactly what one device gives, and a mesh that does not fit the model is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, make_deltas, make_finetune
from jax.sharding import PartitionSpec as P

import dzjax
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.llama import CausalLM
from dzjax.models.safetensors_io import SafetensorsFile
from dzjax.models.saving import save_hf
from dzjax.models.sharding import make_mesh

OPTIONS = dict(max_batch=4, max_seq_len=64, max_resident_deltas=2)


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory):
    """A random Llama whose heads (16; 8 kv), MLP (256) and vocab (256) split over 8 devices,
    with three deltas."""
    tmp = tmp_path_factory.mktemp("tp")
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128, intermediate_size=256,
        num_layers=2, num_heads=16, num_kv_heads=8, head_dim=8, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=128)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = CausalLM(config).init(jax.random.key(0), ids, ids)["params"]
    params = jax.tree.map(lambda a: a * 5 if a.ndim == 2 else a, params)  # peakier logits
    base_dir = save_hf(tmp / "base", config, params, dtype=jnp.float32)
    paths = make_deltas(base_dir, tmp, 3)
    return dzjax.load_base(base_dir, dtype=jnp.float32), base_dir, paths


def test_devices_are_there():
    assert len(jax.devices()) == 8


# Slow (CI time: ~75 s a mesh, each compiles its own programs, single device and pipelined);
# the default run serves on a mesh of 4 in the next test and checks generate on a mesh against
# one device (test_generate_on_a_mesh_equals_one_device).
@pytest.mark.parametrize("n", [pytest.param(1, marks=pytest.mark.slow),
                               pytest.param(2, marks=pytest.mark.slow),
                               pytest.param(4, marks=pytest.mark.slow),
                               pytest.param(8, marks=pytest.mark.slow)])
def test_mixed_batch_on_a_mesh_equals_one_device(tp_model, n):
    base, _, paths = tp_model
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, 250, int(m))] for m in rng.integers(2, 20, 6)]
    names = ["ft0", None, "ft1", "ft2", "ft0", None]
    with dzjax.serve(base, paths, **OPTIONS) as server:
        expected = server.generate(prompts, model=names, max_tokens=8, ignore_eos=True)
    # (pipelined, as on a GPU: the tokens of the step before stay on the mesh)
    with dzjax.serve(base, paths, **OPTIONS, mesh=make_mesh(n), pipeline_decode=True) as server:
        got = server.generate(prompts, model=names, max_tokens=8, ignore_eos=True)
        stats = server.stats()
    assert got == expected
    assert stats["traces"]["decode"] <= 2  # one program per bucket of KV pages read


def test_params_cache_and_deltas_are_split_over_the_mesh(tp_model):
    base, _, paths = tp_model
    # The mesh as JAX's documentation builds it (Explicit axes, a name of its own).
    mesh = jax.make_mesh((4,), ("model",))
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)
    with dzjax.serve(base, paths, **OPTIONS, mesh=mesh) as server:
        served = server.generate([[5, 6, 7], [9, 8]], model=["ft1", None], max_tokens=3,
                                 ignore_eos=True)
        alone = [dzjax.generate(base, [[5, 6, 7]], max_tokens=3, stop_at_eos=False,
                                delta=dzjax.load_delta(paths["ft1"]))[0],
                 dzjax.generate(base, [[9, 8]], max_tokens=3, stop_at_eos=False)[0]]
        assert served == alone  # a mixed batch on the mesh: each row as on one device
        engine = server.engine
        layer = engine.params["model"]["layers_0"]  # q/k/v and gate/up fused (by device)
        qkv, down = layer["self_attn"]["qkv_proj"]["kernel"], layer["mlp"]["down_proj"]["kernel"]
        assert qkv.sharding.spec == P(None, "tp") and down.sharding.spec == P("tp", None)
        # 128 q, 64 k and 64 v columns over 4 devices: 32 + 16 + 16 each
        assert {s.data.shape for s in qkv.addressable_shards} == {(128, 64)}
        assert {s.data.shape[0] for s in engine.pages.k[0].addressable_shards} == {8 // 4}
        gate_up = engine.pool.stacks["model"]["layers_0"]["mlp"]["gate_up_proj"]["kernel"]
        assert gate_up.qweight.sharding.spec == P(None, None, "tp")
        assert {s.data.shape[-1] for s in gate_up.qweight.addressable_shards} == {2 * 256 // 4}


def test_a_mesh_that_does_not_divide_the_model_is_refused_at_serve(tp_model):
    llama = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)  # 4 heads, 2 kv heads
    with pytest.raises(dzjax.DzjaxError, match="does not divide the model's num_attention_heads=4"):
        dzjax.serve(llama, mesh=make_mesh(8))
    with pytest.raises(dzjax.DzjaxError, match="only 8 are available"):
        make_mesh(16)


def test_replicated_kv_heads_compute_the_same_logits(tmp_path):
    """Each KV head's k/v columns repeated r times (dense base, compressed delta): the model
    with r times the KV heads gives the same logits (what a mesh wider than the KV heads runs)."""
    from dzjax.models import kv_heads
    from dzjax.models.loading import Base

    llama = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    delta = dzjax.load_delta(make_deltas(fixture_dir("llama"), tmp_path, 1)["ft0"]).params
    ids = np.array([[1, 15, 27, 3, 99, 42]])
    for r in (2,):  # (4 query heads: at most 4 KV heads)
        config = kv_heads.replicated_config(llama.config, r)
        assert config.num_kv_heads == 2 * r
        wide = Base(config=config, params=kv_heads.replicate(llama.params, llama.config, r))
        k = wide.params["model"]["layers_0"]["self_attn"]["k_proj"]["kernel"]
        assert k.shape[1] == 2 * r * llama.config.head_dim
        for d in (None, delta):
            want = dzjax.logits(llama, ids, delta=d)
            got = dzjax.logits(wide, ids, delta=kv_heads.replicate(d, llama.config, r))
            assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def test_a_mesh_wider_than_the_kv_heads_serves_what_one_device_does(tmp_path):
    """2 KV heads on 4 devices (vLLM's replication): generate and serve equal one device."""
    llama = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    paths = make_deltas(fixture_dir("llama"), tmp_path, 2)
    prompts, names = [[5, 6, 7], [9, 8], [3, 1, 4, 1]], ["ft1", None, "ft0"]
    alone = [dzjax.generate(llama, [p], max_tokens=4, stop_at_eos=False,
                            delta=None if n is None else dzjax.load_delta(paths[n]))[0]
             for p, n in zip(prompts, names)]
    mesh = jax.make_mesh((4,), ("tp",))
    assert dzjax.generate(llama, [prompts[0]], max_tokens=4, stop_at_eos=False, mesh=mesh,
                          delta=dzjax.load_delta(paths["ft1"])) == [alone[0]]
    with dzjax.serve(llama, paths, **OPTIONS, mesh=mesh) as server:
        assert server.generate(prompts, model=names, max_tokens=4, ignore_eos=True) == alone
        pages = server.engine.pages.k[0]
        assert pages.shape[0] == 4 and {s.data.shape[0] for s in pages.addressable_shards} == {1}


# Slow (CI time): 25 s; the mesh's serving and generation stay in the default run.
@pytest.mark.slow
def test_convert_on_a_mesh_writes_the_same_file(tp_model, tmp_path):
    _, base_dir, _ = tp_model
    ft = make_finetune(base_dir, tmp_path / "ft", seed=7)
    calibration = np.random.default_rng(0).integers(0, 200, (4, 16))
    files = {}
    for n in (None, 4):
        out = tmp_path / f"mesh{n}.dz.safetensors"
        delta = dzjax.convert(base_dir, ft, out, group_size=32, calibration=calibration,
                              progress=False, mesh=None if n is None else make_mesh(n))
        files[n] = SafetensorsFile(out), delta.metadata["report"]["relative_error"]
    (one, one_errors), (four, four_errors) = files[None], files[4]
    assert sorted(one.keys()) == sorted(four.keys())
    for key in one.keys():
        np.testing.assert_array_equal(np.asarray(one.read(key)), np.asarray(four.read(key)))
    assert one_errors == four_errors


def test_generate_on_a_mesh_equals_one_device(tp_model):
    base, _, paths = tp_model
    delta = dzjax.load_delta(paths["ft1"])
    prompts = [[1, 15, 27, 3], [1, 99]]
    alone = dzjax.generate(base, prompts, max_tokens=6, delta=delta, stop_at_eos=False)
    assert dzjax.generate(base, prompts, max_tokens=6, delta=delta, stop_at_eos=False,
                          mesh=jax.make_mesh((8,), ("x",))) == alone


def test_any_mesh_becomes_the_one_axis_mesh_or_is_refused_up_front():
    from jax.sharding import AxisType

    from dzjax.models.sharding import as_tp_mesh

    devices = jax.devices()
    for mesh, axis in [(jax.make_mesh((4,), ("x",)), None),
                       (jax.make_mesh((4,), ("tp",), axis_types=(AxisType.Auto,)), None),
                       (jax.make_mesh((1, 4), ("data", "model")), "model"),
                       (jax.make_mesh((4, 1), ("tp", "data")), None), (make_mesh(4), None)]:
        tp = as_tp_mesh(mesh, axis)
        assert tp.axis_names == ("tp",) and tp.axis_types == (AxisType.Auto,)
        assert list(tp.devices) == devices[:4]
    refused = [(jax.make_mesh((2, 4), ("data", "model")), "model", r"\{'data': 2\}.*one server per"),
               (jax.make_mesh((1, 4), ("data", "model")), None, "name the one to split"),
               (jax.make_mesh((4,), ("x",)), "y", "tp_axis 'y' is not an axis"),
               (devices[:4], None, "must be a jax.sharding.Mesh")]
    for mesh, axis, message in refused:
        with pytest.raises(dzjax.DzjaxError, match=message):
            as_tp_mesh(mesh, axis)
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    with pytest.raises(dzjax.DzjaxError, match="name the one to split"):  # before any work
        dzjax.serve(base, mesh=jax.make_mesh((1, 2), ("data", "model")))
    with pytest.raises(dzjax.DzjaxError, match="give the mesh too"):
        dzjax.serve(base, tp_axis="model")


def test_the_serve_command_builds_its_mesh_and_passes_its_switches():
    from dzjax.cli import parser
    from dzjax.cli import serve_options

    args = parser().parse_args(["serve", "base-dir", "--tensor-parallel", "4"])
    assert serve_options(args)["mesh"].shape == {"tp": 4}
    defaults = serve_options(parser().parse_args(["serve", "base-dir"]))
    assert "mesh" not in defaults and "prefix_sharing" not in defaults
    off = serve_options(parser().parse_args(["serve", "base-dir", "--no-fuse-projections",
                                             "--no-pipeline-decode", "--no-prefix-sharing"]))
    assert off["fuse_projections"] is off["pipeline_decode"] is off["prefix_sharing"] is False


def _gqa_base():
    """A random Llama whose head_dim (16) the Pallas paged-attention kernel serves."""
    from dzjax.models.loading import Base

    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128, intermediate_size=256,
        num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16, rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0), max_position_embeddings=128)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = CausalLM(config).init(jax.random.key(0), ids, ids)["params"]
    return Base(config=config, params=jax.tree.map(lambda a: a * 5 if a.ndim == 2 else a, params))


def test_pallas_paged_attention_runs_per_shard_on_a_mesh():
    """The paged-attention kernel (interpret mode) under shard_map, each device on its own heads
    and its slice of the pages: the tokens of one device."""
    base = _gqa_base()
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, 250, int(m))] for m in rng.integers(2, 20, 4)]
    with dzjax.serve(base, {}, **OPTIONS) as server:
        want = server.generate(prompts, max_tokens=6, ignore_eos=True)
    with dzjax.serve(base, {}, **OPTIONS, mesh=make_mesh(4), implementation="interpret") as server:
        assert server.generate(prompts, max_tokens=6, ignore_eos=True) == want


def test_the_sharded_decode_step_lowers_for_cuda_with_the_paged_attention_kernel():
    import functools

    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    from dzjax.models import KernelOptions
    from dzjax.models.kv_cache import KVPages
    from dzjax.serving import steps

    base = _gqa_base()
    device = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    mesh = AbstractMesh((4,), ("tp",), (AxisType.Auto,), abstract_device=device)
    b, ps, width = 8, 16, 8
    shape = lambda a, dtype=None: jax.ShapeDtypeStruct(a.shape, dtype or a.dtype)  # noqa: E731
    args = (jax.tree.map(lambda a: shape(a, jnp.bfloat16), base.params), None,
            jax.eval_shape(lambda: KVPages.zeros(base.config, b * width, ps, jnp.bfloat16)),
            jax.ShapeDtypeStruct((b, width), jnp.int32),
            *(jax.ShapeDtypeStruct((b,), jnp.int32) for _ in range(3)),
            tuple(jax.ShapeDtypeStruct((b,), d)
                  for d in (jnp.uint32, jnp.int32, jnp.float32, jnp.float32)))
    step = functools.partial(steps.decode, config=base.config, dtype=jnp.bfloat16,
                             kernels=KernelOptions(implementation="pallas", mesh=mesh),
                             num_pages=4)
    with use_abstract_mesh(mesh):
        text = jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("manual_computation") >= base.config.num_layers  # per shard, every layer
    assert text.count("paged_attention") >= base.config.num_layers
