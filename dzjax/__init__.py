"""dzjax: serve many compressed full-parameter fine-tunes of one base LLM at once, in JAX."""

from dzjax.compress import Delta, DeltaFileError, convert, export_hf, load_delta
from dzjax.errors import CheckpointError, DzjaxError, UnsupportedConfigError
from dzjax.models import Base, Scores, dense_delta, generate, load_base, logits, score
from dzjax.serving import Server, serve
from dzjax.version import __version__ as __version__

__all__ = ["Base", "CheckpointError", "Delta", "DeltaFileError", "DzjaxError", "Scores",
           "Server", "UnsupportedConfigError", "convert", "dense_delta", "export_hf", "generate",
           "load_base", "load_delta", "logits", "score", "serve"]
