"""Delta compression: extraction, calibration, jitted OBS prune+quantize, the delta file, export."""

from dzjax.compress.pipeline import ConvertConfig, convert
from dzjax.compress.delta_file import Delta, DeltaFileError, load_delta, save_delta
from dzjax.compress.export import export_hf

__all__ = ["ConvertConfig", "Delta", "DeltaFileError", "convert", "export_hf", "load_delta",
           "save_delta"]
