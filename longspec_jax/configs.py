"""Frozen model configurations, exact-name presets and a strict Hugging Face config reader.

`ModelConfig` describes a target decoder (Llama family or Qwen2); `DraftConfig` describes the
one-block LongSpec draft (spec section 1). `from_hf_config` reads a Hugging Face `config.json`
through an explicit list of handled and ignored fields and refuses anything else, so a checkpoint
that needs a feature we do not implement (a rope scaling kind, sliding-window layers, ...) fails
loudly instead of silently decoding wrong tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# Shape alphabet used across the code base (see STYLE.md): B batch, T query tokens, S cache length,
# D model width, F MLP width, N query heads, K kv heads, G = N / K, H head dim, V vocab, L layers.

ROPE_KINDS = ("default", "linear", "llama3", "dynamic")


class ConfigError(ValueError):
    """A configuration that we cannot honour; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (HF "rotate_half" convention, not interleaved).

    kind: "default" | "linear" | "llama3" | "dynamic" (dynamic NTK, HF semantics).
    factor: scaling factor for linear / llama3 / dynamic.
    low_freq_factor, high_freq_factor, original_max_position_embeddings: llama3 scaling only
      (original_max_position_embeddings is also the base length for dynamic NTK).
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ConfigError(
                f"rope_scaling.rope_type={self.kind!r} is not supported; supported kinds are "
                f"{', '.join(ROPE_KINDS)}. Remove the field or convert the checkpoint."
            )
        if self.theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.theta}")
        if self.kind != "default" and self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family or Qwen2 decoder-only target model.

    family: "llama" or "qwen2" (Qwen2 = Llama with q/k/v biases; kept as a name for messages).
    attention_bias: q/k/v projections carry a bias (Qwen2: True; Llama: usually False).
    head_dim: H; defaults to hidden_size // num_heads.
    eos_token_ids: every id that ends generation (HF configs may list several).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    family: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in ("llama", "qwen2"):
            raise ConfigError(f"family must be 'llama' or 'qwen2', got {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def group_size(self) -> int:
        """G = N / K query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """The LongSpec draft block (spec section 1): one decoder layer with sliding-window
    self-attention (q/k/v biases), cross-attention over the target's last-layer KV (q/o only)
    and a SwiGLU MLP. Embedding, LM head and RoPE come from the target.
    """

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    window: int = 512
    vocab_size: int = 0  # the target's vocabulary; 0 = unknown (checked against the target when known)

    @classmethod
    def from_target(cls, target: ModelConfig, *, intermediate_size: int | None = None,
                    window: int = 512) -> "DraftConfig":
        return cls(
            hidden_size=target.hidden_size,
            intermediate_size=intermediate_size or target.intermediate_size,
            num_heads=target.num_heads,
            num_kv_heads=target.num_kv_heads,
            head_dim=target.head_dim,
            rms_norm_eps=target.rms_norm_eps,
            window=window,
            vocab_size=target.vocab_size,
        )

    def check_matches(self, target: ModelConfig, *, source: str = "draft") -> None:
        """Raise ConfigError naming every field where the draft cannot run with `target`."""
        problems = []
        for ours, theirs, label in (
            (self.hidden_size, target.hidden_size, "hidden_size"),
            (self.num_heads, target.num_heads, "num_attention_heads"),
            (self.num_kv_heads, target.num_kv_heads, "num_key_value_heads"),
            (self.head_dim, target.head_dim, "head_dim"),
        ):
            if ours != theirs:
                problems.append(f"{label}: draft {ours} vs target {theirs}")
        if self.vocab_size and self.vocab_size != target.vocab_size:
            problems.append(f"vocab_size: draft {self.vocab_size} vs target {target.vocab_size}")
        if problems:
            raise ConfigError(
                f"{source} does not match the target model ({'; '.join(problems)}). "
                "Use the draft trained for this target (see the presets' draft_repo)."
            )


# --------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig

# Fields that change the computation and that we implement.
_HANDLED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
    "mlp_bias", "model_type", "architectures", "bos_token_id", "eos_token_id", "pad_token_id",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "pretraining_tp",
}
# Fields that do not change inference or training maths here (bookkeeping, dropout, init, dtype).
_IGNORED = {
    "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range",
    "attention_dropout", "_name_or_path", "model_max_length", "rope_type", "tokenizer_class",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "tie_encoder_decoder", "id2label", "label2id", "problem_type", "_attn_implementation_autoset",
    "quantization_config_ignored", "auto_map", "embd_pdrop", "resid_pdrop", "hidden_dropout",
    "use_return_dict", "chunk_size_feed_forward", "bad_words_ids", "begin_suppress_tokens",
    "decoder_start_token_id", "do_sample", "num_beams", "temperature", "top_k", "top_p",
    "max_length", "min_length", "early_stopping", "forced_bos_token_id", "forced_eos_token_id",
    "architectures_note", "name_or_path", "torchscript", "finetuning_task", "prefix",
    "sep_token_id", "cross_attention_hidden_size", "add_cross_attention", "is_decoder",
    "task_specific_params", "tf_legacy_loss", "use_bfloat16", "pruned_heads",
    "output_scores", "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "num_return_sequences", "diversity_penalty", "num_beam_groups",
    "chunk_size", "max_new_tokens",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}


def _read_json(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}. Pass a checkpoint directory holding config.json.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-save the config.") from e


def _rope_from_hf(cfg: Mapping[str, Any], max_pos: int) -> RopeConfig:
    params = cfg.get("rope_parameters")  # transformers >= 5 merges theta and scaling here
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return RopeConfig(theta=theta)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is None:
        raise ConfigError("rope_scaling has no 'rope_type' (or 'type') field; cannot tell the scaling kind.")
    if kind not in ROPE_KINDS:
        raise ConfigError(
            f"rope_scaling.rope_type={kind!r} is not supported (supported: {', '.join(ROPE_KINDS)}). "
            "This checkpoint needs a RoPE variant longspec-jax does not implement."
        )
    known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "rope_theta"}
    unknown = set(scaling) - known
    if unknown:
        raise ConfigError(f"rope_scaling has fields we do not handle: {sorted(unknown)}")
    if kind == "default":
        return RopeConfig(theta=theta)
    if "factor" not in scaling:
        raise ConfigError(f"rope_scaling.rope_type={kind!r} needs a 'factor' field.")
    orig = scaling.get("original_max_position_embeddings")
    if kind == "llama3" and orig is None:
        raise ConfigError("rope_scaling.rope_type='llama3' needs 'original_max_position_embeddings'.")
    return RopeConfig(
        theta=theta,
        kind=kind,
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        # HF's dynamic NTK always measures the length against max_position_embeddings (it ignores an
        # original_max_position_embeddings field), so we do too.
        original_max_position_embeddings=max_pos if kind == "dynamic" else (int(orig) if orig is not None else None),
    )


def from_hf_config(config: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json (path, directory or dict).

    Every field is either handled, or known not to matter (`_IGNORED`); anything else raises
    ConfigError naming the field.
    """
    cfg = _read_json(config)
    unknown = sorted(k for k in cfg if k not in _HANDLED and k not in _IGNORED)
    if unknown:
        raise ConfigError(
            f"config.json has fields longspec-jax does not handle: {unknown}. "
            "If they do not change the model's maths, add them to configs._IGNORED."
        )
    model_type = cfg.get("model_type", "llama")
    if model_type not in _MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r} is not supported (supported: llama, qwen2).")
    family = _MODEL_TYPES[model_type]
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is implemented.")
    if cfg.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported; the MLP projections must have no bias.")
    if cfg.get("pretraining_tp", 1) not in (None, 1):
        # pretraining_tp > 1 only changes how HF slices matmuls; the maths is identical.
        pass
    if cfg.get("use_sliding_window"):
        raise ConfigError(
            "use_sliding_window=true (Qwen2 sliding-window layers) is not supported; "
            "set it to false, as the released Qwen2 checkpoints do."
        )
    for key in ("layer_types",):
        types = cfg.get(key)
        if types and any(t != "full_attention" for t in types):
            raise ConfigError(f"{key} contains {sorted(set(types))}; only 'full_attention' layers are supported.")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ConfigError(f"config.json is missing required fields {missing}.")
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    attention_bias = bool(cfg.get("attention_bias", family == "qwen2"))
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if family == "qwen2" else 1e-5)),
        rope=_rope_from_hf(cfg, max_pos),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True if family == "qwen2" else attention_bias,
        family=family,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
    )


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of `from_hf_config`, for exporting checkpoints and building HF parity models."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if cfg.family == "llama" else "Qwen2ForCausalLM"],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.family == "llama":
        out["attention_bias"] = cfg.attention_bias
        out["mlp_bias"] = False
    else:
        out["use_sliding_window"] = False
    if cfg.rope.kind != "default":
        scaling: dict[str, Any] = {"rope_type": cfg.rope.kind, "factor": cfg.rope.factor}
        if cfg.rope.kind == "llama3":
            scaling.update(low_freq_factor=cfg.rope.low_freq_factor, high_freq_factor=cfg.rope.high_freq_factor,
                           original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
        out["rope_scaling"] = scaling
    return out


# --------------------------------------------------------------------------------------------
# Presets (exact names only; no fuzzy matching)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named target model: its HF repo, the matching LongSpec draft repo, and its shapes."""

    name: str
    target_repo: str
    draft_repo: str | None
    config: ModelConfig
    chat_template_note: str = ""


def _llama2_7b(max_pos: int, factor: float) -> ModelConfig:
    return ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=max_pos,
        rope=RopeConfig(theta=10000.0, kind="linear", factor=factor), bos_token_id=1,
        eos_token_ids=(2,), pad_token_id=0,
    )


def _llama2_13b(max_pos: int, factor: float) -> ModelConfig:
    return _llama2_7b(max_pos, factor).replace(hidden_size=5120, intermediate_size=13824, num_layers=40,
                                               num_heads=40, num_kv_heads=40)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llama3-8b", "gradientai/Llama-3-8B-Instruct-262k", "sail/longspec-Llama-3-8B-Instruct-262k",
               ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                           num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                           rope=RopeConfig(theta=283461213.0), max_position_embeddings=262144,
                           bos_token_id=128000, eos_token_ids=(128001, 128009), pad_token_id=128001)),
        Preset("vicuna-7b-16k", "lmsys/vicuna-7b-v1.5-16k", "sail/longspec-vicuna-7b-v1.5-16k",
               _llama2_7b(16384, 4.0)),
        Preset("vicuna-13b-16k", "lmsys/vicuna-13b-v1.5-16k", "sail/longspec-vicuna-13b-v1.5-16k",
               _llama2_13b(16384, 4.0)),
        Preset("longchat-7b-32k", "lmsys/longchat-7b-v1.5-32k", "sail/longspec-longchat-7b-v1.5-32k",
               _llama2_7b(32768, 8.0)),
        Preset("longchat-13b-16k", "lmsys/longchat-13b-16k", "sail/longspec-longchat-13b-16k",
               _llama2_13b(16384, 8.0)),
        Preset("qwq-32b-preview", "Qwen/QwQ-32B-Preview", "sail/longspec-QwQ-32B-Preview",
               ModelConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                           num_heads=40, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                           rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768,
                           attention_bias=True, family="qwen2", bos_token_id=None,
                           eos_token_ids=(151645, 151643), pad_token_id=151643)),
    )
}


def get_preset(name: str) -> Preset:
    """Exact-name lookup; the error lists every valid name."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}, "
            "or pass --checkpoint DIR with a Hugging Face checkpoint."
        ) from None


def tiny_config(**overrides) -> ModelConfig:
    """A tiny random-weight config for tests and the CPU smoke run."""
    base = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                       max_position_embeddings=2048, eos_token_ids=(1,), bos_token_id=0, pad_token_id=0)
    return base.replace(**overrides)
