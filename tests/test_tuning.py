"""The prefix kernel's tuning: `PrefixConfig` resolution, the heuristic, and the measured tables
(named knobs, a format version, the matching rule, the tuner's writer)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from pallas_kernels import tuning

def test_heuristic_config():
    """The ping-pong from three 128-row tiles (276 rows at T = 69, G = 4) and not below; the overlap
    with two compute warpgroups only; two waves of CTAs at long caches."""
    C = tuning.PrefixConfig
    assert tuning.heuristic_config(69, 4, 8, 1, 32768, 128) == C(2, 128, 2, 11, pingpong=True, overlap=True)
    assert tuning.heuristic_config(37, 4, 8, 1, 32768, 128) == C(2, 128, 2, 17, pingpong=False, overlap=True)
    assert tuning.heuristic_config(16, 4, 8, 1, 32768, 128) == C(1, 128, 3, 33, pingpong=False, overlap=False)
    assert tuning.heuristic_config(5, 4, 8, 1, 4096, 128).num_splits == 17  # one wave at 4k
    assert tuning.heuristic_config(1, 4, 8, 1, 128, 64).num_splits == 1  # never more splits than blocks


def test_apply_overrides():
    """Overrides replace the default's knobs; a changed tile gets the deepest pipeline that fits it,
    the ping-pong needs two warpgroups, and an unset overlap follows the default (or the heuristic's
    rule for another warpgroup count), never with one stage."""
    default = tuning.PrefixConfig(2, 128, 2, 11, pingpong=True, overlap=True)
    assert tuning.apply_overrides(default, 128) == default
    assert tuning.apply_overrides(default, 128, num_splits=5, overlap=None) == \
        dataclasses.replace(default, num_splits=5)
    assert tuning.apply_overrides(default, 128, block_kv=64).stages == tuning.smem_stages(2, 64, 128) == 4
    one = tuning.apply_overrides(default, 128, num_wg=1)
    assert (one.stages, one.pingpong, one.overlap) == (tuning.smem_stages(1, 128, 128), False, False)
    assert tuning.apply_overrides(default, 128, stages=1).overlap is False
    with pytest.raises(TypeError, match="unknown prefix-kernel knobs"):
        tuning.apply_overrides(default, 128, lone_splits=3)


def _table(tmp_path, kind, entries, version=tuning.TABLE_VERSION):
    (tmp_path / tuning.device_file_name(kind)).write_text(json.dumps({"version": version, "entries": entries}))


def _entry(T, S, num_wg, block_kv, stages, num_splits, pingpong=False, overlap=False, G=4):
    return dict(G=G, K=8, B=1, H=128, T=T, S=S, config=dict(num_wg=num_wg, block_kv=block_kv, stages=stages,
                                                          num_splits=num_splits, pingpong=pingpong, overlap=overlap))


def test_tuning_table_lookup(tmp_path):
    """Measured tables are matched by head grouping, then the smallest tuned capacity and row count
    that cover the shape; anything else (other device, grouping, batch, short caches) gets None."""
    C = tuning.PrefixConfig
    kind = "Test GPU 80GB"
    _table(tmp_path, kind, [_entry(16, 32768, 1, 64, 4, 33), _entry(69, 32768, 2, 128, 2, 11),
                            _entry(69, 131072, 1, 128, 3, 22), _entry(37, 131072, 2, 128, 2, 20, pingpong=True),
                            _entry(37, 65536, 2, 128, 2, 22, pingpong=True),
                            _entry(69, 65536, 2, 128, 2, 22, pingpong=True, overlap=True)])

    def look(T, S, G=4, B=1):
        return tuning.lookup(T, G, 8, B, S, 128, device_kind=kind, table_dir=str(tmp_path))

    assert look(69, 32768) == C(2, 128, 2, 11)
    assert look(37, 20480) == C(2, 128, 2, 11)  # rows 148 -> the 276-row entry of the 32k table
    assert look(37, 33536) == C(2, 128, 2, 22, pingpong=True)  # capacity above 32k -> the 64k table
    assert look(37, 65536 + 128) == C(2, 128, 2, 20, pingpong=True)  # -> the 128k table
    assert look(69, 65536) == C(2, 128, 2, 22, pingpong=True, overlap=True)
    assert look(5, 33536) is None  # 20 rows: no one-warpgroup entry in that table
    assert look(1, 32768) == C(1, 64, 4, 33)
    assert look(69, 1 << 20) == C(1, 128, 3, 22)  # beyond every tuned capacity: the largest rows
    assert look(69, 4096 + 64) is None  # 4160 % 128 != 0: the table's block does not tile it
    assert look(1, 32768).num_splits <= 32768 // 64
    assert look(69, 2048) is None  # below MIN_TUNED_CAPACITY
    assert look(1, 131072) is None  # the 128k sweep has no entry of <= 64 rows: the heuristic
    assert look(69, 32768, G=5) is None and look(69, 32768, B=2) is None
    assert tuning.lookup(69, 4, 8, 1, 32768, 128, device_kind="Other GPU", table_dir=str(tmp_path)) is None


@pytest.mark.parametrize("version,config,match", [
    (1, None, "has version 1; this code reads version 2"),
    (None, None, "has version None"),
    (2, dict(num_wg=2, block_kv=128, stages=2, num_splits=11, pingpong=True), "must map exactly the knobs"),
    (2, dict(num_wg=2, block_kv=128, stages=2, num_splits=11, pingpong=True, overlap=False, lone_splits=11),
     "must map exactly the knobs"),
])
def test_tuning_table_refused(tmp_path, version, config, match):
    """A table of another version, or an entry whose config does not name exactly the knobs, is
    refused with the file named (never read by position or half understood)."""
    kind = "Refused GPU"
    entry = _entry(69, 32768, 2, 128, 2, 11)
    if config is not None:
        entry["config"] = config
    _table(tmp_path, kind, [entry], version=version)
    with pytest.raises(ValueError, match=match) as err:
        tuning.lookup(69, 4, 8, 1, 32768, 128, device_kind=kind, table_dir=str(tmp_path))
    assert tuning.device_file_name(kind) in str(err.value)


def test_shipped_tables_read():
    """Every installed table has the current version and named knobs on every entry."""
    names = sorted(n for n in os.listdir(tuning.TABLE_DIR) if n.endswith(".json"))
    assert names
    for name in names:
        table = tuning.read_table(os.path.join(tuning.TABLE_DIR, name))
        assert table["version"] == tuning.TABLE_VERSION and table["entries"]
        for e in table["entries"]:
            assert set(e["config"]) == set(tuning.KNOBS)
            assert tuning.PrefixConfig(**e["config"]).num_wg in (1, 2)


def test_install_entries_merges(tmp_path):
    """The tuner's writer: new shapes are added, measured shapes replaced, the rest kept, with the
    version and named knobs; `lookup` sees the new table at once."""
    path = str(tmp_path / tuning.device_file_name("Install GPU"))
    first = [_entry(69, 32768, 2, 128, 2, 11), _entry(16, 32768, 1, 64, 4, 33)]
    tuning.install_entries(path, first, meta={"run": 1})
    assert tuning.lookup(69, 4, 8, 1, 32768, 128, device_kind="Install GPU", table_dir=str(tmp_path)) == \
        tuning.PrefixConfig(2, 128, 2, 11)
    better = dict(_entry(69, 32768, 2, 128, 2, 9), t_us=90.0)
    better["config"] = tuning.PrefixConfig(**better["config"])  # a dataclass is written by name too
    table = tuning.install_entries(path, [better], meta={"run": 2})
    assert table["version"] == tuning.TABLE_VERSION and table["meta"]["kept_entries_meta"] == {"run": 1}
    entries = tuning.read_table(path)["entries"]
    assert sorted((e["T"], e["config"]["num_splits"]) for e in entries) == [(16, 33), (69, 9)]
    assert tuning.lookup(69, 4, 8, 1, 32768, 128, device_kind="Install GPU", table_dir=str(tmp_path)).num_splits == 9
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary file left behind
