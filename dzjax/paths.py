"""Where dzjax keeps what it builds: one cache root for the demo's models and the benchmark's
models, and a folder for benchmark results. Both follow environment variables, so nothing
depends on the working directory.

  DZJAX_CACHE    the cache root (default ~/.cache/dzjax)
  DZJAX_RESULTS  where `dzjax bench` writes its report without --out (default <cache>/results)
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DZJAX_CACHE") or Path.home() / ".cache" / "dzjax")


def results_dir() -> Path:
    return Path(os.environ.get("DZJAX_RESULTS") or cache_dir() / "results")


def named_path(text: str) -> tuple[str, Path]:
    """A command-line NAME=PATH, or a bare PATH named after its file (ft.dz.safetensors -> ft)."""
    import argparse

    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name.split(".")[0], text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)
