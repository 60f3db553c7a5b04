"""Which tree shape to run when the user fixes none: measured policy, kept apart from the tree
topology (`longspec_jax/tree.py`), which is pure.

Two questions, both answered from measured costs (`docs/perf_notes.md`, "Tree sizes by context"
and "Serving under load"):

* `tree_for_context`: one request. A wide tree pays off where verifying many rows costs little
  more than one (a large target on a GPU, memory-bound up to ~300 rows per forward); its width
  shrinks at long context, where the verification's prefix attention turns compute-bound
  (arithmetic intensity 4T FLOP/byte with GQA group 4, ridge near T ~ 74). On a CPU every extra
  node costs a full row of compute, and a small target on a GPU is launch-bound: there a short
  chain wins. At temperature > 0 a chain with sampled drafts accepts more than any beam tree.
* `tree_for_load`: the serving engine, per step. Each active row adds its tree's nodes to one
  verification forward; past the point where the forward stops being memory-bound the tree only
  costs, so the shape shrinks as rows grow and speculation stops (plain AR) where it cannot win.
  Steps whose every row samples take their own table, led by the single-request T > 0 shape.
"""

from __future__ import annotations

from longspec_jax.tree import TreeShape

# (max context, widths) for a large target on a GPU, one request at temperature 0.
CONTEXT_TREE_TABLE: tuple[tuple[int | None, tuple[int, ...]], ...] = (
    (32768, (4, 16, 16, 16, 16)),  # <= 32k: 69 nodes (LongSpec's own shape)
    (65536, (4, 8, 8, 8, 8)),      # <= 64k: 37 nodes
    (None, (2, 4, 4, 4, 4)),       # beyond: 19 nodes, prefix attention near bandwidth at 128k
)

# CPUs and launch-bound (small) targets: a chain of five drafts.
CPU_TREE = (1, 1, 1, 1, 1)

# Temperature > 0 with sampled drafts (block verification), a large target on a GPU: 19 nodes, whose
# verification costs about an AR step at every context, with the best modelled speedup there.
SAMPLED_TREE = (2, 4, 4, 4, 4)

# Temperature > 0 with sampled drafts on CPUs: a longer chain than at T = 0, since block verification
# keeps accepting deep drafts. A launch-bound target on a GPU keeps `CPU_TREE` (block-verified there,
# the chain of 5 matched or beat the chain of 7: docs/results.md, "Sampled drafts").
CPU_SAMPLED_TREE = (1, 1, 1, 1, 1, 1, 1)

# Below this many bytes of target parameters a GPU decode step is launch-bound, not a weight read.
LAUNCH_BOUND_BYTES = 512 * 2**20

# Verification rows (batch rows x tree nodes) up to which a large target's step on a GPU is a weight
# read: an H100's bf16 ridge is ~295 FLOP per byte, 2 FLOP per 2-byte weight and row.
MEMORY_BOUND_ROWS = 256

# Serving: (most active rows, widths or None = plain AR) for a large target on a GPU. From the engine's
# measured ms per iteration by shape and running rows at 8k (H100, Llama-3-8B shapes) times the demo
# draft's tau per shape (docs/perf_notes.md, "Serving under load"): the 69-node tree to two rows, the
# 19-node tree to eight (modelled 2.2-2.3x AR against the chain's 1.9-2.0x); the chain beyond is the
# roofline estimate (rows x nodes under `MEMORY_BOUND_ROWS`), not measured.
GPU_LOAD_TABLE: tuple[tuple[int | None, tuple[int, ...] | None], ...] = (
    (2, (4, 16, 16, 16, 16)),
    (8, (2, 4, 4, 4, 4)),
    (16, (1, 1, 1, 1, 1)),
    (None, None),
)

# Serving while every running request samples (sampled drafts, block verification): the
# single-request T > 0 shape while rows are few, then the chain, then AR (not measured under load).
GPU_SAMPLED_LOAD_TABLE: tuple[tuple[int | None, tuple[int, ...] | None], ...] = (
    (4, SAMPLED_TREE),
    (16, (1, 1, 1, 1, 1)),
    (None, None),
)

# Serving on a CPU: a decode call computes only its bucket of rows (`decode_calls`), so a chain
# costs each running row what it costs one request alone; measured with
# the demo pair on a 2-core CPU (docs/results.md "Serving"), the chain of 5 beat AR up to four
# running requests.
CPU_LOAD_TABLE: tuple[tuple[int | None, tuple[int, ...] | None], ...] = (
    (4, (1, 1, 1, 1, 1)),
    (None, None),
)


# Serving a launch-bound target on a GPU: the demo pair on an H100 with the CPU table made 1.04x AR
# at one agent and 0.71x at four (docs/results.md, "Serving"), so the chain runs for one row only
# (two and three rows are not measured).
LAUNCH_BOUND_GPU_LOAD_TABLE: tuple[tuple[int | None, tuple[int, ...] | None], ...] = (
    (1, CPU_TREE),
    (None, None),
)


# Serving: prompt tokens a GPU engine prefills between two decode calls (vLLM's default token budget
# per step for an OpenAI server on a large GPU, and SGLang's chunked-prefill size, are 8192). A waiting
# request that loads sooner joins the running ones sooner, and a speculative step costs about the same
# for one running row as for four: admitted one chunk per step, agents that finish their turns in few
# steps decode mostly alone (docs/perf_notes.md, "Serving under load"). On a CPU a chunk is a long
# forward already (0.4 s for the demo pair), so the running requests' streams keep one chunk a step.
GPU_PREFILL_TOKENS_PER_STEP = 8192


def prefill_tokens_per_step(platform: str | None, chunk: int) -> int:
    """The serving engine's default prompt tokens per step: `GPU_PREFILL_TOKENS_PER_STEP` on a GPU,
    one `chunk` on a CPU."""
    return chunk if platform == "cpu" else max(chunk, GPU_PREFILL_TOKENS_PER_STEP)


def is_launch_bound(platform: str | None, target_bytes: int | None) -> bool:
    """CPUs, and GPUs running a target of fewer than `LAUNCH_BOUND_BYTES` parameter bytes."""
    return platform == "cpu" or (target_bytes is not None and target_bytes < LAUNCH_BOUND_BYTES)


def tree_for_context(context_len: int, platform: str | None = None, temperature: float = 0.0,
                     sampled_drafts: bool = True, target_bytes: int | None = None) -> TreeShape:
    """The tree shape for one request decoding up to `context_len` tokens (prompt + new tokens).

    On CPUs and for targets of fewer than `LAUNCH_BOUND_BYTES` parameter bytes (`target_bytes`;
    None = unknown, treated as large) `CPU_TREE`, or on CPUs `CPU_SAMPLED_TREE` at `temperature > 0`
    with sampled drafts; otherwise `SAMPLED_TREE` at `temperature > 0` with sampled drafts, else
    `CONTEXT_TREE_TABLE` by context length.
    """
    context_len = int(context_len)
    if context_len < 0:
        raise ValueError(f"context length must be >= 0, got {context_len}")
    sampled = temperature > 0 and sampled_drafts
    if is_launch_bound(platform, target_bytes):
        return TreeShape(CPU_SAMPLED_TREE if sampled and platform == "cpu" else CPU_TREE)
    if sampled:
        return TreeShape(SAMPLED_TREE)
    for limit, widths in CONTEXT_TREE_TABLE:
        if limit is None or context_len <= limit:
            return TreeShape(widths)
    raise AssertionError("CONTEXT_TREE_TABLE must end with a catch-all row")


def load_table(platform: str | None, target_bytes: int | None, sampled: bool = False):
    """The serving table for this device and target: `CPU_LOAD_TABLE` on CPUs and
    `LAUNCH_BOUND_GPU_LOAD_TABLE` for a launch-bound target on a GPU (chains and AR, at any
    temperature), else `GPU_SAMPLED_LOAD_TABLE` for steps whose every row samples (`sampled`) and
    `GPU_LOAD_TABLE` for the others."""
    if platform == "cpu":
        return CPU_LOAD_TABLE
    if is_launch_bound(platform, target_bytes):
        return LAUNCH_BOUND_GPU_LOAD_TABLE
    return GPU_SAMPLED_LOAD_TABLE if sampled else GPU_LOAD_TABLE


def row_buckets(max_slots: int) -> tuple[int, ...]:
    """Batch sizes a serving engine's decode call may run: powers of two below `max_slots`, then
    `max_slots` (`decode_calls` picks one per load)."""
    return tuple(sorted({1 << i for i in range(max_slots.bit_length()) if 1 << i < max_slots} | {max_slots}))


def decode_calls(tables, max_slots: int, every_row_costs: bool) -> dict[tuple[bool, int], tuple]:
    """{(sampled, running rows): (widths or None, rows the call runs)} for an engine of `max_slots`
    slots with the load tables {sampled: table}; only these (widths, sampled, rows) are compiled.

    An idle row in a call costs a full row of every matmul where `every_row_costs` (CPUs,
    launch-bound targets), and on a GPU running a large target once the batch's rows x nodes pass
    `MEMORY_BOUND_ROWS` (8 slots x a 69-node tree is 552 verification rows). There the call runs the
    smallest bucket of `row_buckets` holding the running rows, at the price of copying their state
    in and out (`loop.run_rows_jit`); elsewhere idle rows cost no weight reads and skip their KV, and
    the call runs the whole batch."""
    buckets, plan = row_buckets(max_slots), {}
    for sampled, table in tables.items():
        for rows in range(1, max_slots + 1):
            shape = tree_for_load(rows, table)
            nodes = 1 if shape is None else shape.num_nodes
            whole = not every_row_costs and max_slots * nodes <= MEMORY_BOUND_ROWS
            plan[sampled, rows] = (None if shape is None else shape.widths,
                                   max_slots if whole else next(b for b in buckets if b >= rows))
    return plan


def tree_for_load(active_rows: int, table) -> TreeShape | None:
    """The tree shape (None = plain AR) for a step with `active_rows` running requests."""
    for limit, widths in table:
        if limit is None or active_rows <= limit:
            return None if widths is None else TreeShape(widths)
    raise AssertionError("a load table must end with a catch-all row")
