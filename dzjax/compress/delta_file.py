"""`Delta`, a compressed fine-tune, and its file: one safetensors file, validated on load.

File layout (format_version 2):
  __metadata__["dzjax"]  JSON: format_version, the model config, the base's fingerprint and
                         digest, the fine-tune's name and source, and for every tensor how it is
                         stored and the xxh3-128 hash of each of its stored arrays' bytes.
  __metadata__["dzjax_digest"]
                         the xxh3-128 hash of the "dzjax" text: the header is checked before it
                         is parsed, and with the tensor hashes it covers every byte that matters.
  <HF name minus ".weight">.qweight/.scales/.zeros/.meta
                         a compressed matrix (`QuantizedTensor`), in the kernel layout [in, out]
                         with codes packed along the input dimension. The embedding table is
                         stored as its transpose [hidden, vocab], the layout of a tied lm_head,
                         so that one tensor serves the lookup and the output projection.
  <HF name>              an exact delta (norms, biases; embeddings kept exact), in HF's layout:
                         float32, or bfloat16 (the entry says "dtype": "bfloat16") with
                         <HF name>.fixup_index (int32 increasing flat positions) and
                         .fixup_value (float32) for the elements bf16 does not hold exactly.
  <...>.<field>.zst      optional lossless stage at rest: the field's bytes, zstd-compressed, as
                         uint8 (the tensor's entry says "zstd": true; its shape and dtype follow
                         from the format). Quantization codes are far from uniform, so this saves
                         15-25% (benchmarks/compression.py quality); it is undone at load.
Every tensor is a delta: W_finetune - W_base.

Nothing in a file is trusted before it is checked: the header against its digest, nesting depth
and limits on the model's size (or against the base, when one is given), every shape against the
config, every decompressed size against the shape (never the zstd frame's own claim), every
tensor's bytes against its hash; scales and exact tensors must be finite. Nothing is executed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import xxhash
import zstandard

import dzjax.jsonsafe as jsonsafe
from dzjax.errors import DzjaxError
from dzjax.models.config import config_from_dict
from dzjax.models.loading import Base, flatten_params, hf_key_map, unflatten
from dzjax.models.safetensors_io import SafetensorsFile, write_safetensors
from dzjax.pallas_kernels import packing
from dzjax.pallas_kernels.formats import FIELDS, Format, QuantizedTensor

FORMAT_VERSION = 2
MAX_HEADER_DEPTH = 16  # nesting of the "dzjax" JSON (it needs 5)
# What a file may claim about its model before it is compared with a base.
LIMITS = {"num_layers": 1024, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
          "vocab_size": 1 << 22, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024,
          "max_position_embeddings": 1 << 24}


class DeltaFileError(DzjaxError):
    """A delta file is malformed, damaged, of an unknown version, or made for another base."""


def content_hash(data) -> str:
    """The hash a delta file records for stored bytes (an array's, or the header's text)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).data
    return xxhash.xxh3_128_hexdigest(data)


@dataclasses.dataclass(frozen=True, eq=False)
class Delta:
    """A compressed fine-tune: a pytree mirroring the base params (`QuantizedTensor` leaves for
    compressed matrices, float32 arrays for exact tensors) plus the file's metadata."""

    params: dict
    metadata: dict
    path: Path | None = None
    digest: str | None = None  # the file's header digest (covers every tensor's hash)

    @property
    def name(self) -> str:
        return self.metadata.get("name") or (self.path.name if self.path else "delta")

    @property
    def base_fingerprint(self) -> str:
        return self.metadata["base_fingerprint"]

    @property
    def nbytes(self) -> int:
        """Bytes in memory (exact tensors as float32)."""
        return sum(leaf.nbytes for leaf in jax.tree.leaves(
            self.params, is_leaf=lambda x: isinstance(x, QuantizedTensor)))

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the arrays as a delta file stores them (before any zstd stage)."""
        total = 0
        for leaf in jax.tree.leaves(self.params, is_leaf=lambda x: isinstance(x, QuantizedTensor)):
            if isinstance(leaf, QuantizedTensor):
                total += leaf.nbytes
            else:
                total += exact_nbytes(leaf)
        return total

    def check_base(self, base: Base) -> None:
        """Raise unless this delta was made on `base` (same architecture, config and weights:
        the quick fingerprint first, then the digest of every weight)."""
        check_made_on(self.metadata, base, self.path)


def check_made_on(metadata: dict, base: Base, path=None) -> None:
    name = metadata.get("name") or (Path(path).name if path else "delta")
    where = f"delta {name!r}" + (f" ({path})" if path else "")
    if metadata["config"]["architecture"] != base.config.architecture:
        raise DeltaFileError(f"{where} is for a {metadata['config']['architecture']}, the base "
                             f"{base.path or ''} is a {base.config.architecture}")
    if config_from_dict(metadata["config"]) != base.config:
        raise DeltaFileError(f"{where} records a model config that differs from the base's "
                             f"({base.path or ''})")
    made_on = metadata.get("base_source", "?")
    if metadata["base_fingerprint"] != base.fingerprint:
        raise DeltaFileError(f"{where} was made on base {made_on} with fingerprint "
                             f"{metadata['base_fingerprint']}, not on this base {base.path or ''}"
                             f" (fingerprint {base.fingerprint})")
    if metadata["base_digest"] != base.digest:
        raise DeltaFileError(f"{where} was made on base {made_on} whose weights have digest "
                             f"{metadata['base_digest']}; this base {base.path or ''} has "
                             f"{base.digest}: some of its weights differ")


def _check_limits(data) -> None:
    """The sizes a config claims are integers within LIMITS (before anything is built)."""
    if not isinstance(data, dict):
        raise ValueError(f"config {str(data)[:80]} is not an object")
    for key, limit in LIMITS.items():
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"config {key}={value!r} is not an integer in [1, {limit}]")


def _stem(hf_name: str) -> str:
    return hf_name.removesuffix(".weight")


def save_delta(delta: Delta, path: str | Path, zstd_level: int | None = None) -> Delta:
    """Write `delta` to `path` atomically (a temporary file renamed onto it); returns the delta
    as written (its metadata with every tensor's entry and hash, its path and digest).

    zstd_level: compress the compressed matrices' arrays losslessly at rest (e.g. 19), or None.
    """
    path = Path(path)
    config = config_from_dict(delta.metadata["config"])
    flat = flatten_params(delta.params)
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    for name, (keys, transposed, _) in hf_key_map(config).items():
        leaf = flat.get(keys)
        if leaf is None:
            continue
        stored = {}
        if isinstance(leaf, QuantizedTensor):
            entries[name] = leaf.format.to_json(leaf.shape)
            for field, array in leaf.arrays().items():
                array = np.asarray(array)
                if zstd_level is None:
                    stored[f"{_stem(name)}.{field}"] = array
                else:
                    packed = zstandard.ZstdCompressor(level=zstd_level).compress(array.tobytes())
                    stored[f"{_stem(name)}.{field}.zst"] = np.frombuffer(packed, np.uint8)
                    entries[name]["zstd"] = True
        else:
            array = np.asarray(leaf, np.float32)
            entries[name], exact = _exact_arrays(name, array.T if transposed else array)
            stored.update(exact)
        entries[name]["hashes"] = {key: content_hash(a) for key, a in stored.items()}
        tensors.update(stored)
    metadata = dict(delta.metadata, format_version=FORMAT_VERSION, tensors=entries)
    header = json.dumps(metadata)
    digest = content_hash(header)
    write_safetensors(path, tensors, metadata={"dzjax": header, "dzjax_digest": digest})
    return dataclasses.replace(delta, metadata=metadata, path=path, digest=digest)


def exact_nbytes(array) -> int:
    """Bytes of an exact tensor as a delta file stores it (`_exact_arrays`)."""
    return sum(a.nbytes for a in _exact_arrays("", np.asarray(array))[1].values())


def _exact_arrays(name: str, array: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    """How an exact float32 tensor is stored: as bfloat16 plus the float32 values of the few
    elements bfloat16 does not hold exactly (a delta between two bf16 checkpoints is a bf16
    value except where a weight is small next to its change), or as float32 when that would
    not be smaller (a float32 fine-tune). Either way it reads back bit for bit."""
    array = np.ascontiguousarray(array, np.float32)
    low = array.astype(ml_dtypes.bfloat16)
    inexact = np.flatnonzero(low.astype(np.float32).reshape(-1) != array.reshape(-1))
    if 8 * inexact.size >= 2 * array.size or array.size > np.iinfo(np.int32).max:
        # bf16 + fixups would not beat float32 (or positions would not fit int32)
        return {"kind": "exact"}, {name: array}
    stored = {name: low}
    if inexact.size:
        stored[f"{name}.fixup_index"] = inexact.astype(np.int32)
        stored[f"{name}.fixup_value"] = array.reshape(-1)[inexact]
    return {"kind": "exact", "dtype": "bfloat16", "fixups": int(inexact.size)}, stored


def load_delta(path: str | Path, base: Base | None = None) -> Delta:
    """Read and validate a delta file (header digest, format version, limits, tensor names,
    shapes, dtypes, hashes, finite values).

    With `base`, the delta must have been made on it, checked before any tensor is read;
    without, that is checked when the delta is used with a base (`Delta.check_base`).
    Nothing in the file is executed.
    """
    path = Path(path)
    sf = SafetensorsFile(path)
    metadata, digest = _read_header(sf, path)
    try:
        _check_limits(metadata["config"])
        config = config_from_dict(metadata["config"])
        entries = dict(metadata["tensors"])
        for key in ("base_fingerprint", "base_digest"):
            if not isinstance(metadata[key], str):
                raise TypeError(f"{key} {metadata[key]!r}")
    except Exception as e:  # any garbled config: it must not reach the model
        raise DeltaFileError(f"{path}: dzjax metadata lacks or garbles {type(e).__name__}: "
                             f"{e}") from None
    if base is not None:
        check_made_on(metadata, base, path)
    key_map = hf_key_map(config)
    unused = set(sf.keys())
    flat = {}
    for name, entry in entries.items():
        if name not in key_map:
            raise DeltaFileError(f"{path}: tensor {name!r} is not a parameter of "
                                 f"{config.architecture}")
        if not isinstance(entry, dict) or not isinstance(entry.get("hashes"), dict):
            raise DeltaFileError(f"{path}: tensor {name!r}: malformed entry {str(entry)[:200]}")
        keys, transposed, hf_shape = key_map[name]
        reader = _TensorReader(sf, path, entry["hashes"], unused)
        flat[keys] = (_read_quantized(reader, name, entry, hf_shape)
                      if entry.get("kind") == "quantized"
                      else _read_exact(reader, name, entry, transposed, hf_shape))
    if unused:
        raise DeltaFileError(f"{path}: unexpected tensor(s) {', '.join(sorted(unused)[:5])}")
    return Delta(params=unflatten(flat), metadata=metadata, path=path, digest=digest)


def read_metadata(path: str | Path) -> dict:
    """A delta file's "dzjax" metadata (settings, report, ...), checked, without its tensors."""
    path = Path(path)
    return _read_header(SafetensorsFile(path), path)[0]


def _read_header(sf: SafetensorsFile, path: Path) -> tuple[dict, str]:
    """The "dzjax" metadata, checked against its digest before it is parsed."""
    raw, digest = sf.metadata.get("dzjax"), sf.metadata.get("dzjax_digest")
    if raw is None:
        raise DeltaFileError(f"{path}: not a dzjax delta file (no 'dzjax' metadata)")
    if digest is None:  # version 1 files had no hashes
        raise DeltaFileError(f"{path}: a delta file without content hashes (format_version 1, "
                             f"an older dzjax); convert the fine-tune again")
    if content_hash(raw) != digest:
        raise DeltaFileError(f"{path}: the dzjax header is damaged (its hash is not the "
                             f"recorded one)")
    try:
        metadata = jsonsafe.loads(raw, max_depth=MAX_HEADER_DEPTH)
    except jsonsafe.JSONLimitError as e:
        raise DeltaFileError(f"{path}: unreadable dzjax metadata: {e}") from None
    version = metadata.get("format_version") if isinstance(metadata, dict) else None
    if type(version) is not int or version != FORMAT_VERSION:  # not True, not 2.0
        raise DeltaFileError(f"{path}: format_version {version!r} is not supported "
                             f"(this dzjax reads version {FORMAT_VERSION})")
    return metadata, digest


class _TensorReader:
    """Reads one entry's stored arrays: checked against their shape, dtype and recorded hash."""

    def __init__(self, sf, path, hashes: dict, unused: set):
        self.sf, self.path, self.hashes, self.unused = sf, path, hashes, unused

    def _stored(self, key: str) -> np.ndarray:
        if key not in self.sf:
            raise DeltaFileError(f"{self.path}: missing tensor {key!r}")
        data = self.sf.read(key)
        if self.hashes.get(key) != content_hash(data):
            raise DeltaFileError(f"{self.path}: tensor {key!r} is damaged (its bytes do not "
                                 f"match the recorded hash)")
        self.unused.discard(key)
        return data

    def read(self, key, shape, dtype, zstd: bool = False) -> np.ndarray:
        shape = tuple(shape)
        if not zstd:
            if key in self.sf and (self.sf.shape(key) != shape or self.sf.dtype(key) != dtype):
                raise DeltaFileError(f"{self.path}: tensor {key!r} is {self.sf.dtype(key)} "
                                     f"{self.sf.shape(key)}, expected {dtype} {shape}")
            return self._stored(key)
        key = f"{key}.zst"
        if key in self.sf and (self.sf.dtype(key) != np.uint8 or len(self.sf.shape(key)) != 1):
            raise DeltaFileError(f"{self.path}: tensor {key!r} must be 1-D uint8 (zstd bytes)")
        size = int(np.prod(shape)) * dtype.itemsize
        raw = _decompress(self._stored(key).tobytes(), size, f"{self.path}: tensor {key!r}")
        return np.frombuffer(raw, dtype).reshape(shape)


def _decompress(data: bytes, size: int, what: str) -> bytes:
    """Exactly `size` bytes out of a zstd frame, never allocating more than size + 1 whatever
    the frame claims (a small frame can declare gigabytes)."""
    try:
        claimed = zstandard.frame_content_size(data)
        if claimed not in (-1, size):
            raise DeltaFileError(f"{what}: the zstd frame declares {claimed} bytes, the shape "
                                 f"needs {size}")
        reader = zstandard.ZstdDecompressor().stream_reader(data)
        out = bytearray()
        while len(out) <= size:
            piece = reader.read(size + 1 - len(out))
            if not piece:
                break
            out += piece
    except zstandard.ZstdError as e:
        raise DeltaFileError(f"{what}: corrupt zstd data ({e})") from None
    if len(out) != size:
        raise DeltaFileError(f"{what} holds {'more than ' if len(out) > size else ''}{len(out)} "
                             f"bytes, expected {size}")
    return bytes(out)


def _finite(array: np.ndarray, path, key: str) -> np.ndarray:
    if not np.isfinite(np.asarray(array, np.float32)).all():
        raise DeltaFileError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return array


def _read_exact(reader: _TensorReader, name, entry, transposed, hf_shape):
    dtype, fixups = entry.get("dtype", "float32"), entry.get("fixups", 0)
    size = int(np.prod(hf_shape))
    if dtype not in ("float32", "bfloat16") or isinstance(fixups, bool) \
            or not isinstance(fixups, int) or not 0 <= fixups <= size:
        raise DeltaFileError(f"{reader.path}: tensor {name!r}: exact tensors are float32, or "
                             f"bfloat16 with 0..{size} fixups; the entry says dtype {dtype!r}, "
                             f"fixups {fixups!r}")
    if dtype == "float32":
        array = reader.read(name, hf_shape, np.dtype(np.float32))
    else:
        array = reader.read(name, hf_shape, np.dtype(ml_dtypes.bfloat16)).astype(np.float32)
        if fixups:
            index = reader.read(f"{name}.fixup_index", (fixups,), np.dtype(np.int32))
            if index[0] < 0 or index[-1] >= size or (np.diff(index) <= 0).any():
                raise DeltaFileError(f"{reader.path}: tensor {name + '.fixup_index'!r} must "
                                     f"hold increasing positions in [0, {size})")
            values = reader.read(f"{name}.fixup_value", (fixups,), np.dtype(np.float32))
            array = array.reshape(-1)
            array[index] = values
            array = array.reshape(hf_shape)
    array = _finite(array, reader.path, name)
    return jnp.asarray(array.T if transposed else array)


def _read_quantized(reader: _TensorReader, name, entry, hf_shape):
    try:
        fmt = Format.from_json(entry)
        k, n = (int(v) for v in entry["shape"])
        fmt.check_shape(k, n, name)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise DeltaFileError(f"{reader.path}: tensor {name!r}: bad compression settings "
                             f"({e})") from None
    # Kernels are [in, out] = HF shape reversed; the embedding is stored transposed likewise.
    if (k, n) != tuple(reversed(hf_shape)):
        raise DeltaFileError(f"{reader.path}: tensor {name!r} has shape {[k, n]}, expected "
                             f"{list(reversed(hf_shape))} for this model")
    arrays = {}
    for field, (shape, dtype) in fmt.stored_arrays(k, n).items():
        key = f"{_stem(name)}.{field}"
        arrays[field] = reader.read(key, shape, dtype, zstd=bool(entry.get("zstd")))
        if field == "scales":
            _finite(arrays[field], reader.path, key)
        if field == "zeros" and arrays[field].size and int(arrays[field].max()) >= 2 ** fmt.bits:
            # Codes are below 2**bits, and so must the zero points be (the kernels' bf16 route
            # builds 128 + zero exactly only for them).
            raise DeltaFileError(f"{reader.path}: tensor {key!r} holds zero points up to "
                                 f"{int(arrays[field].max())}; {fmt.bits}-bit codes need them "
                                 f"below {2 ** fmt.bits}")
        if field == "meta":
            _check_positions(arrays[field], fmt, reader.path, key)
    return QuantizedTensor(**{f: None if arrays.get(f) is None else jnp.asarray(arrays[f])
                              for f in FIELDS}, shape=(k, n), format=fmt)


def _check_positions(meta: np.ndarray, fmt: Format, path, key) -> None:
    """n:m positions must increase within each group (distinct; what `convert` writes): the
    kernels place each kept value by its position and rely on that order."""
    n, m = fmt.nm
    ib = packing.index_bits(m)
    rows = meta.shape[0] * packing.WORD_BITS // ib
    # In host memory, not the accelerator's (this process's own CPU: in a multi-process run
    # jax.devices("cpu")[0] may belong to another process).
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        positions = np.asarray(packing.unpack_codes(meta, ib, rows)).reshape(rows // n, n, -1)
    bad = np.argwhere((np.diff(positions, axis=1) <= 0).any(axis=1)) if n > 1 else []
    if len(bad) or int(positions.max(initial=0)) >= m:
        group, col = (bad[0] if len(bad) else np.argwhere(positions.max(axis=1) >= m)[0])
        raise DeltaFileError(f"{path}: tensor {key!r}: the {n}:{m} positions of group {group} "
                             f"of column {col} are {positions[group, :, col].tolist()}; each "
                             f"group's must be distinct, increasing and below {m}")
