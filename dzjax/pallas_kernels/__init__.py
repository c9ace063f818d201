"""Compressed-delta matmuls: pure-jnp references, fused Pallas kernels, and dispatch between them.

  delta_matmul(x, q, *, implementation=None)                 one delta: x @ dequantize(q)
  multi_delta_matmul(x, stack, batch, *, implementation=None) many deltas in one launch
  stack_deltas / unstack_deltas / write_slot                 the fixed-size stack of device slots
  make_delta_batch(slots, num_slots) -> DeltaBatch           rows grouped by slot (-1 = base only)

Both matmuls return float32. `implementation` (or the `DZJAX_KERNEL` environment variable) is one
of "auto" (Pallas on GPU, XLA elsewhere), "xla", "pallas", "interpret"; see `dispatch`.
"""

from dzjax.pallas_kernels.single_delta import (DeltaMatmulConfig, delta_matmul_pallas,
                                               delta_matmul_xla, dequantize_xla)
from dzjax.pallas_kernels.dispatch import (ENV_VAR, IMPLEMENTATIONS, delta_matmul,
                                           multi_delta_matmul)
from dzjax.pallas_kernels.formats import Format, QuantizedTensor, quantize_to_format
from dzjax.pallas_kernels.multi_delta import (DeltaBatch, MultiDeltaConfig, make_delta_batch,
                                              multi_delta_matmul_pallas, multi_delta_matmul_ref,
                                              multi_delta_matmul_xla, stack_deltas,
                                              unstack_deltas, write_slot)
from dzjax.pallas_kernels.reference import delta_matmul_ref, dequantize

__all__ = [
    "DeltaBatch", "DeltaMatmulConfig", "ENV_VAR", "Format", "IMPLEMENTATIONS", "MultiDeltaConfig",
    "QuantizedTensor", "delta_matmul", "delta_matmul_pallas", "delta_matmul_ref", "delta_matmul_xla",
    "dequantize", "dequantize_xla",
    "make_delta_batch", "multi_delta_matmul", "multi_delta_matmul_pallas",
    "multi_delta_matmul_ref", "multi_delta_matmul_xla", "quantize_to_format", "stack_deltas",
    "unstack_deltas", "write_slot",
]
