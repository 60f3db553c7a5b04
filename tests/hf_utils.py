"""Tiny random Hugging Face checkpoints for parity and loader tests (no network needed).

    path, hf_model = make_hf_checkpoint(tmp_path, kind="llama_gqa", tie=False, rope="llama3")

writes `path/` with config.json, safetensors weights (one file, or several plus
model.safetensors.index.json when `sharded=True`) and a small byte-level BPE tokenizer (printable
ASCII, so any short English text encodes) that `transformers.AutoTokenizer.from_pretrained(path)`
loads. `hf_model` is the float32 torch model (eval mode, eager attention) whose weights were saved,
for reference outputs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

KINDS = ("llama_mha", "llama_gqa", "llama_mqa", "qwen2")
ROPES = ("default", "linear", "llama3", "dynamic")

# Small but not degenerate: GQA group 2, head_dim 16 (so llama3's three frequency bands all occur).
_SHAPES = {
    "llama_mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "llama_gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "llama_mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
}

# max_position_embeddings and rope_scaling per rope kind. llama3's original length (64) puts the
# 16-dim head's wavelengths in all three bands; dynamic's max_position_embeddings (64) is short so
# tests can go beyond it and activate the NTK rescaling.
_ROPES: dict[str, tuple[int, dict[str, Any] | None]] = {
    "default": (256, None),
    "linear": (256, {"rope_type": "linear", "factor": 2.0}),
    "llama3": (256, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}),
    "dynamic": (64, {"rope_type": "dynamic", "factor": 2.0}),
}

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3; configs use bos=1, eos=2, pad=3


def hf_config(kind: str = "llama_gqa", *, tie: bool = False, rope: str = "default", vocab_size: int = 128,
              hidden_size: int = 64, intermediate_size: int = 96, num_layers: int = 2,
              rope_theta: float = 10000.0) -> transformers.PretrainedConfig:
    """The transformers config of a tiny model of `kind` with RoPE scaling `rope`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if rope not in ROPES:
        raise ValueError(f"rope must be one of {ROPES}, got {rope!r}")
    max_pos, scaling = _ROPES[rope]
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, head_dim=hidden_size // _SHAPES[kind]["num_attention_heads"],
        max_position_embeddings=max_pos, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.1,
        **_SHAPES[kind],
    )
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if scaling is not None:
        rope_parameters = {**scaling, "rope_theta": rope_theta}
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(use_sliding_window=False, rope_parameters=rope_parameters, **common)
    else:
        cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, rope_parameters=rope_parameters,
                                       **common)
    cfg._attn_implementation = "eager"
    return cfg


def make_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly `vocab_size` ids (>= 99).

    Ids: the 4 SPECIAL_TOKENS, then the 94 printable ASCII characters and "Ġ" (byte-level space),
    then merges (" x" and letter pairs) up to `vocab_size`. Byte-level BPE is what AutoTokenizer
    rebuilds for Qwen2 (it reconstructs Qwen2Tokenizer from vocab + merges), so the same files
    encode identically whichever class AutoTokenizer picks.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    base = [chr(c) for c in range(33, 127)] + ["Ġ"]
    if vocab_size < len(SPECIAL_TOKENS) + len(base):
        raise ValueError(f"tokenizer vocab_size must be >= {len(SPECIAL_TOKENS) + len(base)}, got {vocab_size}")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(base))}
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    merges = []
    for a, b in [("Ġ", c) for c in letters] + [(a, b) for a in letters for b in letters]:
        if len(vocab) >= vocab_size:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")


def random_hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 eval-mode causal LM with every weight random (norm scales around 1, biases nonzero)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                         attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model.eval()


def make_hf_checkpoint(tmp_path: str | os.PathLike, kind: str = "llama_gqa", *, tie: bool = False,
                       rope: str = "default", sharded: bool = False, seed: int = 0,
                       tokenizer_vocab: int | None = None, name: str | None = None, **config_kw):
    """Write a tiny random HF checkpoint directory and return (path, hf_model).

    Args:
      tmp_path: parent directory (e.g. pytest's tmp_path).
      kind: one of KINDS ("llama_mha", "llama_gqa", "llama_mqa", "qwen2" with q/k/v biases).
      tie: tie_word_embeddings (no lm_head.weight in the checkpoint).
      rope: one of ROPES.
      sharded: several safetensors files plus model.safetensors.index.json.
      seed: torch seed of the random weights.
      tokenizer_vocab: tokenizer size (default: the model's vocab_size); larger values make an
        inconsistent checkpoint for loader tests.
      name: subdirectory name (default derived from the arguments).
      **config_kw: overrides for `hf_config` (vocab_size, hidden_size, num_layers, rope_theta, ...).

    Returns:
      (path string, float32 torch model in eval mode).
    """
    config = hf_config(kind, tie=tie, rope=rope, **config_kw)
    model = random_hf_model(config, seed)
    name = name or f"{kind}-{'tied' if tie else 'untied'}-{rope}{'-sharded' if sharded else ''}-{seed}"
    path = os.path.join(os.fspath(tmp_path), name)
    # A shard limit well below one layer's size forces several files.
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "40KB"} if sharded else {}))
    make_tokenizer(tokenizer_vocab or config.vocab_size).save_pretrained(path)
    return path, model
