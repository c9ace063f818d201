"""Flax Llama-family models, HF config mapping and checkpoint loading, and the linear entry point."""

from dzjax.models.config import ModelConfig, RopeConfig, from_hf_config
from dzjax.models.forward import TRACE_COUNTS, dense_delta, forward, forward_cached
from dzjax.models.generate import generate, sample_tokens
from dzjax.models.linear import add_delta, embed, linear
from dzjax.models.llama import CausalLM, KVCache
from dzjax.models.loading import Base, abstract_params, hf_key_map, load_base

__all__ = [
    "Base", "CausalLM", "KVCache", "ModelConfig", "RopeConfig", "TRACE_COUNTS", "abstract_params",
    "add_delta", "dense_delta", "embed", "forward", "forward_cached", "from_hf_config", "generate",
    "hf_key_map", "linear", "load_base", "sample_tokens",
]
