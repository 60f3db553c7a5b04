"""`tiny-random`: a tiny random-weight Llama and a byte-level tokenizer, built on the fly.

It exists so `python -m infer.generate` runs offline, on a CPU, with no checkpoint: the output is
random bytes, and the CLI says so. The tokenizer is built with the `tokenizers` library (byte-level
BPE without merges: 3 special tokens + the 256 byte symbols), so any text encodes and decoding is
lossless; it carries a minimal chat template so the chat-template path is exercised too.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longspec_jax.configs import ModelConfig, tiny_config

NAME = "tiny-random"
BANNER = ("[tiny-random] random weights and a byte-level tokenizer built on the fly: the output is "
          "random bytes, useful only to check that generation runs. Pass --model PRESET for a real model.")
SPECIALS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIALS) + 256
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def config() -> ModelConfig:
    """The tiny-random model's config (tiny_config with the byte tokenizer's vocabulary and ids)."""
    return tiny_config(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID)


def tokenizer():
    """A `transformers.PreTrainedTokenizerFast` over bytes, with BOS added and a chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for bytes
    vocab = {t: i for i, t in enumerate(SPECIALS + tuple(byte_symbols))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def random_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, attention_impl: str = "xla", seed: int = 0,
                 std: float = 0.02, on_device: bool = False):
    """A `Transformer` with random weights: normal(0, std) matrices and biases, unit RMSNorm scales.

    The model is built abstractly (`nnx.eval_shape`, nothing allocated) and each parameter is then
    filled once, so no eager per-parameter initialisation runs.

    Args:
      cfg: the model config.
      dtype: parameter and compute dtype.
      attention_impl: the `pallas_kernels` implementation the model calls.
      seed: the same seed gives the same weights (for a given `on_device`).
      std: standard deviation of the random matrices.
      on_device: draw the weights with one jitted function on the default device (8B-shaped
        benchmark weights, no host copy). Otherwise draw them with numpy on the host: for tiny
        models this avoids an XLA compile, which on a loaded 2-core CPU costs more than the rest of
        a smoke run.
    """
    from longspec_jax.weights import abstract_target

    graphdef, abstract = nnx.split(abstract_target(cfg, dtype=dtype, attention_impl=attention_impl))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    is_norm = [any(getattr(k, "key", None) == "scale" for k in path) for path, _ in leaves]
    shapes = [(tuple(leaf.shape), leaf.dtype) for _, leaf in leaves]

    if on_device:
        @jax.jit
        def init(key):
            # "rbg" keys lower to XLA's RngBitGenerator: far faster to compile than threefry.
            keys = jax.random.split(key, len(shapes))
            return [jnp.ones(shape, dt) if norm else (jax.random.normal(k, shape, jnp.float32) * std).astype(dt)
                    for k, norm, (shape, dt) in zip(keys, is_norm, shapes)]

        values = init(jax.random.key(seed, impl="rbg"))
    else:
        rng = np.random.default_rng(seed)
        values = [jnp.asarray(np.ones(shape, np.float32) if norm
                              else rng.standard_normal(shape, np.float32) * std, dtype=dt)
                  for norm, (shape, dt) in zip(is_norm, shapes)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, values))


def build(*, dtype=jnp.float32, attention_impl: str = "xla", seed: int = 0):
    """(model, cfg, tokenizer) with weights drawn from `seed` (deterministic)."""
    cfg = config()
    return random_model(cfg, dtype=dtype, attention_impl=attention_impl, seed=seed, std=0.1), cfg, tokenizer()
