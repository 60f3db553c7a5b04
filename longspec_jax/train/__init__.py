"""Draft training: config, data and Anchor-Offset positions, loss, step, orbax checkpoints and
`python -m train.run` (train/README.md)."""
