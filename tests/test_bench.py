"""One CPU smoke run per `python -m bench` suite on the tiny workload: it exits 0, writes its JSON
where the suite says, with the result header, and the numbers are there and sane. The kernels run
in Mosaic GPU interpret mode here (checked against the references, not timed)."""

import json
import os

import jax
import pytest

from bench import common
from bench.__main__ import main

HEADER = ("suite", "workload", "device", "device_count", "python", "jax", "jaxlib", "flax", "git_commit",
          "git_dirty", "argv", "time_utc")


def run_suite(tmp_path, suite, *extra, workload="tiny"):
    assert main([suite, "--workload", workload, *extra, "--out", str(tmp_path)]) == 0
    name = {"--profile": "kernels-profile"}.get(next(iter(extra), None), suite)
    record = json.loads((tmp_path / "cpu" / f"{name}_{workload}.json").read_text())
    assert set(HEADER) <= set(record) and record["suite"] == name and record["workload"] == workload
    assert record["argv"][:4] == ["python", "-m", "bench", suite] and record["device"].startswith("cpu")
    assert record["jax"] and record["flax"] and record["time_utc"].endswith("+00:00")
    return record


def test_device_slug_and_result_path():
    assert common.device_slug(kind="NVIDIA H100 80GB HBM3") == "h100"
    assert common.device_slug(2, kind="NVIDIA H200") == "h200x2"
    assert common.device_slug(kind="cpu") == "cpu"
    assert common.result_path("out", "tune", "llama3-8b", device="h200") == os.path.join("out", "h200",
                                                                                        "tune_llama3-8b.json")
    assert common.result_path("x/y.json", "tune", "tiny") == "x/y.json"


def test_result_files_record_the_command_without_machine_paths():
    argv = ["python", "-m", "bench", "serve", "--checkpoint", "/data/ck", "--out", "/home/me/out", "--turns", "2",
            "rel/dir"]
    assert common.header("serve", None, argv)["argv"] == [
        "python", "-m", "bench", "serve", "--checkpoint", "CHECKPOINT", "--out", "OUT", "--turns", "2", "rel/dir"]


def test_workload_query_counts():
    from bench import workloads

    assert workloads.get("llama3-8b").query_counts() == (1, 5, 16, 19, 37, 69)
    with pytest.raises(SystemExit, match="unknown workload 'nope'.*llama3-8b"):
        workloads.get("nope")


def test_kernels_tiny(tmp_path):
    record = run_suite(tmp_path, "kernels", "--T", "5", "--reps", "1")
    c = record["ceilings"]
    assert c["bandwidth_Bps"] == max(c["copy_Bps"], c["read_Bps"], c["gemv_Bps"]) > 0 and c["matmul_flops"] > 0
    (row,) = record["rows"]
    assert row["T"] == 5 and row["S"] == 256 and row["check"]["ok"] and row["floor_us"] > 0
    assert row["us"]["xla"]["us"] > 0 and row["us"]["dense"]["us"] > 0
    assert "not timed" in row["us"]["prefix"]["error"]  # interpret mode: checked only


@pytest.mark.slow
def test_kernels_profile_tiny(tmp_path):
    record = run_suite(tmp_path, "kernels", "--profile", "--T", "5", "--reps", "1")
    (row,) = record["rows"]
    assert row["device_us"] > 0 and abs(row["kernel_us"] + row["glue_us"] - row["device_us"]) < 1e-6


def test_tune_tiny(tmp_path):
    record = run_suite(tmp_path, "tune", "--T", "5", "--quick", "--block-kv", "128")
    (entry,) = record["entries"]
    assert entry["variants"] and not any("error" in v for v in entry["variants"])
    assert {v["knobs"]["overlap"] for v in entry["variants"]} == {False, True}  # overlap swept off and on
    assert all(v["max_abs_err"] < 2e-2 for v in entry["variants"])
    with pytest.raises(SystemExit, match="--install needs a Hopper GPU"):
        main(["tune", "--workload", "tiny", "--install", "--out", str(tmp_path)])


def test_tune_variants_and_table_format(tmp_path, monkeypatch):
    """The sweep's knob sets: two warpgroups only above 64 rows, with the ping-pong off and on;
    --quick keeps the heuristic's split count; install_table writes what tuning.lookup reads."""
    from bench import tune
    from pallas_kernels import tuning

    full = tune.variants(69, 4, 8, 1, 32768, 128)
    assert {(v["num_wg"], v["pingpong"]) for v in full} == {(1, False), (2, False), (2, True)}
    quick = tune.variants(69, 4, 8, 1, 32768, 128, quick=True)
    assert {v["num_splits"] for v in quick} == {tune.heuristic_knobs(69, 4, 8, 1, 32768, 128)["num_splits"]}
    assert all(v["num_wg"] == 1 for v in tune.variants(5, 4, 8, 1, 32768, 128))

    monkeypatch.setattr(tuning, "TABLE_DIR", str(tmp_path))
    knobs = dict(quick[-1])
    entry = {"G": 4, "K": 8, "B": 1, "H": 128, "T": 69, "S": 32768, "floor_us": 1.0, "knobs": knobs, "us": 2.0,
             "heuristic": tune.heuristic_knobs(69, 4, 8, 1, 32768, 128), "heuristic_us": 3.0}
    tune.install_table("Fake GPU", [entry], {"device": "Fake GPU"})
    got = tuning.lookup(69, 4, 8, 1, 32768, 128, device_kind="Fake GPU", table_dir=str(tmp_path))
    assert got == tuning.PrefixConfig(**knobs)  # the named knobs read back as written


def test_train_tiny(tmp_path):
    record = run_suite(tmp_path, "train", "--steps", "1")
    (row,) = record["rows"]
    assert row["seq_len"] == 64 and row["tokens_per_s"] > 0 and 0 < row["mfu"] < row["mfu_total"]
    assert record["matmul_flops"] > 0


def test_plot_reads_the_kept_results(tmp_path):
    pytest.importorskip("matplotlib")
    results = os.path.join(common.ROOT, "bench", "results")
    out = tmp_path / "a.png"
    assert main(["plot", os.path.join(results, "h200", "acceptance_demo-t0.json"), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    h100 = os.path.join(results, "h100")
    assert main(["plot", os.path.join(h100, "latency_llama3-8b-32k.json"), os.path.join(h100, "latency_llama3-8b-4k-128k.json"),
                 "--baseline", os.path.join(h100, "hf-torch_llama3-8b.json"), "--out", str(tmp_path / "l.png")]) == 0
    with pytest.raises(SystemExit, match="one device and one kind"):
        main(["plot", os.path.join(h100, "latency_llama3-8b-32k.json"), os.path.join(results, "h200", "acceptance_demo-t0.json")])


def test_hf_torch_baseline_tiny(tmp_path):
    pytest.importorskip("transformers")
    from bench.baselines import hf_torch

    assert hf_torch.main(["--workload", "tiny", "--contexts", "64", "--new-tokens", "4", "--no-compile",
                          "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu" / "hf-torch_tiny.json").read_text())
    assert set(HEADER) <= set(record) and record["torch"] and record["rows"][0]["decode_ms_per_token"] > 0
    import torch  # the baseline leaves process-wide torch settings alone (later parity tests build HF modules)
    assert torch.get_default_dtype() == torch.float32


def test_latency_tiny(tmp_path):
    record = run_suite(tmp_path, "latency", "--steps", "2")
    assert record["tensor_parallel"] == 1 and record["tau"] == 3.4 and record["ceilings"]["matmul_flops"] > 0
    (row,) = record["rows"]
    assert row["context"] == 256 and row["prefill_tokens_per_s"] > 0 and row["prefill_floor_s"] > 0
    assert row["ar_ms"] > 0 and row["ar_floor_ms"] > 0
    assert set(row["trees"]) == {"2 2", "1 1"} and row["trees"]["1 1"]["verify_ms"] > 0
    tr = row["trees"]["2 2"]  # the first tree: every part timed
    assert tr["nodes"] == 5 and all(tr[k] > 0 for k in ("verify_ms", "draft_ms", "commit_ms", "iteration_ms"))
    assert tr["iteration_floor_ms"] > tr["verify_floor_ms"] > 0 and len(tr["draft_level_ms"]) == 1
    assert tr["modelled_speedup"] == pytest.approx(3.4 * row["ar_ms"] / tr["iteration_ms"])
    assert tr["draft_vocab"]["128"]["iteration_ms"] > 0 and tr["draft_vocab"]["128"]["draft_ms"] > 0


@pytest.mark.slow
def test_latency_tensor_parallel_profile_tiny(tmp_path):
    prof = tmp_path / "prof"
    assert main(["latency", "--workload", "tiny", "--steps", "2", "--tensor-parallel", "2", "--draft-levels",
                 "--draft-vocab-sizes", "--profile", str(prof), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpux2" / "latency_tiny.json").read_text())
    row = record["rows"][0]
    tr = row["trees"]["2 2"]
    assert record["tensor_parallel"] == 2 and row["ar_ms"] > 0 and tr["iteration_ms"] > 0
    assert len(tr["draft_level_ms"]) == 2 and "draft_vocab" not in tr
    assert row["ar_profile"]["ops_per_iteration"] > 0
    assert {"draft_level0", "draft_level1", "verify", "accept", "commit"} <= set(tr["profile"]["phases"])


def test_acceptance_tiny(tmp_path):
    import numpy as np

    vocab = tmp_path / "even.npy"
    np.save(vocab, np.arange(0, 256, 2))
    record = run_suite(tmp_path, "acceptance", "--dtype", "float32", "--draft-vocab", str(vocab))
    assert record["dtype"] == "float32" and record["greedy_mismatches"] == []
    ar, *rows = record["rows"]
    assert ar["method"] == "ar" and ar["decode_tok_s"] > 0 and ar["tokens"] == 7
    assert [(r["method"], r["draft_vocab"]) for r in rows] == [("2 2", None), ("1 1", None), ("2 2", "even"),
                                                               ("1 1", "even")]
    for r in rows:
        assert r["greedy_equal"] and 1.0 <= r["tau"] <= 3.0 and r["speedup"] > 0 and len(r["accept_by_depth"]) == 2
    assert rows[2]["draft_vocab_size"] == 128


@pytest.mark.slow  # for CI's time budget; the methods themselves: tests/test_sampled_tree.py, test_speculative.py
def test_acceptance_tiny_sampled_methods(tmp_path):
    record = run_suite(tmp_path, "acceptance", "--dtype", "float32", "--temperatures", "1", "--trees", "2,2", "1,1",
                       "--methods", "block", "token", "beam", "--num-prompts", "2", "--warmup", "0")
    ar, *rows = record["rows"]
    assert ar["method"] == "ar" and ar["temperature"] == 1.0
    assert [r["method"] for r in rows] == ["2 2/block", "2 2/token", "2 2/beam", "1 1/block", "1 1/token", "1 1/beam"]
    for r in rows:
        assert "greedy_equal" not in r and 1.0 <= r["tau"] <= 3.0 and r["speedup"] > 0


def test_host_tiny(tmp_path):
    record = run_suite(tmp_path, "host", "--prompt-tokens", "40", "--new-tokens", "24", "--reps", "2")
    assert len(record["alone_ms"]) == len(record["worker_ms"]) == 2
    assert all(0 < ms < 1e4 for ms in record["alone_ms"] + record["worker_ms"])
    assert record["alone_ms_median"] > 0 and record["worker_ms_median"] > 0
    assert 0 < record["call_ms_median"] < 1e4


def test_steps_tiny(tmp_path):
    record = run_suite(tmp_path, "steps", "--shapes", "ar", "1,1", "--rows", "1", "2", "--max-slots", "2",
                       "--steps", "2", "--warmup", "1")
    assert set(record["shapes"]) == {"ar", "1,1"} and record["context"] > 0
    for shape in record["shapes"].values():
        assert [p["rows"] for p in shape["points"]] == [1, 2]
        assert all(p["ms_per_iteration"] > 0 and p["iterations"] >= 2 for p in shape["points"])


def test_serve_tiny(tmp_path):
    """Both servers started for real, two agents of two turns each through the openai client."""
    record = run_suite(tmp_path, "serve", "--concurrency", "1", "2", "--turns", "2")
    assert set(record["modes"]) == {"tree", "ar"} and set(record["speedup"]) == {"1", "2"}
    for mode in record["modes"].values():
        assert [lv["agents"] for lv in mode["levels"]] == [1, 2]
        for lv in mode["levels"]:
            assert lv["output_tokens"] == lv["agents"] * 2 * record["new_tokens"]  # EOS ignored: every token
            assert lv["ttft_later_turns_s"] > 0 and lv["prefix_hit_rate"] >= 0.5  # later turns reuse their context
            assert 0 < lv["reused_token_share"] < 1
            assert lv["call_gap_ms"] is None  # counted on GPUs only
        assert mode["cold_ttft_s"] > 0 and 0 < mode["compile_s"] < mode["startup_s"]
    assert record["modes"]["ar"]["levels"][0]["tau"] == 1.0


@pytest.mark.slow  # for CI's time budget; shared documents in the engine: tests/test_engine.py
def test_serve_tiny_shared_prefix(tmp_path):
    """Agents whose first prompts share a document: the later agents copy it from the first (running
    or resident) and prefill only their own tokens. (Without the fast lane: tiny prompts fit in one
    chunk, so a second lane would prefill one beside the first before there is anything to copy.)"""
    assert main(["serve", "--workload", "tiny", "--concurrency", "3", "--turns", "1", "--modes", "tree",
                 "--shared-prefix", "192", "--server-args=--fast-lane-tokens 0", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "cpu" / "serve_tiny-shared.json").read_text())
    level = record["modes"]["tree"]["levels"][0]
    assert record["shared_prefix"] == 192 and level["output_tokens"] == 3 * record["new_tokens"]
    assert level["prefix_hit_rate"] >= 2 / 3 - 1e-9 and level["reused_tokens"] >= 2 * 192


def test_prefill_needs_a_gpu(capsys):
    """`bench prefill` times cuDNN: elsewhere it says so and exits 2 (its GPU run is in docs/results.md)."""
    if jax.devices()[0].platform == "gpu":
        pytest.skip("a GPU runs the suite for real")
    assert main(["prefill", "--workload", "tiny"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().out
