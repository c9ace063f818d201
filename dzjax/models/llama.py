"""Flax definitions of the Llama family: Llama (rope none / llama3), Mistral, Qwen2 and Qwen3.

Parameters mirror the HF names (`model.layers_3.self_attn.q_proj.kernel` is HF's
`model.layers.3.self_attn.q_proj.weight`, transposed to [in, out]). The forward pass takes the
base params through `apply` and a delta pytree of the same structure (any subtree may be missing,
meaning "no delta there") as an argument; every weight is reached through `dzjax.models.linear`.
How compressed deltas are computed (kernel implementation, tensor-parallel mesh) is the static
field `kernels` of every module that reaches a weight (`KernelOptions`), set once on `CausalLM`.
Flax names every module's ops by its path (model/layers_3/self_attn/q_proj/...); the steps inside
a module that a profile should tell apart carry `jax.named_scope`s (kv_cache_write, attention,
paged_attention, tied_lm_head, and in `linear` delta_matmul, multi_delta_matmul, delta_embed).
The KV cache (`dzjax.models.kv_cache`, contiguous or paged) is an argument: each attention layer
hands it its new keys and values and gets the output and the updated cache back.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dzjax.models import fusion
from dzjax.models.config import ModelConfig, RopeConfig
from dzjax.models.kernel_options import DEFAULT_KERNELS, KernelOptions
from dzjax.models.kv_cache import KVCache, attention  # noqa: F401  (KVCache: re-exported)
from dzjax.models.linear import add_delta, embed, linear, unembed

_INIT = nn.initializers.normal(0.02)
SCORE_CHUNK = 128  # positions whose [B, chunk, V] logits exist at once when scoring


def log_probs(logits, tokens, top: int):
    """log_softmax(logits) [..., V] at `tokens` [...], and its `top` largest entries:
    (logprob [...], top ids int32 [..., top], top logprobs [..., top]); top = 0 gives empty."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if top:
        values, ids = jax.lax.top_k(lp, top)
    else:
        values = jnp.zeros(lp.shape[:-1] + (0,), jnp.float32)
        ids = jnp.zeros(lp.shape[:-1] + (0,), jnp.int32)
    return chosen, ids.astype(jnp.int32), values


def score_positions(head, x, targets, top: int):
    """`log_probs` of head(x) at every position of x [B, T, H] for targets [B, T], SCORE_CHUNK
    positions at a time (never the whole [B, T, V] logits): ([B, T], [B, T, top], [B, T, top])."""
    parts = [log_probs(head(x[:, s:s + SCORE_CHUNK]), targets[:, s:s + SCORE_CHUNK], top)
             for s in range(0, x.shape[1], SCORE_CHUNK)]
    return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))


def sub(delta, name: str):
    """The delta of child `name`, or None when the delta does not touch it."""
    return None if delta is None else delta.get(name)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, with llama3 scaling when configured."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq
    # llama3: long wavelengths slowed down by `factor`, short ones kept, a smooth blend between.
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > old_len / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= old_len / rope.high_freq_factor) & (wavelen <= old_len / rope.low_freq_factor)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate x [B, T, heads, D] by angle position * inv_freq (HF's rotate-half convention)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Linear(nn.Module):
    features: int
    use_bias: bool = False
    param_dtype: jnp.dtype = jnp.float32
    kernels: KernelOptions = DEFAULT_KERNELS

    @nn.compact
    def __call__(self, x, delta=None):
        kernel = self.param("kernel", _INIT, (x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        self.sow("linear_inputs", "x", x)  # recorded only when compression asks (mutable)
        return linear(x, kernel, sub(delta, "kernel"), bias, sub(delta, "bias"),
                      kernels=self.kernels)


class RMSNorm(nn.Module):
    eps: float
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, delta=None):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        weight = add_delta(weight, sub(delta, "weight"), ndim=x.ndim)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (weight.astype(x.dtype) * normed.astype(x.dtype)).astype(x.dtype)


class Embed(nn.Module):
    vocab_size: int
    features: int
    param_dtype: jnp.dtype = jnp.float32
    kernels: KernelOptions = DEFAULT_KERNELS

    def setup(self):
        self.embedding = self.param("embedding", _INIT, (self.vocab_size, self.features),
                                    self.param_dtype)

    def __call__(self, ids, delta=None):
        return embed(ids, self.embedding, sub(delta, "embedding"))

    def attend(self, h, delta=None):
        """Tied output projection: h @ (embedding + delta)^T."""
        return unembed(h, self.embedding, sub(delta, "embedding"), kernels=self.kernels)


class Attention(nn.Module):
    config: ModelConfig
    window: int | None
    param_dtype: jnp.dtype = jnp.float32
    kernels: KernelOptions = DEFAULT_KERNELS

    @nn.compact
    def __call__(self, x, positions, cache, layer: int, delta=None):
        c, pd, kn = self.config, self.param_dtype, self.kernels
        b, t, _ = x.shape
        if kn.fused_projections:  # one matmul for q, k and v (`dzjax.models.fusion`)
            sizes = fusion.part_sizes(c, "self_attn")
            qkv = Linear(sum(sizes), c.qkv_bias, pd, kn, name="qkv_proj")(
                x, sub(delta, "qkv_proj"))
            q, k, v = fusion.split_columns(qkv, sizes, kn.shards)
        else:
            q = Linear(c.num_heads * c.head_dim, c.qkv_bias, pd, kn, name="q_proj")(
                x, sub(delta, "q_proj"))
            k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, pd, kn, name="k_proj")(
                x, sub(delta, "k_proj"))
            v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, pd, kn, name="v_proj")(
                x, sub(delta, "v_proj"))
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:  # Qwen3: RMSNorm over each head, before the rotation
            q = RMSNorm(c.rms_norm_eps, pd, name="q_norm")(q, sub(delta, "q_norm"))
            k = RMSNorm(c.rms_norm_eps, pd, name="k_norm")(k, sub(delta, "k_norm"))
        inv_freq = rope_inv_freq(c.rope, c.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is None:  # a plain forward pass over the whole sequence
            with jax.named_scope("attention"):
                out = attention(q, k, v, positions, positions, self.window)
        else:  # the cache writes this step's keys/values and attends over what it holds
            out, cache = cache.attend(layer, q, k, v, positions, self.window, kn)
        out = Linear(c.hidden_size, c.o_bias, pd, kn, name="o_proj")(out, sub(delta, "o_proj"))
        return out, cache


class MLP(nn.Module):
    config: ModelConfig
    param_dtype: jnp.dtype = jnp.float32
    kernels: KernelOptions = DEFAULT_KERNELS

    @nn.compact
    def __call__(self, x, delta=None):
        c, pd, kn = self.config, self.param_dtype, self.kernels
        if kn.fused_projections:  # one matmul for gate and up
            gate, up = fusion.split_columns(
                Linear(2 * c.intermediate_size, c.mlp_bias, pd, kn, name="gate_up_proj")(
                    x, sub(delta, "gate_up_proj")), fusion.part_sizes(c, "mlp"), kn.shards)
        else:
            gate = Linear(c.intermediate_size, c.mlp_bias, pd, kn, name="gate_proj")(
                x, sub(delta, "gate_proj"))
            up = Linear(c.intermediate_size, c.mlp_bias, pd, kn, name="up_proj")(
                x, sub(delta, "up_proj"))
        return Linear(c.hidden_size, c.mlp_bias, pd, kn, name="down_proj")(
            jax.nn.silu(gate) * up, sub(delta, "down_proj"))


class DecoderLayer(nn.Module):
    config: ModelConfig
    window: int | None
    param_dtype: jnp.dtype = jnp.float32
    kernels: KernelOptions = DEFAULT_KERNELS

    @nn.compact
    def __call__(self, x, positions, cache, layer: int, delta=None):
        c, pd, kn = self.config, self.param_dtype, self.kernels
        h = RMSNorm(c.rms_norm_eps, pd, name="input_layernorm")(x, sub(delta, "input_layernorm"))
        h, cache = Attention(c, self.window, pd, kn, name="self_attn")(
            h, positions, cache, layer, sub(delta, "self_attn"))
        x = x + h
        h = RMSNorm(c.rms_norm_eps, pd, name="post_attention_layernorm")(
            x, sub(delta, "post_attention_layernorm"))
        return x + MLP(c, pd, kn, name="mlp")(h, sub(delta, "mlp")), cache


class Transformer(nn.Module):
    """The decoder stack (HF's `model`): embedding, layers, final norm."""

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernels: KernelOptions = DEFAULT_KERNELS

    def setup(self):
        c, pd, kn = self.config, self.param_dtype, self.kernels
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, pd, kn)
        self.layers = [DecoderLayer(c, c.sliding_windows[i], pd, kn)
                       for i in range(c.num_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, pd)

    def __call__(self, input_ids, positions, delta=None, cache=None):
        x = self.embed_tokens(input_ids, sub(delta, "embed_tokens")).astype(self.dtype)
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, positions, cache, i, sub(delta, f"layers_{i}"))
            self.sow("intermediates", "hidden_states", x)
        return self.norm(x, sub(delta, "norm")), cache

    def attend(self, x, delta=None):
        return self.embed_tokens.attend(x, sub(delta, "embed_tokens"))


class CausalLM(nn.Module):
    """LlamaForCausalLM and its relatives.

    CausalLM(config, dtype, kernels=KernelOptions(...)).apply({"params": params}, ...)
    __call__(input_ids [B, T], positions [B, T], delta=None, cache=None, logits_at=None)
    returns float32 logits [B, T, V] and the updated cache (None without one); with `logits_at`
    (int [B]), only the logits at that position of each row, [B, 1, V] (a prefill needs only the
    last prompt position's: no [B, T, V] array). With `score=(targets [B, T], top)` it returns,
    instead of logits, `score_positions`'s log-probabilities of the targets (and the `top`
    likeliest tokens) at every position, computed SCORE_CHUNK positions at a time; with both,
    (those, the `logits_at` logits). The hidden state after every layer is sown into
    the `intermediates` collection, for per-block tests.
    """

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32  # activations
    param_dtype: jnp.dtype = jnp.float32  # only used by init (synthetic models)
    kernels: KernelOptions = DEFAULT_KERNELS  # how compressed deltas are computed

    @nn.compact
    def __call__(self, input_ids, positions, delta=None, cache=None, logits_at=None,
                 score=None):
        c = self.config
        model = Transformer(c, self.dtype, self.param_dtype, self.kernels, name="model")
        x, cache = model(input_ids, positions, sub(delta, "model"), cache)
        if c.tie_word_embeddings:
            def head(x):
                with jax.named_scope("tied_lm_head"):
                    return model.attend(x, sub(delta, "model")).astype(jnp.float32)
        else:
            lm_head = Linear(c.vocab_size, False, self.param_dtype, self.kernels, name="lm_head")
            head = lambda x: lm_head(x, sub(delta, "lm_head")).astype(jnp.float32)
        scored = None if score is None else score_positions(head, x, *score)
        if scored is not None and logits_at is None:
            return scored, cache
        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]
        return (head(x) if scored is None else (scored, head(x))), cache
