"""What a command line names, shared by `python -m infer.generate` and `python -m infer.serve`: the
model and draft flags, their checks (before any weight is read), loading, and the compilation cache.

--model takes an exact preset name (`longspec_jax.configs.PRESETS`; weights come from --checkpoint
DIR or the preset's Hugging Face repo in the local cache), `longspec-demo` (the small code model and
draft trained here and shipped in longspec_jax/demo) or `tiny-random`.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from longspec_jax.infer import runtime, tiny_random
from longspec_jax import demo

# The model used when --model is not given: the demo pair shipped in the package.
DEFAULT_MODEL = demo.NAME
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags that pick and place the models (both commands)."""
    from longspec_jax.configs import PRESETS

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset name ({', '.join(sorted(PRESETS))}), {demo.NAME!r} or {tiny_random.NAME!r}")
    p.add_argument("--checkpoint", default=None,
                   help="local HF checkpoint directory to load instead of the preset's repo")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="parameter and compute dtype (auto: f32 on CPU, bf16 on GPUs)")
    p.add_argument("--attention-impl", choices=("auto", "xla", "pallas"), default="auto",
                   help="attention kernels: pallas (Hopper GPUs), xla (anywhere), auto picks")
    p.add_argument("--method", choices=("ar", "tree"), default=None,
                   help="ar: one token per forward; tree: LongSpec tree speculative decoding (default when a "
                        "draft is available)")
    p.add_argument("--draft", default=None,
                   help="--method tree: draft checkpoint DIR or HF repo (default: the preset's draft repo)")
    p.add_argument("--tree-shape", nargs="+", type=int, default=None,
                   help="--method tree: nodes per depth, e.g. 4 16 16 16 16 (default: chosen from the context "
                        "length, device, temperature and load, longspec_jax/infer/defaults.py)")
    p.add_argument("--draft-vocab", default=None, metavar="FILE",
                   help="--method tree: draft vocabulary, a .npy or .json list of token ids "
                        "(scripts/draft_vocab.py); the draft scores only these tokens, output unchanged. "
                        "Default: the draft's own draft_vocab.json when its directory ships one (the "
                        f"{demo.NAME} draft ships 2048 ids), else none; 'none' scores the full vocabulary")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help=f"prompt tokens per prefill forward (default: {runtime.GPU_PREFILL_CHUNK} on a GPU, "
                        f"{runtime.CPU_PREFILL_CHUNK} elsewhere)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the target (and draft) over the first N devices: attention heads, MLP and "
                        "vocabulary over a 'tensor' mesh axis, KV cache over kv heads; N must divide the kv heads")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help=f"JAX's persistent compilation cache, so a second launch skips compiling (default: "
                        f"${runtime.COMPILE_CACHE_ENV}, else ~/.cache/longspec_jax/xla; 'none' disables it)")


def param_gb(model) -> float:
    """Parameter gigabytes of a model."""
    from flax import nnx

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e9


def setup_compile_cache(args) -> None:
    """Turn on the persistent compilation cache and say where it is (one line)."""
    path = runtime.enable_compile_cache(args.compile_cache)
    print(f"compilation cache: {path or 'off'}"
          + (f" (--compile-cache DIR or ${runtime.COMPILE_CACHE_ENV} moves it; 'none' disables it)" if path else ""))


def resolve_dtype(name: str) -> str:
    """--dtype auto: bf16 on accelerators, f32 on CPUs (most CPUs have no fast bf16 matmul)."""
    if name != "auto":
        return name
    return "f32" if jax.default_backend() == "cpu" else "bf16"



class UsageError(ValueError):
    """A problem with the command line or the environment that the user can fix."""



def open_target(args):
    """(cfg, tokenizer, checkpoint dir or None) of --model / --checkpoint: config.json and the
    tokenizer only, which load in well under a second, so that the prompt is checked before the
    weights load."""
    if args.model == tiny_random.NAME:
        if args.checkpoint:
            raise UsageError(f"--checkpoint cannot be combined with --model {tiny_random.NAME}; "
                             "pass --model PRESET --checkpoint DIR")
        return tiny_random.config(), tiny_random.tokenizer(), None
    from longspec_jax import hub, weights
    from longspec_jax.configs import get_preset

    preset = None
    if args.model == demo.NAME:
        if not demo.available():
            raise UsageError(f"the demo pair is missing from {demo.HERE} (target/ and draft/); reinstall the "
                             f"package, or pass --model {tiny_random.NAME} or a preset")
        path = hub.resolve_checkpoint(args.checkpoint or demo.TARGET_DIR)
    else:
        preset = get_preset(args.model)  # ConfigError listing every valid name
        path = hub.resolve_checkpoint(args.checkpoint or preset.target_repo)
    cfg = weights.read_config(path)
    tokenizer = weights.load_tokenizer(path, cfg)
    if preset is not None:
        mismatched = [f for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
                      if getattr(cfg, f) != getattr(preset.config, f)]
        if mismatched:
            print(f"warning: checkpoint {path} differs from preset {args.model} in {mismatched}; "
                  "using the checkpoint's config.", file=sys.stderr)
    return cfg, tokenizer, path



def load_target_weights(args, cfg, path, dtype):
    """The target model of `open_target`'s config and checkpoint (random weights for tiny-random)."""
    if path is None:
        model, _, _ = tiny_random.build(dtype=dtype, attention_impl=args.attention_impl, seed=0)
        return model
    from longspec_jax import weights

    model = weights.abstract_target(cfg, dtype=dtype, attention_impl=args.attention_impl)
    return weights.load_params(model, path, cfg)



def resolve_draft(args) -> str | None:
    """Local path of the draft for --method tree: --draft (a directory, a weight file, or a repo in
    the local Hugging Face cache), else the demo's or the preset's draft; None for tiny-random,
    which drafts with a random block."""
    from longspec_jax import hub

    name = args.draft
    if name is None and args.model == tiny_random.NAME:
        return None
    if name is None and args.model == demo.NAME:
        name = demo.DRAFT_DIR
    if name is None:
        from longspec_jax.configs import get_preset

        name = get_preset(args.model).draft_repo
        if name is None:
            raise UsageError(f"preset {args.model} has no released draft; pass --draft DIR")
    return hub.resolve_checkpoint(name, kind="draft")



def choose_draft_vocab(args, ids, draft_path, cfg, shape):
    """The draft vocabulary for --method tree, checked against the target's vocabulary and the
    --tree-shape: --draft-vocab FILE (`ids`), else the one the draft ships (unless --draft-vocab
    none), else None."""
    from longspec_jax import draft_vocab

    source = "--draft-vocab"
    if ids is None and args.draft_vocab is None and draft_path is not None:
        shipped = draft_vocab.find(draft_path)
        if shipped is not None:
            source, ids = shipped, draft_vocab.read(shipped)
            print(f"draft vocabulary: {len(ids)} ids shipped with the draft ({os.path.basename(shipped)}; "
                  "--draft-vocab none for the full vocabulary)")
    try:
        ids = None if ids is None else draft_vocab.validate(ids, cfg.vocab_size)
    except ValueError as e:
        raise UsageError(f"{source}: {e}") from None
    if shape is not None:
        try:
            shape.check_vocab(cfg.vocab_size if ids is None else ids.size)
        except ValueError as e:
            raise UsageError(f"--tree-shape {shape}"
                             + (f" with the {ids.size}-id draft vocabulary of {source}" if ids is not None else "")
                             + f": {e}") from None
    return ids



def load_draft_model(args, path, cfg, dtype):
    """The draft at `resolve_draft`'s path, checked against the target; a random one for None."""
    from longspec_jax.configs import DraftConfig

    if path is None:
        from flax import nnx

        from longspec_jax.draft import Draft

        print("[tiny-random] using a random-weight draft as well: expect almost no accepted tokens.")
        return Draft(DraftConfig.from_target(cfg), cfg.rope, rngs=nnx.Rngs(1), dtype=dtype, param_dtype=dtype,
                     attention_impl=args.attention_impl)
    from longspec_jax.draft_weights import load_draft

    draft = load_draft(path, cfg, dtype=dtype, attention_impl=args.attention_impl)
    draft.cfg.check_matches(cfg, source=f"draft {path}")
    return draft



def tensor_parallel_mesh(n: int):
    """The --tensor-parallel mesh over the first n devices, or None for n == 1 (single device)."""
    if n == 1:
        return None
    if n > jax.device_count():
        raise UsageError(f"--tensor-parallel {n} needs {n} devices but JAX sees {jax.device_count()} "
                         f"({jax.devices()[0].platform}); pass at most {jax.device_count()} "
                         "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices)")
    from longspec_jax import sharding

    return sharding.tensor_parallel_mesh(n)



def choose_method(args) -> str:
    """--method default: tree when a draft is available (--draft, or the preset's released draft
    found in the local Hugging Face cache), else the AR baseline."""
    if args.method is not None:
        return args.method
    if args.draft is not None or args.model == demo.NAME:
        return "tree"
    from longspec_jax.configs import PRESETS

    preset = PRESETS.get(args.model)
    if preset is None or preset.draft_repo is None:
        return "ar"
    from longspec_jax.hub import CheckpointError, resolve_checkpoint

    try:
        resolve_checkpoint(preset.draft_repo, kind="draft")
    except CheckpointError:  # not downloaded: fall back to AR and say so
        print(f"(draft {preset.draft_repo} is not in the local cache: using --method ar; for speculative decoding "
              f"download it with `huggingface-cli download {preset.draft_repo} --local-dir DIR` and pass "
              "--draft DIR)")
        return "ar"
    return "tree"


def check_method(args, shape, vocab_ids) -> None:
    """After `choose_method`: refuse tree-only flags for autoregressive decoding."""
    if args.method == "ar" and (shape is not None or vocab_ids is not None):
        flag = "--tree-shape" if shape is not None else "--draft-vocab"
        raise UsageError(f"{flag} applies to speculative decoding, but the method is ar"
                         f"{'' if args.draft else ' (no draft is available)'}; pass --method tree (and --draft DIR), "
                         f"or leave {flag} out")


def check_model_flags(args, counts=()):
    """Refuse flag values that cannot work, before any other file is read or any weight is loaded
    (`counts`: the command's own (flag, value, hint) that must be >= 1). Returns (--tree-shape as a `TreeShape` or None, the ids in --draft-vocab FILE or None); the ids
    are checked against the vocabulary once the target's config is read."""
    from longspec_jax import draft_vocab
    from longspec_jax.tree import TreeShape

    counts = (*counts, ("--prefill-chunk", args.prefill_chunk, " (prompt tokens per prefill forward)"),
              ("--tensor-parallel", args.tensor_parallel, " (1 = one device)"))
    for flag, value, hint in counts:
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1{hint}, got {value}")
    if args.prefill_chunk is None:
        args.prefill_chunk = runtime.default_prefill_chunk()
    try:
        shape = None if args.tree_shape is None else TreeShape.parse(args.tree_shape)
    except ValueError as e:
        raise UsageError(f"--tree-shape {' '.join(map(str, args.tree_shape))}: {e}") from None
    if args.draft_vocab is None or args.draft_vocab.lower() == "none":
        return shape, None
    try:
        return shape, draft_vocab.read(args.draft_vocab)
    except ValueError as e:
        raise UsageError(f"--draft-vocab: {e}") from None
