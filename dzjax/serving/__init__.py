"""Batched multi-delta serving (`dzjax.serve`, the HTTP server): not built yet.

See the serving issue and ../shared/DESIGN.md for what this package will own.
"""
