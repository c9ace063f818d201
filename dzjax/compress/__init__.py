"""Delta compression (extraction, calibration, OBS prune+quantize, the delta file): not built yet.

See the compression issue and ../shared/DESIGN.md for what this package will own.
"""
