"""ModelConfig: the frozen, hashable description of a Llama-family model, built from a HF config.

Every attribute of the HF config is either handled (it shapes the model), ignored (it cannot change
the forward pass), or rejected: an attribute outside both lists that differs from the architecture's
default raises `UnsupportedConfigError` naming it, so a conversion never silently goes wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dzjax.errors import UnsupportedConfigError

# architecture -> (q/k/v bias fixed by the architecture or None = from `attention_bias`, q/k norms)
_ARCHITECTURES = {
    "LlamaForCausalLM": dict(qkv_bias=None, qk_norm=False),
    "MistralForCausalLM": dict(qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(qkv_bias=None, qk_norm=True),
}

HANDLED = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
    "attention_bias", "mlp_bias", "sliding_window", "layer_types", "use_sliding_window",
    "max_window_layers", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
})
# Attributes that cannot change the forward pass at inference.
IGNORED = frozenset({
    "transformers_version", "_name_or_path", "initializer_range", "use_cache", "attention_dropout",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "id2label", "label2id", "problem_type", "is_encoder_decoder", "tokenizer_class",
    "torch_dtype", "pretraining_tp",  # pretraining_tp only slices the same matmuls in HF
})
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # "default" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the forward pass needs; hashable, so it can be a static argument of `jax.jit`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Per layer: attend to at most this many most recent positions (None = full causal attention).
    sliding_windows: tuple[int | None, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise UnsupportedConfigError(
                f"{len(self.sliding_windows)} sliding windows for {self.num_layers} layers")


def _checked(value, kind, name: str, optional: bool = False):
    """`value` if it is of `kind` (int: not bool; float: int or float, finite), else ValueError."""
    if value is None and optional:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and abs(value) < float("inf")
    else:
        ok = isinstance(value, kind)
    if not ok:
        what = "list" if isinstance(kind, tuple) else kind.__name__
        raise ValueError(f"config {name}={str(value)[:80]} is not a {what}")
    return float(value) if kind is float else value


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The config as plain JSON-able values (what a delta file records)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> ModelConfig:
    """The inverse of `config_to_dict` for data from a file: every field checked for its type and
    the architecture for support, so that nothing malformed reaches the model. ValueError (or
    UnsupportedConfigError) names the field."""
    if not isinstance(data, dict):
        raise ValueError(f"config {data!r} is not an object")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"config has unknown fields {sorted(unknown)}")
    rope = data.get("rope")
    if not isinstance(rope, dict) or set(rope) - {f.name for f in dataclasses.fields(RopeConfig)}:
        raise ValueError(f"config rope={rope!r} is not a rope config")
    rope_types = {"theta": float, "rope_type": str, "factor": float, "low_freq_factor": float,
                  "high_freq_factor": float, "original_max_position_embeddings": int}
    rope = RopeConfig(**{k: _checked(v, rope_types[k], f"rope.{k}") for k, v in rope.items()})
    if rope.rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(f"config rope.rope_type={rope.rope_type!r} is not supported")
    if data.get("architecture") not in _ARCHITECTURES:
        raise UnsupportedConfigError(f"config architecture={data.get('architecture')!r} is not "
                                     f"supported")
    values = {"architecture": data["architecture"], "rope": rope}
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
        values[name] = _checked(data.get(name), int, name)
        if values[name] < 1:
            raise ValueError(f"config {name}={values[name]} must be >= 1")
    values["rms_norm_eps"] = _checked(data.get("rms_norm_eps"), float, "rms_norm_eps")
    for name in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm"):
        if name in data:
            values[name] = _checked(data[name], bool, name)
    windows = _checked(data.get("sliding_windows", []), (list, tuple), "sliding_windows")
    values["sliding_windows"] = tuple(_checked(w, int, "sliding_windows[]", optional=True)
                                      for w in windows)
    eos = _checked(data.get("eos_token_ids", []), (list, tuple), "eos_token_ids")
    values["eos_token_ids"] = tuple(_checked(t, int, "eos_token_ids[]") for t in eos)
    values["bos_token_id"] = _checked(data.get("bos_token_id"), int, "bos_token_id", optional=True)
    return ModelConfig(**values)


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _rope_config(hf, where: str) -> RopeConfig:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"{where}: rope type {rope_type!r} (rope_parameters) is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    theta = float(params.pop("rope_theta", 10000.0))
    if rope_type == "default":
        unknown = {k: v for k, v in params.items() if v is not None and k != "partial_rotary_factor"}
        if params.get("partial_rotary_factor", 1.0) != 1.0 or unknown:
            raise UnsupportedConfigError(f"{where}: rope_parameters {unknown} are not supported")
        return RopeConfig(theta=theta)
    try:
        return RopeConfig(theta=theta, rope_type=rope_type, factor=float(params["factor"]),
                          low_freq_factor=float(params["low_freq_factor"]),
                          high_freq_factor=float(params["high_freq_factor"]),
                          original_max_position_embeddings=int(
                              params["original_max_position_embeddings"]))
    except KeyError as e:
        raise UnsupportedConfigError(f"{where}: llama3 rope_parameters lack {e.args[0]!r}") from None


def _sliding_windows(hf, n_layers: int, where: str) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is None:  # Mistral: one window for every layer
        return (window,) * n_layers
    windows = []
    for i, kind in enumerate(layer_types):
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention" and window:
            windows.append(int(window))
        else:
            raise UnsupportedConfigError(f"{where}: layer_types[{i}]={kind!r} is not supported")
    return tuple(windows)


def _reject_unhandled(hf, where: str) -> None:
    defaults = type(hf)().to_dict()
    for key, value in hf.to_dict().items():
        if key in HANDLED or key in IGNORED:
            continue
        if key not in defaults or value != defaults[key]:
            raise UnsupportedConfigError(
                f"{where}: attribute {key}={value!r} is not implemented by dzjax "
                f"(model type {hf.model_type!r})")


def from_hf_config(hf, where: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a `transformers.PretrainedConfig`; `where` names it in errors."""
    architectures = getattr(hf, "architectures", None) or []
    if len(architectures) != 1 or architectures[0] not in _ARCHITECTURES:
        raise UnsupportedConfigError(
            f"{where}: architectures={architectures!r} is not supported; "
            f"supported: {', '.join(_ARCHITECTURES)}")
    arch = architectures[0]
    _reject_unhandled(hf, where)
    if hf.hidden_act != "silu":
        raise UnsupportedConfigError(f"{where}: hidden_act={hf.hidden_act!r} is not supported (silu)")
    if getattr(hf, "pretraining_tp", 1) < 1:
        raise UnsupportedConfigError(f"{where}: pretraining_tp={hf.pretraining_tp!r}")
    fixed = _ARCHITECTURES[arch]
    attention_bias = bool(getattr(hf, "attention_bias", False))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        architecture=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.rms_norm_eps),
        rope=_rope_config(hf, where),
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        qkv_bias=attention_bias if fixed["qkv_bias"] is None else fixed["qkv_bias"],
        o_bias=attention_bias if fixed["qkv_bias"] is None else False,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=fixed["qk_norm"],
        sliding_windows=_sliding_windows(hf, hf.num_hidden_layers, where),
        eos_token_ids=_eos_ids(hf.eos_token_id),
        bos_token_id=hf.bos_token_id,
    )


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The HF config.json fields of `config` (used by export and by the demo's model builder)."""
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[config.architecture]
    rope = {"rope_type": config.rope.rope_type, "rope_theta": config.rope.theta}
    if config.rope.rope_type == "llama3":
        rope.update(factor=config.rope.factor, low_freq_factor=config.rope.low_freq_factor,
                    high_freq_factor=config.rope.high_freq_factor,
                    original_max_position_embeddings=config.rope.original_max_position_embeddings)
    out = dict(
        architectures=[config.architecture], model_type=model_type,
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, hidden_act="silu", rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids) if len(config.eos_token_ids) != 1
        else config.eos_token_ids[0],
    )
    if model_type in ("llama", "qwen3"):
        out["attention_bias"] = config.qkv_bias
    if model_type == "llama":
        out["mlp_bias"] = config.mlp_bias
    windows = set(config.sliding_windows)
    if windows != {None}:
        if model_type != "mistral" or len(windows) != 1:
            raise UnsupportedConfigError(f"cannot export per-layer sliding windows for {model_type}")
        out["sliding_window"] = config.sliding_windows[0]
    elif model_type == "mistral":
        out["sliding_window"] = None
    return out
