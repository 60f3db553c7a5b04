"""`python -m infer.generate`: an end-to-end smoke run in a subprocess, and the refusals."""

import os
import re
import subprocess
import sys

import pytest

from longspec_jax.infer import cli, generate

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
    assert re.search(r"compile [\d.]+ s .*\| prefill 73 tokens in [\d.]+ s \([\d,.]+ tok/s\) \| decode \d+ tokens in "
                     r"[\d.]+ s \([\d,.]+ tok/s, [\d.]+ ms/step\)", out)
    assert "compilation cache:" in out


def test_cli_second_launch_reuses_the_compilation_cache(tmp_path):
    """The persistent compilation cache is on by default for the CLI: a second launch finds the
    first one's executables (its compile time drops) and the line says where they are."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    env.pop("LONGSPEC_COMPILE_CACHE", None)
    argv = [sys.executable, "-m", "infer.generate", "--model", "tiny-random", "--max-new-tokens", "8",
            "--compile-cache", str(tmp_path / "xla")]
    runs = [subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"compilation cache: {tmp_path / 'xla'}" in proc.stdout
    first, second = (float(re.search(r"compile ([\d.]+) s", p.stdout).group(1)) for p in runs)
    assert os.listdir(tmp_path / "xla") and second < 0.5 * first, (first, second)
    off = subprocess.run(argv[:-2] + ["--compile-cache", "none"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "compilation cache: off" in off.stdout


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
    assert cli.choose_method(parse(["--model", "tiny-random"])) == "ar"  # no draft for the random model
    assert cli.choose_method(parse(["--model", "tiny-random", "--draft", "some/dir"])) == "tree"
    assert cli.choose_method(parse(["--model", "tiny-random", "--method", "ar", "--draft", "d"])) == "ar"
    # A preset whose released draft is not downloaded falls back to AR and says why.
    assert cli.choose_method(parse(["--model", "llama3-8b"])) == "ar"
    assert "not in the local cache" in capsys.readouterr().out


def test_default_model_is_the_demo_pair():
    assert generate.build_parser().parse_args([]).model == cli.DEFAULT_MODEL == "longspec-demo"
    parse = generate.build_parser().parse_args
    assert cli.choose_method(parse([])) == "tree"  # the demo ships its draft


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

    assert cli.resolve_dtype("auto") == ("f32" if jax.default_backend() == "cpu" else "bf16")
    assert cli.resolve_dtype("bf16") == "bf16"


def test_text_streamer_prints_exactly_the_final_text():
    import io

    import numpy as np

    from longspec_jax.infer import prompts, tiny_random

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

    from longspec_jax.infer import prompts, tiny_random

    cfg = tiny_random.config()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7, 9999]}))
    assert prompts.stop_ids(cfg, tiny_random.tokenizer(), str(tmp_path)) == (1, 7)  # 9999 is outside the vocab
    assert prompts.stop_ids(cfg) == (1,)


@pytest.fixture
def cached_preset(tmp_path, monkeypatch):
    """A preset whose target and released draft sit only in a (fake) Hugging Face cache, like a
    user's `huggingface-cli download` of both repos: the draft directory has no tokenizer."""
    import jax.numpy as jnp
    from flax import nnx
    from huggingface_hub import constants

    from longspec_jax.infer import tiny_random
    from longspec_jax import configs, draft_weights, weights
    from longspec_jax.draft import Draft
    from tests.hub_utils import cache_snapshot

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import; the env is for subprocesses
    model, cfg, tok = tiny_random.build()
    weights.save_target(model, cfg, str(tmp_path / "target"), tokenizer=tok)
    cache_snapshot(cache, "org/tiny-target", tmp_path / "target")
    draft = Draft(configs.DraftConfig.from_target(cfg), cfg.rope, rngs=nnx.Rngs(1), dtype=jnp.float32,
                  param_dtype=jnp.float32)
    draft_weights.save_draft(draft, tmp_path / "draft", target_cfg=cfg)
    monkeypatch.setitem(configs.PRESETS, "tiny-preset",
                        configs.Preset("tiny-preset", "org/tiny-target", "org/tiny-draft", cfg))
    return cache, tmp_path / "draft", draft


def test_cached_preset_draft_is_found_and_loaded(cached_preset, capsys):
    """A cached safetensors draft: --method defaults to tree and that draft runs (the draft directory
    must not be held to a target's required files)."""
    cache, draft_dir, _ = cached_preset
    from tests.hub_utils import cache_snapshot

    snap = cache_snapshot(cache, "org/tiny-draft", draft_dir)
    parse = generate.build_parser().parse_args
    assert cli.choose_method(parse(["--model", "tiny-preset"])) == "tree"
    assert "not in the local cache" not in capsys.readouterr().out
    with open(os.path.join(snap, "draft_vocab.json"), "w") as f:  # what the draft ships is used, so it was loaded
        f.write('{"ids": [1, 10, 20, 30, 40, 50]}')
    assert generate.main(["--model", "tiny-preset", "--max-new-tokens", "4", "--tree-shape", "2",
                          "--no-chat-template"]) == 0
    out = capsys.readouterr().out
    assert "method tree" in out and "6 ids shipped with the draft" in out and "draft vocab 6" in out


def test_cached_preset_torch_draft_is_found_and_loaded(cached_preset, capsys, monkeypatch):
    """A released-style draft: config.json + pytorch_model.bin, no safetensors, no tokenizer."""
    torch = pytest.importorskip("torch")
    cache, draft_dir, draft = cached_preset
    from longspec_jax import draft_weights
    from tests.hub_utils import cache_snapshot

    torch_dir = draft_dir.parent / "torch-draft"
    torch_dir.mkdir()
    os.rename(draft_dir / "config.json", torch_dir / "config.json")
    torch.save({f"model.{k}": torch.from_numpy(v.copy()) for k, v in draft_weights.draft_state_dict(draft).items()},
               str(torch_dir / "pytorch_model.bin"))
    cache_snapshot(cache, "org/tiny-draft", torch_dir)
    loaded = []
    real_load = draft_weights.load_draft
    monkeypatch.setattr(draft_weights, "load_draft",
                        lambda path, *a, **k: loaded.append(path) or real_load(path, *a, **k))
    assert generate.main(["--model", "tiny-preset", "--max-new-tokens", "4", "--tree-shape", "2",
                          "--no-chat-template"]) == 0
    out = capsys.readouterr().out
    assert "method tree" in out and "not in the local cache" not in out
    assert len(loaded) == 1 and os.path.isfile(os.path.join(loaded[0], "pytorch_model.bin"))
    assert str(cache) in loaded[0]


def test_stop_ids_accepts_a_single_generation_eos(tmp_path):
    import json

    from longspec_jax.infer import prompts, tiny_random

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert prompts.stop_ids(tiny_random.config(), None, str(tmp_path)) == (1, 7)


@pytest.mark.parametrize("verification", ["block", "token"])
def test_verification_flag_selects_the_rule_at_temperature_above_zero(verification, capsys):
    assert generate.main(["--model", "tiny-random", "--method", "tree", "--tree-shape", "2", "2", "--max-new-tokens", "8",
                          "--temperature", "1", "--verification", verification, "--no-chat-template"]) == 0
    assert f"sampled drafts, {verification} verification" in capsys.readouterr().out


def test_verification_flag_refuses_an_unknown_rule(capsys):
    assert generate.main(["--model", "tiny-random", "--verification", "typical"]) == 2
    err = capsys.readouterr().err
    assert "--verification: invalid choice: 'typical'" in err and "'block', 'token'" in err
