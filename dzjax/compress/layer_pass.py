"""One decoder layer run on the calibration activations, and the Hessians of its linear inputs:
the pieces that convert's sequential pipeline and target_bits' measurement pass share."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dzjax.compress.obs import hessian_init, hessian_update
from dzjax.models.llama import DecoderLayer

# Linears compressed together on one Hessian, in the order their inputs become available.
STAGES = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
CHUNK = 8  # calibration samples per forward pass


@functools.partial(jax.jit, static_argnames=("config", "window", "capture", "kernels"))
def layer_pass(params, delta, x, *, config, window, capture, kernels):
    """Run one decoder layer on x [n, T, D]; returns its output and the inputs of `capture`."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    out, state = DecoderLayer(config, window, kernels=kernels).apply(
        {"params": params}, x, positions, cache=None, layer=0, delta=delta,
        mutable=["linear_inputs"])
    inputs = None
    if capture is not None:
        inputs = state["linear_inputs"][capture[0]][capture[1]]["x"][0]
    return out[0], inputs


def hessian(run, xs: np.ndarray):
    """H = 2/n X^T X of the captured linear inputs over all calibration chunks."""
    state = None
    for start in range(0, len(xs), CHUNK):
        inputs = run(xs[start:start + CHUNK])
        if state is None:
            state = hessian_init(inputs.shape[-1])
        state = hessian_update(state, inputs.reshape(-1, inputs.shape[-1]))
    return state.h


def layer_outputs(run, delta, x):
    """The layer's outputs on all of x, CHUNK samples at a time."""
    return jnp.concatenate([run(delta, x[s:s + CHUNK], capture=None)[0]
                            for s in range(0, len(x), CHUNK)])


def count_params(key_map: dict) -> int:
    """Parameters of a model, from its HF key map ({name: (keys, transposed, shape)})."""
    return sum(int(np.prod(shape)) for _, _, shape in key_map.values())
