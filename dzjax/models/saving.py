"""Writing params as a standard HF checkpoint directory (config.json + model.safetensors).

The inverse of `loading.load_params`, through the same key map. The checkpoint is written into a
temporary folder beside `out` and renamed onto it, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dzjax.models.config import ModelConfig, to_hf_dict
from dzjax.models.loading import SINGLE_FILE, flatten_params, hf_key_map
from dzjax.models.safetensors_io import LazyTensor, current_umask, write_safetensors


def hf_tensors(config: ModelConfig, params, dtype=None,
               transform=None) -> dict[str, LazyTensor]:
    """{HF tensor name: LazyTensor in HF layout} for every parameter of `config`.

    Each is computed when written: `transform(keys, leaf)` (e.g. adding a delta), the move to the
    host, the transposition and the cast happen one tensor at a time.
    """
    flat = flatten_params(params)
    tensors = {}
    for name, (keys, transposed, shape) in hf_key_map(config).items():
        if keys not in flat:
            raise ValueError(f"params lack {'.'.join(keys)} (HF tensor {name})")
        leaf = flat[keys]

        def load(keys=keys, leaf=leaf, transposed=transposed, out_dtype=dtype or leaf.dtype):
            array = np.asarray(transform(keys, leaf) if transform else leaf)
            return np.ascontiguousarray(array.T if transposed else array, dtype=out_dtype)

        tensors[name] = LazyTensor(shape, np.dtype(dtype or leaf.dtype), load)
    return tensors


def save_hf(out: str | os.PathLike, config: ModelConfig, params, *, dtype=None,
            hf_config: dict | None = None, tokenizer=None, overwrite: bool = False,
            transform=None) -> Path:
    """Write `params` as a HF checkpoint directory `out`; returns it.

    Args:
      out: the directory to write.
      config: the model's config.
      params: params pytree (as loaded or initialised).
      dtype: dtype of the stored weights (default: as they are).
      hf_config: the config.json contents to write (default: derived from `config`).
      tokenizer: a transformers tokenizer to save beside the weights.
      overwrite: replace an existing non-empty `out` (else that is an error: nothing is deleted).
      transform: optional `transform(keys, leaf) -> array` applied to each param as it is
        written (how `export_hf` adds a delta without holding a merged copy of the model).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
        contents = dict(hf_config if hf_config is not None else to_hf_dict(config))
        if dtype is not None:
            contents["dtype"] = np.dtype(dtype).name
        (tmp / "config.json").write_text(json.dumps(contents, indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp / SINGLE_FILE, hf_tensors(config, params, dtype, transform),
                          metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
