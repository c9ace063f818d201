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


def encode_prompt(base, prompt, what: str = "prompt") -> list[int]:
    """A prompt (a text, or a sequence of token ids) as a non-empty list of token ids in the
    vocabulary. Text needs the base's tokenizer (which adds its special tokens, e.g. BOS).

    Raises DzjaxError naming `what` when the prompt is empty, not text or ids, or out of range.
    """
    if isinstance(prompt, str):
        if base.tokenizer is None:
            raise DzjaxError(f"{what}: the base {base.path or ''} has no tokenizer; pass token ids "
                             "instead of text")
        ids = list(base.tokenizer(prompt)["input_ids"])
    else:
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
