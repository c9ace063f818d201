"""The serving engine's settings (`dzjax.serve`'s options), with their documented defaults."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    max_batch: int = 8  # batch rows (requests decoded per step)
    max_seq_len: int | None = None  # prompt + output tokens per request; None = min(context, 1024)
    page_size: int = 16  # positions per KV page
    kv_pages: int | None = None  # KV pages in the pool; None = enough for every row at max_seq_len
    max_resident_deltas: int = 8  # device slots of the delta pool
    max_deltas_per_step: int | None = None  # None = max_resident_deltas
    host_cache_bytes: int = 4 << 30
    max_overtakes: int | None = None  # None = max_batch
    dtype: str | None = None  # activations and KV cache; None: bfloat16 on a GPU, else float32
    implementation: str | None = None  # delta kernels (see dzjax.pallas_kernels)
    mesh: object = None  # a jax.sharding.Mesh: tensor parallelism (None: one device)
    tp_axis: str | None = None  # the mesh axis to split over (`sharding.as_tp_mesh`)
    fuse_projections: bool = True  # q/k/v and gate/up as one matmul each (`dzjax.models.fusion`)
    # Dispatch decode step n+1 before reading step n's tokens. None: on an accelerator; off on a
    # CPU, where host and "device" share the cores (measured: no gain, up to 10% lost).
    pipeline_decode: bool | None = None
    prefix_sharing: bool = True  # requests of one model share the KV pages of a common prefix
    # Limits: what one request may ask, so that no request can slow the others down.
    max_stop_strings: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    max_prompt_bytes: int | None = None  # a text prompt's UTF-8 bytes; None = 32 * max_seq_len
    delta_read_timeout_s: float = 120.0  # a delta read from disk that takes longer fails
    # A mesh over several processes (`multihost`): a process silent this long stops the server.
    worker_timeout_s: float = 10.0
