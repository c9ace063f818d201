"""Loading a HF checkpoint directory into a `Base`: config, strictly-checked params, tokenizer.

The key map between HF tensor names and our param paths is derived from the model's own abstract
params (`model.layers_3.mlp.up_proj.kernel` <-> `model.layers.3.mlp.up_proj.weight`, transposed),
so that it can never drift from the model definition. Loading reads one tensor at a time and
hands it to the device before reading the next: host memory never holds a second
copy of the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.errors import CheckpointError, UnsupportedConfigError
from dzjax.models import fingerprint as fp
from dzjax.models.config import ModelConfig, from_hf_config
from dzjax.models.llama import CausalLM
from dzjax.models.safetensors_io import SafetensorsFile
from dzjax.pallas_kernels.formats import QuantizedTensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# transformers is used for configs and tokenizers only: its advice that torch is missing is noise.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# Tensors HF checkpoints may carry that are not parameters of the forward pass.
_NON_PARAMS = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True, eq=False)
class Base:
    """A base model: its config, its params pytree (on device) and its tokenizer (or None)."""

    config: ModelConfig
    params: dict
    tokenizer: Any = None
    path: Path | None = None
    hf_config: Any = None  # the transformers config it was loaded from, for export
    weights_digest: str | None = None  # computed by load_base as it reads; else from the params
    weights_fingerprint: str | None = None  # set by `without_weights`; else from files or params

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    @functools.cached_property
    def digest(self) -> str:
        """The digest of every weight (`dzjax.models.fingerprint`); a delta records the one of
        the base it was made on."""
        if self.weights_digest is not None:
            return self.weights_digest
        flat = flatten_params(self.params)
        digest = fp.WeightsDigest()
        for name, (keys, transposed, _) in hf_key_map(self.config).items():
            leaf = np.asarray(flat[keys])
            digest.add(name, leaf.T if transposed else leaf)
        return digest.hexdigest()

    @functools.cached_property
    def fingerprint(self) -> str:
        """The quick sampled fingerprint of the base weights (`dzjax.models.fingerprint`).

        Read from the checkpoint's files when the base was loaded from them (so that loading in
        float16, which rounds differently from bf16, changes nothing), else from the params.
        """
        if self.weights_fingerprint is not None:
            return self.weights_fingerprint
        if self.path is not None:
            return checkpoint_fingerprint(self.path, self.config)
        flat = flatten_params(self.params)

        def sample(keys, transposed):
            leaf = flat[keys]

            def read(rows, cols):
                if leaf.ndim == 1:
                    return np.asarray(leaf[cols])
                return np.asarray(leaf[cols, rows] if transposed else leaf[rows, cols])
            return read

        return fp.fingerprint({name: (shape, sample(keys, transposed)) for name, (keys, transposed,
                               shape) in hf_key_map(self.config).items()})


    def without_weights(self) -> Base:
        """This base without its weights: its params as shapes, its digests computed, the rest
        as is. What a server keeps once it has placed its own copy of the params, so that the
        weights are freed when nothing else holds them."""
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.params)
        return dataclasses.replace(self, params=shapes, weights_digest=self.digest,
                                   weights_fingerprint=self.fingerprint)


def checkpoint_fingerprint(path: Path, config: ModelConfig) -> str:
    """The quick fingerprint of a checkpoint directory, read from its files."""
    return fp.checkpoint_fingerprint(checkpoint_files(path), {
        name: shape for name, (_, _, shape) in hf_key_map(config).items()})


def checkpoint_digest(path: Path, config: ModelConfig) -> str:
    """The digest of every weight of a checkpoint directory, streamed from its files."""
    return fp.checkpoint_digest(checkpoint_files(path), sorted(hf_key_map(config)))


def abstract_params(config: ModelConfig, dtype=jnp.float32) -> dict:
    """The params pytree of `config` as ShapeDtypeStructs (nothing allocated).

    The model is traced with one decoder layer, whose params every layer shares in shape: the
    cost does not grow with the layer count (a file claiming thousands of layers is cheap to
    check).
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    one_layer = dataclasses.replace(config, num_layers=1, sliding_windows=config.sliding_windows[:1])
    variables = jax.eval_shape(
        lambda: CausalLM(one_layer, param_dtype=dtype).init(jax.random.key(0), ids, ids))
    params = variables["params"]
    layer = params["model"].pop("layers_0")
    params["model"].update({f"layers_{i}": layer for i in range(config.num_layers)})
    return params


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """HF tensor name of a param path, and whether HF stores it transposed ([out, in])."""
    *parents, leaf = path
    parts = [p.replace("layers_", "layers.") if re.fullmatch(r"layers_\d+", p) else p
             for p in parents]
    name = ".".join(parts + ["weight" if leaf in ("kernel", "embedding") else leaf])
    return name, leaf == "kernel"


def flatten_params(tree) -> dict[tuple[str, ...], Any]:
    """{("model", "layers_0", ..., "kernel"): leaf} of a params-shaped tree (compressed tensors
    count as leaves)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0]
    return {tuple(str(k.key) for k in path): leaf for path, leaf in leaves}


@functools.lru_cache(maxsize=16)  # traces the model's init: worth doing once per config
def hf_key_map(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], bool, tuple[int, ...]]]:
    """{HF tensor name: (param path, transposed, HF shape)} for every parameter of `config`.

    Cached and shared: callers must not modify it.
    """
    out = {}
    for keys, leaf in flatten_params(abstract_params(config)).items():
        name, transposed = hf_name(keys)
        out[name] = (keys, transposed, tuple(reversed(leaf.shape)) if transposed else leaf.shape)
    return out


def read_hf_config(path: Path):
    """The transformers config of checkpoint dir `path`, with errors that name the file."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a HF checkpoint directory)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        from transformers import CONFIG_MAPPING

        raw = _read_json(config_file)
        if raw.get("model_type") not in CONFIG_MAPPING:
            raise UnsupportedConfigError(
                f"{config_file}: model_type={raw.get('model_type')!r} (architectures="
                f"{raw.get('architectures')!r}) is not supported") from None
        raise CheckpointError(f"{config_file}: invalid config ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def checkpoint_files(path: Path) -> dict[str, Path]:
    """{tensor name: file} from a single model.safetensors or a sharded index."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {shard.name} is missing from {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).keys()}
    hint = " (only pickled .bin weights found; dzjax reads safetensors only)" if any(
        path.glob("*.bin")) else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def load_params(path: Path, config: ModelConfig, dtype) -> tuple[dict, str]:
    """Every parameter of `config` read exactly once from the checkpoint at `path`, in `dtype`,
    and the digest of the weights as read (`dzjax.models.fingerprint`)."""
    key_map = hf_key_map(config)
    digest = fp.WeightsDigest()
    files = checkpoint_files(path)
    opened: dict[Path, SafetensorsFile] = {}
    flat: dict[tuple[str, ...], jax.Array] = {}
    for name, file in files.items():
        sf = opened.get(file) or opened.setdefault(file, SafetensorsFile(file))
        if name not in sf:
            raise CheckpointError(f"{file}: tensor {name!r} listed in the index is missing")
        if name not in key_map:
            if _NON_PARAMS.match(name) or (name == "lm_head.weight" and config.tie_word_embeddings):
                continue  # not a parameter (tied lm_head: the embedding is used)
            raise CheckpointError(f"{file}: unexpected tensor {name!r} for {config.architecture}")
        keys, transposed, shape = key_map[name]
        if sf.shape(name) != shape:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {sf.shape(name)}, "
                                  f"expected {shape} from config.json")
        if not np.issubdtype(sf.dtype(name), np.floating) and sf.dtype(name).name != "bfloat16":
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {sf.dtype(name)}")
        array = sf.read(name)
        digest.add(name, array)
        array = np.ascontiguousarray(array.T if transposed else array, dtype=dtype)
        flat[keys] = jax.device_put(array)  # host copy dropped right after
    missing = sorted(name for name, (keys, _, _) in key_map.items() if keys not in flat)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return unflatten(flat), digest.hexdigest()


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for keys, value in flat.items():
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer, or None when the directory has none."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_base(path: str | Path, dtype=jnp.bfloat16) -> Base:
    """Load a HF checkpoint directory (config.json + safetensors, sharded or not, + tokenizer).

    Args:
      path: directory with config.json and model.safetensors or model.safetensors.index.json.
      dtype: dtype the weights are held in on the device (bf16 by default; f16/f32 files convert).
    Returns:
      A `Base` with the config, the params pytree and the tokenizer (None if the dir has none).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    hf_config = read_hf_config(path)
    config = from_hf_config(hf_config, where=str(path / "config.json"))
    params, digest = load_params(path, config, np.dtype(dtype))
    return Base(config=config, params=params, tokenizer=load_tokenizer(path), path=path,
                hf_config=hf_config, weights_digest=digest)
