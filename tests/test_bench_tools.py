"""Fast checks of the benchmark helpers that shape reported figures (no model runs)."""

import json

import jax
import jax.numpy as jnp
import pytest


def test_summarize_greedy_equal_only_where_checked():
    from bench.bench_demo import summarize

    run = {"tokens": 10, "decode_s": 0.5, "tau": 2.0, "forwards": 5, "accepted_by_depth": [3, 1]}
    sampled = summarize([dict(run), dict(run)], ar_rate=10.0)
    assert sampled["greedy_equal"] is None  # T > 0: nothing was compared
    assert sampled["speedup"] == pytest.approx(2.0)
    greedy = summarize([dict(run, greedy_equal=True), dict(run, greedy_equal=False)], ar_rate=None)
    assert greedy["greedy_equal"] is False
    assert summarize([dict(run, greedy_equal=True)], None)["greedy_equal"] is True


def test_bf16_copy_ceiling_is_not_optimised_away():
    """A bf16 scale by 1.0001 is a scale by 1 (XLA then drops the copy: a 55 TB/s 'ceiling' on an
    H200); the ceiling kernels must change every element."""
    from bench.bench_e2e import measure_ceilings

    assert float(jnp.asarray(1.0001, jnp.bfloat16)) == 1.0  # why the old copy was void
    x = jax.random.normal(jax.random.key(0), (4096,), jnp.bfloat16)
    assert bool(jnp.all(jnp.negative(x) == -x)) and bool(jnp.any(jnp.negative(x) != x))
    detail = {}
    bw, peak = measure_ceilings(True, jnp.bfloat16, detail)
    assert set(detail) == {"copy_bandwidth_Bps", "read_bandwidth_Bps", "gemv_bandwidth_Bps"}
    assert bw == max(detail.values()) and bw > 0 and peak > 0


def _demo_json(path, device, ctx):
    rows = [{"context": ctx, "temperature": 0.0, "method": "ar", "draft": None, "decode_tok_s": 100.0},
            {"context": ctx, "temperature": 0.0, "method": "chain", "draft": "draft", "tau": 2.5,
             "decode_tok_s": 120.0, "speedup": 1.2}]
    path.write_text(json.dumps({"device": device, "jax_version": "x", "dtype": "float32", "rows": rows}))
    return str(path)


def test_plot_demo_merge(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plot_demo

    a = _demo_json(tmp_path / "a.json", "gpu", 2048)
    b = _demo_json(tmp_path / "b.json", "gpu", 8192)
    out = tmp_path / "merged.png"
    assert plot_demo.main(["--merge", str(out), a, b]) == 0
    assert out.stat().st_size > 1000
    c = _demo_json(tmp_path / "c.json", "cpu", 4096)
    with pytest.raises(SystemExit, match="different devices"):
        plot_demo.main(["--merge", str(tmp_path / "bad.png"), a, c])


def test_bench_tp_device_busy_reads_a_trace(tmp_path):
    """Per-device busy and collective time from a (synthetic) profiler trace of 2 steps."""
    import gzip

    from bench.bench_tp import device_busy

    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:1"}},
          {"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/host:CPU"}},
          {"ph": "X", "pid": 1, "name": "gemv_fusion", "ts": 0.0, "dur": 3000.0},
          {"ph": "X", "pid": 1, "name": "all-reduce-start.3", "ts": 2500.0, "dur": 1000.0},  # overlaps 500
          {"ph": "X", "pid": 2, "name": "gemv_fusion", "ts": 0.0, "dur": 2000.0},
          {"ph": "X", "pid": 2, "name": "ncclDevKernel_AllGather_RING_LL", "ts": 2000.0, "dur": 400.0},
          {"ph": "X", "pid": 2, "name": "ncclDevKernel_AllGather_RING_LL", "ts": 3000.0, "dur": 400.0},
          {"ph": "X", "pid": 3, "name": "host work", "dur": 9999.0}]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    out = device_busy(str(tmp_path), steps=2)
    assert set(out) == {"/device:GPU:0", "/device:GPU:1"}
    assert out["/device:GPU:0"]["busy_ms_per_step"] == pytest.approx(2.0)
    assert out["/device:GPU:0"]["collective_ms_per_step"] == pytest.approx(0.5)
    assert out["/device:GPU:0"]["union_ms_per_step"] == pytest.approx(1.75)
    g1 = out["/device:GPU:1"]
    assert g1["collective_ms_per_step"] == pytest.approx(0.4) and g1["ops_per_step"] == 1.5
    assert g1["collectives"] == [{"name": "ncclDevKernel_AllGather_RING_LL", "ms_per_step": pytest.approx(0.4),
                                  "per_step": 1.0}]
    assert device_busy(str(tmp_path / "none"), 1) == {"error": f"no trace file under {tmp_path / 'none'}"}


def test_bench_tp_hlo_collectives_counts_instructions():
    from bench.bench_tp import hlo_collectives

    text = """
  %all-reduce-start.3 = bf16[5120]{0} all-reduce-start(bf16[5120]{0} %p), channel_id=1, to_apply=%add
  %all-gather-start = ((bf16[76032,5120]{1,0}), bf16[152064,5120]{1,0}) all-gather-start(%g), dimensions={0}
  ROOT %all-reduce.1 = bf16[5120]{0} all-reduce(%q), channel_id=2
  %cp = f32[1,4,8]{1,0,2} collective-permute(%b), source_target_pairs={{1,0}}
  %fusion = f32[4] fusion(%all-reduce.1), calls=%fused_all-reduce_user
"""
    assert hlo_collectives(text) == {"all-reduce": 2, "all-gather": 1, "collective-permute": 1}


@pytest.mark.parametrize("extra", [["--skip-demo"], ["--tiny"]])
def test_bench_tp_exactness_only_refuses_checking_nothing(extra, capsys):
    from bench import bench_tp

    with pytest.raises(SystemExit):
        bench_tp.main(["--exactness-only", *extra])
    assert "--exactness-only checks the demo pair" in capsys.readouterr().err


def test_bench_collectives_refuses_more_devices_than_exist():
    from bench import bench_collectives
    from longspec_jax.sharding import ShardingError

    with pytest.raises(ShardingError, match="needs 64 devices"):
        bench_collectives.main(["--devices", "64", "--out", "/nonexistent"])
