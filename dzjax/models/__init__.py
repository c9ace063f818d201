"""Flax Llama-family models, HF config mapping and checkpoint loading, the linear entry point,
per-row delta stacks, the sampler and the reference generation loop."""

from dzjax.models.config import ModelConfig, RopeConfig, from_hf_config
from dzjax.models.forward import TRACE_COUNTS, dense_delta, forward, forward_cached, logits
from dzjax.models.generate import generate
from dzjax.models.kernel_options import KernelOptions
from dzjax.models.linear import add_delta, embed, linear
from dzjax.models.llama import CausalLM, KVCache
from dzjax.models.loading import Base, abstract_params, hf_key_map, load_base
from dzjax.models.sampling import sample
from dzjax.models.scoring import Scores, score

__all__ = [
    "Base", "CausalLM", "KVCache", "KernelOptions", "ModelConfig", "RopeConfig", "TRACE_COUNTS",
    "abstract_params", "add_delta", "dense_delta", "embed", "forward", "forward_cached",
    "from_hf_config", "generate", "hf_key_map", "linear", "load_base", "logits", "sample",
    "Scores", "score",
]
