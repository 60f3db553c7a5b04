"""Hugging Face safetensors checkpoints <-> `Transformer` parameters, through one declarative key
table with strict checks.

Loading reads the checkpoint's metadata first and refuses, naming the key or file, anything it
cannot map exactly: unmapped, duplicated, missing or mis-shaped tensors, integer tensors, corrupt
files, a tokenizer larger than the model's vocabulary. Only then are tensors read, one at a time
(safetensors -> numpy -> transform -> cast -> `jax.device_put` to the parameter's sharding), into a
model built abstractly with `nnx.eval_shape`; so the host never holds a second copy of the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from longspec_jax import configs, hub
from longspec_jax.configs import ModelConfig
from longspec_jax.hub import INDEX_FILE, SINGLE_FILE, CheckpointError
from longspec_jax.sharding import iter_params, variable_sharding
from longspec_jax.transformer import Transformer, check_unfused

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors: the Rust error is not re-exported
    SafetensorError = Exception

_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# --------------------------------------------------------------------------------------------
# The key table


def _template_regex(template: str) -> str:
    """Regex of a key template: "{0}" (the layer index) becomes a digit group, the rest is literal."""
    return re.escape(template).replace(re.escape("{0}"), r"(\d+)")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One HF tensor family.

    hf_key: HF key template, "{0}" = layer index (e.g. "model.layers.{0}.mlp.up_proj.weight").
    target: our parameter path template (as `sharding.iter_params` names it).
    hf_shape: the HF tensor's shape for a config.
    to_ours / to_hf: numpy transforms HF layout <-> our layout.
    """

    hf_key: str
    target: str
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]

    @property
    def pattern(self) -> str:
        return _template_regex(self.hf_key)

    @property
    def target_pattern(self) -> str:
        return _template_regex(self.target)


def _ident(x, cfg):
    return x


def _t(x, cfg):
    return x.T


def _proj_in(heads_attr):
    """Linear weight [heads*H, D] (torch [out, in]) <-> kernel [D, heads, H]."""

    def to_ours(x, cfg):
        return x.T.reshape(cfg.hidden_size, getattr(cfg, heads_attr), cfg.head_dim)

    def to_hf(x, cfg):
        return x.reshape(cfg.hidden_size, -1).T

    return to_ours, to_hf


def _bias(heads_attr):
    return (lambda x, cfg: x.reshape(getattr(cfg, heads_attr), cfg.head_dim),
            lambda x, cfg: x.reshape(-1))


def _o_to_ours(x, cfg):  # [D, N*H] -> [N, H, D]
    return x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _o_to_hf(x, cfg):
    return x.reshape(-1, cfg.hidden_size).T


_L = "model.layers.{0}."


def key_table(cfg: ModelConfig) -> tuple[KeyRule, ...]:
    """The HF <-> ours mapping for `cfg` (Llama and Qwen2 share names; biases only when configured)."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q_in, k_in = _proj_in("num_heads"), _proj_in("num_kv_heads")
    rules = [
        KeyRule("model.embed_tokens.weight", "embedder.embedding", lambda c: (V, D), _ident, _ident),
        KeyRule("model.norm.weight", "final_norm.scale", lambda c: (D,), _ident, _ident),
        KeyRule(_L + "input_layernorm.weight", "layers.{0}.input_norm.scale", lambda c: (D,), _ident, _ident),
        KeyRule(_L + "post_attention_layernorm.weight", "layers.{0}.post_attn_norm.scale", lambda c: (D,),
                _ident, _ident),
        KeyRule(_L + "self_attn.q_proj.weight", "layers.{0}.attn.q_kernel", lambda c: (NH, D), *q_in),
        KeyRule(_L + "self_attn.k_proj.weight", "layers.{0}.attn.k_kernel", lambda c: (KH, D), *k_in),
        KeyRule(_L + "self_attn.v_proj.weight", "layers.{0}.attn.v_kernel", lambda c: (KH, D), *k_in),
        KeyRule(_L + "self_attn.o_proj.weight", "layers.{0}.attn.o_kernel", lambda c: (D, NH), _o_to_ours,
                _o_to_hf),
        KeyRule(_L + "mlp.gate_proj.weight", "layers.{0}.mlp.gate_kernel", lambda c: (F, D), _t, _t),
        KeyRule(_L + "mlp.up_proj.weight", "layers.{0}.mlp.up_kernel", lambda c: (F, D), _t, _t),
        KeyRule(_L + "mlp.down_proj.weight", "layers.{0}.mlp.down_kernel", lambda c: (D, F), _t, _t),
    ]
    if cfg.attention_bias:
        rules += [
            KeyRule(_L + "self_attn.q_proj.bias", "layers.{0}.attn.q_bias", lambda c: (NH,), *_bias("num_heads")),
            KeyRule(_L + "self_attn.k_proj.bias", "layers.{0}.attn.k_bias", lambda c: (KH,), *_bias("num_kv_heads")),
            KeyRule(_L + "self_attn.v_proj.bias", "layers.{0}.attn.v_bias", lambda c: (KH,), *_bias("num_kv_heads")),
        ]
    if not cfg.tie_word_embeddings:
        rules.append(KeyRule("lm_head.weight", "lm_head.kernel", lambda c: (V, D), _t, _t))
    return tuple(rules)


def ignored_patterns(cfg: ModelConfig) -> tuple[str, ...]:
    """Regexes of HF keys that are not parameters of the model and are skipped on purpose."""
    pats = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]  # old Llama-2 exports; recomputed
    if cfg.tie_word_embeddings:
        pats.append(r"lm_head\.weight")  # a tied checkpoint may store the shared matrix twice
    return tuple(pats)


def _match(key: str, rules, ignored) -> tuple[KeyRule, str] | None | str:
    """(rule, our path) for a mapped key, "ignore" for a skipped one, None when unmapped."""
    for pat in ignored:
        if re.fullmatch(pat, key):
            return "ignore"
    for rule in rules:
        m = re.fullmatch(rule.pattern, key)
        if m:
            return rule, rule.target.format(*m.groups())
    return None


# --------------------------------------------------------------------------------------------
# Reading


def checkpoint_files(path: str) -> dict[str, list[str]]:
    """{safetensors file: [keys]} of a checkpoint dir; validates the index and every file's header."""
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({e}); re-download it.") from e
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, SINGLE_FILE)):
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise CheckpointError(
            f"no safetensors weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} (PyTorch .bin checkpoints "
            "are not supported; convert with transformers' save_pretrained(safe_serialization=True)).")
    missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise CheckpointError(f"{INDEX_FILE} in {path} lists files that are missing: {missing}; download them "
                              "(the checkpoint is incomplete).")
    out, seen = {}, {}
    for fname in files:
        fpath = os.path.join(path, fname)
        try:
            with safe_open(fpath, framework="numpy") as f:
                keys = list(f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{fpath} is not a readable safetensors file ({e}); it is truncated or "
                                  "corrupt: delete it and re-download.") from e
        for k in keys:
            if k in seen:
                raise CheckpointError(f"tensor {k!r} is stored twice: in {seen[k]} and {fname}; the checkpoint is "
                                      "inconsistent, re-export it.")
            seen[k] = fname
        out[fname] = keys
    if weight_map is not None:
        for k, fname in weight_map.items():
            if seen.get(k) != fname:
                raise CheckpointError(f"{INDEX_FILE} maps {k!r} to {fname}, but "
                                      f"{'it is in ' + seen[k] if k in seen else 'no file holds it'}; re-download.")
    return out


def _plan(path: str, cfg: ModelConfig, params: dict[str, nnx.Variable]):
    """Check every tensor's mapping, shape and dtype from the headers; returns [(file, key, rule, our path)]."""
    rules, ignored = key_table(cfg), ignored_patterns(cfg)
    plan, claimed = [], {}
    for fname, keys in checkpoint_files(path).items():
        with safe_open(os.path.join(path, fname), framework="numpy") as f:
            for key in keys:
                m = _match(key, rules, ignored)
                if m == "ignore":
                    continue
                if m is None:
                    raise CheckpointError(f"unexpected tensor {key!r} in {fname}: no rule in weights.key_table maps "
                                          f"it (family={cfg.family}, attention_bias={cfg.attention_bias}, "
                                          f"tie_word_embeddings={cfg.tie_word_embeddings}); config.json and the "
                                          "weights may not belong together.")
                rule, target = m
                if target not in params:
                    raise CheckpointError(f"tensor {key!r} in {fname} maps to {target!r}, which the model does not "
                                          f"have (num_hidden_layers={cfg.num_layers}?).")
                if target in claimed:
                    raise CheckpointError(f"tensors {claimed[target]!r} and {key!r} both map to {target!r}.")
                claimed[target] = key
                sl = f.get_slice(key)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                if shape != rule.hf_shape(cfg):
                    raise CheckpointError(f"tensor {key!r} in {fname} has shape {shape}, expected "
                                          f"{rule.hf_shape(cfg)} from config.json; weights and config disagree.")
                if dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"tensor {key!r} in {fname} has dtype {dtype}; expected a float type "
                                          f"({', '.join(_FLOAT_DTYPES)}). Quantized checkpoints are not supported.")
                plan.append((fname, key, rule, target))
    missing = sorted(set(params) - set(claimed))
    if missing:
        hf_keys = []
        for target in missing[:5]:
            for rule in rules:
                m = re.fullmatch(rule.target_pattern, target)
                if m:
                    hf_keys.append(rule.hf_key.format(*m.groups()))
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors the model needs, e.g. {hf_keys}; "
                              "it is incomplete or for a different architecture.")
    return plan


def load_params(model: nnx.Module, path: str, cfg: ModelConfig, *, mesh=None, rules=None) -> nnx.Module:
    """Fill `model`'s parameters (abstract or concrete) from the checkpoint at `path`, in place.

    Each tensor is read, transformed to our layout, cast to the parameter's dtype and placed with
    its logical sharding on `mesh` (or the default device), then dropped from host memory.
    """
    check_unfused(model, "load_params")
    params = dict(iter_params(model))
    plan = _plan(path, cfg, params)
    by_file: dict[str, list] = {}
    for fname, key, rule, target in plan:
        by_file.setdefault(fname, []).append((key, rule, target))
    for fname, items in by_file.items():
        fpath = os.path.join(path, fname)
        try:
            with safe_open(fpath, framework="numpy") as f:
                for key, rule, target in items:
                    var = params[target]
                    spec = var.get_value()
                    host = np.asarray(rule.to_ours(f.get_tensor(key), cfg)).astype(np.dtype(spec.dtype))
                    sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
                    var.set_value(jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host))
                    del host
        except SafetensorError as e:
            raise CheckpointError(f"reading {fpath} failed ({e}); the file is corrupt: delete it and "
                                  "re-download.") from e
    return model


def check_tokenizer(tokenizer, cfg: ModelConfig, path: str) -> None:
    """Refuse a tokenizer that can emit ids the model's embedding does not have."""
    n = len(tokenizer)
    if n > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer in {path} has {n} tokens but config.json has vocab_size="
                              f"{cfg.vocab_size}: ids >= {cfg.vocab_size} have no embedding. Use the tokenizer "
                              "that belongs to these weights.")


def load_tokenizer(path: str, cfg: ModelConfig):
    """transformers.AutoTokenizer from `path`, checked against `cfg`."""
    import transformers

    # AutoTokenizer may build an empty tokenizer from config.json alone; demand the files themselves.
    found = [n for n in ("tokenizer.json", "tokenizer.model", "vocab.json") if os.path.exists(os.path.join(path, n))]
    if not found:
        raise CheckpointError(f"no tokenizer in {path}: expected tokenizer.json (or tokenizer.model / vocab.json) "
                              "and tokenizer_config.json next to config.json; copy them from the model's repo.")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {path} ({e}); it needs tokenizer_config.json and "
                              "tokenizer.json (or tokenizer.model) next to config.json.") from e
    check_tokenizer(tokenizer, cfg, path)
    return tokenizer


def abstract_target(cfg: ModelConfig, *, dtype=jnp.bfloat16, attention_impl: str = "xla") -> Transformer:
    """A Transformer whose parameters are shape/dtype placeholders (nothing allocated)."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
                                              attention_impl=attention_impl))


def read_config(path: str) -> ModelConfig:
    """The `ModelConfig` of the checkpoint directory `path` (its config.json), without reading weights."""
    try:
        return configs.from_hf_config(path)
    except configs.ConfigError as e:
        raise CheckpointError(f"{os.path.join(path, hub.CONFIG_FILE)}: {e}") from e


def load_target(path_or_repo: str, *, dtype=jnp.bfloat16, mesh=None, attention_impl: str = "xla", rules=None,
                allow_download: bool = False, with_tokenizer: bool = True):
    """Load an HF Llama / Qwen2 checkpoint as a `Transformer`.

    Args:
      path_or_repo: a local checkpoint directory or an HF repo id (resolved offline from the HF cache
        unless `allow_download`; see `hub.resolve_checkpoint`).
      dtype: parameter and compute dtype.
      mesh: optional ("data", "fsdp", "tensor") mesh; parameters are placed by `sharding` rules.
      attention_impl: the `pallas_kernels` implementation the model calls.
      rules: logical -> mesh axis rules (default `sharding.DEFAULT_RULES`).
      allow_download: let `hub` download a missing repo.
      with_tokenizer: also load (and check) the tokenizer; otherwise None is returned for it.

    Returns:
      (model, cfg, tokenizer).
    """
    path = hub.resolve_checkpoint(path_or_repo, allow_download=allow_download)
    cfg = read_config(path)
    tokenizer = load_tokenizer(path, cfg) if with_tokenizer else None
    model = abstract_target(cfg, dtype=dtype, attention_impl=attention_impl)
    load_params(model, path, cfg, mesh=mesh, rules=rules)
    return model, cfg, tokenizer


# --------------------------------------------------------------------------------------------
# Writing


def save_target(model: Transformer, cfg: ModelConfig, directory: str, tokenizer=None, *,
                max_shard_bytes: int | None = None, overwrite: bool = True) -> str:
    """Write `model` as an HF checkpoint (safetensors, config.json, optional tokenizer) that
    transformers and `load_target` read back; returns the directory's absolute path.

    The checkpoint is written whole through `hub.writing_directory`: nothing half-written after a
    failure, and no file of an earlier checkpoint in `directory` (a stale shard or index) survives.
    `overwrite=False` refuses a non-empty `directory` instead of replacing it. Tensors keep the
    parameters' dtype. `max_shard_bytes` splits the weights into several files plus
    model.safetensors.index.json (huggingface_hub's shard planner, in key-table order).
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    directory = hub.check_output_dir(directory, overwrite=overwrite)  # refuse before gathering any weight
    check_unfused(model, "save_target")
    params = dict(iter_params(model))
    tensors: dict[str, np.ndarray] = {}
    for rule in key_table(cfg):
        matches = [(t, re.fullmatch(rule.target_pattern, t)) for t in params]
        matches = sorted(((t, m) for t, m in matches if m), key=lambda tm: [int(g) for g in tm[1].groups()])
        for target, m in matches:
            value = np.asarray(jax.device_get(params[target].get_value()))
            tensors[rule.hf_key.format(*m.groups())] = np.ascontiguousarray(rule.to_hf(value, cfg))
    total = sum(a.nbytes for a in tensors.values())
    split = split_state_dict_into_shards_factory(tensors, get_storage_size=lambda a: a.nbytes,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_bytes or total)
    hf = configs.to_hf_config(cfg)
    hf["torch_dtype"] = {np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(
        np.dtype(next(iter(params.values())).get_value().dtype), "float32")
    with hub.writing_directory(directory, overwrite=overwrite) as tmp:
        for fname, keys in split.filename_to_tensors.items():
            save_file({k: tensors[k] for k in keys}, os.path.join(tmp, fname), metadata={"format": "pt"})
        if split.is_sharded:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
        with open(os.path.join(tmp, hub.CONFIG_FILE), "w") as f:
            json.dump(hf, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory
