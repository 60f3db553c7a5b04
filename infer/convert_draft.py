"""Convert a LongSpec draft state dict (PyTorch) to the safetensors checkpoint format we load.

    python -m infer.convert_draft draft_model_weights.pth OUT_DIR --target TARGET
    python -m infer.convert_draft pytorch_model.bin OUT_DIR --target path/to/target/config.json

IN is a `torch.save`d state dict: `draft_model_weights.pth` from the released training code
(keys without prefix) or an HF `pytorch_model.bin` (optionally `model.` / `glide.` prefixed). It
is read with `torch.load(weights_only=True)`, which refuses arbitrary pickled code; torch is only
needed here. TARGET is a preset name (see `longspec_jax.configs.PRESETS`), a target checkpoint
directory, or its config.json: the draft is checked against it (hidden size, heads, vocabulary,
every tensor shape) and OUT_DIR receives config.json + model.safetensors (the target's config with
the draft's intermediate size, as in the released sail/longspec-* repositories).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _target_config(spec: str):
    from longspec_jax.configs import PRESETS, from_hf_config

    if spec in PRESETS:
        return PRESETS[spec].config
    if os.path.exists(spec):
        return from_hf_config(spec)
    raise SystemExit(f"--target {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
                     "config.json / checkpoint directory.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.convert_draft", description=__doc__.split("\n\n")[0])
    p.add_argument("input", help="draft_model_weights.pth / pytorch_model.bin / model.safetensors")
    p.add_argument("output", help="output directory (created; existing files config.json and "
                                  "model.safetensors are replaced)")
    p.add_argument("--target", required=True, help="target preset name, checkpoint directory or config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="stored dtype (default bfloat16)")
    p.add_argument("--window", type=int, default=512, help="draft self-attention window (default 512)")
    args = p.parse_args(argv)

    from longspec_jax.configs import ConfigError
    from longspec_jax.draft_weights import DraftWeightsError, load_draft, save_draft

    try:
        target_cfg = _target_config(args.target)
        dtype = DTYPES[args.dtype]
        draft = load_draft(args.input, target_cfg, dtype=dtype, param_dtype=dtype, window=args.window)
        save_draft(draft, args.output, target_cfg=target_cfg)
    except (ConfigError, DraftWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.join(args.output, 'config.json')} and model.safetensors "
          f"(hidden {draft.cfg.hidden_size}, intermediate {draft.cfg.intermediate_size}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
