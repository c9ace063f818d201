"""Calibration token ids for compression: the embedded corpus, the user's texts, or token ids.

The embedded default needs no download: documents from the two corpora shipped in `dzjax/data`
(English docstrings and Python code from the standard library), tokenized with the checkpoint's
own tokenizer, cut into `n_samples` windows of `seq_len` tokens at seeded random offsets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dzjax.errors import DzjaxError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DOMAINS = ("prose", "code")
DOC_SEPARATOR = "<|doc|>"  # a line of its own between documents
log = logging.getLogger(__name__)


def embedded_corpus(domain: str = "prose") -> list[str]:
    """The documents of one shipped corpus: "prose" (English docstrings) or "code" (Python)."""
    if domain not in DOMAINS:
        raise DzjaxError(f"unknown corpus domain {domain!r}; choose from {', '.join(DOMAINS)}")
    text = (DATA_DIR / f"{domain}.txt").read_text(encoding="utf-8")
    return [doc.strip("\n") for doc in text.split(f"\n{DOC_SEPARATOR}\n") if doc.strip()]


def read_texts(path: Path) -> list[str]:
    """Documents of a .txt file (separated by blank lines) or a .jsonl file (a "text" field each)."""
    if not path.is_file():
        raise DzjaxError(f"calibration file {path}: no such file")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DzjaxError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
        return texts
    return [doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]


def _windows(stream: np.ndarray, n_samples: int, seq_len: int, seed: int) -> np.ndarray:
    if len(stream) < seq_len:
        raise DzjaxError(f"calibration text has {len(stream)} tokens, fewer than seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len + 1, n_samples)
    return np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int32)


def calibration_tokens(calibration, tokenizer, vocab_size: int, *, n_samples: int, seq_len: int,
                       seed: int = 0) -> tuple[np.ndarray, str]:
    """Token ids [n_samples, seq_len] and a short description of where they came from.

    Args:
      calibration: None (the embedded corpus), a list of strings, a .txt/.jsonl path, or an int
        array of token ids [n, seq] (used as given).
      tokenizer: the checkpoint's tokenizer, or None.
    """
    if calibration is not None and not isinstance(calibration, (str, Path, list, tuple)):
        ids = np.asarray(calibration)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise DzjaxError(f"calibration token ids must be an int array [n, seq], got "
                             f"{ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise DzjaxError(f"calibration token ids must lie in [0, {vocab_size})")
        return ids.astype(np.int32), f"token ids {list(ids.shape)}"
    if calibration is None and tokenizer is None:
        log.warning("no tokenizer in either checkpoint: calibrating on random token ids")
        ids = np.random.default_rng(seed).integers(0, vocab_size, (n_samples, seq_len))
        return ids.astype(np.int32), "random token ids (no tokenizer)"
    if calibration is None:
        texts, source = embedded_corpus("prose") + embedded_corpus("code"), "embedded corpus"
    elif isinstance(calibration, (str, Path)):
        texts, source = read_texts(Path(calibration)), f"file {calibration}"
    else:
        texts, source = list(calibration), f"{len(calibration)} texts"
    if tokenizer is None:
        raise DzjaxError("calibration texts need a tokenizer and neither checkpoint has one; "
                         "pass token ids instead")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = np.concatenate([np.asarray(tokenizer(t)["input_ids"] + eos, np.int64) for t in texts])
    return _windows(stream, n_samples, seq_len, seed), source
