"""Prompts in, tokens out: the one prompt encoder and the one end-of-sequence set, shared by
`dzjax.generate` and the serving engine."""

from __future__ import annotations

import numpy as np

from dzjax.errors import DzjaxError


def eos_ids(config, tokenizer) -> frozenset[int]:
    """Token ids that end a sequence: the model config's, and the tokenizer's eos token."""
    ids = set(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def check_text(text: str, what: str, max_bytes: int | None = None) -> None:
    """Raise DzjaxError naming `what` when `text` is not valid Unicode (a lone surrogate, which
    JSON can carry) or longer than `max_bytes` in UTF-8 (checked before any tokenizing)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise DzjaxError(f"{what} is not valid text: {e.reason} at character {e.start}") \
            from None
    if max_bytes is not None and size > max_bytes:
        raise DzjaxError(f"{what} has {size} bytes of text; at most {max_bytes} are allowed")


def encode_prompt(base, prompt, what: str = "prompt", *, max_bytes: int | None = None,
                  max_tokens: int | None = None) -> list[int]:
    """A prompt (a text, or a sequence of token ids) as a non-empty list of token ids in the
    vocabulary. Text needs the base's tokenizer (which adds its special tokens, e.g. BOS).

    Raises DzjaxError naming `what` when the prompt is empty, not text or ids, out of range, or
    longer than `max_bytes` of text / `max_tokens` ids (both checked before any work).
    """
    if isinstance(prompt, str):
        if base.tokenizer is None:
            raise DzjaxError(f"{what}: the base {base.path or ''} has no tokenizer; pass token ids "
                             "instead of text")
        check_text(prompt, what, max_bytes)
        ids = list(base.tokenizer(prompt)["input_ids"])
    else:
        if max_tokens is not None and hasattr(prompt, "__len__") and len(prompt) > max_tokens:
            raise DzjaxError(f"{what} has {len(prompt)} tokens; the context holds at most "
                             f"{max_tokens}")
        array = np.asarray(prompt)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise DzjaxError(f"{what} must be a string or a list of token ids")
        ids = [int(t) for t in array]
    if not ids:
        raise DzjaxError(f"{what} is empty")
    vocab = base.config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise DzjaxError(f"{what}: token ids must lie in [0, {vocab}), got values from "
                         f"{min(ids)} to {max(ids)}")
    return ids
