"""Perplexity of base + delta on token windows, and its KL divergence from the fine-tune: how the
quality of a compressed delta is judged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dzjax.models.forward import logits as model_logits
from dzjax.models.loading import Base


def token_windows(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """The texts as one stream (<s> text </s> each), cut into consecutive windows [n, seq_len]."""
    ids = tokenizer(texts)["input_ids"]
    stream = np.concatenate([np.asarray(d + [tokenizer.eos_token_id], np.int32) for d in ids])
    n = len(stream) // seq_len
    return stream[:n * seq_len].reshape(n, seq_len)


def perplexity(base: Base, windows: np.ndarray, delta=None, batch: int = 16) -> float:
    """exp(mean next-token cross-entropy) over windows [n, T] under base + delta (float32)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        logits = model_logits(base, chunk, delta=delta)[:, :-1]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, chunk[:, 1:])
        total += float(losses.sum())
        count += losses.size
    return float(np.exp(total / count))


def kl_divergence(reference: Base, base: Base, windows: np.ndarray, delta=None,
                  batch: int = 16) -> float:
    """Mean over next-token positions of KL(reference || base + delta), in nats per token: how
    far a compressed model's predictions are from the fine-tune's (`reference`, loaded whole)."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        chunk = windows[start:start + batch]
        log_p = jax.nn.log_softmax(model_logits(reference, chunk)[:, :-1], axis=-1)
        log_q = jax.nn.log_softmax(model_logits(base, chunk, delta=delta)[:, :-1], axis=-1)
        total += float(jnp.sum(jnp.exp(log_p) * (log_p - log_q)))
        count += log_p.shape[0] * log_p.shape[1]
    return total / count
