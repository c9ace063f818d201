"""Fused Pallas unpack+dequant+matmul kernels and their pure-jnp references: not built yet.

See the kernels issue and ../shared/DESIGN.md for what this package will own.
"""
