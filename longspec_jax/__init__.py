"""longspec-jax: LongSpec long-context lossless speculative decoding in JAX / Pallas.

The names a notebook needs, loaded on first use:

    import longspec_jax as ls
    target, cfg, tok = ls.load_target("CKPT_DIR")
    draft = ls.load_draft("DRAFT_DIR", cfg)
    out = ls.Decoder(target, draft).generate([tok("...")["input_ids"]], max_new_tokens=128)

Packages: `longspec_jax` (models, loading, sampling, verification), `longspec_jax.infer` (decode
loop, engine, server), `longspec_jax.train` (draft training); kernels in `pallas_kernels`.
"""

import importlib

_API = {
    "load_target": "longspec_jax.weights", "load_draft": "longspec_jax.draft_weights",
    "SamplingParams": "longspec_jax.sampling", "TreeShape": "longspec_jax.tree",
    "PRESETS": "longspec_jax.configs", "get_preset": "longspec_jax.configs",
    "Decoder": "longspec_jax.infer.decoder", "generate_ar": "longspec_jax.infer.decoder",
    "generate_tree": "longspec_jax.infer.decoder", "Engine": "longspec_jax.infer.engine",
    "Request": "longspec_jax.infer.engine",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'longspec_jax' has no attribute {name!r}")
