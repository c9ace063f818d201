"""dzjax.convert -> delta file -> load_delta -> logits / export_hf, and bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fixture_dir, reference

import dzjax
from dzjax.compress import layer_pass, pipeline
from dzjax.compress.delta_file import DeltaFileError, content_hash, save_delta
from dzjax.models.safetensors_io import SafetensorsFile, write_safetensors
from dzjax.models.saving import save_hf
from dzjax.pallas_kernels.formats import QuantizedTensor

FAST = dict(n_samples=8, seq_len=32, progress=False)
SETTINGS = dict(bits=4, sparsity="2:4", group_size=32)  # shared, so compiled code is reused


@pytest.fixture(scope="module")
def llama_delta(tmp_path_factory):
    out = tmp_path_factory.mktemp("delta") / "ft.dz.safetensors"
    delta = dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), out, **SETTINGS, **FAST)
    return out, delta


def _finetune_of(tmp_path, name, scale=0.02, seed=0):
    """A fine-tune of fixture `name`: every weight perturbed (a stand-in for real training)."""
    base = dzjax.load_base(fixture_dir(name), dtype=jnp.float32)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    params = jax.tree.map(lambda p: p + scale * jax.random.normal(next(keys), p.shape), base.params)
    return save_hf(tmp_path / f"{name}_ft", base.config, params, hf_config=base.hf_config.to_dict())


def _max_err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def test_round_trip_file_logits_equal_export_hf_logits(llama_delta, tmp_path):
    path, converted = llama_delta
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    loaded = dzjax.load_delta(path)
    ids = reference("llama")["input_ids"]
    with_delta = dzjax.logits(base, ids, delta=loaded)
    np.testing.assert_array_equal(with_delta, dzjax.logits(base, ids, delta=converted))
    merged = dzjax.load_base(dzjax.export_hf(base, loaded, tmp_path / "merged"), dtype=jnp.float32)
    assert _max_err(with_delta, dzjax.logits(merged, ids)) <= 1e-4
    # The compressed delta moves the base most of the way to the fine-tune.
    ft = reference("llama_ft")["logits"]
    assert _max_err(with_delta, ft) < 0.7 * _max_err(dzjax.logits(base, ids), ft)


def test_file_holds_compressed_tensors_and_metadata(llama_delta):
    path, delta = llama_delta
    sf = SafetensorsFile(path)
    meta = json.loads(sf.metadata["dzjax"])
    assert meta["format_version"] == 2 and meta["name"] == "llama_ft"
    base = dzjax.load_base(fixture_dir("llama"))
    assert meta["base_fingerprint"] == base.fingerprint and meta["base_digest"] == base.digest
    assert sf.dtype("model.layers.0.mlp.up_proj.qweight") == np.uint32
    assert sf.shape("model.layers.0.mlp.up_proj.qweight") == (64 // 2 * 4 // 32, 128)  # [K/2 * 4 bits / 32, N]
    assert sf.shape("model.layers.0.mlp.down_proj.qweight") == (128 // 2 * 4 // 32, 64)
    # [hidden, vocab], with the embeddings' own default settings: 4-bit, dense, one scale a row
    assert sf.shape("model.embed_tokens.qweight") == (64 * 4 // 32, 256)
    embedding = dict(meta["tensors"]["model.embed_tokens.weight"])
    del embedding["hashes"]
    assert embedding == {"kind": "quantized", "shape": [64, 256], "bits": 4, "group_size": 64,
                         "symmetric": False, "sparsity": None}
    assert sf.dtype("model.norm.weight") == np.float32  # exact (a float32 fine-tune)
    entry = dict(meta["tensors"]["model.layers.1.self_attn.o_proj.weight"])
    hashes = entry.pop("hashes")
    assert entry == {"kind": "quantized", "shape": [64, 64], "bits": 4, "group_size": 32,
                     "symmetric": False, "sparsity": "2:4"}
    stem = "model.layers.1.self_attn.o_proj"
    assert set(hashes) == {f"{stem}.{f}" for f in ("qweight", "scales", "zeros", "meta")}
    assert hashes[f"{stem}.scales"] == content_hash(sf.read(f"{stem}.scales"))
    report = delta.metadata["report"]
    assert report["file_bytes"] == path.stat().st_size
    assert 3.0 < report["bits_per_compressed_weight"] < 4.0  # 2:4 at 4 bits + group scales
    assert report["ratio_vs_bf16"] > 3.5  # the 4-bit embedding is a third of this tiny model
    assert set(report["relative_error"]) >= {"model.layers.0.mlp.down_proj.weight", "lm_head.weight"}


# Slow (CI time): 26 s; tied embeddings and biases are converted and served in the default run by
# test_serving's qwen2 case.
@pytest.mark.slow
def test_tied_embeddings_and_biases_round_trip(tmp_path):
    ft_dir = _finetune_of(tmp_path, "qwen2")
    delta = dzjax.convert(fixture_dir("qwen2"), ft_dir, tmp_path / "q.dz", bits=8, sparsity=None,
                          group_size=None, **FAST)
    flat = dict(jax.tree_util.tree_flatten_with_path(
        delta.params, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0])
    names = {jax.tree_util.keystr(k) for k in flat}
    assert "['lm_head']['kernel']" not in names  # tied: the embedding serves both
    bias = delta.params["model"]["layers_0"]["self_attn"]["q_proj"]["bias"]
    assert bias.dtype == jnp.float32 and not isinstance(bias, QuantizedTensor)

    base = dzjax.load_base(fixture_dir("qwen2"), dtype=jnp.float32)
    finetune = dzjax.load_base(ft_dir, dtype=jnp.float32)
    ids = reference("qwen2")["input_ids"]
    with_delta = dzjax.logits(base, ids, delta=dzjax.load_delta(tmp_path / "q.dz"))
    merged = dzjax.load_base(dzjax.export_hf(base, delta, tmp_path / "m"), dtype=jnp.float32)
    assert _max_err(with_delta, dzjax.logits(merged, ids)) <= 1e-4
    # 8-bit dense: close to the fine-tune itself
    assert _max_err(with_delta, dzjax.logits(finetune, ids)) < 0.05


@pytest.mark.parametrize("settings", [
    pytest.param(dict(bits=16, sparsity="2:4", group_size=None), marks=pytest.mark.slow),
    pytest.param(dict(bits=2, sparsity=None, group_size=32, symmetric=True), marks=pytest.mark.slow),
    dict(bits=3, sparsity=0.5, group_size=32, act_order=True),
    pytest.param(dict(bits=4, sparsity=None, group_size=32, method="rtn",
                      compress_embeddings=False), marks=pytest.mark.slow),
], ids=["16bit-2:4", "2bit-sym", "3bit-unstructured-actorder", "rtn-exact-embeddings"])
def test_formats_round_trip(tmp_path, settings):
    out = tmp_path / "d.dz"
    converted = dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), out, **FAST,
                              **settings)
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    ids = reference("llama")["input_ids"]
    loaded = dzjax.load_delta(out)
    np.testing.assert_array_equal(dzjax.logits(base, ids, delta=loaded),
                                  dzjax.logits(base, ids, delta=converted))
    merged = dzjax.load_base(dzjax.export_hf(base, loaded, tmp_path / "m"), dtype=jnp.float32)
    assert _max_err(dzjax.logits(base, ids, delta=loaded), dzjax.logits(merged, ids)) <= 1e-4
    embedding = loaded.params["model"]["embed_tokens"]["embedding"]
    assert isinstance(embedding, QuantizedTensor) == settings.get("compress_embeddings", True)


def test_generate_with_compressed_delta_equals_generate_on_export(llama_delta, tmp_path):
    path, _ = llama_delta
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    delta = dzjax.load_delta(path)
    merged = dzjax.load_base(dzjax.export_hf(base, delta, tmp_path / "m"), dtype=jnp.float32)
    prompts = [[3, 4, 5], [7, 8, 9, 10, 11]]
    assert (dzjax.generate(base, prompts, max_tokens=6, delta=delta, stop_at_eos=False)
            == dzjax.generate(merged, prompts, max_tokens=6, stop_at_eos=False))


# --- bad input ----------------------------------------------------------------------------------

def test_delta_on_the_wrong_base_is_refused(llama_delta):
    path, _ = llama_delta
    delta = dzjax.load_delta(path)
    with pytest.raises(DeltaFileError, match="was made on base .* not on this base"):
        dzjax.logits(dzjax.load_base(fixture_dir("llama_ft")), [[1, 2]], delta=delta)
    with pytest.raises(DeltaFileError, match="is for a LlamaForCausalLM"):
        dzjax.logits(dzjax.load_base(fixture_dir("qwen3")), [[1, 2]], delta=delta)


def test_truncated_delta_file(llama_delta, tmp_path):
    path, _ = llama_delta
    bad = tmp_path / "bad.dz"
    bad.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(dzjax.CheckpointError, match="truncated"):
        dzjax.load_delta(bad)


def _rewrite(path, out, edit_meta=None, edit_tensors=None, rehash=True):
    """A copy of a delta file with its header and tensors edited; with `rehash`, the hashes are
    made to match again (a well-formed file that says something else), else left as they were
    (a damaged file)."""
    sf = SafetensorsFile(path)
    meta = json.loads(sf.metadata["dzjax"])
    tensors = {k: np.array(sf.read(k)) for k in sf.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if rehash and isinstance(meta.get("tensors"), dict):
        for entry in meta["tensors"].values():
            if isinstance(entry, dict) and isinstance(entry.get("hashes"), dict):
                entry["hashes"] = {k: content_hash(tensors[k]) if k in tensors else v
                                   for k, v in entry["hashes"].items()}
    if edit_meta:
        edit_meta(meta)
    header = json.dumps(meta)
    digest = content_hash(header) if rehash else sf.metadata["dzjax_digest"]
    write_safetensors(out, tensors, metadata={"dzjax": header, "dzjax_digest": digest})
    return out


def test_unknown_format_version(llama_delta, tmp_path):
    bad = _rewrite(llama_delta[0], tmp_path / "v9.dz",
                   edit_meta=lambda m: m.__setitem__("format_version", 9))
    with pytest.raises(DeltaFileError, match="format_version 9 is not supported"):
        dzjax.load_delta(bad)


def test_tampered_shapes(llama_delta, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:1]

    bad = _rewrite(llama_delta[0], tmp_path / "s.dz", edit_tensors=shrink)
    with pytest.raises(DeltaFileError, match=r"'model.layers.0.mlp.up_proj.scales' is bfloat16 "
                                             r"\(1, 128\), expected bfloat16 \(2, 128\)"):
        dzjax.load_delta(bad)
    meta_bad = _rewrite(llama_delta[0], tmp_path / "m.dz", edit_meta=lambda m: m["tensors"][
        "model.layers.0.mlp.up_proj.weight"].__setitem__("shape", [64, 64]))
    with pytest.raises(DeltaFileError, match="up_proj.weight' has shape"):
        dzjax.load_delta(meta_bad)


def test_unexpected_and_missing_tensors(llama_delta, tmp_path):
    extra = _rewrite(llama_delta[0], tmp_path / "e.dz",
                     edit_tensors=lambda t: t.__setitem__("junk", np.zeros(2, np.float32)))
    with pytest.raises(DeltaFileError, match="unexpected tensor.*junk"):
        dzjax.load_delta(extra)
    missing = _rewrite(llama_delta[0], tmp_path / "m.dz",
                       edit_tensors=lambda t: t.pop("model.layers.1.mlp.down_proj.meta"))
    with pytest.raises(DeltaFileError, match="missing tensor 'model.layers.1.mlp.down_proj.meta'"):
        dzjax.load_delta(missing)


def test_not_a_dzjax_file():
    with pytest.raises(DeltaFileError, match="not a dzjax delta file"):
        dzjax.load_delta(fixture_dir("llama") / "model.safetensors")


def test_mismatched_pair_is_refused(tmp_path):
    with pytest.raises(dzjax.DzjaxError, match="is not a fine-tune of .*architecture"):
        dzjax.convert(fixture_dir("llama"), fixture_dir("qwen3"), tmp_path / "x.dz", **FAST)
    assert not list(tmp_path.iterdir())


def test_interrupted_convert_leaves_no_file(tmp_path, monkeypatch):
    calls = []
    real = pipeline._compress

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_compress", failing)
    with pytest.raises(KeyboardInterrupt):
        dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "x.dz",
                      **SETTINGS, **FAST)
    assert os.listdir(tmp_path) == []


def test_bad_settings_are_named(tmp_path):
    for kwargs, message in [(dict(bits=5), "bits"), (dict(sparsity="3:2"), "3:2"),
                            (dict(sparsity=1.5), "sparsity"), (dict(method="magic"), "method"),
                            (dict(group_size=0), "group_size"),
                            (dict(group_size=48), "group_size=48 must be a multiple or a div"),
                            (dict(embedding_bits=5), "bits")]:
        with pytest.raises(dzjax.DzjaxError, match=message):
            dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "x.dz",
                          **kwargs, **FAST)
    assert not list(tmp_path.iterdir())


def test_calibration_token_ids_and_bad_calibration(tmp_path):
    ids = np.random.default_rng(0).integers(0, 256, (4, 32))
    delta = dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "x.dz",
                          calibration=ids, **SETTINGS, **FAST)
    assert delta.metadata["calibration"] == "token ids [4, 32]"
    with pytest.raises(dzjax.DzjaxError, match="need a tokenizer"):
        dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "y.dz",
                      calibration=["some text"], **FAST)
    with pytest.raises(dzjax.DzjaxError, match=r"lie in \[0, 256\)"):
        dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "y.dz",
                      calibration=ids + 300, **FAST)


def test_logits_same_with_xla_and_interpret_kernels(llama_delta, monkeypatch):
    """Every compressed matmul of the forward pass through the Pallas kernels (interpret mode)."""
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    delta = dzjax.load_delta(llama_delta[0])
    ids = reference("llama")["input_ids"]
    xla = dzjax.logits(base, ids, delta=delta, implementation="xla")
    monkeypatch.setenv("DZJAX_KERNEL", "interpret")
    interpret = dzjax.logits(base, ids, delta=delta)
    rel = float(jnp.linalg.norm(interpret - xla) / jnp.linalg.norm(xla))
    assert rel < 1e-5, rel
    assert _max_err(interpret, dzjax.logits(base, ids)) > 0.1  # the delta is really applied
    monkeypatch.setenv("DZJAX_KERNEL", "cuda-please")
    with pytest.raises(ValueError, match="DZJAX_KERNEL='cuda-please'"):
        dzjax.logits(base, ids, delta=delta)


def test_zstd_stage_at_rest_is_lossless_and_smaller(llama_delta, tmp_path):
    path, converted = llama_delta
    small = save_delta(converted, tmp_path / "z.dz", zstd_level=19).path
    assert small.stat().st_size < 0.95 * path.stat().st_size
    plain, packed = dzjax.load_delta(path), dzjax.load_delta(small)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(packed.params), strict=True):
        np.testing.assert_array_equal(a, b)
    corrupt = _rewrite(small, tmp_path / "c.dz", edit_tensors=lambda t: t.__setitem__(
        "model.layers.0.mlp.up_proj.qweight.zst", t["model.layers.0.mlp.up_proj.qweight.zst"][:-9]))
    with pytest.raises(DeltaFileError, match="up_proj.qweight.zst"):
        dzjax.load_delta(corrupt)


def test_float16_base_is_still_the_base_of_its_delta(llama_delta):
    base16 = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float16)
    logits = dzjax.logits(base16, [[1, 2, 3]], delta=dzjax.load_delta(llama_delta[0]))
    assert bool(jnp.isfinite(logits).all())


def test_swapping_compressed_deltas_does_not_retrace(llama_delta, tmp_path):
    from dzjax.models import TRACE_COUNTS

    first = dzjax.load_delta(llama_delta[0])
    ft_dir = _finetune_of(tmp_path, "llama", scale=0.05, seed=3)
    second = dzjax.convert(fixture_dir("llama"), ft_dir, tmp_path / "b.dz", **SETTINGS, **FAST)
    base = dzjax.load_base(fixture_dir("llama"), dtype=jnp.float32)
    ids = reference("llama")["input_ids"]
    a = dzjax.logits(base, ids, delta=first)
    traces = TRACE_COUNTS["forward"]
    b = dzjax.logits(base, ids, delta=second)
    assert TRACE_COUNTS["forward"] == traces
    assert _max_err(a, b) > 0.1


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["config"].__setitem__("num_kv_heads", 0), "garbles"),
    (lambda m: m["config"].__setitem__("hidden_size", "64"), "garbles"),
    (lambda m: m.__setitem__("tensors", []), "unexpected tensor"),
    (lambda m: m.__setitem__("tensors", "all"), "garbles"),
    (lambda m: m["tensors"].__setitem__("model.norm.weight", "exact"), "malformed entry"),
    (lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("group_size", 0),
     "bad compression settings"),
    (lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("group_size", 48),
     "bad compression settings .*multiple or a divisor of 64"),
    # a valid format, but not the one the arrays were stored in
    (lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("group_size", 16),
     "up_proj.scales' is bfloat16 .2, 128., expected bfloat16 .4, 128."),
    (lambda m: m["tensors"]["model.layers.0.mlp.up_proj.weight"].__setitem__("group_size", 128),
     "bad compression settings .*not its padded per-channel size 64"),
])
def test_garbled_metadata_is_a_clear_error(llama_delta, tmp_path, edit, message):
    bad = _rewrite(llama_delta[0], tmp_path / "g.dz", edit_meta=edit)
    with pytest.raises(DeltaFileError, match=message):
        dzjax.load_delta(bad)


def test_delta_config_must_match_the_base(llama_delta, tmp_path):
    def fewer_layers(m):
        m["config"]["num_layers"] = 1
        m["config"]["sliding_windows"] = [None]
        m["tensors"] = {k: v for k, v in m["tensors"].items() if "layers.1." not in k}

    def drop_layer(t):
        for k in [k for k in t if "layers.1." in k]:
            del t[k]

    bad = _rewrite(llama_delta[0], tmp_path / "l.dz", edit_meta=fewer_layers,
                   edit_tensors=drop_layer)
    with pytest.raises(DeltaFileError, match="config that differs"):
        dzjax.logits(dzjax.load_base(fixture_dir("llama")), [[1, 2]], delta=dzjax.load_delta(bad))


def test_convert_refuses_misshapen_or_unknown_tensors(tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(fixture_dir("llama_ft"), ft)
    sf = SafetensorsFile(ft / "model.safetensors")
    tensors = {k: np.array(sf.read(k)) for k in sf.keys()}
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:1]
    write_safetensors(ft / "model.safetensors", tensors)
    with pytest.raises(dzjax.CheckpointError, match="'model.norm.weight' has shape"):
        dzjax.convert(fixture_dir("llama"), ft, tmp_path / "x.dz", **SETTINGS, **FAST)
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float32)
    write_safetensors(ft / "model.safetensors", tensors)
    with pytest.raises(dzjax.CheckpointError, match="unexpected tensor"):
        dzjax.convert(fixture_dir("llama"), ft, tmp_path / "x.dz", **SETTINGS, **FAST)


def test_export_refuses_a_non_empty_folder(llama_delta, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    base = dzjax.load_base(fixture_dir("llama"))
    with pytest.raises(FileExistsError):
        dzjax.export_hf(base, dzjax.load_delta(llama_delta[0]), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_delta_write_that_fails_midway_leaves_nothing(llama_delta, tmp_path, monkeypatch):
    from dzjax.models import safetensors_io

    def write_half(f, header_bytes, *rest):
        f.write(header_bytes)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "_write_body", write_half)
    with pytest.raises(OSError, match="disk full"):
        save_delta(llama_delta[1], tmp_path / "d.dz")
    assert os.listdir(tmp_path) == []


def _bf16_pair_delta(shape, seed, move=0.03):
    """W_ft - W_base of a bf16 base and a bf16 fine-tune that moves it by ~3%, in float32."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(ml_dtypes.bfloat16).astype(np.float32)
    ft = (base * (1 + move * rng.normal(size=shape))).astype(ml_dtypes.bfloat16)
    ft = ft.astype(np.float32)
    ft.reshape(-1)[:3] = -base.reshape(-1)[:3] * 1e-3  # weights crossing zero: not bf16 deltas
    return ft - base


def test_exact_tensors_of_a_bf16_finetune_are_stored_in_bf16_bit_for_bit(llama_delta, tmp_path):
    path, delta = llama_delta
    params = jax.tree.map(lambda x: x, delta.params,
                          is_leaf=lambda x: isinstance(x, QuantizedTensor))
    norm = _bf16_pair_delta((64,), 0)
    table = _bf16_pair_delta((256, 64), 1)  # an exact embedding table
    params["model"]["norm"]["weight"] = jnp.asarray(norm)
    params["model"]["embed_tokens"]["embedding"] = jnp.asarray(table)
    out = save_delta(dzjax.Delta(params=params, metadata=delta.metadata), tmp_path / "e.dz")
    sf = SafetensorsFile(out.path)
    assert sf.dtype("model.norm.weight") == np.dtype("bfloat16")
    entry = json.loads(sf.metadata["dzjax"])["tensors"]["model.embed_tokens.weight"]
    assert entry["dtype"] == "bfloat16" and 3 <= entry["fixups"] < 0.1 * table.size
    assert sf.shape("model.embed_tokens.weight.fixup_index") == (entry["fixups"],)
    loaded = dzjax.load_delta(out.path)
    np.testing.assert_array_equal(loaded.params["model"]["norm"]["weight"], norm)
    np.testing.assert_array_equal(loaded.params["model"]["embed_tokens"]["embedding"], table)
    assert out.stored_nbytes < delta.stored_nbytes + 3 * table.size  # ~2 bytes, not 4
    # float32 values (a float32 fine-tune) stay float32: bf16 would need a fixup almost everywhere
    params["model"]["norm"]["weight"] = jnp.asarray(np.random.default_rng(2).normal(size=64),
                                                    jnp.float32)
    f32 = save_delta(dzjax.Delta(params=params, metadata=delta.metadata), tmp_path / "f.dz")
    assert SafetensorsFile(f32.path).dtype("model.norm.weight") == np.float32

    # A well-formed file whose fixups point outside the tensor is refused, naming it.
    def bad_index(tensors):
        tensors["model.embed_tokens.weight.fixup_index"][-1] = table.size
    bad = _rewrite(out.path, tmp_path / "bad.dz", edit_tensors=bad_index)
    with pytest.raises(DeltaFileError, match="embed_tokens.weight.fixup_index' must hold"):
        dzjax.load_delta(bad)
    bad = _rewrite(out.path, tmp_path / "bad2.dz", edit_meta=lambda m: m["tensors"][
        "model.norm.weight"].__setitem__("dtype", "float64"))
    with pytest.raises(DeltaFileError, match="model.norm.weight.*dtype 'float64'"):
        dzjax.load_delta(bad)


def test_embeddings_have_their_own_settings():
    cfg = pipeline.ConvertConfig()  # the measured defaults
    blocks, table = cfg.obs_config(4096), cfg.obs_config(4096, embedding=True)
    assert (blocks.bits, blocks.sparsity, blocks.group_size) == (2, None, 128)
    assert (table.bits, table.sparsity, table.group_size) == (4, None, None)  # dense, per row
    same = pipeline.ConvertConfig(bits=4, sparsity="2:4", embedding_bits="same",
                                  embedding_sparsity="same", embedding_group_size="same")
    table = same.obs_config(4096, embedding=True)
    assert (table.bits, table.sparsity, table.group_size) == (4, (2, 4), 128)
    with pytest.raises(dzjax.DzjaxError, match="sparsity"):
        pipeline.ConvertConfig(embedding_sparsity="5:4")


def test_the_pipeline_runs_each_layer_with_its_delta():
    """The calibration pass through a layer (its Hessians, the activations handed to the next
    layer) is base + delta: with the exact delta, the fine-tune's own layer."""
    config = dzjax.load_base(fixture_dir("llama")).config
    reader = pipeline._PairReader(fixture_dir("llama"), fixture_dir("llama_ft"), config)
    base, ft = reader.subtree(("model", "layers_1"))
    delta = jax.tree.map(lambda f, b: jnp.asarray(f - b), ft, base)
    x = jax.random.normal(jax.random.key(0), (2, 8, config.hidden_size))
    run = lambda params, d: layer_pass.layer_pass(  # noqa: E731
        jax.tree.map(jnp.asarray, params), d, x, config=config, window=None, capture=None,
        kernels=pipeline.KernelOptions(implementation="xla"))[0]
    with_delta, finetune, without = run(base, delta), run(ft, None), run(base, None)
    assert _max_err(with_delta, finetune) < 1e-4 and _max_err(without, finetune) > 1e-2


def test_refinement_trains_the_scales_only(llama_delta, tmp_path):
    _, plain = llama_delta
    refined = dzjax.convert(fixture_dir("llama"), fixture_dir("llama_ft"), tmp_path / "r.dz",
                            refine_steps=20, **SETTINGS, **FAST)
    losses = refined.metadata["report"]["refinement"]
    assert set(losses) == {"model.layers.0", "model.layers.1", "lm_head"}
    assert all(after <= before for before, after in losses.values()), losses
    assert any(after < before for before, after in losses.values()), losses
    a = plain.params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    b = dzjax.load_delta(tmp_path / "r.dz").params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    # layer 1's inputs moved with layer 0's refinement, but the codes of layer 0 did not
    a0 = plain.params["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    b0 = refined.params["model"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(a0.qweight, b0.qweight)
    np.testing.assert_array_equal(a0.meta, b0.meta)
    np.testing.assert_array_equal(a0.zeros, b0.zeros)
    assert b.scales.dtype == jnp.bfloat16 and a.scales.shape == b.scales.shape
    with pytest.raises(dzjax.DzjaxError, match="refine_steps"):
        pipeline.ConvertConfig(refine_steps=-1)
