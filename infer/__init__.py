"""The command lines under the names users type from a clone: `python -m infer.generate`,
`python -m infer.serve`, `python -m infer.convert_draft`. The code is `longspec_jax.infer`; an
installed package also has them as `longspec-generate`, `longspec-serve`, `longspec-convert-draft`."""
