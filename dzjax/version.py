"""The version of dzjax (also `dzjax.__version__`; recorded where output depends on it)."""

__version__ = "0.1.0"
