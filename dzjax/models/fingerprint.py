"""Which base weights a delta was made on: a digest of every weight, and a quick sampled check.

  digest       xxh3-128 over every tensor's name, shape and values rounded to bfloat16, in HF
               layout: the same from a checkpoint's files (any float dtype) as from the params
               loaded from them in float32 or bf16. Every weight counts (at bf16 precision), so a
               base with a few weights changed is another base. Computed as `load_base` reads each
               tensor (at ~13 GB/s it adds little to the read), and by `convert` streaming the
               base's files in chunks.
  fingerprint  sha256 over 64 values spread over each tensor: a few pages per tensor, so a delta
               made on another base is refused before anything is read in full.
A delta records both (`base_digest`, `base_fingerprint`); `Delta.check_base` compares the quick one
first, then the digest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import xxhash

from dzjax.models.safetensors_io import SafetensorsFile

SAMPLES = 64  # values per tensor of the quick fingerprint
_CHUNK_BYTES = 64 << 20  # the digest converts and hashes this much of a tensor at a time


class WeightsDigest:
    """The digest of a model's weights, one tensor at a time in any order."""

    def __init__(self):
        self._parts: dict[str, bytes] = {}

    def add(self, name: str, array) -> None:
        """Add tensor `name`: an array in HF layout (any float dtype), or anything with `.shape`
        whose row slices give its rows (`SafetensorsFile.rows`)."""
        shape = tuple(array.shape)
        h = xxhash.xxh3_128(f"{name}:{list(shape)}:".encode())
        rows = shape[0] if shape else 1
        per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * 4)
        step = max(1, _CHUNK_BYTES // per_row)
        for start in range(0, rows, step):
            chunk = array[start:start + step] if shape else array
            h.update(np.ascontiguousarray(chunk, dtype=ml_dtypes.bfloat16).tobytes())
        self._parts[name] = h.digest()

    def hexdigest(self) -> str:
        h = xxhash.xxh3_128()
        for name in sorted(self._parts):
            h.update(self._parts[name])
        return h.hexdigest()


def checkpoint_digest(files: dict[str, Path], names: list[str]) -> str:
    """The digest of tensors `names` of a checkpoint ({tensor name: file}), streamed: each tensor
    is read in row chunks (positioned reads), so host memory holds one chunk."""
    digest = WeightsDigest()
    opened: dict[Path, SafetensorsFile] = {}
    for name in names:
        sf = opened.get(files[name]) or opened.setdefault(files[name], SafetensorsFile(files[name]))
        digest.add(name, sf.rows(name))
    return digest.hexdigest()


def fingerprint(tensors: dict[str, tuple[tuple[int, ...], Any]]) -> str:
    """The quick fingerprint of a model's weights (see the module docstring).

    Args:
      tensors: {HF name: (HF shape, sample)}, where sample(rows, cols) returns the values at those
        positions of the tensor in HF layout (1-D tensors: cols only).
    Returns:
      sha256 hex digest over every name, shape and the bfloat16 rounding of 64 values spread over
      the tensor.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        shape, sample = tensors[name]
        size = int(np.prod(shape))
        flat = np.unique(np.linspace(0, size - 1, SAMPLES).astype(np.int64))
        rows, cols = (np.divmod(flat, shape[1]) if len(shape) == 2 else (None, flat))
        values = np.asarray(sample(rows, cols), np.float32).astype(ml_dtypes.bfloat16)
        digest.update(f"{name}:{list(shape)}:".encode() + values.tobytes())
    return digest.hexdigest()[:32]


def checkpoint_fingerprint(files: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> str:
    """`fingerprint` of a checkpoint ({tensor name: file}), read from its files (a few pages per
    tensor) for the tensors `shapes` names."""
    opened = {file: SafetensorsFile(file) for file in set(files[n] for n in shapes)}

    def sample(name):
        def read(rows, cols):
            array = opened[files[name]].view(name)
            return array[rows, cols] if array.ndim == 2 else array[cols]
        return read

    return fingerprint({name: (shape, sample(name)) for name, shape in shapes.items()})
