"""Named benchmark workloads: one table, every suite reads its fields from it (`--workload NAME`).

A workload names the model (a preset's shapes with random weights, the shipped demo pair, or the
tiny CPU config), the contexts, the draft-tree shapes, the draft-vocabulary cuts, the prompts and
any XLA flags. Suites take what they need: `kernels` and `tune` the attention shapes, contexts and
the query counts the trees imply; `train` the sequence lengths; the decoding suites the rest.
"""

from __future__ import annotations

import dataclasses

# The tiny config with a head dim the Mosaic GPU kernels support (64), so that every suite, kernels
# included, runs on it (the kernels in interpret mode on a CPU).
TINY = {"head_dim": 64}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark setting.

    Attributes:
      model: a preset name (`longspec_jax.configs.PRESETS`; random weights at its shapes), "demo" (the
        shipped pair in `longspec_jax/demo`) or "tiny" (`configs.tiny_config(**TINY)`).
      contexts: committed prompt lengths; the kernels' cache capacities.
      trees: draft-tree level widths, e.g. (4, 16, 16, 16, 16) is the 69-node LongSpec tree.
      draft_vocab_sizes: draft LM-head cuts to time (FR-Spec style; which ids does not change cost).
      dtype: parameters, compute and caches.
      prompts: "heldout" (the demo's held-out packages) or None (random tokens).
      num_prompts, new_tokens, temperatures: what a decoding benchmark generates.
      train_seq_lens: sequence lengths of the training-step benchmark.
      tau: the acceptance length `latency` models its speedup at (the paper's 3.4 by default).
      xla_flags: appended to $XLA_FLAGS before JAX starts (`python -m bench` does it).
      about: one line for `--help` and the docs.
    """

    model: str
    contexts: tuple[int, ...]
    trees: tuple[tuple[int, ...], ...] = ()
    draft_vocab_sizes: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    prompts: str | None = None
    num_prompts: int = 1
    new_tokens: int = 256
    temperatures: tuple[float, ...] = (0.0,)
    train_seq_lens: tuple[int, ...] = ()
    tau: float = 3.4
    xla_flags: str = ""
    about: str = ""

    def configs(self):
        """(target ModelConfig, DraftConfig) of the workload's model."""
        from longspec_jax import configs

        if self.model == "tiny":
            cfg = configs.tiny_config(**TINY)
            return cfg, configs.DraftConfig.from_target(cfg)
        if self.model == "demo":
            from longspec_jax import demo
            from longspec_jax.draft_weights import draft_config_from_hf

            return configs.from_hf_config(demo.TARGET_DIR), draft_config_from_hf(demo.DRAFT_DIR)
        cfg = configs.get_preset(self.model).config
        return cfg, configs.DraftConfig.from_target(cfg)

    def query_counts(self) -> tuple[int, ...]:
        """Query counts of the attention calls that decoding with these trees issues: 1 (an AR step),
        the widest draft level of any tree, and every tree's node count (its verification)."""
        from longspec_jax.tree import TreeShape

        counts = {1, max((max(w) for w in self.trees), default=1)} | {TreeShape(w).num_nodes for w in self.trees}
        return tuple(sorted(counts))


LONGSPEC_TREES = ((4, 16, 16, 16, 16), (4, 8, 8, 8, 8), (2, 4, 4, 4, 4), (1, 1, 1, 1))
DEMO_TREES = ((1, 1, 1, 1), (1, 1, 1, 1, 1), (4, 16, 16, 16, 16))

WORKLOADS: dict[str, Workload] = {
    "llama3-8b": Workload(
        model="llama3-8b", contexts=(4096, 32768, 131072), trees=LONGSPEC_TREES, draft_vocab_sizes=(32768,),
        train_seq_lens=(1024, 32768),
        about="Llama-3-8B shapes, random bf16 weights, 4k / 32k / 128k, the 69/37/19/5-node trees, 32k draft vocab"),
    "llama3-8b-32k": Workload(
        model="llama3-8b", contexts=(32768,), trees=LONGSPEC_TREES, draft_vocab_sizes=(32768,),
        about="Llama-3-8B shapes at 32k only (the speed targets' context)"),
    "qwq-32b-32k": Workload(
        model="qwq-32b-preview", contexts=(32768,), trees=((4, 16, 16, 16, 16), (2, 4, 4, 4, 4), (1, 1, 1, 1, 1)),
        draft_vocab_sizes=(32768,),
        about="QwQ-32B-Preview shapes (G = 5), random bf16 weights, 32k, 69/19/6-node trees, 32k draft vocab"),
    "demo": Workload(
        model="demo", contexts=(2048, 4096, 8192, 16384), trees=DEMO_TREES, draft_vocab_sizes=(2048,),
        dtype="float32", prompts="heldout", num_prompts=4, temperatures=(0.0, 1.0),
        about="the shipped demo pair (float32) on 4 held-out packages cut to 2k-16k, 256 new tokens, T = 0 and 1"),
    "demo-8k": Workload(
        model="demo", contexts=(8192,), trees=DEMO_TREES, draft_vocab_sizes=(2048,), dtype="float32",
        prompts="heldout", num_prompts=4,
        about="the demo pair at 8k, 4 held-out prompts, T = 0 (the context of the demo's headline numbers)"),
    "serve-demo": Workload(
        model="demo", contexts=(2048,), dtype="float32", prompts="heldout", new_tokens=64,
        about="serving agents on the demo pair: 2k-token first turns of held-out code, 64 new tokens a turn"),
    "serve-demo-8k": Workload(
        model="demo", contexts=(8192,), dtype="float32", prompts="heldout", new_tokens=64,
        about="serving agents on the demo pair at long context: 8k-token first turns, 64 new tokens a turn"),
    "serve-llama3-8b": Workload(
        model="llama3-8b", contexts=(8192,), new_tokens=128,
        about="serving agents at Llama-3-8B shapes (a random checkpoint on disk): 8k first turns, 128 new tokens"),
    "serve-llama3-8b-32k": Workload(
        model="llama3-8b", contexts=(32768,), new_tokens=128,
        about="serving agents at Llama-3-8B shapes (a random checkpoint on disk): 32k first turns, 128 new tokens"),
    "tiny": Workload(
        model="tiny", contexts=(256,), trees=((2, 2), (1, 1)), draft_vocab_sizes=(128,), new_tokens=8,
        train_seq_lens=(64,),
        about="tiny random config: a CPU smoke run of every suite (kernels in interpret mode)"),
}


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise SystemExit(f"unknown workload {name!r}; the workloads are: {', '.join(WORKLOADS)} "
                         "(bench/workloads.py)") from None


def add_workload_arg(parser, default: str) -> None:
    parser.add_argument("--workload", default=default, choices=sorted(WORKLOADS),
                        help=f"named setting from bench/workloads.py (default {default})")
