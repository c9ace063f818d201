"""OBS prune + quantize of one linear kernel: SparseGPT and GPTQ in one jitted loop.

Layout: kernel w [K, N] = [in, out] (y = x @ w), Hessian h = 2/n X^T X [K, K] over the layer inputs
X [n, K]. The published code works on torch's [out, in] weight; its "columns" are our rows (inputs).

The loop (Frantar & Alistarh, GPTQ arXiv 2210.17323 and SparseGPT arXiv 2301.00774):
  damp h by `damp * mean(diag h)`; U = upper Cholesky factor of h^-1 (U^T U = h^-1);
  for each block of B inputs: [unstructured: choose the block's mask]; for each input i in the block:
    [n:m: at the first input of each group of m, choose its mask]; [at a group's first input: its grid]
    q = quantize(w_i masked), err = (w_i - q) / U_ii, update the block's later inputs by -U_i,: err;
  then one lazy batch update of all later inputs by the block's errors.
Saliency is SparseGPT's w^2 / U_ii^2 = w^2 / [h_F^-1]_ii (F = the inputs not yet processed).

Grids: min-max over a group's current weights (pruned ones included, as published), taken when the
loop reaches the group's first input. For a group that starts inside a block we use the weights with
that block's updates so far; GPTQ reads them before those updates (a stale copy). The two agree when
group_size is a multiple of the block; otherwise ours is exact and its loss lower, and only the
unstructured mask (chosen per block) depends on block_size. Per-channel and act-order grids are
fixed up front from the original weights.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from dzjax.compress import quant
from dzjax.pallas_kernels import formats

_HIGHEST = lax.Precision.HIGHEST  # GPUs would otherwise run float32 matmuls in TF32


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObsConfig:
    """How to compress one kernel.

    bits: 2, 3, 4 or 8; 16 means no quantization (prune only).
    group_size: inputs per (scale, zero); None = one per output channel over all K inputs.
    symmetric: grid [-a, a] with zero fixed at 2^(bits-1); else min-max with an integer zero.
    act_order: process inputs by descending diag(h). Groups are then "static": their grids come from
      the original weights up front, in the original input order, so kernels need no g_idx. With n:m,
      whole groups of m consecutive inputs move together (by the sum of their diag(h)).
    sparsity: None; a float p in (0, 1) = unstructured (each block of B inputs x N outputs prunes
      exactly int(p*B*N) weights: the lowest saliency at the block's start, as SparseGPT does, whose
      threshold index prunes one more per block); or
      (n, m) / "n:m" = at most n nonzeros in every m consecutive inputs of each output (NVIDIA's 2:4).
    block_size: inputs per lazy batch update; the block used is the largest divisor of K at most this
      that is a multiple of m and, for groups without act_order, a multiple or divisor of group_size.
    damp: dampening of diag(h), relative to its mean.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_order: bool = False
    sparsity: float | tuple[int, int] | str | None = None
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self):
        formats.check_bits(self.bits)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be None or a positive int, got {self.group_size!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp!r}")
        object.__setattr__(self, "sparsity", formats.parse_sparsity(self.sparsity))

    @property
    def n_m(self) -> tuple[int, int] | None:
        return self.sparsity if isinstance(self.sparsity, tuple) else None

    def format(self, k: int) -> formats.Format:
        """How a kernel with k inputs compressed with this config is stored."""
        return formats.Format.for_matrix(k, bits=self.bits, sparsity=self.sparsity,
                                         group_size=self.group_size, symmetric=self.symmetric)

    def check(self, k: int) -> None:
        """Raise ValueError where this config cannot compress a kernel with k inputs."""
        if self.group_size is not None and self.bits != 16 and k % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide the input dim K={k}")
        if self.n_m and k % self.n_m[1]:
            raise ValueError(f"n:m sparsity {self.n_m[0]}:{self.n_m[1]} needs m to divide K={k}")


def _block_size(k: int, cfg: ObsConfig) -> int:
    m = cfg.n_m[1] if cfg.n_m else 1
    g = cfg.group_size if cfg.bits != 16 and not cfg.act_order else None
    for b in range(min(cfg.block_size, k), 0, -1):
        if k % b == 0 and b % m == 0 and (g is None or b % g == 0 or g % b == 0):
            return b
    raise ValueError(f"no block size <= {cfg.block_size} divides K={k} and fits m={m}, group={g}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HessianState:
    """Running h = 2/n X^T X over all inputs seen so far (a mean, so float32 stays well scaled)."""

    h: jax.Array  # [K, K] float32
    count: jax.Array  # [] int32, rows of X seen


def hessian_init(k: int) -> HessianState:
    return HessianState(h=jnp.zeros((k, k), jnp.float32), count=jnp.zeros((), jnp.int32))


@jax.jit
def hessian_update(state: HessianState, x: jax.Array) -> HessianState:
    """Add inputs x [..., K] (any leading shape; all rows count) to the running Hessian."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    count = state.count + x.shape[0]
    old = state.count.astype(jnp.float32) / count.astype(jnp.float32)
    x = x * jnp.sqrt(2.0 / count.astype(jnp.float32))
    return HessianState(h=state.h * old + jnp.matmul(x.T, x, precision=_HIGHEST), count=count)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ObsResult:
    """A compressed kernel. codes/scales/zeros are None when bits == 16.

    w_hat [K, N] float32: the compressed weights, 0 where pruned, == quant.grid_values(codes, scales, zeros).
    codes [K, N] uint8 in [0, 2^bits); pruned weights hold their group's zero.
    scales [K // group_size, N] float32 and zeros (same shape, uint8); [1, N] per channel.
    mask [K, N] bool, True = kept.
    loss []: the OBS objective sum (w - q)^2 / U_ii^2 / 2 over the loop, which equals
      1/2 tr(D^T h' D) with D = w - w_hat and h' the damped Hessian (= ||X D||^2 / n without damping).
    """

    w_hat: jax.Array
    codes: jax.Array | None
    scales: jax.Array | None
    zeros: jax.Array | None
    mask: jax.Array
    loss: jax.Array

    def to_quantized(self, fmt: formats.Format, k: int | None = None) -> formats.QuantizedTensor:
        """The result packed as stored in the delta file and read by the kernels; k: the real
        inputs of a problem padded by `pad_problem` (default: all rows)."""
        if fmt.bits == 16:
            return formats.quantize_to_format(self.w_hat, None, None, self.mask, fmt, k)
        return formats.quantize_to_format(self.codes, self.scales, self.zeros, self.mask, fmt, k)


def pad_problem(w: jax.Array, h: jax.Array, kp: int) -> tuple[jax.Array, jax.Array]:
    """w [K, N] and its Hessian [K, K] padded to kp inputs, as a matrix with K inputs is stored
    (`formats.Format.padded_k`): zero weights on inputs that correlate with nothing. Their
    Hessian diagonal is the mean of the real one, so the dampening is unchanged; with no cross
    terms the OBS updates never reach them, they stay exactly 0 (on the grid, which holds 0) and
    the real inputs compress exactly as they would alone, except that a short last group gets
    its own scale."""
    k = w.shape[0]
    if kp == k:
        return w, h
    pad = kp - k
    w = jnp.pad(w, ((0, pad), (0, 0)))
    fill = jnp.mean(jnp.diag(h)).astype(h.dtype)
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(
        jnp.concatenate([jnp.zeros(k, h.dtype), jnp.full(pad, fill)]))
    return w, h


def inverse_hessian_cholesky(h: jax.Array, damp: float) -> jax.Array:
    """Upper U with U^T U = (h + damp * mean(diag h) I)^-1.

    One Cholesky in reversed index order (J reverses): J h J = L L^T gives h = R R^T with R = J L J
    upper, so h^-1 = R^-T R^-1 and U = R^-1 (GPTQ's cholesky -> cholesky_inverse -> cholesky).
    """
    k = h.shape[0]
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=h.dtype)
    r = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    return lax.linalg.triangular_solve(r, jnp.eye(k, dtype=h.dtype), left_side=True, lower=False)


def _act_order(hdiag: jax.Array, cfg: ObsConfig) -> jax.Array:
    k = hdiag.shape[0]
    if not cfg.act_order:
        return jnp.arange(k)
    m = cfg.n_m[1] if cfg.n_m else 1  # keep each group of m consecutive inputs together
    order = jnp.argsort(-hdiag.reshape(k // m, m).sum(1), stable=True)
    return (order[:, None] * m + jnp.arange(m)).reshape(k)


def _unstructured_pruned(w1: jax.Array, d: jax.Array, sparsity: float,
                         real: jax.Array | None = None) -> jax.Array:
    """True for the int(sparsity * size) weights of block w1 [B, N] with the lowest w^2 / d^2;
    with `real` (bool [B]), only real rows count and are pruned (the rest pads the problem)."""
    saliency = (w1 / d[:, None]) ** 2
    if real is None:
        n_pruned = int(sparsity * w1.size)
    else:
        saliency = jnp.where(real[:, None], saliency, jnp.inf)
        n_pruned = (sparsity * jnp.sum(real) * w1.shape[1]).astype(jnp.int32)
    rank = jnp.argsort(jnp.argsort(saliency.reshape(-1), stable=True), stable=True)
    return (rank < n_pruned).reshape(w1.shape)


def _nm_pruned(wg: jax.Array, dg: jax.Array, n: int) -> jax.Array:
    """True for the m - n lowest-saliency weights of each output in one group wg [m, N]."""
    rank = jnp.argsort(jnp.argsort((wg / dg[:, None]) ** 2, axis=0), axis=0)
    return rank < wg.shape[0] - n


@functools.partial(jax.jit, static_argnames=("cfg", "rows"))
def obs_prune_quantize(w: jax.Array, h: jax.Array, cfg: ObsConfig,
                       rows: int | None = None) -> ObsResult:
    """Prune and quantize kernel w [K, N] under Hessian h [K, K] (see the module docstring).

    rows: the real inputs of a problem padded by `pad_problem` (default: all K); unstructured
    sparsity counts and prunes only those.
    A Cholesky failure (h not positive definite after damping) gives NaNs: check `loss`.
    """
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"h must be [K, K] = {(k, k)} for w {w.shape}, got {h.shape}")
    cfg.check(k)
    b = _block_size(k, cfg)
    quantized = cfg.bits != 16
    g = cfg.group_size if quantized and cfg.group_size else k
    dynamic_groups = quantized and cfg.group_size is not None and not cfg.act_order

    w, h = w.astype(jnp.float32), h.astype(jnp.float32)
    dead = jnp.diag(h) == 0  # inputs never active: weight 0, Hessian diagonal 1 (as GPTQ)
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    # Grids of per-channel and act-order runs are fixed up front from the original weights; others
    # are filled in when the loop reaches the group's first input.
    scales, zeros = quant.minmax_grid(w.reshape(k // g, g, n), bits=min(cfg.bits, 8), symmetric=cfg.symmetric)
    perm = _act_order(jnp.diag(h), cfg)
    group_of = perm // g  # grid row of each processed input, in the original order
    w = w[perm]
    real = None if rows is None else (perm < rows)  # real inputs, in processing order
    u = inverse_hessian_cholesky(h[perm][:, perm], cfg.damp)

    def refresh_grid(scales, zeros, rows, group):  # grid of one group from its current weights
        s, z = quant.minmax_grid(rows, bits=cfg.bits, symmetric=cfg.symmetric)
        return scales.at[group].set(s), zeros.at[group].set(z)

    def block(carry, i1):
        w, scales, zeros, loss = carry
        w1 = lax.dynamic_slice_in_dim(w, i1, b)  # [B, N]
        u_rows = lax.dynamic_slice_in_dim(u, i1, b)  # [B, K], zero left of the block
        u1 = lax.dynamic_slice_in_dim(u_rows, i1, b, axis=1)  # [B, B]
        d = jnp.diag(u1)
        if dynamic_groups and g >= b:
            scales, zeros = lax.cond(
                i1 % g == 0,
                lambda: refresh_grid(scales, zeros, lax.dynamic_slice_in_dim(w, i1, g), i1 // g),
                lambda: (scales, zeros))
        if isinstance(cfg.sparsity, float):
            pruned1 = _unstructured_pruned(
                w1, d, cfg.sparsity, None if real is None else lax.dynamic_slice_in_dim(real, i1, b))
        else:
            pruned1 = jnp.zeros((b, n), bool)

        def column(i, c):
            w1, pruned1, codes1, err1, scales, zeros, loss = c
            if cfg.n_m:
                nn, m = cfg.n_m
                pruned1 = lax.cond(
                    i % m == 0,
                    lambda: lax.dynamic_update_slice_in_dim(pruned1, _nm_pruned(
                        lax.dynamic_slice_in_dim(w1, i, m), lax.dynamic_slice_in_dim(d, i, m), nn), i, 0),
                    lambda: pruned1)
            if dynamic_groups and g < b:
                scales, zeros = lax.cond(
                    i % g == 0,
                    lambda: refresh_grid(scales, zeros, lax.dynamic_slice_in_dim(w1, i, g), (i1 + i) // g),
                    lambda: (scales, zeros))
            wi = w1[i]
            q = jnp.where(pruned1[i], 0.0, wi)
            code = jnp.zeros_like(q)
            if quantized:
                s, z = scales[group_of[i1 + i]], zeros[group_of[i1 + i]]
                code = quant.quantize(q, s, z, bits=cfg.bits)
                q = s * (code - z)
            err = (wi - q) / d[i]
            loss = loss + jnp.sum(err**2) / 2
            w1 = (w1 - u1[i][:, None] * err[None, :]).at[i].set(q)  # rows < i are untouched: u1 upper
            return w1, pruned1, codes1.at[i].set(code), err1.at[i].set(err), scales, zeros, loss

        zero = jnp.zeros((b, n), jnp.float32)
        q1, pruned1, codes1, err1, scales, zeros, loss = lax.fori_loop(
            0, b, column, (w1, pruned1, zero, zero, scales, zeros, loss))
        # Lazy batch update of all later inputs; u_rows is zero before the block, and the block's own
        # rows are then overwritten with their final values.
        w = w - jnp.matmul(u_rows.T, err1, precision=_HIGHEST)
        w = lax.dynamic_update_slice_in_dim(w, q1, i1, 0)
        return (w, scales, zeros, loss), (codes1, pruned1)

    (w, scales, zeros, loss), (codes, pruned) = lax.scan(
        block, (w, scales, zeros, jnp.zeros((), jnp.float32)), jnp.arange(0, k, b))
    codes, pruned = codes.reshape(k, n), pruned.reshape(k, n)
    inverse = jnp.argsort(perm)
    mask = ~pruned[inverse]
    if not quantized:
        return ObsResult(w_hat=w[inverse], codes=None, scales=None, zeros=None, mask=mask, loss=loss)
    codes = codes[inverse].astype(jnp.uint8)
    zeros = zeros.astype(jnp.uint8)
    w_hat = quant.grid_values(codes, scales, zeros)
    return ObsResult(w_hat=w_hat, codes=codes, scales=scales, zeros=zeros, mask=mask, loss=loss)


@functools.partial(jax.jit, static_argnames=("cfg", "rows"))
def round_to_nearest(w: jax.Array, cfg: ObsConfig, h: jax.Array | None = None,
                     rows: int | None = None) -> ObsResult:
    """Baseline: magnitude pruning (same mask rules as OBS, blocks of `_block_size`), then the grid of
    the pruned weights and rounding to nearest. loss = 1/2 tr(D^T h D) if h is given, else NaN.
    rows: as in `obs_prune_quantize`."""
    k, n = w.shape
    cfg.check(k)
    w = w0 = w.astype(jnp.float32)
    if isinstance(cfg.sparsity, float):
        b = _block_size(k, cfg)
        blocks = w.reshape(k // b, b, n)
        if rows is None:
            pruned = jax.vmap(lambda wb: _unstructured_pruned(wb, jnp.ones(b), cfg.sparsity))(blocks)
        else:
            real = (jnp.arange(k) < rows).reshape(k // b, b)
            pruned = jax.vmap(lambda wb, rb: _unstructured_pruned(
                wb, jnp.ones(b), cfg.sparsity, rb))(blocks, real)
        pruned = pruned.reshape(k, n)
    elif cfg.n_m:
        nn, m = cfg.n_m
        pruned = jax.vmap(lambda wg: _nm_pruned(wg, jnp.ones(m), nn))(w.reshape(k // m, m, n)).reshape(k, n)
    else:
        pruned = jnp.zeros((k, n), bool)
    w = jnp.where(pruned, 0.0, w)
    codes = scales = zeros = None
    if cfg.bits != 16:
        g = cfg.group_size or k
        scales, zeros = quant.minmax_grid(w.reshape(k // g, g, n), bits=cfg.bits, symmetric=cfg.symmetric)
        codes = quant.quantize(w.reshape(k // g, g, n), scales[:, None], zeros[:, None], bits=cfg.bits)
        codes, zeros = codes.reshape(k, n).astype(jnp.uint8), zeros.astype(jnp.uint8)
        w_hat = quant.grid_values(codes, scales, zeros)
    else:
        w_hat = w
    loss = jnp.nan if h is None else reconstruction_loss(w0, w_hat, h)
    return ObsResult(w_hat=w_hat, codes=codes, scales=scales, zeros=zeros, mask=~pruned,
                     loss=jnp.asarray(loss, jnp.float32))


def reconstruction_loss(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
    """1/2 tr((w - w_hat)^T h (w - w_hat)) = ||X (w - w_hat)||_F^2 / n for h = 2/n X^T X."""
    d = (w - w_hat).astype(jnp.float32)
    return 0.5 * jnp.sum(d * jnp.matmul(h.astype(jnp.float32), d, precision=_HIGHEST))
