"""HF checkpoint loading: sharded and single files, dtypes, and clear errors for bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, reference

import dzjax
from dzjax.errors import CheckpointError, UnsupportedConfigError
from dzjax.models.safetensors_io import SafetensorsFile, write_safetensors
from dzjax.models.saving import save_hf


def _leaves(base):
    return jax.tree_util.tree_flatten_with_path(base.params)[0]


def test_sharded_and_single_file_load_the_same():
    single = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    sharded = dzjax.load_base(fixture_dir("llama_sharded"), dtype=jnp.float32)
    assert len(list((fixture_dir("llama_sharded")).glob("*.safetensors"))) >= 3
    assert single.config == sharded.config
    for (path, a), (path_b, b) in zip(_leaves(single), _leaves(sharded), strict=True):
        assert path == path_b
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("file_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("load_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_fp16_fp32_files_load(tmp_path, file_dtype, load_dtype):
    f32 = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    save_hf(tmp_path / "ckpt", f32.config, f32.params, dtype=file_dtype)
    stored = SafetensorsFile(tmp_path / "ckpt" / "model.safetensors")
    assert {stored.dtype(k) for k in stored.keys()} == {np.dtype(file_dtype)}

    base = dzjax.load_base(tmp_path / "ckpt", dtype=load_dtype)
    for (path, got), (_, want) in zip(_leaves(base), _leaves(f32), strict=True):
        assert got.dtype == load_dtype
        # What the file holds, then the conversion to the load dtype: both exact roundings.
        expected = np.asarray(want).astype(file_dtype).astype(load_dtype)
        np.testing.assert_array_equal(got, expected, err_msg=jax.tree_util.keystr(path))
    ref = reference("llama")
    logits = dzjax.logits(base, ref["input_ids"])
    rel = float(jnp.linalg.norm(logits - ref["logits"]) / np.linalg.norm(ref["logits"]))
    assert rel < 0.05, f"relative logit error {rel} for a {np.dtype(file_dtype)} file"


def test_loading_reads_tensor_by_tensor(monkeypatch):
    """No second full copy on the host: each tensor goes to the device before the next is read."""
    live = []
    real_read = SafetensorsFile.read

    def read(self, name):
        live.append(name)
        return real_read(self, name)

    real_put = jax.device_put

    def device_put(x, *args, **kwargs):
        assert len(live) == 1, f"{len(live)} tensors read before handing one to the device"
        live.clear()
        return real_put(x, *args, **kwargs)

    monkeypatch.setattr(SafetensorsFile, "read", read)
    monkeypatch.setattr(jax, "device_put", device_put)
    dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    assert not live


def test_tokenizer_is_none_without_tokenizer_files():
    assert dzjax.load_base(fixture_dir("qwen2")).tokenizer is None


# --- bad input: each a clear error that names the file, tensor or attribute ---------------------

def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        dzjax.load_base(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        dzjax.load_base(tmp_path)


def test_missing_safetensors(copy_fixture):
    ckpt = copy_fixture("llama")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*safetensors only"):
        dzjax.load_base(ckpt)


def test_missing_shard(copy_fixture):
    ckpt = copy_fixture("llama_sharded")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is missing"):
        dzjax.load_base(ckpt)


@pytest.mark.parametrize("keep", [4, 100, 0.5, 0.999])
def test_truncated_safetensors(copy_fixture, keep):
    ckpt = copy_fixture("llama")
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:int(keep * len(data)) if keep < 1 else keep])
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*truncated"):
        dzjax.load_base(ckpt)


def _rewrite(file, edit):
    sf = SafetensorsFile(file)
    tensors = {name: np.array(sf.read(name)) for name in sf.keys()}
    edit(tensors)
    del sf
    write_safetensors(file, tensors)


def test_missing_tensor(copy_fixture):
    ckpt = copy_fixture("llama")
    _rewrite(ckpt / "model.safetensors",
             lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.self_attn.k_proj"):
        dzjax.load_base(ckpt)


def test_tensor_of_wrong_shape(copy_fixture):
    ckpt = copy_fixture("llama")

    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]

    _rewrite(ckpt / "model.safetensors", shrink)
    with pytest.raises(CheckpointError,
                       match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has "
                             r"shape \(100, 64\), expected \(128, 64\)"):
        dzjax.load_base(ckpt)


def test_unexpected_tensor(copy_fixture):
    ckpt = copy_fixture("llama")
    _rewrite(ckpt / "model.safetensors",
             lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.mlp.extra.weight'"):
        dzjax.load_base(ckpt)


def test_not_a_safetensors_file(copy_fixture):
    ckpt = copy_fixture("llama")
    (ckpt / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        dzjax.load_base(ckpt)


def _edit_config(ckpt, **changes):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def test_unknown_architecture(copy_fixture):
    ckpt = copy_fixture("llama")
    _edit_config(ckpt, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(UnsupportedConfigError, match="LlamaForSequenceClassification"):
        dzjax.load_base(ckpt)


def test_unknown_model_type(copy_fixture):
    ckpt = copy_fixture("llama")
    _edit_config(ckpt, model_type="not_a_model", architectures=["NotAModelForCausalLM"])
    with pytest.raises(UnsupportedConfigError, match="model_type='not_a_model'"):
        dzjax.load_base(ckpt)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "linear", "longrope"])
def test_unsupported_rope_type(copy_fixture, rope_type):
    ckpt = copy_fixture("llama")
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0,
            "original_max_position_embeddings": 64}
    if rope_type == "longrope":  # transformers itself insists on these
        rope.update(short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    _edit_config(ckpt, rope_parameters=rope)
    with pytest.raises(UnsupportedConfigError, match=f"rope type '{rope_type}'"):
        dzjax.load_base(ckpt)


@pytest.mark.parametrize("attribute,value", [("hidden_act", "gelu"), ("head_scaling", 2.0),
                                             ("quantization_config", {"bits": 4})])
def test_unimplemented_config_attribute_is_named(copy_fixture, attribute, value):
    ckpt = copy_fixture("llama")
    _edit_config(ckpt, **{attribute: value})
    with pytest.raises(UnsupportedConfigError, match=attribute):
        dzjax.load_base(ckpt)


def test_qwen2_sliding_window_layers_follow_layer_types(copy_fixture):
    ckpt = copy_fixture("qwen2")
    _edit_config(ckpt, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                 layer_types=["full_attention", "sliding_attention"])
    assert dzjax.load_base(ckpt).config.sliding_windows == (None, 8)
    assert dzjax.load_base(fixture_dir("mistral")).config.sliding_windows == (8, 8)


def test_save_hf_is_atomic(tmp_path, monkeypatch):
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    save_hf(tmp_path / "out", base.config, base.params)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dzjax.models.saving.write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf(tmp_path / "out", base.config, base.params, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    shutil.rmtree(tmp_path / "out")


def test_save_hf_never_deletes_a_folder_it_was_not_told_to_replace(tmp_path):
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(tmp_path, base.config, base.params)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_files_we_write_read_back_identically_with_the_reference_safetensors(tmp_path):
    """The own reader/writer (positioned reads without memory maps, streamed writes, errors that
    name the file and tensor) against the `safetensors` library: a bf16 HF checkpoint written by
    `save_hf` and a delta file written by `convert` read the same through both."""
    import ml_dtypes  # noqa: F401  (numpy learns bfloat16 from it, for safetensors too)
    from safetensors import safe_open

    from conftest import make_deltas

    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.bfloat16)
    checkpoint = save_hf(tmp_path / "bf16", base.config, base.params, dtype=jnp.bfloat16)
    delta = make_deltas(fixture_dir("llama"), tmp_path, 1)["ft0"]
    for path in (checkpoint / "model.safetensors", delta):
        ours = SafetensorsFile(path)
        with safe_open(path, "np") as theirs:
            assert theirs.metadata() == ours.metadata
            assert sorted(theirs.keys()) == sorted(ours.keys())
            for key in ours.keys():
                expected = ours.read(key)
                got = theirs.get_tensor(key)
                assert got.dtype == expected.dtype and got.shape == expected.shape, key
                np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))
