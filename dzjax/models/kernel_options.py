"""`KernelOptions`: how the model computes its projections, carried by the model itself.

The options are a static, hashable field of `CausalLM` (and of every module that reaches a weight),
so a jitted entry point that builds the model with other options compiles another program, and a
model built anywhere runs exactly as its options say: there is no global or context variable.

  implementation  "auto" (Pallas on a GPU when the kernels serve the format, XLA elsewhere),
                  "xla", "pallas" or "interpret" (see `dzjax.pallas_kernels.dispatch`)
  mesh            None, or the tensor-parallel `jax.sharding.Mesh` the params and delta stacks are
                  placed on: per-row delta kernels then run per shard under `shard_map`
  fused_projections  whether the params hold each layer's q/k/v and gate/up weights fused
                  (`dzjax.models.fusion`: one matmul and one delta kernel per group; serving)

Public entry points take `implementation=None` and resolve it once, with `DZJAX_KERNEL`, through
`KernelOptions.resolve`.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh

from dzjax.pallas_kernels.dispatch import requested_implementation


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelOptions:
    implementation: str = "auto"
    mesh: Mesh | None = None
    fused_projections: bool = False

    def __post_init__(self):
        if self.implementation is None:  # would leave the choice to the environment at trace time
            raise ValueError("KernelOptions needs an implementation; KernelOptions.resolve(None) "
                             "reads DZJAX_KERNEL")
        requested_implementation(self.implementation)  # validates the name

    @classmethod
    def resolve(cls, implementation: str | None = None, mesh: Mesh | None = None, *,
                fused_projections: bool = False) -> KernelOptions:
        """Options from a public entry point's arguments: `implementation` None means
        `DZJAX_KERNEL`, else "auto"."""
        return cls(implementation=requested_implementation(implementation), mesh=mesh,
                   fused_projections=fused_projections)

    @property
    def sharded(self) -> bool:
        return self.mesh is not None and self.mesh.size > 1

    @property
    def shards(self) -> int:
        """Devices the column-parallel projections are split over (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.size


DEFAULT_KERNELS = KernelOptions()  # the documented default: "auto", one device
