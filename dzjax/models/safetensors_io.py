"""A small, strict safetensors reader and an atomic writer, on NumPy (bf16 through ml_dtypes).

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}, "__metadata__": {str: str}}, then the raw little-endian data. Nothing in a file is
ever executed.

Why not the `safetensors` library (the tests read our files with it, `test_loading`): its reader
memory-maps the file, so the pages of a whole checkpoint stay resident while it loads, where one
positioned read per tensor keeps host memory at one tensor; its errors do not name the tensor of a
truncated or malformed file; and its writer takes every tensor at once, where `write_safetensors`
streams `LazyTensor`s (export computes base + delta one tensor at a time) into an atomic rename.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np

import dzjax.jsonsafe as jsonsafe
from dzjax.errors import CheckpointError, DzjaxError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16), "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # bytes of a file's JSON header
_MAX_HEADER_DEPTH = 8


class SafetensorsFile:
    """Header parsed and checked at open; tensors read one at a time, on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{self.path}: not a safetensors file or truncated (header of {header_len} "
                    f"bytes in a file of {size})")
            try:  # {name: {dtype, shape, data_offsets}, __metadata__: {str: str}}: 3 levels
                header = jsonsafe.loads(f.read(header_len), max_depth=_MAX_HEADER_DEPTH)
            except jsonsafe.JSONLimitError as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(
                isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ is not a JSON object of strings")
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, size - self._data_start)
        self._mmap = None

    def _check_entry(self, name, entry, data_size):
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry "
                                  f"{entry!r}") from None
        if any(d < 0 for d in shape) or begin < 0 or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes for "
                                  f"shape {shape} of {entry['dtype']}")
        if end > data_size:
            raise CheckpointError(f"{self.path}: truncated: tensor {name!r} ends at byte {end} "
                                  f"but the file has {data_size} bytes of data")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def _entry(self, name: str):
        if name not in self._entries:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        return self._entries[name]

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a fresh array, read with one positioned read (no memory map, so the
        pages do not stay resident and host memory holds only what the caller keeps)."""
        dtype, shape, begin, end = self._entry(name)
        array = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return array

    def rows(self, name: str) -> "RowReader":
        """Tensor `name` as an object with `.shape` whose slices along the first axis are read
        from the file when asked (positioned reads, no memory map): a tensor streamed in chunks
        costs host memory for one chunk."""
        return RowReader(self, name)

    def _read_range(self, name: str, start: int, stop: int) -> np.ndarray:
        dtype, shape, begin, end = self._entry(name)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        array = np.empty((stop - start,) + shape[1:], dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin + start * row_bytes)
            if f.readinto(array.reshape(-1).view(np.uint8)) != (stop - start) * row_bytes:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return array

    def view(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor `name`: only the pages indexed are read."""
        dtype, shape, begin, end = self._entry(name)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap[self._data_start + begin:self._data_start + end].view(dtype).reshape(shape)


class RowReader:
    """Rows of one tensor of a `SafetensorsFile`, read on demand: reader[start:stop]."""

    def __init__(self, sf: SafetensorsFile, name: str):
        self.sf, self.name = sf, name
        self.shape = sf.shape(name)

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not self.shape:  # a scalar tensor: the whole of it
            return self.sf.read(self.name)
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows are read as one contiguous range")
        return self.sf._read_range(self.name, start, max(start, stop))


class LazyTensor(NamedTuple):
    """A tensor to write whose values are computed only when written (one at a time)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray | LazyTensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` atomically: into a temporary file beside `path`, then renamed onto it.

    A `LazyTensor` is computed while the file is written and dropped right after, so a whole
    model can be written holding one tensor in host memory.
    """
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        dtype, shape = np.dtype(tensor.dtype), tuple(tensor.shape)
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data to 8 bytes
    atomic_write(path, lambda f: _write_body(f, header_bytes, tensors, header))


def _write_body(f, header_bytes, tensors, header):
    f.write(struct.pack("<Q", len(header_bytes)))
    f.write(header_bytes)
    for name, tensor in tensors.items():
        array = np.ascontiguousarray(tensor.load() if isinstance(tensor, LazyTensor) else tensor)
        if list(array.shape) != header[name]["shape"] or _NAMES.get(array.dtype) != header[name][
                "dtype"]:
            raise ValueError(f"tensor {name!r}: got {array.dtype} {array.shape}, declared "
                             f"{header[name]['dtype']} {header[name]['shape']}")
        f.write(array.view(np.uint8).data)  # raw bytes (a bf16 buffer cannot be exported as is)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path, pid: int | None = None) -> str:
    return f".{path.name}.{os.getpid() if pid is None else pid}."


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files that `atomic_write` calls to `path` left behind when their
    process was killed (named after it and after a process that no longer runs); returns them."""
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def check_target(path: Path, *, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse, before any work, a file target that cannot be written or would destroy an input:
    a folder, a path inside (or equal to) one of the `inputs` folders, or a folder that is not
    writable. Returns the path. Raises DzjaxError naming the problem."""
    path = Path(path)
    if path.is_dir():
        raise DzjaxError(f"{path} is a directory; give the file to write")
    resolved = path.resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if resolved == folder or folder in resolved.parents:
            raise DzjaxError(f"{path} is inside the input checkpoint {folder}: writing there "
                             f"could overwrite its files; write it elsewhere")
    parent = path.parent
    while not parent.exists():  # atomic_write creates the missing folders
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DzjaxError(f"cannot write {path}: {parent} is not a writable folder")
    return path


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temporary file in path's folder and rename it onto `path` on success;
    on any error (or interrupt) the temporary file is removed, and temporary files of killed
    earlier writes to `path` are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes the file private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
