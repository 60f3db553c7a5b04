"""Tuning knobs of the prefix kernel: `PrefixConfig`, its heuristic, and measured per-GPU tables.

A `PrefixConfig` names the static knobs of `prefix_decode.prefix_attention`; every config runs the
same exact algorithm, so knobs change speed only, never results. `default_config` returns the
device's measured table entry for a shape where one exists (`lookup`), else `heuristic_config`;
`apply_overrides` turns that default plus a caller's explicit knobs into the config a call runs.

Tables: `pallas_kernels/tuning/prefix_<device kind>.json`, written by `bench/tune_prefix.py
--install` (the fastest valid config per shape, checked against the float32 reference in the
sweep). Format version 2:

    {"version": 2, "meta": {...},
     "entries": [{"G": 4, "K": 8, "B": 1, "H": 128, "T": 69, "S": 32768,
                  "config": {"num_wg": 2, "block_kv": 128, "stages": 2, "num_splits": 11,
                             "pingpong": true, "overlap": true}, ...measurements...}]}

Matching (`lookup`): same G = N / K, K, H and B; among those, the entry with the smallest tuned
capacity >= S (the largest otherwise) and, within it and the asked rows' class (<= 64 rows or
more), the smallest tuned row count T * G >= the asked rows (the largest otherwise); no entry of
that class at that capacity, another GPU, or S < MIN_TUNED_CAPACITY: None (the heuristic decides).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax

from pallas_kernels._wgmma import ROWS_PER_WG

TABLE_VERSION = 2
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning")
MIN_TUNED_CAPACITY = 4096  # below this the heuristic decides (the draft's 640-slot ring, tests)
SMEM_BYTES = 227 * 1024  # shared memory one Hopper CTA may use
SMEM_RESERVED = 4096  # barriers and alignment (~2.7 KiB measured), rounded up


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Static knobs of one prefix-kernel call.

    Attributes:
      num_wg: compute warpgroups per CTA (1 or 2), each holding 64 query rows.
      block_kv: cache slots per K/V block (the pipeline's unit).
      stages: K/V blocks in flight in shared memory (`smem_stages` is the most that fit).
      num_splits: CTAs that share one (batch row, KV head, row tile)'s blocks (split-K).
      pingpong: FA3's warpgroup ping-pong, the two compute warpgroups alternating on the tensor
        cores (two warpgroups only).
      overlap: FA3's intra-warpgroup overlap, block j's QK^T issued with block j - 1's PV and block
        j's softmax run under that PV (needs stages >= 2).
    """

    num_wg: int
    block_kv: int
    stages: int
    num_splits: int
    pingpong: bool = False
    overlap: bool = False


KNOBS = tuple(f.name for f in dataclasses.fields(PrefixConfig))


@dataclasses.dataclass(frozen=True)
class TableEntry:
    """One measured shape of a tuning table and its fastest config."""

    G: int
    K: int
    B: int
    H: int
    T: int
    S: int
    config: PrefixConfig


def smem_stages(num_wg: int, block_kv: int, H: int) -> int:
    """The most K/V pipeline stages (max 4) that fit in shared memory next to the q tiles and the
    LSE rows (two bytes per bf16/f16 element)."""
    per_stage = 2 * block_kv * H * 2
    q_bytes = num_wg * ROWS_PER_WG * H * 2 + num_wg * ROWS_PER_WG * 4
    return max(1, min(4, (SMEM_BYTES - q_bytes - SMEM_RESERVED) // per_stage))


def heuristic_config(T: int, G: int, K: int, B: int, S: int, H: int) -> PrefixConfig:
    """Knobs from rules of thumb, for shapes no measured table entry covers.

    Each rule was measured on H100/H200 (docs/perf_notes.md, "Kernels").
    """
    rows = T * G
    num_wg = 1 if rows <= ROWS_PER_WG else 2
    block_kv = 128
    stages = smem_stages(num_wg, block_kv, H)
    m_tiles = -(-rows // (num_wg * ROWS_PER_WG))
    ctas = K * m_tiles * B
    # CTAs per launch on a 132-SM GPU (one CTA per SM fits in shared memory): two full waves balance
    # long caches, one wave keeps the partials to merge few for short ones. A ceiling: short rows
    # use fewer splits.
    target = 264 if S >= 16384 else 132
    num_splits = max(1, min(-(-target // ctas), S // block_kv, 64))
    return PrefixConfig(num_wg=num_wg, block_kv=block_kv, stages=stages, num_splits=num_splits,
                        pingpong=num_wg == 2 and m_tiles >= 3,  # gains from three row tiles only
                        overlap=num_wg == 2 and stages >= 2)  # measured with two warpgroups only


def device_file_name(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'prefix_NVIDIA_H100_80GB_HBM3.json'."""
    return "prefix_" + re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_") + ".json"


def read_table(path: str) -> dict:
    """A tuning table file as written (`{"version", "meta", "entries"}`), after checking its version
    and that every entry's config names exactly the `PrefixConfig` knobs."""
    with open(path) as f:
        data = json.load(f)
    version = data.get("version")
    if version != TABLE_VERSION:
        raise ValueError(f"tuning table {path} has version {version!r}; this code reads version {TABLE_VERSION} "
                         "(named knobs under 'config'). Re-run `python bench/tune_prefix.py --install` on this "
                         "GPU, or delete the file to use the heuristic")
    for i, e in enumerate(data.get("entries", ())):
        cfg = e.get("config")
        if not isinstance(cfg, dict) or set(cfg) != set(KNOBS):
            raise ValueError(f"tuning table {path}, entry {i} (T={e.get('T')}, S={e.get('S')}): 'config' must map "
                             f"exactly the knobs {list(KNOBS)}, got {cfg!r}; fix or re-tune the entry")
    return data


def install_entries(path: str, entries: list[dict], meta: dict) -> dict:
    """Merge measured entries into the table at `path` (created if absent) and write it, version 2.

    Each entry is a dict with the shape keys G, K, B, H, T, S, `config` (a `PrefixConfig` or its
    dict) and any measurements (t_us, heuristic_config, ...). Entries of the same shapes replace
    the table's, the others stay; `meta` describes this run, and the meta of the run(s) the kept
    entries came from stays under "kept_entries_meta". Written to a temporary file and renamed, so
    a failure leaves the old table whole. Returns the table written.
    """
    def shape(e):
        return tuple(e[k] for k in ("G", "K", "B", "H", "T", "S"))

    def named(e):
        e = dict(e)
        for key in ("config", "heuristic_config"):
            if isinstance(e.get(key), PrefixConfig):
                e[key] = dataclasses.asdict(e[key])
        return e

    new = [named(e) for e in entries]
    old, table_meta = [], dict(meta)
    if os.path.exists(path):
        prev = read_table(path)
        old = [e for e in prev.get("entries", []) if shape(e) not in {shape(n) for n in new}]
        if old:
            table_meta["kept_entries_meta"] = prev.get("meta", {}).get("kept_entries_meta", prev.get("meta"))
    table = dict(version=TABLE_VERSION, meta=table_meta,
                 entries=sorted(old + new, key=lambda e: (e["G"], e["S"], -e["T"])))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        read_table(tmp)  # what was written reads back
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    load_table.cache_clear()
    return table


@functools.cache
def load_table(device_kind: str, table_dir: str = TABLE_DIR) -> tuple[TableEntry, ...]:
    """The measured entries for `device_kind` (empty where no table exists)."""
    path = os.path.join(table_dir, device_file_name(device_kind))
    if not os.path.exists(path):
        return ()
    return tuple(TableEntry(**{k: e[k] for k in ("G", "K", "B", "H", "T", "S")}, config=PrefixConfig(**e["config"]))
                 for e in read_table(path).get("entries", ()))


def current_device_kind() -> str | None:
    """The first device's kind where it is a GPU, else None."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    return dev.device_kind if dev.platform == "gpu" else None


def lookup(T: int, G: int, K: int, B: int, S: int, H: int, device_kind: str | None = None,
           table_dir: str = TABLE_DIR) -> PrefixConfig | None:
    """The device's measured config for a shape (matching rule in the module docstring), or None."""
    device_kind = device_kind if device_kind is not None else current_device_kind()
    if device_kind is None or S < MIN_TUNED_CAPACITY:
        return None
    entries = [e for e in load_table(device_kind, table_dir) if (e.G, e.K, e.B, e.H) == (G, K, B, H)]
    if not entries:
        return None
    caps = sorted({e.S for e in entries})
    cap = next((c for c in caps if c >= S), caps[-1])
    rows = T * G
    # Only entries of the same row class (one 64-row warpgroup tile or more): a table whose sweep
    # stopped before the small row counts must not hand a decode step a verification config.
    at_cap = [e for e in entries if e.S == cap and (e.T * e.G <= ROWS_PER_WG) == (rows <= ROWS_PER_WG)]
    if not at_cap:
        return None
    by_rows = sorted(at_cap, key=lambda e: e.T * e.G)
    cfg = next((e for e in by_rows if e.T * e.G >= rows), by_rows[-1]).config
    if S % cfg.block_kv:
        return None
    # A deeper tiling than the rows need, or more splits than blocks, is never useful.
    num_wg = 1 if rows <= ROWS_PER_WG else cfg.num_wg
    return dataclasses.replace(cfg, num_wg=num_wg, num_splits=max(1, min(cfg.num_splits, S // cfg.block_kv)),
                               pingpong=cfg.pingpong and num_wg == 2, overlap=cfg.overlap and cfg.stages >= 2)


def default_config(T: int, G: int, K: int, B: int, S: int, H: int) -> PrefixConfig:
    """The device's measured table entry for the shape where it has one, else `heuristic_config`."""
    return lookup(T, G, K, B, S, H) or heuristic_config(T, G, K, B, S, H)


def apply_overrides(default: PrefixConfig, H: int, **overrides) -> PrefixConfig:
    """`dataclasses.replace(default, **overrides)` for the knobs given (None = keep the default's),
    then the knobs that depend on others, then checks.

    A changed tile (num_wg, block_kv) without `stages` gets the deepest pipeline that fits it (the
    default's depth is for its own tile); without `overlap`, the default's choice holds for its own
    warpgroup count and the heuristic's rule (on with two) otherwise, never with a one-stage
    pipeline; the ping-pong needs two compute warpgroups.
    """
    unknown = set(overrides) - set(KNOBS)
    if unknown:
        raise TypeError(f"unknown prefix-kernel knobs {sorted(unknown)}; the knobs are {list(KNOBS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = dataclasses.replace(default, **given)
    if "stages" not in given and (cfg.num_wg, cfg.block_kv) != (default.num_wg, default.block_kv):
        cfg = dataclasses.replace(cfg, stages=smem_stages(cfg.num_wg, cfg.block_kv, H))
    if "overlap" not in given:
        on = default.overlap if cfg.num_wg == default.num_wg else cfg.num_wg == 2
        cfg = dataclasses.replace(cfg, overlap=on and cfg.stages >= 2)
    cfg = dataclasses.replace(cfg, pingpong=bool(cfg.pingpong) and cfg.num_wg == 2, overlap=bool(cfg.overlap))
    if cfg.num_wg not in (1, 2):
        raise ValueError(f"num_wg={cfg.num_wg}: the kernel has 1 or 2 compute warpgroups")
    for knob in ("block_kv", "stages", "num_splits"):
        if getattr(cfg, knob) < 1:
            raise ValueError(f"{knob}={getattr(cfg, knob)} must be >= 1 (or None for the tuned default)")
    most = smem_stages(cfg.num_wg, cfg.block_kv, H)
    if cfg.stages > most:
        raise ValueError(f"stages={cfg.stages} with num_wg={cfg.num_wg}, block_kv={cfg.block_kv}, H={H} exceeds "
                         f"shared memory; at most {most} (tuning.smem_stages)")
    if cfg.overlap and cfg.stages < 2:
        raise ValueError(f"overlap=True needs stages >= 2 (V of block j - 1 is held while K of block j arrives), "
                         f"got stages={cfg.stages}; pass overlap=False or a smaller block_kv")
    return cfg
