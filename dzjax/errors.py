"""Errors that dzjax raises for bad input: each message names the file, tensor or attribute at fault."""


class DzjaxError(ValueError):
    """Base class: bad input handed to dzjax (a file, a config, an argument)."""


class CheckpointError(DzjaxError):
    """A checkpoint directory or safetensors file is missing, truncated or does not match its config."""


class UnsupportedConfigError(DzjaxError):
    """A model config uses an architecture or attribute value that dzjax does not implement."""
