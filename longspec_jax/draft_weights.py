"""Load and save LongSpec draft checkpoints in the released `sail/longspec-*` format (spec 1.5).

A checkpoint is a directory with a Hugging Face `config.json` (the target's LlamaConfig /
Qwen2Config, read here only for the draft's shapes) and one weight file:
`model.safetensors`, or `pytorch_model.bin` / `draft_model_weights.pth` (a torch state dict; read
with `torch.load(weights_only=True)`, so torch is needed only for those). Keys are the unprefixed
names of `LlamaGlideDecoderLayer`:

  input_layernorm.weight [D]                     self_attn.{q,k,v}_proj.{weight,bias}, o_proj.weight
  post_self_attention_layernorm.weight [D]       cross_attn.q_proj.{weight,bias}, o_proj.weight
  post_cross_attention_layernorm.weight [D]      mlp.{gate,up,down}_proj.weight

A leading `model.` / `glide.` / `draft_model.` prefix is stripped (HF `base_model_prefix`, the
inference module name, the training module name). `cross_attn.{k,v}_proj.*` exist in the released
files but are never used by the model (spec 1.3) and are skipped; rotary `inv_freq` buffers too.
Everything else must match the table exactly: unknown, missing, duplicate or mis-shaped tensors
raise `DraftWeightsError` naming them. PyTorch Linear weights are [out, in]; they are transposed and
reshaped into our [D, N, H] / [N, H, D] / [D, F] kernels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longspec_jax.configs import ConfigError, DraftConfig, ModelConfig, from_hf_config, to_hf_config
from longspec_jax.draft import Draft

PREFIXES = ("model.", "glide.", "draft_model.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "draft_model_weights.pth")
_IGNORED_KEYS = re.compile(r"^cross_attn\.(k_proj|v_proj)\.(weight|bias)$|(^|\.)rotary_emb\.inv_freq$")


class DraftWeightsError(ValueError):
    """A draft checkpoint that does not fit the draft model; the message names the tensors."""


def _table(cfg: DraftConfig) -> dict[str, tuple[tuple[str, str], tuple[int, ...], Callable, Callable]]:
    """HF key -> ((module, param), HF shape, to_ours(np) , to_hf(np))."""
    D, N, K, H, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size

    def proj_in(heads):  # [heads*H, D] -> [D, heads, H]
        return (lambda w: w.T.reshape(D, heads, H), lambda p: p.reshape(D, heads * H).T)

    def bias(heads):
        return (lambda b: b.reshape(heads, H), lambda p: p.reshape(heads * H))

    o_proj = (lambda w: w.T.reshape(N, H, D), lambda p: p.reshape(N * H, D).T)  # [D, N*H] -> [N, H, D]
    lin = (lambda w: w.T, lambda p: p.T)
    same = (lambda x: x, lambda x: x)
    t: dict[str, Any] = {}
    for norm in ("input_layernorm", "post_self_attention_layernorm", "post_cross_attention_layernorm"):
        t[f"{norm}.weight"] = ((norm, "scale"), (D,), *same)
    for name, heads in (("q", N), ("k", K), ("v", K)):
        t[f"self_attn.{name}_proj.weight"] = (("self_attn", f"{name}_kernel"), (heads * H, D), *proj_in(heads))
        t[f"self_attn.{name}_proj.bias"] = (("self_attn", f"{name}_bias"), (heads * H,), *bias(heads))
    t["self_attn.o_proj.weight"] = (("self_attn", "o_kernel"), (D, N * H), *o_proj)
    t["cross_attn.q_proj.weight"] = (("cross_attn", "q_kernel"), (N * H, D), *proj_in(N))
    t["cross_attn.q_proj.bias"] = (("cross_attn", "q_bias"), (N * H,), *bias(N))
    t["cross_attn.o_proj.weight"] = (("cross_attn", "o_kernel"), (D, N * H), *o_proj)
    t["mlp.gate_proj.weight"] = (("mlp", "gate_kernel"), (F, D), *lin)
    t["mlp.up_proj.weight"] = (("mlp", "up_kernel"), (F, D), *lin)
    t["mlp.down_proj.weight"] = (("mlp", "down_kernel"), (D, F), *lin)
    return t


def strip_prefix(key: str) -> str:
    """Remove any leading model./glide./draft_model. prefixes (possibly nested)."""
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


# ------------------------------------------------------------------------------------------------
# reading


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a weight file (.safetensors, or a torch .bin/.pth state dict) to host numpy arrays."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DraftWeightsError(f"draft weight file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        # framework="flax" also handles bfloat16 (numpy has no native bf16).
        with safe_open(path, framework="flax") as f:
            for k in f.keys():
                out[k] = np.asarray(f.get_tensor(k))
        return out
    if path.endswith((".bin", ".pth", ".pt")):
        try:
            import torch
        except ImportError:
            raise DraftWeightsError(
                f"{path} is a PyTorch state dict; reading it needs torch (pip install torch), or convert it "
                "once elsewhere with `python -m infer.convert_draft`.") from None
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types; name the file
            raise DraftWeightsError(f"could not read {path} with torch.load(weights_only=True): {e}") from e
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise DraftWeightsError(f"{path} does not hold a state dict (got {type(sd).__name__}).")
        out = {}
        for k, v in sd.items():
            if not hasattr(v, "detach"):
                raise DraftWeightsError(f"{path}: entry {k!r} is not a tensor ({type(v).__name__}).")
            v = v.detach().cpu()
            out[k] = (v.float().numpy().astype(jnp.bfloat16) if v.dtype == torch.bfloat16 else v.numpy())
        return out
    raise DraftWeightsError(f"unsupported draft weight file {path}: expected .safetensors, .bin or .pth")


def find_weight_file(directory: str | os.PathLike) -> str:
    directory = os.fspath(directory)
    for name in WEIGHT_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    if os.path.isfile(os.path.join(directory, "model.safetensors.index.json")):
        raise DraftWeightsError(f"{directory}: sharded draft checkpoints are not supported (a draft is one "
                                "block; re-save it as a single model.safetensors).")
    raise DraftWeightsError(f"{directory} holds none of {', '.join(WEIGHT_FILES)}.")


# A draft directory may ship the draft vocabulary it was built with (EAGLE-3 keeps its d2t map in
# the checkpoint the same way): `{"ids": [...], ...}` as written by scripts/draft_vocab.py
# (`--draft-dir`). `python -m infer.generate` uses it unless told `--draft-vocab none`.
DRAFT_VOCAB_FILE = "draft_vocab.json"


def find_draft_vocab(path: str | os.PathLike) -> str | None:
    """The draft vocabulary file shipped in a draft directory (or beside a draft weight file), or None."""
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(directory, DRAFT_VOCAB_FILE)
    return candidate if os.path.isfile(candidate) else None


def read_draft_vocab(path: str | os.PathLike) -> np.ndarray:
    """Token ids of a draft vocabulary file: a .npy array, or a .json list or {"ids": [...]} of ints.
    Validation against the target's vocabulary happens in the decoder (`check_draft_vocab`)."""
    path = os.fspath(path)
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return np.asarray(data["ids"] if isinstance(data, dict) else data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the draft vocabulary {path!r}: {e}. Rebuild it with scripts/draft_vocab.py.") from e
    raise ValueError(f"draft vocabulary {path!r} must be a .npy or .json file of token ids (scripts/draft_vocab.py)")


def draft_config_from_hf(config: str | os.PathLike | Mapping[str, Any], *, window: int = 512) -> DraftConfig:
    """Draft shapes from the checkpoint's config.json (the target's LlamaConfig / Qwen2Config).

    Only the shape fields are read; the target's own config stays authoritative for RoPE etc.
    """
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"draft config not found: {path}")
        with open(path) as f:
            config = json.load(f)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads") if k not in config]
    if missing:
        raise ConfigError(f"draft config.json is missing {missing}")
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"draft config.json: hidden_act={act!r} is not supported (only silu).")
    return DraftConfig(hidden_size=int(config["hidden_size"]), intermediate_size=int(config["intermediate_size"]),
                       num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                       rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), window=window,
                       vocab_size=int(config.get("vocab_size", 0)))


def _check_tensors(tensors: Mapping[str, np.ndarray], cfg: DraftConfig, source: str) -> dict[str, np.ndarray]:
    table = _table(cfg)
    found: dict[str, np.ndarray] = {}
    dup, unknown = [], []
    for raw, arr in tensors.items():
        key = strip_prefix(raw)
        if _IGNORED_KEYS.search(key):
            continue
        if key not in table:
            unknown.append(raw)
        elif key in found:
            dup.append(raw)
        else:
            found[key] = arr
    missing = sorted(set(table) - set(found))
    bad = [f"{k}: file {tuple(found[k].shape)} vs expected {table[k][1]}" for k in sorted(found)
           if tuple(found[k].shape) != table[k][1]]
    problems = []
    if unknown:
        problems.append(f"unexpected tensors {sorted(unknown)}")
    if dup:
        problems.append(f"duplicate tensors (same name after prefix stripping) {sorted(dup)}")
    if missing:
        problems.append(f"missing tensors {missing}")
    if bad:
        problems.append("mis-shaped tensors [" + "; ".join(bad) + "]")
    if problems:
        raise DraftWeightsError(
            f"{source} is not a LongSpec draft for hidden_size={cfg.hidden_size}, heads={cfg.num_heads}, "
            f"kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, intermediate={cfg.intermediate_size}: "
            + "; ".join(problems) + ". Check that the draft was trained for this target.")
    return found


def _infer_intermediate(tensors: Mapping[str, np.ndarray]) -> int | None:
    for raw, arr in tensors.items():
        if strip_prefix(raw) == "mlp.gate_proj.weight":
            return int(arr.shape[0])
    return None


def load_draft(path: str | os.PathLike, target_cfg: ModelConfig | None = None, *, dtype=jnp.bfloat16,
               param_dtype=None, attention_impl: str = "xla", window: int = 512) -> Draft:
    """Build a `Draft` for `target_cfg` from a checkpoint directory or a bare weight file.

    Args:
      path: directory (config.json + model.safetensors | pytorch_model.bin | draft_model_weights.pth)
        or one weight file (then the shapes come from the target config and the tensors).
      target_cfg: the target model's config; hidden size, heads, head dim and vocabulary must match.
        Default: the checkpoint's own config.json, which in the released format is the target's
        config (RoPE included); pass the target's config whenever you have it.
      dtype / param_dtype: compute and storage dtypes (param_dtype defaults to dtype).
    Raises:
      ConfigError for a draft config that does not match the target, DraftWeightsError for
      unknown / missing / duplicate / mis-shaped tensors.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        weight_file = find_weight_file(path)
        has_config = os.path.isfile(os.path.join(path, "config.json"))
    else:
        weight_file, has_config = path, False
    if target_cfg is None:
        if not has_config:
            raise ConfigError(f"{path}: a bare weight file needs the target's config (target_cfg=...).")
        target_cfg = from_hf_config(os.path.join(path, "config.json"))
    param_dtype = dtype if param_dtype is None else param_dtype
    tensors = read_tensors(weight_file)
    if has_config:
        cfg = draft_config_from_hf(path, window=window)
        cfg.check_matches(target_cfg, source=f"draft config {os.path.join(path, 'config.json')}")
    else:
        F = _infer_intermediate(tensors)
        cfg = DraftConfig.from_target(target_cfg, intermediate_size=F, window=window)
    if not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=target_cfg.vocab_size)
    found = _check_tensors(tensors, cfg, weight_file)
    draft = Draft(cfg, target_cfg.rope, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                  attention_impl=attention_impl)
    table = _table(cfg)
    for key, arr in found.items():
        (mod, name), _, to_ours, _ = table[key]
        p = getattr(getattr(draft, mod), name)
        p.value = jnp.asarray(to_ours(np.asarray(arr)), dtype=param_dtype)
    return draft


# ------------------------------------------------------------------------------------------------
# writing


def draft_state_dict(draft: Draft, *, include_unused: bool = True, dtype=None) -> dict[str, np.ndarray]:
    """The draft's HF-named state dict (numpy). With include_unused, zero cross_attn k/v tensors are
    added so that the original PyTorch code loads the file without missing-key warnings."""
    cfg = draft.cfg
    out = {}
    for key, ((mod, name), shape, _, to_hf) in _table(cfg).items():
        arr = np.asarray(jax.device_get(getattr(getattr(draft, mod), name).value))
        arr = to_hf(arr)
        out[key] = np.ascontiguousarray(arr.astype(dtype) if dtype is not None else arr)
        assert out[key].shape == shape, (key, out[key].shape, shape)
    if include_unused:
        dt = out["cross_attn.q_proj.weight"].dtype
        kvh = cfg.num_kv_heads * cfg.head_dim
        for n in ("k_proj", "v_proj"):
            out[f"cross_attn.{n}.weight"] = np.zeros((kvh, cfg.hidden_size), dt)
            out[f"cross_attn.{n}.bias"] = np.zeros((kvh,), dt)
    return out


def save_draft(draft: Draft, directory: str | os.PathLike, *, target_cfg: ModelConfig | None = None,
               dtype=None) -> None:
    """Write `directory/config.json` + `directory/model.safetensors` in the sail/longspec format.

    config.json is the target's HF config with the draft's intermediate size (what the released
    drafts carry); without target_cfg a minimal Llama config of the draft's shapes is written.
    The files are written to a temporary directory first and moved into place, so a failure
    leaves nothing half-written.
    """
    from safetensors.flax import save_file  # handles bfloat16, which plain numpy cannot

    directory = os.fspath(directory)
    cfg = draft.cfg
    if target_cfg is not None:
        cfg.check_matches(target_cfg)
        hf = to_hf_config(target_cfg.replace(intermediate_size=cfg.intermediate_size))
    else:
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
              "rms_norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size, "num_hidden_layers": 1}
    hf["rms_norm_eps"] = cfg.rms_norm_eps
    tensors = draft_state_dict(draft, dtype=dtype)
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".draft-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        os.makedirs(directory, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
