"""Resumable convert: the sequential pipeline's progress, checkpointed with orbax.

After a decoder layer, `convert` may save what it has so far: every tensor compressed or stored
exactly, their errors, and the calibration activations entering the next layer. A convert killed
(or failing) midway and started again with the same arguments picks up after the last saved
layer and writes the same bytes as an uninterrupted run: every later step is a deterministic
function of those saved arrays, which orbax gives back exactly.

The checkpoint lives beside the output, in `.<out name>.convert/`, and is removed when the delta
file is written. It is tied to one conversion by a key: the digests of both checkpoints, the
settings, the model config, the calibration tokens, the name, the kernels, the versions of dzjax
and jax and the device kind. A checkpoint with another key (other
arguments, changed inputs) is discarded, with a line on stderr, and the convert starts over.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dzjax.compress.delta_file import content_hash
from dzjax.pallas_kernels.formats import Format, QuantizedTensor

DEFAULT_EVERY = 60.0  # seconds of work between checkpoints (0: after every layer)


def checkpoint_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.convert"


def environment() -> dict:
    """What else the bytes depend on: the versions and the device the pipeline runs on (the
    kernels "auto" picks, float rounding)."""
    import jax

    from dzjax.version import __version__

    return {"dzjax": __version__, "jax": jax.__version__,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}


def conversion_key(**parts) -> str:
    """One hash of everything the compressed bytes depend on (arrays by their content hash)."""
    text = json.dumps({k: content_hash(np.ascontiguousarray(v)) if isinstance(v, np.ndarray)
                       else v for k, v in parts.items()}, sort_keys=True, default=str)
    return content_hash(text)


class Checkpoints:
    """Saves and restores one convert's progress (see the module docstring)."""

    def __init__(self, out: Path, key: str, every: float | None = DEFAULT_EVERY,
                 log=lambda line: print(line, file=sys.stderr, flush=True)):
        self.dir, self.key, self.every, self.log = checkpoint_dir(out), key, every, log
        self.last = time.perf_counter()
        self._manager = None

    def _open(self):
        import orbax.checkpoint as ocp

        if self._manager is None:
            self._manager = ocp.CheckpointManager(
                self.dir.resolve(), options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, enable_async_checkpointing=False))
        return self._manager

    def restore(self) -> tuple[int, dict, dict, object] | None:
        """(layers done, stored tensors, the run's logs (errors...), activations entering the
        next layer) of a checkpoint of this conversion, or None (nothing saved, or another
        conversion's)."""
        import orbax.checkpoint as ocp

        if self.every is None or not self.dir.is_dir():
            return None
        step = self._open().latest_step()
        if step is None:
            return None
        saved = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if saved.get("key") != self.key:
            self.log(f"[convert] {self.dir}: a checkpoint of another conversion (other "
                     f"arguments or inputs); starting over")
            self.remove()
            return None
        state = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
        stored = {}
        for name, arrays in state["tensors"].items():
            keys = tuple(name.split("."))
            entry = saved["formats"].get(name)
            if entry is None:
                stored[keys] = arrays["exact"]
            else:
                fields = {f: arrays.get(f) for f in ("qweight", "scales", "zeros", "meta")}
                stored[keys] = QuantizedTensor(**fields, shape=tuple(entry["shape"]),
                                               format=Format.from_json(entry))
        self.log(f"[convert] resuming from {self.dir} after layer {step - 1}")
        return step, stored, saved["logs"], state["x"]

    def maybe_save(self, layers_done: int, stored: dict, logs: dict, x) -> None:
        """Save after `layers_done` layers when `every` seconds have passed since the last."""
        if self.every is None or time.perf_counter() - self.last < self.every:
            return
        import orbax.checkpoint as ocp

        tensors, formats = {}, {}
        for keys, value in stored.items():
            name = ".".join(keys)
            if isinstance(value, QuantizedTensor):
                tensors[name] = value.arrays()
                formats[name] = value.format.to_json(value.shape)
            else:
                tensors[name] = {"exact": value}
        self._open().save(layers_done, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"tensors": tensors, "x": x}),
            meta=ocp.args.JsonSave({"key": self.key, "formats": formats, "logs": logs})))
        self._manager.wait_until_finished()
        self.last = time.perf_counter()

    def remove(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None
        shutil.rmtree(self.dir, ignore_errors=True)
