"""Load and save LongSpec draft checkpoints in the released `sail/longspec-*` format (spec 1.5).

A checkpoint is a directory with a Hugging Face `config.json` (the target's LlamaConfig /
Qwen2Config, read here only for the draft's shapes, plus `WINDOW_KEY`, the self-attention window,
when we wrote it) and one weight file (`hub.DRAFT_WEIGHT_FILES`): `model.safetensors`, or
`pytorch_model.bin` / `draft_model_weights.pth` (a torch state dict; read with
`torch.load(weights_only=True)`, so torch is needed only for those). It may also ship a draft
vocabulary (`draft_vocab.FILE`). Keys are the unprefixed names of `LlamaGlideDecoderLayer`:

  input_layernorm.weight [D]                     self_attn.{q,k,v}_proj.{weight,bias}, o_proj.weight
  post_self_attention_layernorm.weight [D]       cross_attn.q_proj.{weight,bias}, o_proj.weight
  post_cross_attention_layernorm.weight [D]      mlp.{gate,up,down}_proj.weight

Leading `model.` / `glide.` / `draft_model.` / `module.` prefixes are stripped (HF
`base_model_prefix`, the inference module name, the training module name, a DeepSpeed wrapper).
`cross_attn.{k,v}_proj.*` exist in the released files but are never used by the model (spec 1.3)
and are skipped; rotary `inv_freq` buffers too.
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
import zipfile
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longspec_jax import draft_vocab, hub
from longspec_jax.configs import ConfigError, DraftConfig, ModelConfig, from_hf_config, to_hf_config
from longspec_jax.draft import Draft
from longspec_jax.transformer import check_unfused

PREFIXES = ("model.", "glide.", "draft_model.", "module.")
# config.json key holding the draft's self-attention window; absent in the released drafts (512).
WINDOW_KEY = "draft_window"
DEFAULT_WINDOW = 512
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
    """Remove any leading model./glide./draft_model./module. prefixes (possibly nested, e.g. a
    DeepSpeed-wrapped training model's `module.draft_model.`)."""
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
        try:
            # framework="flax" also handles bfloat16 (numpy has no native bf16).
            with safe_open(path, framework="flax") as f:
                for k in f.keys():
                    out[k] = np.asarray(f.get_tensor(k))
        except Exception as e:  # noqa: BLE001 - safetensors' Rust error type is not always exported
            raise DraftWeightsError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                                    "truncated or not a weight file: re-export or re-download it.") from e
        return out
    if path.endswith((".bin", ".pth", ".pt")):
        return _read_torch(path)
    raise DraftWeightsError(f"unsupported draft weight file {path}: expected .safetensors, .bin or .pth")


def _read_torch(path: str) -> dict[str, np.ndarray]:
    """A torch.save'd state dict (optionally under "state_dict") as numpy arrays."""
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (b"\x80").
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise DraftWeightsError(f"{path} is not a PyTorch file (torch.save writes a zip archive; this file starts "
                                f"with {head!r}); pass the draft_model_weights.pth / pytorch_model.bin you trained "
                                "or downloaded.")
    try:
        import torch
    except ImportError:
        raise DraftWeightsError(
            f"{path} is a PyTorch state dict; reading it needs torch (pip install torch), or convert it "
            "once elsewhere with `python -m infer.convert_draft`.") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types; name the file
        raise DraftWeightsError(f"could not read {path} with torch.load(weights_only=True) ({type(e).__name__}: "
                                f"{e}); it is truncated, or holds more than tensors (re-save the state dict "
                                "alone with torch.save(model.state_dict(), ...)).") from e
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


def find_weight_file(directory: str | os.PathLike) -> str:
    """The draft weight file in `directory`: the first of `hub.DRAFT_WEIGHT_FILES` present."""
    directory = os.fspath(directory)
    for name in hub.DRAFT_WEIGHT_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    if os.path.isfile(os.path.join(directory, hub.INDEX_FILE)):
        raise DraftWeightsError(f"{directory}: sharded draft checkpoints are not supported (a draft is one "
                                "block; re-save it as a single model.safetensors).")
    raise DraftWeightsError(f"{directory} holds none of {', '.join(hub.DRAFT_WEIGHT_FILES)}.")


def _read_config(config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A draft directory's config.json (or the file, or a dict) as a dict."""
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, hub.CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"draft config not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-save the draft.") from e


def _check_window(window, source: str) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"{source}: the draft self-attention window must be an integer >= 1, got {window!r}")
    return window


def draft_config_from_hf(config: str | os.PathLike | Mapping[str, Any], *, window: int | None = None
                         ) -> DraftConfig:
    """Draft shapes from the checkpoint's config.json (the target's LlamaConfig / Qwen2Config).

    Only the shape fields are read; the target's own config stays authoritative for RoPE etc.
    `window`: the self-attention window; None takes the one recorded under `WINDOW_KEY`, else
    `DEFAULT_WINDOW` (the released drafts' 512).
    """
    config = _read_config(config)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads") if k not in config]
    if missing:
        raise ConfigError(f"draft config.json is missing {missing}")
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"draft config.json: hidden_act={act!r} is not supported (only silu).")
    if window is None:
        window = _check_window(config.get(WINDOW_KEY, DEFAULT_WINDOW), f"draft config.json {WINDOW_KEY}")
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
               param_dtype=None, attention_impl: str = "xla", window: int | None = None) -> Draft:
    """Build a `Draft` for `target_cfg` from a checkpoint directory or a bare weight file.

    Args:
      path: directory (config.json + model.safetensors | pytorch_model.bin | draft_model_weights.pth)
        or one weight file (then the shapes come from the target config and the tensors).
      target_cfg: the target model's config; hidden size, heads, head dim and vocabulary must match.
        Default: the checkpoint's own config.json, which in the released format is the target's
        config (RoPE included); pass the target's config whenever you have it.
      dtype / param_dtype: compute and storage dtypes (param_dtype defaults to dtype).
      window: the self-attention window; None takes the one the checkpoint's config.json records
        (`WINDOW_KEY`), else `DEFAULT_WINDOW`.
    Raises:
      ConfigError for a draft config that does not match the target (or a window < 1),
      DraftWeightsError for an unreadable file or unknown / missing / duplicate / mis-shaped tensors.
    """
    path = os.fspath(path)
    if window is not None:
        _check_window(window, "load_draft")
    if os.path.isdir(path):
        weight_file = find_weight_file(path)
        config = _read_config(path) if os.path.isfile(os.path.join(path, hub.CONFIG_FILE)) else None
    else:
        weight_file, config = path, None
    if target_cfg is None:
        if config is None:
            raise ConfigError(f"{path}: a bare weight file needs the target's config (target_cfg=...).")
        target_cfg = from_hf_config({k: v for k, v in config.items() if k != WINDOW_KEY})
    param_dtype = dtype if param_dtype is None else param_dtype
    tensors = read_tensors(weight_file)
    if config is not None:
        cfg = draft_config_from_hf(config, window=window)
        cfg.check_matches(target_cfg, source=f"draft config {os.path.join(path, hub.CONFIG_FILE)}")
    else:
        F = _infer_intermediate(tensors)
        cfg = DraftConfig.from_target(target_cfg, intermediate_size=F, window=window or DEFAULT_WINDOW)
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
    check_unfused(draft, "draft_state_dict")
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
               dtype=None, overwrite: bool = True, draft_vocab_file: str | None = None) -> str:
    """Write `directory/config.json` + `directory/model.safetensors` in the sail/longspec format;
    returns the directory's absolute path.

    config.json is the target's HF config with the draft's intermediate size (what the released
    drafts carry) and the window under `WINDOW_KEY`; without target_cfg a minimal Llama config of
    the draft's shapes is written. The directory is written whole through `hub.writing_directory`:
    nothing half-written after a failure, and nothing of an earlier checkpoint there survives (a
    draft vocabulary beside old weights would no longer belong to them). `overwrite=False` refuses
    a non-empty `directory` instead of replacing it. `draft_vocab_file`: a vocabulary built for
    these weights, shipped with them as `draft_vocab.FILE`.
    """
    from safetensors.flax import save_file  # handles bfloat16, which plain numpy cannot

    directory = hub.check_output_dir(directory, overwrite=overwrite)
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
    hf[WINDOW_KEY] = cfg.window
    tensors = draft_state_dict(draft, dtype=dtype)
    with hub.writing_directory(directory, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, hub.CONFIG_FILE), "w") as f:
            json.dump(hf, f, indent=2)
        save_file({k: jnp.asarray(v) for k, v in tensors.items()}, os.path.join(tmp, hub.SINGLE_FILE),
                  metadata={"format": "pt"})
        if draft_vocab_file is not None:
            shutil.copyfile(draft_vocab_file, os.path.join(tmp, draft_vocab.FILE))
    return directory
