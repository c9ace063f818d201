"""The KV cache, in two layouts with one interface: each attention layer hands its new keys and
values to `cache.attend(layer, q, k, v, positions, window, kernels)` and gets the attention
output and the updated cache back.

  KVCache       contiguous: layer l's keys k[l] [B, S, kv_heads, D]; slot j holds position j.
                What `dzjax.generate` and a prefill's own prompts use.
  PagedKVCache  pages: layer l's keys k[l] [kv_heads, P, page_size, D] (the layout of jax's
                `pallas.ops.gpu.paged_attention`); row b's position p lives in page
                block_tables[b, p // page_size] at offset p % page_size. Attention reads the first
                `num_pages` pages of each row (a static bucket of the longest live row), so its
                cost follows the tokens in use, not the pool's capacity. What serving decodes on.

Every layer is its own buffer (a tuple of arrays, never one stacked array): a step writes its new
keys and values with an in-place update of the donated buffer, and nothing copies the cache.
Writes to an out-of-range position or page (idle rows, padding) are dropped.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def attention(q, k, v, q_pos, k_pos, window: int | None) -> jax.Array:
    """Causal grouped-query attention, in XLA.

    Args:
      q: [B, T, H, D]; k, v: [B, S, Hkv, D] with H a multiple of Hkv.
      q_pos: [B, T] and k_pos: [B, S] absolute positions; key j is seen by query i when
        k_pos[j] <= q_pos[i] (and k_pos[j] > q_pos[i] - window with a sliding window).
    Returns:
      [B, T, H * D] in q's dtype.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h * d).astype(q.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, indexed by absolute position: slot j holds position j."""

    k: tuple[jax.Array, ...]  # per layer [B, S, kv_heads, D]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self):
        return self.k[0].dtype

    def attend(self, layer: int, q, k, v, positions, window, kernels):
        """Write k, v [B, T, kv_heads, D] at `positions` [B, T], attend over the whole cache."""
        with jax.named_scope("kv_cache_write"):
            rows = jnp.arange(q.shape[0])[:, None]
            keys = self.k[layer].at[rows, positions].set(k.astype(self.dtype), mode="drop")
            values = self.v[layer].at[rows, positions].set(v.astype(self.dtype), mode="drop")
        b, s = keys.shape[:2]
        with jax.named_scope("attention"):
            out = attention(q, keys.astype(q.dtype), values.astype(q.dtype), positions,
                            jnp.broadcast_to(jnp.arange(s), (b, s)), window)
        return out, dataclasses.replace(self, k=_set(self.k, layer, keys),
                                        v=_set(self.v, layer, values))


def _set(layers: tuple, i: int, value) -> tuple:
    return layers[:i] + (value,) + layers[i + 1:]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPages:
    """The page pool of a paged cache: every layer's keys and values in pages."""

    k: tuple[jax.Array, ...]  # per layer [kv_heads, P, page_size, D]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config, num_pages: int, page_size: int, dtype) -> KVPages:
        shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def write_prompts(self, cache: KVCache, block_tables, lengths) -> KVPages:
        """The contiguous cache of n prompts (positions 0..T-1, as a prefill fills it) written
        into their pages: row i's position p < lengths[i] goes to page block_tables[i, p // ps]."""
        n, t = cache.k[0].shape[:2]
        pos = jnp.arange(t)
        pages = jnp.take(block_tables, jnp.minimum(pos // self.page_size,
                                                   block_tables.shape[1] - 1), axis=1)  # [n, T]
        pages = jnp.where(pos[None] < lengths[:, None], pages, self.num_pages)  # padding: dropped
        offsets = jnp.broadcast_to(pos % self.page_size, (n, t))

        def write(dst, src):  # dst [kvH, P, ps, D], src [n, T, kvH, D]
            return dst.at[:, pages, offsets].set(jnp.moveaxis(src, 2, 0).astype(dst.dtype),
                                                 mode="drop")
        return KVPages(tuple(map(write, self.k, cache.k)), tuple(map(write, self.v, cache.v)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A batch's view of the page pool: each row's block table, and how many pages to read."""

    pages: KVPages
    block_tables: jax.Array  # int32 [B, max_pages]; unused entries hold P (out of range)
    num_pages: int = dataclasses.field(metadata=dict(static=True))  # pages read per row

    def attend(self, layer: int, q, k, v, positions, window, kernels):
        """Write one new token per row (k, v [B, 1, kv_heads, D] at positions [B, 1]) into its
        page, then attend over the row's first `num_pages` pages."""
        if q.shape[1] != 1:
            raise ValueError(f"a paged cache decodes one token per row, got {q.shape[1]}")
        kp, vp = self.pages.k[layer], self.pages.v[layer]
        ps, total = self.pages.page_size, self.pages.num_pages
        pos = positions[:, 0]
        with jax.named_scope("kv_cache_write"):
            slot = jnp.minimum(pos // ps, self.block_tables.shape[1] - 1)
            page = jnp.take_along_axis(self.block_tables, slot[:, None], axis=1)[:, 0]
            page = jnp.where(pos // ps < self.block_tables.shape[1], page, total)
            kp = kp.at[:, page, pos % ps].set(jnp.moveaxis(k[:, 0], 1, 0).astype(kp.dtype),
                                             mode="drop")
            vp = vp.at[:, page, pos % ps].set(jnp.moveaxis(v[:, 0], 1, 0).astype(vp.dtype),
                                             mode="drop")
        tables = self.block_tables[:, :self.num_pages]
        with jax.named_scope("paged_attention"):
            if use_pallas_attention(kernels.implementation, window, ps, q.shape[-1],
                                    self.num_pages):
                out = _paged_attention_pallas(q[:, 0], kp, vp, tables, pos + 1, kernels)
                out = out.reshape(q.shape[0], 1, -1).astype(q.dtype)
            else:
                out = _paged_attention_xla(q, kp, vp, tables, positions, window)
        pages = KVPages(_set(self.pages.k, layer, kp), _set(self.pages.v, layer, vp))
        return out, dataclasses.replace(self, pages=pages)


def _paged_attention_xla(q, k_pages, v_pages, tables, positions, window):
    """Each row's first pages gathered into a contiguous [B, n * ps, kvH, D] view: the work
    follows the pages read, not the pool."""
    b = q.shape[0]
    n, ps = tables.shape[1], k_pages.shape[2]
    safe = jnp.minimum(tables, k_pages.shape[1] - 1)  # unused entries: masked out below

    def gather(pages):  # [kvH, P, ps, D] -> [B, n * ps, kvH, D]
        picked = pages[:, safe]  # [kvH, B, n, ps, D]
        return jnp.moveaxis(picked, 0, 3).reshape(b, n * ps, pages.shape[0], pages.shape[3])
    k_pos = jnp.broadcast_to(jnp.arange(n * ps), (b, n * ps))
    return attention(q, gather(k_pages).astype(q.dtype), gather(v_pages).astype(q.dtype),
                     positions, k_pos, window)


def pallas_attention_unsupported(page_size: int, head_dim: int, num_pages: int) -> str | None:
    """Why jax's paged-attention kernel (Triton: power-of-two blocks of at least 16) cannot serve
    these shapes, or None when it can."""
    def pow2(v):
        return v >= 1 and v & (v - 1) == 0
    if not pow2(page_size) or page_size < 16:
        return f"page_size={page_size} is not a power of two >= 16"
    if not pow2(head_dim) or head_dim < 16:
        return f"head_dim={head_dim} is not a power of two >= 16"
    if not pow2(num_pages):
        return f"{num_pages} pages per row is not a power of two"
    return None


def use_pallas_attention(implementation: str, window, page_size: int, head_dim: int,
                         num_pages: int) -> bool:
    """Whether decode attention runs jax's Pallas paged-attention kernel: under "auto" on a GPU,
    and under "pallas"/"interpret", for layers without a sliding window (the kernel has none:
    those always take the XLA path) and shapes the kernel serves ("auto" takes the XLA path
    otherwise; the engine refuses them up front for "pallas"/"interpret")."""
    if implementation == "xla" or window is not None:
        return False
    if implementation == "auto" and jax.default_backend() != "gpu":
        return False
    reason = pallas_attention_unsupported(page_size, head_dim, num_pages)
    if reason is not None and implementation != "auto":
        raise ValueError(f"implementation={implementation!r}: the Pallas paged-attention "
                         f"kernel cannot serve this cache: {reason}")
    return reason is None


def _paged_attention_pallas(q, k_pages, v_pages, tables, lengths, kernels):
    """jax's paged attention: q [B, H, D], pages [kvH, P, ps, D], tables [B, n], lengths [B].
    (The kernel does not scale the scores: q is scaled by 1 / sqrt(D) first.) On a tensor-
    parallel mesh it runs per shard (`shard_map`): each device on its own heads, whose kv heads
    are its own slice of the pages."""
    with warnings.catch_warnings():  # deprecated upstream, and still what works with Triton
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as pa
    n = tables.shape[1]
    k_splits = min(16, n)
    tables = jnp.minimum(tables, k_pages.shape[1] - 1)  # unused entries: never read past length
    q = (q.astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
    lengths = jnp.maximum(lengths, 1).astype(jnp.int32)

    def kernel(q, k_pages, v_pages, tables, lengths):
        return pa.paged_attention(q, k_pages, v_pages, tables, lengths, k_splits=k_splits,
                                  pages_per_compute_block=max(1, min(8, n // k_splits)),
                                  interpret=kernels.implementation == "interpret")
    if not kernels.sharded:
        return kernel(q, k_pages, v_pages, tables, lengths)
    axis = kernels.mesh.axis_names[0]
    return jax.shard_map(kernel, mesh=kernels.mesh,
                         in_specs=(P(None, axis, None), P(axis), P(axis), P(), P()),
                         out_specs=P(None, axis, None), check_vma=False)(
        q, k_pages, v_pages, tables, lengths)
