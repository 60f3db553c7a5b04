"""The benchmark scripts run end to end on tiny configs (CPU), so they do not rot between GPU
sessions. Marked slow: they compile several decode loops each."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_bench_e2e_tiny(tmp_path):
    from bench import bench_e2e

    assert bench_e2e.main(["--tiny", "--contexts", "256", "--trees", "2 2", "1 1", "--loop-trees", "2 2",
                           "--steps", "4", "--draft-vocab-sizes", "128", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("e2e_tiny_*.json")
    tr = json.loads(path.read_text())["rows"][0]["trees"]["2 2"]
    for key in ("verify_ms", "draft_ms", "commit_ms", "iteration_ms"):
        assert tr[key] > 0
    assert tr["draft_vocab"]["128"]["iteration_ms"] > 0


def test_bench_tp_tiny(tmp_path):
    from bench import bench_tp

    bench_tp.main(["--tiny", "--tensor", "2", "--steps", "4", "--tree", "2 2", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("tp_tiny_*.json")
    row = json.loads(path.read_text())["rows"][0]
    assert row["tp_ar_ms"] > 0 and row["single_ar_ms"] > 0


def test_tune_prefix_interpret(tmp_path):
    from bench import tune_prefix

    assert tune_prefix.main(["--interpret", "--T", "5", "--S", "256", "--K", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("tune_*.json")
    entry = json.loads(path.read_text())["entries"][0]
    assert entry["variants"] and not any("error" in v for v in entry["variants"])


def test_bench_demo_short(tmp_path):
    """The demo benchmark on one held-out prompt cut to 256 tokens: AR and two speculative
    configurations, interleaved by prompt, greedy output checked against AR inside."""
    from bench import bench_demo

    out = tmp_path / "demo.json"
    assert bench_demo.main(["--contexts", "256", "--num-prompts", "1", "--new-tokens", "12", "--temperatures", "0",
                            "--trees", "default", "small=2,2", "--warmup", "0", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["ar", "default", "small"]
    assert all(r["greedy_equal"] and r["tau"] >= 1.0 for r in rows[1:])


def test_bench_xla_prefix_short(tmp_path):
    from bench import bench_xla_prefix

    out = tmp_path / "x.json"
    assert bench_xla_prefix.main(["--context", "512", "--T", "1", "200", "--visible", "300", "--steps", "1",
                                  "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and all(r["dense_ms"] > 0 and r["blockwise_ms"] > 0 for r in rows)


def test_bench_e2e_demo_shapes_float32(tmp_path):
    from bench import bench_e2e

    assert bench_e2e.main(["--model", "longspec-demo", "--dtype", "float32", "--contexts", "512", "--trees", "1 1",
                           "--loop-trees", "1 1", "--steps", "2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("e2e_longspec-demo_*.json")
    res = json.loads(path.read_text())
    assert res["weights"] == "random float32" and res["rows"][0]["trees"]["1 1"]["iteration_ms"] > 0


def test_bench_collectives_fake_devices(tmp_path):
    from bench import bench_collectives

    assert bench_collectives.main(["--devices", "2", "--hidden", "64", "--layers", "4", "--iters", "20",
                                   "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("collectives_*x2.json")
    res = json.loads(path.read_text())
    assert [r["collective"] for r in res["rows"]][:2] == ["psum [1,1,hidden] bf16", "psum [1,1,hidden] f32"]
    assert all(r["us"] > 0 for r in res["rows"]) and res["per_decode_step_collectives_ms"] > 0
    assert res["copy_bandwidth_Bps"] > 0 and res["gemv_bandwidth_Bps"] > 0
