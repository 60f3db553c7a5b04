"""Measured tuning tables of the prefix kernel, per GPU model (vLLM / SGLang style config files).

`bench/tune_prefix.py` times every valid (num_wg, block_kv, stages, num_splits) of
`prefix_decode.prefix_attention` at the attention shapes of real models (batch 1, several query
counts T and cache capacities S) and writes the fastest per shape to
`pallas_kernels/tuning/prefix_<device kind>.json`. `prefix_decode.default_config` asks `lookup`
first and falls back to its heuristic where no table or no matching entry exists (another GPU,
another head grouping, batch > 1, caches shorter than the smallest tuned capacity).

Matching: same G = N / K, K, H and B; among those, the entry with the smallest tuned capacity
>= S (the largest otherwise) and, within it and the asked rows' class (<= 64 rows or more), the
smallest tuned row count T * G >= the asked rows (the largest otherwise); no entry of that class
at that capacity: None. Tuned knobs change speed only, never results: every config is the
same exact algorithm, checked against the float32 reference in the sweep.
"""

from __future__ import annotations

import functools
import json
import os
import re

TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning")
MIN_TUNED_CAPACITY = 4096  # below this the heuristic decides (the draft's 640-slot ring, tests)


def device_file_name(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'prefix_NVIDIA_H100_80GB_HBM3.json'."""
    return "prefix_" + re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_") + ".json"


@functools.cache
def load_table(device_kind: str, table_dir: str = TABLE_DIR) -> tuple[dict, ...]:
    path = os.path.join(table_dir, device_file_name(device_kind))
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        data = json.load(f)
    return tuple(data.get("entries", ()))


def current_device_kind() -> str | None:
    import jax

    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    return dev.device_kind if dev.platform == "gpu" else None


def lookup(T: int, G: int, K: int, B: int, S: int, H: int, device_kind: str | None = None,
           table_dir: str = TABLE_DIR) -> tuple[int, int, int, int, bool, int, bool, bool] | None:
    """(num_wg, block_kv, stages, num_splits, pingpong, lone_splits, lone_share, overlap) from the
    device's table, or None. Entries written before a knob existed were measured without it: four
    numbers mean no ping-pong, five mean the lone last tile ran at num_splits with its second
    warpgroup idle, seven mean no intra-warpgroup overlap."""
    device_kind = device_kind if device_kind is not None else current_device_kind()
    if device_kind is None or S < MIN_TUNED_CAPACITY:
        return None
    entries = [e for e in load_table(device_kind, table_dir)
               if (e["G"], e["K"], e["B"], e["H"]) == (G, K, B, H)]
    if not entries:
        return None
    caps = sorted({e["S"] for e in entries})
    cap = next((c for c in caps if c >= S), caps[-1])
    rows = T * G
    # Only entries of the same row class (one 64-row warpgroup tile or more): a table whose sweep
    # stopped before the small row counts must not hand a decode step a verification config.
    at_cap = [e for e in entries if e["S"] == cap and (e["T"] * e["G"] <= 64) == (rows <= 64)]
    if not at_cap:
        return None
    by_rows = sorted(at_cap, key=lambda e: e["T"] * e["G"])
    e = next((e for e in by_rows if e["T"] * e["G"] >= rows), by_rows[-1])
    num_wg, block_kv, stages, num_splits = e["config"][:4]
    pingpong = bool(e["config"][4]) if len(e["config"]) > 4 else False
    lone_splits = int(e["config"][5]) if len(e["config"]) > 5 else num_splits
    lone_share = bool(e["config"][6]) if len(e["config"]) > 6 else False
    overlap = bool(e["config"][7]) if len(e["config"]) > 7 else False
    if S % block_kv:
        return None
    # A deeper tiling than the rows need, or more splits than blocks, is never useful.
    if rows <= 64:
        num_wg = 1
    num_splits = max(1, min(num_splits, S // block_kv))
    lone_splits = max(1, min(lone_splits, S // block_kv))
    return (int(num_wg), int(block_kv), int(stages), int(num_splits), pingpong and num_wg == 2, lone_splits,
            lone_share and num_wg == 2, overlap and stages >= 2)
