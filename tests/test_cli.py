"""`python -m infer.generate`: an end-to-end smoke run in a subprocess, and the refusals."""

import os
import subprocess
import sys

import pytest

from infer import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_tiny_random_smoke():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it (conftest sets 8)
    proc = subprocess.run([sys.executable, "-m", "infer.generate", "--model", "tiny-random", "--max-new-tokens", "8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "random weights" in out  # the banner
    assert "chat template" in out
    assert "after 8 tokens" in out or "stopped on: eos" in out
    for line in ("compile:", "prefill:", "decode:"):
        assert line in out
    assert "tok/s" in out


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "-1"], "--temperature must be"),
    (["--top-p", "0"], "--top-p must be"),
    (["--model", "llama-3-8b"], "unknown model preset 'llama-3-8b'; choose one of: llama3-8b"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
    (["--model", "tiny-random", "--checkpoint", "somewhere"], "--checkpoint cannot be combined"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-new-tokens", "64", "--cache-capacity", "32"], "raise --cache-capacity to at least"),
    (["--prompt-tokens", "0"], "--prompt-tokens must be >= 1"),
    (["--method", "ar", "--compare-ar"], "--compare-ar compares the tree decoder with AR"),
])
def test_cli_refusals(argv, message, capsys):
    if "--model" not in argv:
        argv = ["--model", "tiny-random", *argv]  # the refusals do not depend on the model
    assert generate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_checkpoint_is_explained(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing is available offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert generate.main(["--model", "llama3-8b", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "not available offline" in err or "does not exist" in err
    assert "--checkpoint" in err


def test_method_defaults_to_tree_only_when_a_draft_is_available(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    parse = generate.build_parser().parse_args
    assert generate.choose_method(parse(["--model", "tiny-random"])) == "ar"  # no draft for the random model
    assert generate.choose_method(parse(["--model", "tiny-random", "--draft", "some/dir"])) == "tree"
    assert generate.choose_method(parse(["--model", "tiny-random", "--method", "ar", "--draft", "d"])) == "ar"
    # A preset whose released draft is not downloaded falls back to AR and says why.
    assert generate.choose_method(parse(["--model", "llama3-8b"])) == "ar"
    assert "not in the local cache" in capsys.readouterr().out


def test_default_model_is_the_demo_pair():
    assert generate.build_parser().parse_args([]).model == generate.DEFAULT_MODEL == "longspec-demo"
    parse = generate.build_parser().parse_args
    assert generate.choose_method(parse([])) == "tree"  # the demo ships its draft


def test_compare_ar_reports_identical_greedy_output(capsys):
    """--compare-ar runs the target alone too; at T = 0 the two outputs must be identical."""
    assert generate.main(["--model", "tiny-random", "--method", "tree", "--tree-shape", "2", "2",
                          "--max-new-tokens", "12", "--compare-ar", "--no-chat-template"]) == 0
    out = capsys.readouterr().out
    assert "outputs identical" in out and "x AR" in out


def test_demo_pair_default_run(capsys):
    """The default model (the shipped demo pair) on a short slice of its held-out prompt."""
    from longspec_jax import demo

    assert demo.available(), "the demo pair is missing from longspec_jax/demo"
    assert generate.main(["--prompt-tokens", "256", "--max-new-tokens", "16", "--compare-ar"]) == 0
    out = capsys.readouterr().out
    assert "model longspec-demo" in out and "prompt: 256 tokens" in out
    assert "tau (tokens per target forward" in out and "outputs identical" in out
    assert "draft vocab 2048" in out  # the shipped draft vocabulary is the demo's default


def test_demo_draft_vocab_none_scores_the_full_vocabulary(capsys):
    assert generate.main(["--prompt-tokens", "128", "--max-new-tokens", "8", "--draft-vocab", "none",
                          "--tree-shape", "1", "1"]) == 0
    assert "draft vocab 8192" in capsys.readouterr().out


def test_dtype_auto_is_f32_on_cpu():
    import jax

    assert generate.resolve_dtype("auto") == ("f32" if jax.default_backend() == "cpu" else "bf16")
    assert generate.resolve_dtype("bf16") == "bf16"


def test_text_streamer_prints_exactly_the_final_text():
    import io

    import numpy as np

    from infer import prompts, tiny_random

    tok = tiny_random.tokenizer()
    text = "héllo wörld ✓ done"
    ids = tok(text, add_special_tokens=False)["input_ids"]  # multi-byte characters span several ids
    out = io.StringIO()
    streamer = prompts.TextStreamer(tok, out)
    buf = np.zeros((1, len(ids)), np.int64)
    for n in range(1, len(ids) + 1, 3):  # slices that split characters mid-sequence
        buf[0, :n] = ids[:n]
        streamer(buf, np.array([n]))
        assert "\ufffd" not in out.getvalue()
    streamer.finish(ids)
    assert out.getvalue() == text + "\n"


def test_stop_ids_union(tmp_path):
    import json

    from infer import prompts, tiny_random

    cfg = tiny_random.config()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7, 9999]}))
    assert prompts.stop_ids(cfg, tiny_random.tokenizer(), str(tmp_path)) == (1, 7)  # 9999 is outside the vocab
    assert prompts.stop_ids(cfg) == (1,)


@pytest.mark.slow
def test_bench_ar_tiny_smoke(tmp_path):
    import json

    from bench import bench_ar

    out = tmp_path / "ar.json"
    assert bench_ar.main(["--tiny", "--contexts", "40", "--new-tokens", "8", "--repeats", "1",
                          "--stream-every", "4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m bench.bench_ar --tiny")
    row = record["results"][0]
    assert row["context"] == 40 and row["ms_per_token"] > 0 and row["floor_ms_per_token"] > 0
    assert "stream_ms_per_token" in row and record["jax"] == __import__("jax").__version__
