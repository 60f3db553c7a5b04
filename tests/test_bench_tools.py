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


def test_bench_e2e_phases_from_hlo_and_trace(tmp_path):
    """Decode-loop phases: instruction -> named scope from the HLO metadata (instructions without
    one inherit the previous phase in their computation), then device time and op counts per
    phase and per op from a (synthetic) GPU trace."""
    import gzip

    from bench.bench_e2e import hlo_phases, summarize_trace

    text = """
%fused_computation.1 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %exp = f32[4]{0} exponential(%p), metadata={op_name="jit(_decode_loop)/while/body/accept/exp"}
}

%body (s: f32[4]) -> f32[4] {
  %s = f32[4]{0} parameter(0)
  %gemm_fusion_dot_2 = f32[4]{0} fusion(%s), kind=kCustom, metadata={op_name="jit(_decode_loop)/while/body/draft_level0/dot_general"}
  %copy.7 = f32[4]{0} copy(%gemm_fusion_dot_2)
  %loop_fusion_3 = f32[4]{0} fusion(%copy.7), kind=kLoop, metadata={op_name="jit(_decode_loop)/while/body/verify/add"}
  %input_reduce_fusion = f32[4]{0} fusion(%loop_fusion_3), kind=kInput, metadata={op_name="jit(_decode_loop)/while/body/commit/reduce_max"}
  ROOT %tuple = (f32[4]{0}) tuple(%input_reduce_fusion)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %while = f32[4]{0} while(%a), body=%body, metadata={op_name="jit(_decode_loop)/while"}
}
"""
    ph = hlo_phases(text)
    assert ph["gemm_fusion_dot_2"] == "draft_level0" and ph["copy.7"] == "draft_level0"  # inherited
    assert ph["loop_fusion_3"] == "verify" and ph["input_reduce_fusion"] == "commit" and ph["exp"] == "accept"
    assert "while" not in ph and "a" not in ph and "tuple" in ph  # the tuple inherits "commit"

    ev = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    for it in range(2):  # two iterations
        ev += [{"ph": "X", "pid": 1, "name": "gemm_fusion_dot_2", "dur": 10.0, "args": {"hlo_op": "gemm_fusion_dot_2"}},
               {"ph": "X", "pid": 1, "name": "loop_fusion_3", "dur": 30.0, "args": {"hlo_op": "loop_fusion_3"}},
               {"ph": "X", "pid": 1, "name": "loop_fusion_3", "dur": 30.0, "args": {"hlo_op": "loop_fusion_3"}},
               {"ph": "X", "pid": 1, "name": "MemcpyD2H", "dur": 2.0},
               {"ph": "X", "pid": 2, "name": "host", "dur": 999.0}]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    out = summarize_trace(str(tmp_path), iterations=2, compiled_text=text)
    assert out["ops_per_iteration"] == 4 and out["device_ms_per_iteration"] == pytest.approx(0.072)
    assert out["ops"][0]["name"] == "loop_fusion_3" and out["ops"][0]["per_iteration"] == 2
    phases = out["phases"]
    assert phases["verify"]["ms_per_iteration"] == pytest.approx(0.060) and phases["verify"]["ops_per_iteration"] == 2
    assert phases["draft_level0"]["ops_per_iteration"] == 1 and phases["other"]["ops_per_iteration"] == 1
    assert phases["verify"]["top_ops"] == [{"name": "loop_fusion_3", "us_per_iteration": pytest.approx(60.0)}]
    assert "phases" not in summarize_trace(str(tmp_path), iterations=2)  # no HLO text: no phases


def test_bench_demo_tie_margin_reads_the_target_logits():
    """The margin bench_demo reports at a greedy mismatch: the target's next-token logits after
    the context (one causal pass), the gap between the two choices and the top-2 gap."""
    import jax.numpy as jnp
    import numpy as np

    from bench.bench_demo import tie_margin
    from infer import ar
    from infer.tiny_random import build

    model, cfg, _ = build(dtype=jnp.float32)
    context = [3, 17, 5, 9, 11, 2, 40]
    greedy_next = ar.generate_ar(model, context, max_new_tokens=1, eos_ids=()).sequences()[0][0]
    other = (greedy_next + 1) % cfg.vocab_size
    m = tie_margin(model, context, other, greedy_next)
    assert m["best_token"] == greedy_next and m["ar_token"] == greedy_next and m["spec_token"] == other
    assert m["logit_spec_minus_ar"] <= 0.0 and m["top2_gap"] >= 0.0 and np.isfinite(m["max_abs_logit"])
    assert tie_margin(model, context, greedy_next, greedy_next)["logit_spec_minus_ar"] == 0.0


def test_tune_prefix_variants_and_baseline():
    """The sweep's knob sets: two compute warpgroups come with the ping-pong off and on, one
    warpgroup never; --quick keeps the heuristic's split count; --baseline loads a kernel file."""
    import dataclasses
    import os

    from bench import tune_prefix
    from pallas_kernels import prefix_decode, tuning

    full = tune_prefix.variants(69, 4, 8, 1, 32768, 128)
    assert {(v.num_wg, v.pingpong) for v in full} == {(1, False), (2, False), (2, True)}
    assert not any(v.overlap for v in full)  # the overlap only with --overlap
    quick = tune_prefix.variants(69, 4, 8, 1, 32768, 128, quick=True)
    assert {v.num_splits for v in quick} == {tuning.heuristic_config(69, 4, 8, 1, 32768, 128).num_splits}
    assert all(v.num_wg == 1 and not v.pingpong for v in tune_prefix.variants(5, 4, 8, 1, 32768, 128, quick=True))
    # --overlap: every knob set with a >= 2-stage pipeline also with the intra-warpgroup overlap.
    ov = tune_prefix.variants(69, 4, 8, 1, 32768, 128, quick=True, overlap=True)
    assert ov == quick + [dataclasses.replace(v, overlap=True) for v in quick if v.stages >= 2]
    assert any(v.overlap for v in ov)
    # --num-wg / --block-kv keep only the knob sets with those values.
    assert {(v.num_wg, v.block_kv) for v in tune_prefix.keep_variants(ov, num_wg=2, block_kv=128)} == {(2, 128)}
    assert tune_prefix.keep_variants(ov) == ov
    base = tune_prefix.load_baseline(prefix_decode.__file__)
    assert base.prefix_attention is not prefix_decode.prefix_attention and callable(base.prefix_attention)
    assert os.path.samefile(base.__file__, prefix_decode.__file__)


def test_bench_cpu_cache_layout_tiny(tmp_path):
    """The layout benchmark runs all three forms on tiny shapes, and they attend alike."""
    from bench import bench_cpu_cache_layout as b

    q = jax.random.normal(jax.random.key(0), (1, 2, 3, 8))
    kc = jax.random.normal(jax.random.key(1), (1, 16, 2, 8))
    vc = jax.random.normal(jax.random.key(2), (1, 16, 2, 8))
    slot = b.attention(q, kc, vc, 11, "slot_major")
    for layout in ("head_major", "head_major_reduce"):
        other = b.attention(q, kc.transpose(0, 2, 1, 3), vc.transpose(0, 2, 1, 3), 11, layout)
        assert jnp.allclose(slot, other, atol=1e-5), layout
    assert b.main(["--T", "1", "--layers", "1", "--capacity", "256", "--visible", "128", "--steps", "2",
                   "--reps", "1", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu_cache_layout_*.json")
    row = json.loads(path.read_text())["rows"][0]
    assert all(row[k] > 0 for k in ("slot_major_ms", "head_major_ms", "head_major_reduce_ms"))


def test_bench_gemm_rows_tiny(tmp_path):
    """The fused and separate projection forms hold the same values and compute the same stack; the
    benchmark writes one row per form and row count plus the LM head."""
    from bench import bench_gemm_rows as b
    from longspec_jax.configs import tiny_config

    cfg = tiny_config()
    x = jax.random.normal(jax.random.key(5), (1, 3, cfg.hidden_size), jnp.float32)
    sep = b.stack_fn(cfg, False)(x, b.layer_weights(cfg, 2, False, jax.random.key(0), jnp.float32))
    fus = b.stack_fn(cfg, True)(x, b.layer_weights(cfg, 2, True, jax.random.key(0), jnp.float32))
    assert float(jnp.max(jnp.abs(sep))) > 0.1
    assert jnp.allclose(sep, fus, rtol=1e-4, atol=1e-4)
    assert b.main(["--tiny", "--rows", "1", "3", "--reps", "1", "--tag", "t", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gemm_rows_tiny_*_t.json")
    rows = json.loads(path.read_text())["rows"]
    assert sorted((r["form"], r["rows"]) for r in rows) == sorted(
        (f, t) for f in ("separate", "fused", "lm_head") for t in (1, 3))
    assert all(r["ms"] > 0 for r in rows)


def test_profile_prefix_tiny(tmp_path):
    """The prefix-call profile runs (interpret mode on the CPU) and splits device time into kernel and
    glue that add up to the total, with the config the call used."""
    from bench import profile_prefix
    from pallas_kernels import tuning

    assert profile_prefix.main(["--tiny", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("profile_prefix_*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["device_us_per_call"] > 0 and row["device_ops_per_call"] >= 1
    assert abs(row["kernel_us_per_call"] + row["glue_us_per_call"] - row["device_us_per_call"]) < 1e-6
    assert set(row["config"]) == set(tuning.KNOBS)  # the named knobs of tuning.PrefixConfig
