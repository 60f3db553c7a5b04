"""Typed, frozen training configuration read from YAML plus `key=value` overrides.

A config file is a nested mapping whose sections mirror the dataclasses below. Reading is strict:
an unknown key anywhere (in the file or in an override) raises `TrainConfigError` naming the full
dotted key and the keys that are valid at that level, so a typo such as `optim.lrr=1e-4` never
silently trains with the default learning rate.

Sections (see `train/configs/*.yaml` for complete examples):
  model       which target (tiny random / preset / checkpoint dir), the draft shape, dtypes
  data        files, format, template (spec 5.2), sequence length, packing, shuffling seed
  positions   Anchor-Offset indices (spec 2.1)
  optim       AdamW + warmup-cosine + clipping (spec 5.3)
  train       objective, batch sizes, steps, lag range, seed, remat, loss chunking
  mesh        device mesh (data, fsdp, tensor) and multi-host initialisation
  checkpoint  orbax directory, interval, keep-last-N, export directory
  log         metrics JSONL, progress bar, TensorBoard
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

import yaml

from longspec_jax.attention import TRAIN_ATTENTION
from longspec_jax.layers import REMAT_POLICIES


class TrainConfigError(ValueError):
    """A training configuration we cannot run; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Target and draft models.

    target: "tiny" (random tiny target built from `tiny` overrides, for CPU runs), the exact name of a
      preset in `longspec_jax.configs.PRESETS` (random weights, for benchmarks), a Hugging Face
      config.json file (random weights of that shape: train.objective=lm from scratch), or a Hugging
      Face checkpoint directory (config.json + safetensors + tokenizer).
    tiny: field overrides for `configs.tiny_config` when target == "tiny" (e.g. {num_layers: 2}).
    target_dtype: dtype of the frozen target ("bfloat16" as in the paper's fp16 target; "float32" for tests).
    compute_dtype: compute dtype of the trained model (the draft, or the target for "lm"); its
      parameters are always float32 master weights.
    draft_init: optional directory of an exported draft to continue training from (stages 2 and 3).
    draft_intermediate_size: MLP width of the draft (default: the target's).
    window: draft self-attention window (spec 1.2: 512).
    tokenizer: "auto" (the target checkpoint's tokenizer; a byte-level tokenizer for "tiny"), "bytes",
      or a directory readable by transformers.AutoTokenizer.
    attention_impl: attention implementation passed to the models ("xla", "pallas", "auto").
    """

    target: str = "tiny"
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    target_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    draft_init: str | None = None
    draft_intermediate_size: int | None = None
    window: int = 512
    tokenizer: str = "auto"
    attention_impl: str = "xla"


@dataclasses.dataclass(frozen=True)
class DataSection:
    """Training data (spec 5.2).

    paths: files or directories; directories are searched (sorted) for *.jsonl, *.json, *.parquet, *.txt.
    format: "auto" (from each file's suffix), "jsonl", "parquet" or "text" (one document per file).
    template: "raw" (text + EOS, loss on all tokens), "long" (long documents, or prompt/answer pairs
      formatted as chat with loss on every token, packed), "chat" (prompt/answer, loss on answers only).
    text_field / prompt_field / answer_field: record fields read by the templates.
    chat_format: "qwen" (<|im_start|> turns), "llama_pseudo" (<s>role\\n...</s>), or "custom" (use
      prompt_template / answer_template with {system}, {prompt}, {answer} placeholders).
    system_prompt: system turn for chat formats ("" = none).
    seq_len: fixed training length T.
    packing: concatenate documents separated by EOS and cut into T-token rows (no padding); otherwise
      each document becomes one row, truncated (if `truncate`) and right-padded.
    truncate: cut over-long documents to T; when False a longer document is an error.
    answer_reserve: for "chat", prompts are left-truncated to seq_len - answer_reserve tokens (spec 5.2).
    add_eos: append the tokenizer's EOS to every document / answer.
    add_bos: prepend the tokenizer's BOS (when it has one, e.g. Llama; Qwen has none).
    shuffle: shuffle document order per epoch, deterministically from `seed`.
    cache_dir: directory for the encoded-token cache ("" = none): keyed by the files, the tokenizer and
      the settings above, so a second run over the same data skips tokenization.
    """

    paths: Sequence[str] = ()
    format: str = "auto"
    template: str = "raw"
    text_field: str = "text"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    chat_format: str = "qwen"
    prompt_template: str = ""
    answer_template: str = ""
    system_prompt: str = "You are a helpful assistant."
    seq_len: int = 1024
    packing: bool = False
    truncate: bool = True
    answer_reserve: int = 1024
    add_eos: bool = True
    add_bos: bool = True
    shuffle: bool = True
    seed: int = 42
    cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class PositionsSection:
    """Anchor-Offset indices (spec 2.1).

    enabled: False = vanilla arange positions always.
    sinks: number of anchor positions kept at [0..s-1]: an int, or "random" (uniform 0..4, as released).
    max_sinks: upper bound of the "random" draw (inclusive).
    max_offset: largest offset o; the released code uses min(30000, model_max_length - 1000) - L.
      When `max_offset` is None it is min(30000, max_position_embeddings - 1000) - L, floored at 0.
    switch_off_len: sequences longer than this use vanilla positions (released: 1200).
    """

    enabled: bool = True
    sinks: int | str = "random"
    max_sinks: int = 4
    max_offset: int | None = None
    switch_off_len: int = 1200


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then cosine decay, global-norm clipping (spec 5.3)."""

    lr: float = 5e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """The training loop.

    objective: "draft" (LongSpec draft on a frozen target) or "lm" (train the target itself from scratch).
    batch_size: global micro-batch (sequences per micro-step over all devices).
    grad_accum: micro-batches per optimizer step (explicit scan; global batch = batch_size * grad_accum).
    steps: optimizer steps (>= 0); 0 = one epoch of the data.
    min_lag / max_lag: flash noisy training lag j range (spec 1.3: 1..4); one j per step.
    loss_chunk: sequence chunk for the LM-head cross-entropy (full [T, V] logits never materialise).
    remat: activation checkpointing of the trained model (per decoder layer of an LM, the whole draft
      block): "none", "full" (keep only each layer's inputs), "dots" (keep matmul outputs) or
      "dots_no_batch".
    attention: the attention core of both training forwards (`longspec_jax.attention.train_attention`):
      "dense" (masked [T, T] float32 scores), "chunked" (query blocks of attention_chunk rows, memory
      O(chunk x T); use it for 32k sequences) or "flash" (jax.nn.dot_product_attention: cuDNN flash
      attention on NVIDIA GPUs with bf16/f16 compute, XLA elsewhere; the fastest choice on GPUs).
    attention_chunk: query rows per block of "chunked" (and of "flash"'s float32 fallback on a GPU).
    log_target_loss: also compute the frozen target's CE on the same tokens (logged only, as the
      original's "train/large_loss"; costs one more LM-head pass) and the draft's top-1 agreement
      with the target ("agree").
    distill: weight a in [0, 1] of knowledge distillation from the frozen target (draft objective):
      loss = (1 - a) * CE(data) + a * T^2 * KL(p_target || p_draft) at temperature T =
      distill_temperature. 0 (default) is the paper's recipe, plain CE on the data. Greedy
      verification accepts a draft token when it is the target's argmax, so matching the target's
      distribution rather than the data's is what raises acceptance (DistillSpec); it costs one more
      LM-head pass per chunk (the same one log_target_loss pays).
    distill_temperature: T > 0 of the KL term.
    seed: RNG seed for initialisation, lags and positions.
    """

    objective: str = "draft"
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 0
    min_lag: int = 1
    max_lag: int = 4
    loss_chunk: int = 512
    remat: str = "none"
    attention: str = "dense"
    attention_chunk: int = 1024
    log_target_loss: bool = True
    distill: float = 0.0
    distill_temperature: float = 1.0
    seed: int = 42


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh. Sizes of -1 take all remaining devices (at most one -1).

    distributed: "auto" (call jax.distributed.initialize() when a multi-process launch is detected
      from the environment), True (always) or False (never).
    heartbeat_timeout_s: seconds without a heartbeat after which a multi-process run gives up on a
      process that died: the others stop with JAX's "another task died" error instead of waiting.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    distributed: bool | str = "auto"
    heartbeat_timeout_s: int = 100


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """Orbax checkpoints and the final HF-format export.

    dir: checkpoint directory (required to save; "" = no checkpoints).
    every: save every N optimizer steps (and at the end).
    keep: keep the last N checkpoints.
    async_save: write in a background thread (orbax async checkpointing).
    export_dir: where the trained draft (and, for "lm", the target) is written as safetensors + config.json.
    """

    dir: str = ""
    every: int = 200
    keep: int = 3
    async_save: bool = True
    export_dir: str = ""


@dataclasses.dataclass(frozen=True)
class LogSection:
    """Metrics: JSONL file (one line per logged step), progress bar, optional TensorBoard; `rows`: a
    path prefix where each process logs the global data rows it read per step (`<rows>.<process>`)."""

    metrics: str = ""
    every: int = 1
    progress: bool = True
    tensorboard: str = ""
    rows: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    positions: PositionsSection = PositionsSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    mesh: MeshSection = MeshSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly), e.g. to store beside a checkpoint."""
        def conv(x):
            if dataclasses.is_dataclass(x):
                return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            if isinstance(x, Mapping):
                return {k: conv(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [conv(v) for v in x]
            return x

        return conv(self)


_CHOICES = {
    "data.format": ("auto", "jsonl", "parquet", "text"),
    "data.template": ("raw", "long", "chat"),
    "data.chat_format": ("qwen", "llama_pseudo", "custom"),
    "train.objective": ("draft", "lm"),
    "train.remat": tuple(REMAT_POLICIES),
    "train.attention": TRAIN_ATTENTION,
    "model.target_dtype": ("bfloat16", "float16", "float32"),
    "model.compute_dtype": ("bfloat16", "float16", "float32"),
}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Coerce YAML scalars to the annotated type, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _check_type(value, a, key)
                except TrainConfigError:
                    pass
        raise TrainConfigError(f"{key}={value!r} has the wrong type; expected {tp}")
    if tp is Any:
        return value
    if origin in (collections.abc.Sequence, list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    if origin in (collections.abc.Mapping, dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise TrainConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise TrainConfigError(f"{key} must be {'true or false' if tp is bool else 'a string'}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TrainConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise TrainConfigError(f"{key} must be a number, got {value!r}") from None
        return float(value)
    return value


def _build(cls, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise TrainConfigError(f"{prefix or 'config'} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise TrainConfigError(
            f"unknown config key {key!r}; valid keys under {prefix.rstrip('.') or 'the top level'} are: "
            f"{', '.join(sorted(fields))}"
        )
    kw = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kw[name] = _build(tp, value or {}, key + ".")
        else:
            value = _check_type(value, tp, key)
            if key in _CHOICES and value not in _CHOICES[key]:
                raise TrainConfigError(f"{key}={value!r} is not one of {', '.join(_CHOICES[key])}")
            kw[name] = value
    return cls(**kw)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise TrainConfigError(f"override {key!r}: {p!r} is not a section")
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`["optim.lr=1e-4", "data.paths=[a,b]"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise TrainConfigError(f"override {item!r} has an empty key")
        _set_dotted(tree, key, yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):  # `tiny` overrides merge one level
            out[k] = {**out[k], **v} if k == "tiny" else _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from a nested mapping (strict about keys and types)."""
    cfg = _build(TrainConfig, data or {}, "")
    validate(cfg)
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML file (or nothing) and apply `key=value` overrides on top."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise TrainConfigError(f"config file {path!r} not found; see train/configs/ for examples") from None
        except yaml.YAMLError as e:
            raise TrainConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    return from_dict(_merge(data, parse_overrides(overrides)))


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks, each naming the key to change."""
    t, d, p, o = cfg.train, cfg.data, cfg.positions, cfg.optim
    if t.batch_size < 1 or t.grad_accum < 1:
        raise TrainConfigError("train.batch_size and train.grad_accum must be >= 1")
    if t.steps < 0:
        raise TrainConfigError(f"train.steps={t.steps} is negative; it must be >= 1 (optimizer steps), or 0 for one "
                               "epoch of the data")
    if t.attention_chunk < 1:
        raise TrainConfigError(f"train.attention_chunk must be >= 1, got {t.attention_chunk}")
    if cfg.mesh.heartbeat_timeout_s < 1:
        raise TrainConfigError(f"mesh.heartbeat_timeout_s must be >= 1 second, got {cfg.mesh.heartbeat_timeout_s}")
    if cfg.log.every < 1:
        raise TrainConfigError(f"log.every must be >= 1 (log every N steps), got {cfg.log.every}")
    if not 1 <= t.min_lag <= t.max_lag:
        raise TrainConfigError(f"need 1 <= train.min_lag <= train.max_lag, got {t.min_lag}, {t.max_lag}")
    if d.seq_len < 2:
        raise TrainConfigError(f"data.seq_len must be >= 2, got {d.seq_len}")
    if not 0.0 <= t.distill <= 1.0:
        raise TrainConfigError(f"train.distill is the weight of the distillation term and must be in [0, 1], "
                               f"got {t.distill}")
    if not t.distill_temperature > 0:
        raise TrainConfigError(f"train.distill_temperature must be > 0, got {t.distill_temperature}")
    if t.distill > 0 and t.objective != "draft":
        raise TrainConfigError("train.distill needs train.objective=draft (it distills the frozen target into "
                               "the draft); set train.distill=0 for the lm objective")
    if t.loss_chunk < 1:
        raise TrainConfigError(f"train.loss_chunk must be >= 1, got {t.loss_chunk}")
    if isinstance(p.sinks, str) and p.sinks != "random":
        raise TrainConfigError(f"positions.sinks must be an integer or 'random', got {p.sinks!r}")
    if isinstance(p.sinks, int) and p.sinks < 0:
        raise TrainConfigError(f"positions.sinks must be >= 0, got {p.sinks}")
    if p.max_offset is not None and p.max_offset < 0:
        raise TrainConfigError(f"positions.max_offset must be >= 0, got {p.max_offset}")
    if o.lr <= 0 or not 0 <= o.warmup_ratio < 1:
        raise TrainConfigError("optim.lr must be > 0 and optim.warmup_ratio in [0, 1)")
    if d.template == "chat" and d.answer_reserve >= d.seq_len:
        raise TrainConfigError(
            f"data.answer_reserve={d.answer_reserve} must be smaller than data.seq_len={d.seq_len}")
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise TrainConfigError(f"mesh sizes must be positive with at most one -1, got {sizes}")
    if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1:
        raise TrainConfigError("checkpoint.every and checkpoint.keep must be >= 1")

