"""`python -m infer.generate` on a new user's bad inputs: each is refused with an `error:` line
that names the flag, the value and what to pass, and before any weight is loaded."""

import re

import pytest

from longspec_jax.infer import generate, tiny_random
from longspec_jax import demo, weights


def _must_not_load(*args, **kwargs):
    raise AssertionError("weights were loaded before the bad input was refused")


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a target's weights are read (checkpoint or random)."""
    monkeypatch.setattr(weights, "load_params", _must_not_load)
    monkeypatch.setattr(tiny_random, "build", _must_not_load)


def _refused(argv, capsys) -> str:
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    return err


# --------------------------------------------------------------------------------------------
# prompt length against the model's position limit


def test_tiny_random_prompt_beyond_its_limit(tmp_path, capsys, no_weights):
    prompt = tmp_path / "p.txt"
    prompt.write_text("a" * 2500)  # one token per byte: 2,500 tokens plus BOS against the 2,048 limit
    err = _refused(["--model", "tiny-random", "--prompt-file", str(prompt), "--no-chat-template"], capsys)
    assert "the prompt (2501 tokens) plus --max-new-tokens (128) is 2629 positions, more than the 2048" in err
    assert "max_position_embeddings" in err
    assert "--prompt-tokens 1920" in err and "--max-new-tokens" in err


def test_long_prompt_file_on_the_demo_model(tmp_path, capsys, no_weights):
    """A 66k-token file against the demo's 32,768 positions; with --prompt-tokens 40000 as well."""
    if not demo.available():
        pytest.skip("the demo pair is missing")
    prompt = tmp_path / "long.py"
    prompt.write_text("".join(r["text"] for r in demo.heldout_prompts()), encoding="utf-8")
    err = _refused(["--prompt-file", str(prompt), "--no-chat-template"], capsys)
    assert re.search(r"the prompt \(\d{5} tokens\) plus --max-new-tokens \(128\) is \d{5} positions, more than the "
                     r"32768 that longspec-demo supports", err), err
    assert "--prompt-tokens 32640" in err
    err = _refused(["--prompt-file", str(prompt), "--prompt-tokens", "40000", "--max-new-tokens", "16"], capsys)
    assert "the prompt (40000 tokens) plus --max-new-tokens (16) is 40016 positions" in err


def test_max_new_tokens_alone_beyond_the_limit(capsys, no_weights):
    from longspec_jax.infer import prompts

    n_prompt = len(prompts.encode_prompt(tiny_random.tokenizer(), prompts.DEFAULT_PROMPT)[0])
    err = _refused(["--model", "tiny-random", "--max-new-tokens", "5000"], capsys)
    assert f"the prompt ({n_prompt} tokens) plus --max-new-tokens (5000)" in err
    assert "more than the 2048 that tiny-random supports" in err
    assert err.rstrip().endswith(f"pass --max-new-tokens {2048 - n_prompt}")  # what is left after the prompt


def test_tree_flags_refused_for_ar(capsys, no_weights):
    err = _refused(["--model", "tiny-random", "--method", "ar", "--tree-shape", "2", "2"], capsys)
    assert "--tree-shape applies to speculative decoding, but the method is ar" in err


@pytest.mark.parametrize("method,capacity,message", [
    ("ar", 50, "--cache-capacity 50 cannot hold the prompt (42 tokens) plus --max-new-tokens (16); raise "
               "--cache-capacity to at least 58"),
    ("tree", 44, "--cache-capacity 44 cannot hold the prompt (42 tokens) and one draft tree (5 nodes) after it; "
                 "raise --cache-capacity to at least 47"),
])
def test_cache_capacity_too_small(capsys, no_weights, method, capacity, message):
    argv = ["--model", "tiny-random", "--prompt", "x" * 41, "--no-chat-template", "--max-new-tokens", "16",
            "--method", method, *(["--tree-shape", "2", "2"] if method == "tree" else []),
            "--cache-capacity", str(capacity)]
    assert message in _refused(argv, capsys)


# --------------------------------------------------------------------------------------------
# flags checked at once


@pytest.mark.parametrize("argv,message", [
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1 (prompt tokens per prefill forward), got 0"),
    (["--prefill-chunk", "-4", "--method", "tree"], "--prefill-chunk must be >= 1"),
    (["--max-new-tokens", "0", "--method", "tree"], "--max-new-tokens must be >= 1, got 0"),
    (["--cache-capacity", "0"], "--cache-capacity must be >= 1"),
    (["--tensor-parallel", "0"], "--tensor-parallel must be >= 1"),
    (["--method", "tree", "--tree-shape", "4", "0"], "--tree-shape 4 0: every depth of the tree shape needs at "
                                                     "least one node"),
    (["--method", "tree", "--tree-shape", "300"], "--tree-shape 300: tree shape (300,): depth 1 asks for 300 nodes "
                                                  "but only 1 parents x 256 tokens exist"),
])
def test_flags_are_checked_before_loading(argv, message, capsys, no_weights):
    assert message in _refused(["--model", "tiny-random", *argv], capsys)


def test_argparse_errors_are_a_return_code(capsys):
    assert generate.main(["--prefill-chunk", "many"]) == 2
    assert "invalid int value" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# empty prompts


def test_empty_prompt_is_refused(tmp_path, capsys, no_weights):
    err = _refused(["--model", "tiny-random", "--prompt", ""], capsys)
    assert "--prompt is empty; pass the text to continue" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty; write the text to continue into it" in _refused(
        ["--model", "tiny-random", "--prompt-file", str(empty)], capsys)
    empty.write_text(" \n\n")
    assert "is empty (only whitespace)" in _refused(["--model", "tiny-random", "--prompt-file", str(empty)], capsys)


def test_prompt_file_that_is_not_utf8(tmp_path, capsys, no_weights):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert "is not UTF-8 text (byte 0xe9 at offset 3); convert it to UTF-8" in _refused(
        ["--model", "tiny-random", "--prompt-file", str(bad)], capsys)


# --------------------------------------------------------------------------------------------
# checkpoint and draft names that do not exist


def test_missing_checkpoint_path_that_could_be_a_repo(tmp_path, capsys, monkeypatch, no_weights):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    err = _refused(["--model", "llama3-8b", "--checkpoint", "ckpts/llama"], capsys)
    assert "the directory 'ckpts/llama' does not exist" in err
    assert f"the Hugging Face repo 'ckpts/llama' is not in the local cache {tmp_path / 'cache'} either" in err
    assert "If it is a repo, download it with\n  huggingface-cli download ckpts/llama --local-dir DIR" in err
    assert "pass --checkpoint DIR" in err


def test_missing_checkpoint_path_that_cannot_be_a_repo(tmp_path, capsys, no_weights):
    missing = tmp_path / "models" / "llama"
    err = _refused(["--model", "llama3-8b", "--checkpoint", str(missing)], capsys)
    assert f"target checkpoint directory {str(missing)!r} does not exist; check the path" in err
    assert "huggingface-cli" not in err and "cache" not in err


@pytest.mark.parametrize("name,cached_hint", [("./drafts/mine", False), ("drafts/mine", True)])
def test_missing_draft_path(tmp_path, capsys, monkeypatch, no_weights, name, cached_hint):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    err = _refused(["--model", "tiny-random", "--draft", name, "--max-new-tokens", "4"], capsys)
    assert "does not exist" in err and "HFValidationError" not in err
    assert ("huggingface-cli download drafts/mine" in err and "pass --draft DIR" in err) == cached_hint


def test_load_target_of_a_missing_path_like_name(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(weights.CheckpointError, match="the directory 'dir/name' does not exist, and the Hugging "
                                                      "Face repo 'dir/name' is not in the local cache"):
        weights.load_target("dir/name")
    with pytest.raises(weights.CheckpointError, match="is a file; pass the checkpoint directory"):
        (tmp_path / "config.json").write_text("{}")
        weights.load_target(str(tmp_path / "config.json"))


def test_tree_shape_wider_than_the_draft_vocab(tmp_path, capsys, no_weights):
    import numpy as np

    vocab = tmp_path / "v.npy"
    np.save(vocab, np.array([3, 1, 2], np.int32))
    err = _refused(["--model", "tiny-random", "--method", "tree", "--tree-shape", "4", "--draft-vocab", str(vocab)],
                   capsys)
    assert "--tree-shape 4 with the 3-id draft vocabulary of --draft-vocab: tree shape (4,): depth 1 asks for 4 " \
           "nodes but only 1 parents x 3 tokens exist" in err
