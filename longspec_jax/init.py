"""What a run needs when it has no checkpoint: random weights for any config, and the byte tokenizer
of `configs.tiny_config()`.

Random weights (`random_target`, `random_draft`): RMSNorm scales are one and every other parameter
(projections, biases, embedding, LM head) is drawn from N(0, std^2), std = 0.02 by default (the
modules' own initialisers use the same distribution). The module is built abstractly
(`nnx.eval_shape`, nothing allocated) and the values are drawn by one jitted function whose outputs
are placed in the parameters' mesh shardings (`sharding` rules) when a mesh is given, so an 8B
model never exists unsharded on one device, and every process of a multi-host run computes the
same values. Parameter i (in `nnx.iter_graph` order) is drawn from `fold_in(key(seed), i)` with the
default threefry key, whose values do not depend on the mesh, the backend or the jax version;
parameters of one shape are drawn together (one random op per distinct shape), which keeps the
compile short for deep models. The compiled function is cached per structure, so new seeds are free.

The byte tokenizer (`byte_tokenizer`) is a `transformers.PreTrainedTokenizerFast`: id 0 is "<s>"
(BOS and padding), id 1 is "</s>" (EOS) and id b is byte b for b >= 2 (the control bytes 0 and 1
are encoded as byte 2), matching `tiny_config()` (vocab 256, bos/pad 0, eos 1). Like the tokenizers
of real checkpoints, it reads the texts "<s>" and "</s>" as those special tokens. It adds BOS when
asked for special tokens and carries a minimal chat template, so chat prompts work too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from longspec_jax import sharding
from longspec_jax.configs import DraftConfig, ModelConfig, RopeConfig
from longspec_jax.draft import Draft
from longspec_jax.layers import LOGICAL_AXES
from longspec_jax.transformer import Transformer

BOS_ID, EOS_ID = 0, 1
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def random_target(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=None, std: float = 0.02,
                  attention_impl: str = "xla", mesh: Mesh | None = None, rules=None) -> Transformer:
    """A `Transformer` with random weights (module docstring).

    Args:
      cfg: the model config.
      seed: the same seed gives the same weights, on any mesh and backend.
      dtype: compute dtype; param_dtype: storage dtype (default: `dtype`).
      std: standard deviation of every parameter but the norm scales.
      attention_impl: the `pallas_kernels` implementation the model calls at inference.
      mesh, rules: place each parameter in its sharding on `mesh` (default rules of `sharding`).
    """
    pd = dtype if param_dtype is None else param_dtype
    return _randomize(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=pd,
                                                         attention_impl=attention_impl)),
                      seed, std, mesh, rules)


def random_draft(cfg: DraftConfig, rope: RopeConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=None,
                 std: float = 0.02, attention_impl: str = "xla", mesh: Mesh | None = None, rules=None) -> Draft:
    """A `Draft` block with random weights; `rope` is the target's RopeConfig. Arguments as `random_target`."""
    pd = dtype if param_dtype is None else param_dtype
    return _randomize(nnx.eval_shape(lambda: Draft(cfg, rope, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=pd,
                                                   attention_impl=attention_impl)),
                      seed, std, mesh, rules)


def _randomize(abstract: nnx.Module, seed: int, std: float, mesh: Mesh | None, rules) -> nnx.Module:
    """Fill every variable of an abstract module with drawn values, in place; returns the module."""
    variables = [var for _, var in sharding.iter_params(abstract)]
    specs = tuple((tuple(v.get_value().shape), jnp.dtype(v.get_value().dtype),
                   v.get_metadata(LOGICAL_AXES, None) == ("norm",)) for v in variables)
    shardings = None if mesh is None else tuple(sharding.variable_sharding(v, mesh, rules) for v in variables)
    values = _drawer(specs, shardings)(jax.random.key(seed), jnp.float32(std))
    for var, value in zip(variables, values):
        var.set_value(value)
    return abstract


@functools.lru_cache(maxsize=32)
def _drawer(specs: tuple, shardings: tuple | None):
    """The jitted `(key, std) -> [value per variable]` for one module structure (and placement)."""
    groups: dict[tuple, list[int]] = {}
    for i, (shape, dt, is_norm) in enumerate(specs):
        if not is_norm:
            groups.setdefault((shape, dt), []).append(i)

    def draw(key, std):
        out = [jnp.ones(shape, dt) if is_norm else None for shape, dt, is_norm in specs]
        for (shape, dt), idx in groups.items():
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx, jnp.uint32))
            stacked = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys) * std  # [n, *shape]
            for j, i in enumerate(idx):
                out[i] = stacked[j].astype(dt)
        return out

    return jax.jit(draw, out_shardings=None if shardings is None else list(shardings))


def byte_tokenizer():
    """The byte-level `PreTrainedTokenizerFast` of `tiny_config()` (module docstring)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable stand-in the ByteLevel pre-tokenizer emits
    vocab = {"<s>": BOS_ID, "</s>": EOS_ID, **{symbol[b]: b for b in range(2, 256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\x00", "\x02"), normalizers.Replace("\x01", "\x02")])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
