"""`Delta`, a compressed fine-tune, and its file: one safetensors file, validated on load.

File layout (format_version 1):
  __metadata__["dzjax"]  JSON: format_version, the model config, the base fingerprint, the
                         fine-tune's name and source, and for every tensor how it is stored.
  <HF name minus ".weight">.qweight/.scales/.zeros/.meta
                         a compressed matrix (`QuantizedTensor`), in the kernel layout [in, out]
                         with codes packed along the input dimension. The embedding table is
                         stored as its transpose [hidden, vocab], the layout of a tied lm_head,
                         so that one tensor serves the lookup and the output projection.
  <HF name>              an exact float32 delta (norms, biases; embeddings kept exact), in HF's
                         layout.
  <...>.<field>.zst      optional lossless stage at rest: the field's bytes, zstd-compressed, as
                         uint8 (the tensor's entry says "zstd": true; its shape and dtype follow
                         from the format). Quantization codes are far from uniform, so this saves
                         15-25% (benchmarks/compression.py quality); it is undone at load.
Every tensor is a delta: W_finetune - W_base.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import zstandard

from dzjax.errors import DzjaxError
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.loading import Base, flatten_params, hf_key_map, unflatten
from dzjax.models.safetensors_io import SafetensorsFile, write_safetensors
from dzjax.pallas_kernels.formats import FIELDS, Format, QuantizedTensor

FORMAT_VERSION = 1


class DeltaFileError(DzjaxError):
    """A delta file is malformed, of an unknown version, or made for another base."""


@dataclasses.dataclass(frozen=True, eq=False)
class Delta:
    """A compressed fine-tune: a pytree mirroring the base params (`QuantizedTensor` leaves for
    compressed matrices, float32 arrays for exact tensors) plus the file's metadata."""

    params: dict
    metadata: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.metadata.get("name") or (self.path.name if self.path else "delta")

    @property
    def base_fingerprint(self) -> str:
        return self.metadata["base_fingerprint"]

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(
            self.params, is_leaf=lambda x: isinstance(x, QuantizedTensor)))

    def check_base(self, base: Base) -> None:
        """Raise unless this delta was made on `base` (same architecture, config and weights)."""
        if self.metadata["config"]["architecture"] != base.config.architecture:
            raise DeltaFileError(
                f"delta {self.name!r} is for a {self.metadata['config']['architecture']}, "
                f"the base {base.path or ''} is a {base.config.architecture}")
        if config_from_json(self.metadata["config"]) != base.config:
            raise DeltaFileError(f"delta {self.name!r} ({self.path}) records a model config that "
                                 f"differs from the base's ({base.path or ''})")
        if self.base_fingerprint != base.fingerprint:
            raise DeltaFileError(
                f"delta {self.name!r} ({self.path}) was made on base "
                f"{self.metadata.get('base_source', '?')} with fingerprint {self.base_fingerprint}, "
                f"not on this base {base.path or ''} (fingerprint {base.fingerprint})")


def config_to_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_json(data: dict) -> ModelConfig:
    data = dict(data)
    data["rope"] = RopeConfig(**data["rope"])
    for key in ("sliding_windows", "eos_token_ids"):
        data[key] = tuple(data[key])
    return ModelConfig(**data)


def _stem(hf_name: str) -> str:
    return hf_name.removesuffix(".weight")


def save_delta(delta: Delta, path: str | Path, zstd_level: int | None = None) -> Path:
    """Write `delta` to `path` atomically (a temporary file renamed onto it).

    zstd_level: compress the compressed matrices' arrays losslessly at rest (e.g. 19), or None.
    """
    path = Path(path)
    config = config_from_json(delta.metadata["config"])
    flat = flatten_params(delta.params)
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for name, (keys, transposed, _) in hf_key_map(config).items():
        leaf = flat.get(keys)
        if leaf is None:
            continue
        if isinstance(leaf, QuantizedTensor):
            entries[name] = leaf.format.to_json(leaf.shape)
            for field, array in leaf.arrays().items():
                array = np.asarray(array)
                if zstd_level is None:
                    tensors[f"{_stem(name)}.{field}"] = array
                else:
                    packed = zstandard.ZstdCompressor(level=zstd_level).compress(array.tobytes())
                    tensors[f"{_stem(name)}.{field}.zst"] = np.frombuffer(packed, np.uint8)
                    entries[name]["zstd"] = True
        else:
            entries[name] = {"kind": "exact"}
            array = np.asarray(leaf, np.float32)
            tensors[name] = array.T if transposed else array
    metadata = dict(delta.metadata, format_version=FORMAT_VERSION, tensors=entries)
    write_safetensors(path, tensors, metadata={"dzjax": json.dumps(metadata)})
    return path


def load_delta(path: str | Path) -> Delta:
    """Read and validate a delta file (format version, tensor names, shapes, dtypes).

    The base it was made on is checked when the delta is used with a base (`Delta.check_base`).
    Nothing in the file is executed.
    """
    path = Path(path)
    sf = SafetensorsFile(path)
    raw = sf.metadata.get("dzjax")
    if raw is None:
        raise DeltaFileError(f"{path}: not a dzjax delta file (no 'dzjax' metadata)")
    try:
        metadata = json.loads(raw)
        version = metadata["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DeltaFileError(f"{path}: unreadable dzjax metadata") from None
    if version != FORMAT_VERSION:
        raise DeltaFileError(f"{path}: format_version {version!r} is not supported "
                             f"(this dzjax reads version {FORMAT_VERSION})")
    try:
        config = config_from_json(metadata["config"])
        entries = dict(metadata["tensors"])
        if not isinstance(metadata["base_fingerprint"], str):
            raise TypeError("base_fingerprint")
        key_map = hf_key_map(config)
    except Exception as e:  # any garbled config: it must not reach the model
        raise DeltaFileError(f"{path}: dzjax metadata lacks or garbles {type(e).__name__}: "
                             f"{e}") from None
    unused = set(sf.keys())
    flat = {}
    for name, entry in entries.items():
        if name not in key_map:
            raise DeltaFileError(f"{path}: tensor {name!r} is not a parameter of "
                                 f"{config.architecture}")
        if not isinstance(entry, dict):
            raise DeltaFileError(f"{path}: tensor {name!r}: malformed entry {entry!r}")
        keys, transposed, hf_shape = key_map[name]
        flat[keys] = (_read_quantized(sf, path, name, entry, keys, hf_shape, unused)
                      if entry.get("kind") == "quantized"
                      else _read_exact(sf, path, name, transposed, hf_shape, unused))
    if unused:
        raise DeltaFileError(f"{path}: unexpected tensor(s) {', '.join(sorted(unused)[:5])}")
    return Delta(params=unflatten(flat), metadata=metadata, path=path)


def _read(sf, path, key, shape, dtype, unused):
    if key not in sf:
        raise DeltaFileError(f"{path}: missing tensor {key!r}")
    if sf.shape(key) != tuple(shape) or sf.dtype(key) != dtype:
        raise DeltaFileError(f"{path}: tensor {key!r} is {sf.dtype(key)} {sf.shape(key)}, "
                             f"expected {dtype} {tuple(shape)}")
    unused.discard(key)
    return jnp.asarray(sf.read(key))


def _read_zstd(sf, path, key, shape, dtype, unused):
    key = f"{key}.zst"
    if key not in sf:
        raise DeltaFileError(f"{path}: missing tensor {key!r}")
    if sf.dtype(key) != np.uint8 or len(sf.shape(key)) != 1:
        raise DeltaFileError(f"{path}: tensor {key!r} must be 1-D uint8 (zstd bytes)")
    size = int(np.prod(shape)) * dtype.itemsize
    try:
        raw = zstandard.ZstdDecompressor().decompress(sf.read(key).tobytes(), max_output_size=size)
    except zstandard.ZstdError as e:
        raise DeltaFileError(f"{path}: tensor {key!r}: corrupt zstd data ({e})") from None
    if len(raw) != size:
        raise DeltaFileError(f"{path}: tensor {key!r} holds {len(raw)} bytes, expected {size} for "
                             f"{dtype} {tuple(shape)}")
    unused.discard(key)
    return jnp.asarray(np.frombuffer(raw, dtype).reshape(shape))


def _read_exact(sf, path, name, transposed, hf_shape, unused):
    array = _read(sf, path, name, hf_shape, np.dtype(np.float32), unused)
    return array.T if transposed else array


def _read_quantized(sf, path, name, entry, keys, hf_shape, unused):
    try:
        fmt = Format.from_json(entry)
        k, n = (int(v) for v in entry["shape"])
        fmt.check_shape(k, n, name)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise DeltaFileError(f"{path}: tensor {name!r}: bad compression settings ({e})") from None
    # Kernels are [in, out] = HF shape reversed; the embedding is stored transposed likewise.
    if (k, n) != tuple(reversed(hf_shape)):
        raise DeltaFileError(f"{path}: tensor {name!r} has shape {[k, n]}, expected "
                             f"{list(reversed(hf_shape))} for this model")
    read = _read_zstd if entry.get("zstd") else _read
    arrays = {field: read(sf, path, f"{_stem(name)}.{field}", shape, dtype, unused)
              for field, (shape, dtype) in fmt.stored_arrays(k, n).items()}
    return QuantizedTensor(**{f: arrays.get(f) for f in FIELDS}, shape=(k, n), format=fmt)
