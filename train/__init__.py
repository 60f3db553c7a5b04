"""`python -m train.run` from a clone (the code is `longspec_jax.train`; installed: `longspec-train`),
with the configs (`train/configs/`) and the guide (`train/README.md`)."""
