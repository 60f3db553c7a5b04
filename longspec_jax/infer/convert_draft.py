"""Convert a LongSpec draft state dict (PyTorch) to the safetensors checkpoint format we load.

    python -m infer.convert_draft draft_model_weights.pth OUT_DIR --target TARGET
    python -m infer.convert_draft pytorch_model.bin OUT_DIR --target path/to/target/config.json

IN is a `torch.save`d state dict: `draft_model_weights.pth` from the released training code
(keys without prefix), an HF `pytorch_model.bin` (optionally `model.` / `glide.` prefixed), or a
DeepSpeed-wrapped save (`module.` / `module.draft_model.`); or a draft directory holding one. It is
read with `torch.load(weights_only=True)`, which refuses arbitrary pickled code; torch is only
needed here. TARGET is a preset name (see `longspec_jax.configs.PRESETS`), a target checkpoint
directory, or its config.json: the draft is checked against it (hidden size, heads, vocabulary,
every tensor shape). OUT_DIR receives config.json (the target's config with the draft's
intermediate size, as in the released sail/longspec-* repositories, plus the window) and
model.safetensors, written whole or not at all; a draft vocabulary shipped beside IN is copied
along. A non-empty OUT_DIR is refused unless --force, which replaces it and everything in it.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class UsageError(ValueError):
    """A command-line value that cannot work; the message says which and what to pass."""


def _target_config(spec: str):
    from longspec_jax.configs import PRESETS, from_hf_config

    if spec in PRESETS:
        return PRESETS[spec].config
    if os.path.exists(spec):
        return from_hf_config(spec)
    raise UsageError(f"--target {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
                     "config.json / checkpoint directory.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.convert_draft", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="draft_model_weights.pth / pytorch_model.bin / model.safetensors, or a draft "
                                 "directory")
    p.add_argument("output", help="output directory (created; must be empty or absent unless --force)")
    p.add_argument("--target", required=True, help="target preset name, checkpoint directory or config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="stored dtype (default bfloat16)")
    p.add_argument("--window", type=int, default=None,
                   help="draft self-attention window, recorded in the output config (default: the one IN's "
                        "config.json records, else 512)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory and everything in it")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse's own refusals (exit 2) and --help (exit 0), as a return code
        return e.code

    from longspec_jax import draft_vocab, hub
    from longspec_jax.draft_weights import load_draft, save_draft

    try:
        if args.window is not None and args.window < 1:
            raise UsageError(f"--window must be >= 1 (self-attention keys per query besides itself), got "
                             f"{args.window}")
        out = hub.check_output_dir(args.output, overwrite=args.force)  # before reading anything
        target_cfg = _target_config(args.target)
        dtype = DTYPES[args.dtype]
        draft = load_draft(args.input, target_cfg, dtype=dtype, param_dtype=dtype, window=args.window)
        shipped = draft_vocab.find(args.input)
        if shipped is not None:  # it belongs to these weights; it must still fit the target
            draft_vocab.validate(draft_vocab.read(shipped), target_cfg.vocab_size)
        save_draft(draft, out, target_cfg=target_cfg, overwrite=args.force, draft_vocab_file=shipped)
    except ValueError as e:  # UsageError, ConfigError, DraftWeightsError, hub.CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: config.json and model.safetensors (hidden {draft.cfg.hidden_size}, intermediate "
          f"{draft.cfg.intermediate_size}, window {draft.cfg.window}, {args.dtype})"
          + (f" and the draft vocabulary {draft_vocab.FILE} shipped with the input" if shipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
