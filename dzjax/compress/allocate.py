"""`convert(..., target_bits=B)`: bits and sparsity per matrix, from measured sensitivity, to fit a
size budget (beyond DeltaZip, which compresses every matrix alike).

Sensitivity is measured, not assumed. One pass of the fine-tune over the calibration tokens
(nothing compressed yet) gives each decoder layer's inputs and outputs. Each unit (a group of
matrices that must share one format: q/k/v and gate/up are fused into one matrix when served,
and deltas served together share one layout) is rounded to nearest at each option of `OPTIONS`,
and its error measured where the units' errors meet: 1/2 the squared change of its layer's
output (the residual stream) over the calibration tokens, with that unit alone compressed. Its
cost is the bytes the option stores. (The first measure, the error at the unit's own outputs
1/2 tr(E^T H E), counted a change of q/k/v, before the softmax, like one of o/down, into the
residual stream; its choices lost to uniform settings, these beat them: measured by
`benchmarks/compression.py allocation`.)

The choice is the classic greedy one on each unit's lower convex hull of (bytes, error): every unit
starts at its cheapest option, and the step that buys the most error reduction per byte is taken
while it fits the budget. The budget is the whole delta's bits per weight (the report's
`bits_per_weight`): the embeddings and the lm_head keep their own settings and, with the norms
and biases stored exactly, are a fixed cost; the block matrices share what is left.

The result maps each matrix's HF name to {"bits", "sparsity"}; convert records it in the file
(`settings.allocation`), and passing it, or the file, as `convert(..., allocation=...)` converts
another fine-tune of the same base with the same layout, so the two can be served together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from dzjax.compress.delta_file import exact_nbytes
from dzjax.compress.layer_pass import STAGES, count_params, layer_outputs, layer_pass
from dzjax.compress.obs import ObsConfig, round_to_nearest
from dzjax.errors import DzjaxError
from dzjax.models.linear import embed
from dzjax.models.loading import flatten_params
from dzjax.pallas_kernels.reference import dequantize

# The options a unit may take: (bits, sparsity), at the convert's group size. Dominated options
# (more bytes and more error than another) drop out on their own.
OPTIONS = ((2, None), (3, None), (4, "2:4"), (4, None), (8, "2:4"), (8, None))


def units(num_layers: int) -> list[tuple[str, ...]]:
    """The groups of matrices (HF names) that take one option each, in convert's order."""
    groups = []
    for i in range(num_layers):
        p = f"model.layers.{i}"
        groups += [tuple(f"{p}.self_attn.{x}.weight" for x in ("q_proj", "k_proj", "v_proj")),
                   (f"{p}.self_attn.o_proj.weight",),
                   tuple(f"{p}.mlp.{x}.weight" for x in ("gate_proj", "up_proj")),
                   (f"{p}.mlp.down_proj.weight",)]
    return groups


@dataclasses.dataclass(frozen=True)
class Measured:
    """One option of one unit: the bytes it stores and its Hessian-weighted error."""

    option: tuple[int, str | None]
    nbytes: int
    error: float


def _hull(points: list[Measured]) -> list[Measured]:
    """The options on the lower convex hull of (bytes, error), by bytes: each step costs more
    bytes and buys less error reduction per byte than the one before."""
    best: dict[int, Measured] = {}
    for p in points:  # of equal size, the lower error
        if p.nbytes not in best or p.error < best[p.nbytes].error:
            best[p.nbytes] = p
    hull: list[Measured] = []
    for p in sorted(best.values(), key=lambda m: m.nbytes):
        if hull and p.error >= hull[-1].error:
            continue  # more bytes, no less error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a-p: going a -> p directly is a better rate
            if (a.error - b.error) * (p.nbytes - a.nbytes) <= \
                    (a.error - p.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def choose(measured: dict[tuple[str, ...], list[Measured]], budget: int) -> dict[tuple, Measured]:
    """The option of each unit that minimizes the summed error within `budget` bytes (greedy on
    the hulls). Raises a DzjaxError if even the cheapest options exceed it."""
    hulls = {unit: _hull(points) for unit, points in measured.items()}
    at = {unit: 0 for unit in hulls}
    spent = sum(h[0].nbytes for h in hulls.values())
    if spent > budget:
        raise ValueError(f"needs at least {spent} bytes for the block matrices, the budget "
                         f"leaves {budget}")
    while True:
        steps = []
        for unit, h in hulls.items():
            i = at[unit]
            if i + 1 < len(h) and spent + h[i + 1].nbytes - h[i].nbytes <= budget:
                gain = (h[i].error - h[i + 1].error) / (h[i + 1].nbytes - h[i].nbytes)
                steps.append((gain, unit))
        if not steps:
            break
        _, unit = max(steps, key=lambda s: s[0])
        h, i = hulls[unit], at[unit]
        spent += h[i + 1].nbytes - h[i].nbytes
        at[unit] = i + 1
    return {unit: hulls[unit][i] for unit, i in at.items()}


def as_allocation(chosen: dict[tuple, Measured]) -> dict[str, dict]:
    return {name: {"bits": m.option[0], "sparsity": m.option[1]}
            for unit, m in chosen.items() for name in unit}


def read(source, where: str = "allocation") -> dict[str, dict]:
    """An allocation given as a dict, a JSON file of one, or a delta file that records one."""
    if not isinstance(source, (str, Path)):
        return source  # a mapping (or not: `check` says what is wrong)
    path = Path(source)
    if not path.is_file():
        raise DzjaxError(f"{where}: {path} is not a file (a delta file or a JSON allocation)")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DzjaxError(f"{where}: {path} is not a JSON allocation: {e}") from None
        return data.get("allocation", data) if isinstance(data, dict) else data
    from dzjax.compress.delta_file import read_metadata  # (delta_file is imported above too)

    allocation = read_metadata(path).get("settings", {}).get("allocation")
    if allocation is None:
        raise DzjaxError(f"{where}: the delta file {path} was converted without target_bits or "
                         f"an allocation: it records none")
    return allocation


def check(allocation, num_layers: int, where: str = "allocation") -> dict[str, dict]:
    """Validate an allocation for a model of `num_layers` (every block matrix named once, with
    valid bits and sparsity, one option per fused unit); returns it normalized."""
    from dzjax.pallas_kernels import formats

    if not isinstance(allocation, dict):
        raise DzjaxError(f"{where}: expected a mapping of matrix names to {{'bits', 'sparsity'}}, "
                         f"got {type(allocation).__name__}")
    expected = [name for unit in units(num_layers) for name in unit]
    unknown = sorted(set(allocation) - set(expected))
    missing = [n for n in expected if n not in allocation]
    if unknown or missing:
        raise DzjaxError(f"{where}: " + "; ".join(
            ([f"names no block matrix of this {num_layers}-layer model: {unknown[:3]}"]
             if unknown else []) + ([f"misses {len(missing)} matrices, e.g. {missing[0]}"]
                                    if missing else [])))
    out = {}
    for name in expected:
        entry = allocation[name]
        if not isinstance(entry, dict) or set(entry) - {"bits", "sparsity"} or "bits" not in entry:
            raise DzjaxError(f"{where}: {name}: expected {{'bits': int, 'sparsity': ...}}, "
                             f"got {entry!r}")
        try:
            bits = formats.check_bits(entry["bits"])
            sparsity = formats.parse_sparsity(entry.get("sparsity"))
        except ValueError as e:
            raise DzjaxError(f"{where}: {name}: {e}") from None
        if isinstance(sparsity, tuple):
            sparsity = f"{sparsity[0]}:{sparsity[1]}"
        out[name] = {"bits": bits, "sparsity": sparsity}
    for unit in units(num_layers):
        if len({json.dumps(out[n], sort_keys=True) for n in unit}) > 1:
            raise DzjaxError(f"{where}: {', '.join(unit)} are served as one fused matrix and "
                             f"need one option, got {[out[n] for n in unit]}")
    return out


def summary(allocation: dict[str, dict]) -> dict[str, int]:
    """How many matrices took each option, e.g. {"2-bit": 40, "4-bit 2:4": 16}."""
    counts: dict[str, int] = {}
    for entry in allocation.values():
        label = f"{entry['bits']}-bit" + (f" {entry['sparsity']}" if entry["sparsity"] else "")
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


# -- the measurement pass ----------------------------------------------------------------------

def allocated(cfg, run, tokens, progress: bool):
    """cfg (a `ConvertConfig`) with the allocation that fits its target_bits, measured on the
    fine-tune of `run` (convert's pipeline state)."""
    n_params = count_params(run.reader.key_map)
    measured, fixed = measure(run, tokens)
    try:
        chosen = choose(measured, int(cfg.target_bits * n_params / 8) - fixed)
    except ValueError:
        least = fixed + sum(min(m.nbytes for m in ms) for ms in measured.values())
        raise DzjaxError(
            f"target_bits={cfg.target_bits} is below the smallest this delta can be: "
            f"{least * 8 / n_params:.3f} bits/weight, with every block matrix at the cheapest of "
            f"{OPTIONS} and the embeddings at their own settings") from None
    allocation = as_allocation(chosen)
    if progress:
        predicted = (fixed + sum(m.nbytes for m in chosen.values())) * 8 / n_params
        print(f"[convert] target_bits {cfg.target_bits}: "
              + ", ".join(f"{n} x {label}" for label, n in summary(allocation).items())
              + f" ({predicted:.3f} bits/weight)", file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, allocation=allocation)


def measure(run, tokens) -> tuple[dict, int]:
    """For `target_bits`: each unit of `run` (convert's pipeline state)'s options, measured on the fine-tune's
    own activations (nothing compressed), and the bytes of all the allocation does not
    choose (the embeddings and lm_head at their settings, the exact norms and biases)."""
    cfg, config = run.cfg, run.config

    def fixed_matrix(w, embedding_like: bool) -> int:
        if not cfg.compress_embeddings:
            return exact_nbytes(w)
        k, n = w.shape
        return cfg.obs_config(k, embedding=embedding_like).format(k).nbytes(k, n)

    table, ft_table = run.reader.pair(("model", "embed_tokens", "embedding"))
    fixed = fixed_matrix((ft_table - table).T, True)
    x = embed(jnp.asarray(tokens), jnp.asarray(ft_table))
    del table, ft_table
    measured = {}
    for i in range(config.num_layers):
        prefix = ("model", f"layers_{i}")
        layer_base, layer_ft = run.reader.subtree(prefix)
        delta = jax.tree.map(lambda f, b: jnp.asarray(f - b), layer_ft, layer_base)
        del layer_ft
        forward = functools.partial(layer_pass, jax.tree.map(jnp.asarray, layer_base),
                                config=config, window=config.sliding_windows[i],
                                kernels=run.kernels)
        exact = layer_outputs(forward, delta, x)
        for module, names in STAGES:
            unit = tuple(f"model.layers.{i}.{module}.{p}.weight" for p in names)
            options, refusals = [], []
            for option in OPTIONS:
                nbytes, changed = 0, jax.tree.map(lambda a: a, delta)  # (a new tree: delta
                # itself stays the fine-tune's)
                try:
                    for proj, name in zip(names, unit):
                        w = delta[module][proj]["kernel"]
                        obs = dataclasses.replace(cfg.obs_config(w.shape[0]), bits=option[0],
                                                  sparsity=option[1])
                        b, w_hat = _rounded(w, obs, name)
                        nbytes += b
                        changed[module][proj]["kernel"] = w_hat
                except DzjaxError as e:  # an option this shape cannot take: not offered
                    refusals.append(str(e))
                    continue
                # The error where the units' errors meet: the layer's output (the residual
                # stream), with this unit alone compressed.
                error = 0.5 * float(jnp.sum((layer_outputs(forward, changed, x) - exact) ** 2))
                options.append(Measured(option, nbytes, error))
            if not options:
                raise DzjaxError(f"{', '.join(unit)}: no allocation option fits: "
                                 + "; ".join(refusals))
            measured[unit] = options
        matrices = {(module, proj, "kernel") for module, names in STAGES for proj in names}
        fixed += sum(exact_nbytes(leaf) for keys, leaf in flatten_params(delta).items()
                     if keys not in matrices)
        x = exact  # (the next layer's inputs)
    norm, ft_norm = run.reader.pair(("model", "norm", "weight"))
    fixed += exact_nbytes(ft_norm - norm)
    if not config.tie_word_embeddings:
        head, ft_head = run.reader.pair(("lm_head", "kernel"))
        fixed += fixed_matrix(ft_head - head, True)
    return measured, fixed


def _rounded(w, obs: ObsConfig, name: str) -> tuple[int, jax.Array]:
    """(bytes, the dense matrix) of w rounded to nearest with `obs`, stored as convert would."""
    k = w.shape[0]
    try:
        fmt = obs.format(k)
        fmt.check_shape(*w.shape, name)
    except ValueError as e:
        raise DzjaxError(f"{name}: {e}") from None
    w = jnp.asarray(w)
    w_pad = jnp.pad(w, ((0, fmt.padded_k(k) - k), (0, 0)))  # (as `obs.pad_problem` pads it)
    q = round_to_nearest(w_pad, obs, rows=None if w_pad.shape[0] == k else k).to_quantized(fmt, k)
    return q.nbytes, dequantize(q)
