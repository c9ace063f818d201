"""Refinement of a compressed delta's scales with optax, after OBS (`convert(..., refine_steps=N)`).

OBS fixes the codes and fits each matrix on its own Hessian. The scales can still move: like
BitDelta's scale distillation, but on top of OBS codes, each layer's scales (one per group and
output, as a multiplier exp(a) on the OBS scale) are trained with Adam so that the compressed
layer's output matches the fine-tune's layer on the same inputs (the calibration activations of
the compressed model so far, so a layer also makes up for the error of those before it), and the
lm_head's so that the logits match the fine-tune's (KL on the calibration tokens). Memory stays
that of the sequential pipeline: one layer's weights, its inputs and its targets.

Codes, zero points and n:m positions are untouched (integers in the file: a zero point stays where
OBS put it), so pruned weights stay exactly 0. The refined scales are rounded to bfloat16 as
stored, and kept only if that lowers the loss over all calibration samples.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from dzjax.models.kernel_options import KernelOptions
from dzjax.pallas_kernels.formats import QuantizedTensor

XLA = KernelOptions(implementation="xla")  # differentiable (the Pallas kernels have no VJP)


def _scales(delta) -> dict[str, jax.Array]:
    """{path: float32 scales} of every compressed matrix in a pytree of deltas."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            delta, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0]:
        if isinstance(leaf, QuantizedTensor) and leaf.scales is not None:
            found[jax.tree_util.keystr(path)] = leaf.scales.astype(jnp.float32)
    return found


def _with_scales(delta, scales: dict[str, jax.Array]):
    """`delta` with the scales of its compressed matrices replaced (by path)."""
    def put(path, leaf):
        key = jax.tree_util.keystr(path)
        if isinstance(leaf, QuantizedTensor) and key in scales:
            return dataclasses.replace(leaf, scales=scales[key])
        return leaf
    return jax.tree_util.tree_map_with_path(put, delta,
                                            is_leaf=lambda x: isinstance(x, QuantizedTensor))


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))


def _fit(loss, batches, consts, scales0: dict, steps: int, lr: float):
    """Adam on a = log(scale / scale0) of loss(scales, batch, consts) for `steps` steps over
    `batches` (cycled); the weights are arguments (`consts`), not constants baked into the jitted
    step. Returns the bf16-rounded scales and the mean loss over all batches (before, after),
    keeping scales0 (and reporting its loss twice) when the refined ones do no better."""
    tx = _optimizer(lr, steps)

    @jax.jit
    def step(a, opt_state, batch, consts):
        value, grads = jax.value_and_grad(lambda a: loss(
            jax.tree.map(lambda s, x: s * jnp.exp(x), scales0, a), batch, consts))(a)
        updates, opt_state = tx.update(grads, opt_state, a)
        return optax.apply_updates(a, updates), opt_state, value

    evaluate = jax.jit(loss)

    def mean_loss(scales):
        return sum(float(evaluate(scales, b, consts)) for b in batches) / len(batches)

    a = jax.tree.map(jnp.zeros_like, scales0)
    opt_state = tx.init(a)
    for t in range(steps):
        a, opt_state, _ = step(a, opt_state, batches[t % len(batches)], consts)
    stored = lambda s: s.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    refined = jax.tree.map(lambda s, x: stored(s * jnp.exp(x)), scales0, a)
    before, after = mean_loss(jax.tree.map(stored, scales0)), mean_loss(refined)
    if after < before:
        return refined, (before, after)
    return scales0, (before, before)  # nothing better: the OBS scales stay


def refine_layer(layer_pass, params, delta, dense, x, *, steps: int, lr: float, chunk: int):
    """Refine the scales of one compressed decoder layer.

    Args:
      layer_pass: (params, delta, x) -> the layer's output [n, T, D] (jitted, XLA kernels).
      params: its base weights; delta: its delta with `QuantizedTensor` matrices; dense: the
        same delta, exact (the fine-tune's layer).
      x: its calibration inputs [n, T, D]; chunk: samples per step.
    Returns:
      (delta with refined bfloat16 scales, (mean squared error before, after)), or (delta,
      None) when it has no scales.
    """
    if not _scales(delta):  # 16-bit matrices: no scales to train
        return delta, None
    batches = [(x[s:s + chunk], layer_pass(params, dense, x[s:s + chunk]))
               for s in range(0, len(x), chunk)]

    def loss(scales, batch, consts):
        (xs, target), (params, delta) = batch, consts
        return jnp.mean((layer_pass(params, _with_scales(delta, scales), xs) - target) ** 2)

    scales, losses = _fit(loss, batches, (params, delta), _scales(delta), steps, lr)
    return _with_scales(delta, {k: v.astype(jnp.bfloat16) for k, v in scales.items()}), losses


def refine_head(q: QuantizedTensor, normed, head, ft_head, *, steps: int, lr: float,
                chunk: int):
    """Refine the scales of a compressed lm_head delta q so that the logits of the final
    states `normed` [n, T, D] match the fine-tune's (KL(fine-tune || compressed) per token).
    Returns (q with refined bfloat16 scales, (KL before, KL after))."""
    from dzjax.models.linear import linear

    batches = [normed[s:s + chunk] for s in range(0, len(normed), chunk)]

    def loss(scales, hs, consts):
        q, head, ft_head = consts
        teacher = jax.nn.log_softmax(linear(hs, ft_head), axis=-1)
        student = jax.nn.log_softmax(
            linear(hs, head, dataclasses.replace(q, scales=scales["q"]), kernels=XLA), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1))

    scales, losses = _fit(loss, batches, (q, head, ft_head),
                          {"q": q.scales.astype(jnp.float32)}, steps, lr)
    return dataclasses.replace(q, scales=scales["q"].astype(jnp.bfloat16)), losses
