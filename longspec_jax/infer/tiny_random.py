"""`tiny-random`: a tiny random-weight Llama and its byte-level tokenizer, built on the fly.

It exists so `python -m infer.generate` runs offline, on a CPU, with no checkpoint: the output is
random bytes, and the CLI says so. The model is `configs.tiny_config()` with weights from
`longspec_jax.init.random_target`; the tokenizer is `longspec_jax.init.byte_tokenizer()` (any text
encodes, decoding is lossless, and it carries a minimal chat template so the chat path is exercised).
"""

from __future__ import annotations

import jax.numpy as jnp

from longspec_jax import init
from longspec_jax.configs import ModelConfig, tiny_config

NAME = "tiny-random"
BANNER = ("[tiny-random] random weights and a byte-level tokenizer built on the fly: the output is "
          "random bytes, useful only to check that generation runs. Pass --model PRESET for a real model.")


def config() -> ModelConfig:
    """The tiny-random model's config: `tiny_config()`, whose vocabulary and ids are the byte tokenizer's."""
    return tiny_config()


def tokenizer():
    """A `transformers.PreTrainedTokenizerFast` over bytes, with BOS added and a chat template."""
    return init.byte_tokenizer()


def build(*, dtype=jnp.float32, attention_impl: str = "xla", seed: int = 0):
    """(model, cfg, tokenizer) with weights drawn from `seed` (deterministic)."""
    cfg = config()
    return init.random_target(cfg, seed=seed, dtype=dtype, std=0.1, attention_impl=attention_impl), cfg, tokenizer()
