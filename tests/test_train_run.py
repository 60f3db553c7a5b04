"""End to end: `python -m train.run` CLI errors, refusals of bad steps and resumes (nothing written),
orbax atomicity, SIGKILL + --resume equals an uninterrupted run with a log that holds each step once,
and a trained-then-exported draft / LM loads in the inference loaders."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax.train import run as run_lib
from longspec_jax.train.checkpoint import Checkpointer
from longspec_jax.train.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "train", "configs", "tiny_cpu.yaml")
RESUME_TOL = 1e-6


def tiny_overrides(tmp_path, **extra):
    base = {
        "data.paths": f"[{os.path.join(ROOT, 'tests', 'data', 'tiny_text')}]",
        "data.seq_len": 32, "train.batch_size": 4, "train.loss_chunk": 16, "model.window": 8,
        "mesh.data": 1, "log.progress": "false", "log.every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert run_lib.main(["--config", TINY, "optim.lrr=1e-4"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert run_lib.main(["--config", TINY, f"data.paths=[{tmp_path / 'nope'}]", "mesh.data=1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_lib.main(["--config", TINY, "train.batch_size=3", "mesh.data=2"]) == 2
    assert "multiple of mesh data x fsdp" in capsys.readouterr().err
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(1, {"x": jnp.zeros(2)}, {"data": {"epoch": 0, "index": 0}})
    ck.close()
    assert run_lib.main(["--config", TINY, "mesh.data=1", f"checkpoint.dir={tmp_path / 'ck'}"]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_partially_written_checkpoint_is_ignored(tmp_path):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    ck = Checkpointer(str(tmp_path / "ck"), keep=5, async_save=True)
    for s in (1, 2):
        ck.save(s, {**state, "step": jnp.int32(s)}, {"data": {"epoch": 0, "index": s}})
    ck.wait()
    # A save killed mid-write leaves orbax's temporary directory (renamed only when complete) ...
    shutil.copytree(tmp_path / "ck" / "2", tmp_path / "ck" / "3.orbax-checkpoint-tmp")
    os.remove(next(p for p in (tmp_path / "ck" / "3.orbax-checkpoint-tmp" / "meta").iterdir()))
    # ... and a final-named directory missing an item is refused as well.
    shutil.copytree(tmp_path / "ck" / "2" / "state", tmp_path / "ck" / "4" / "state")
    ck.close()
    ck = Checkpointer(str(tmp_path / "ck"), keep=5)
    assert ck.latest_step() == 2
    restored, meta = ck.restore(2, state)
    assert int(restored["step"]) == 2 and meta["data"]["index"] == 2
    np.testing.assert_array_equal(restored["w"], state["w"])
    ck.close()


def _metrics(path):
    """step -> record (the last line per step)."""
    out = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def _cli(args, env):
    return [sys.executable, "-m", "train.run", "--config", TINY] + args


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """Constant LR (min_lr_ratio=1, no warmup) so a run configured for 1000 steps and killed early
    follows the same trajectory as a 12-step run; the resumed losses must match it exactly."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=ROOT)
    common = tiny_overrides(tmp_path, **{"optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0,
                                         "checkpoint.every": 4, "checkpoint.async_save": "true"})
    ref = subprocess.run(_cli(common + ["train.steps=12", f"checkpoint.dir={tmp_path / 'ref'}",
                                        f"log.metrics={tmp_path / 'ref.jsonl'}"], env),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _metrics(tmp_path / "ref.jsonl")

    log = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(_cli(common + ["train.steps=1000", f"checkpoint.dir={tmp_path / 'run'}",
                                           f"log.metrics={log}"], env),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "killed.err", "w"))  # a file: a full pipe would block it
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and max(_metrics(log), default=0) >= 9:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert log.exists(), (tmp_path / "killed.err").read_text()[-3000:]
    killed_at = max(_metrics(log))
    assert killed_at < 12, "the run must be killed before the compared steps"

    resumed = subprocess.run(_cli(common + ["train.steps=12", f"checkpoint.dir={tmp_path / 'run'}",
                                            f"log.metrics={log}", "--resume"], env),
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The kill may land while an async save is being written: that step must then be ignored, and the
    # run resumes from the previous finalized one (or from scratch if there is none).
    if "resumed from" in resumed.stderr:
        start = int(resumed.stderr.split("resumed from ")[1].split("(")[0].rstrip().rsplit("/", 1)[1])
    else:
        assert "no finalized checkpoint" in resumed.stderr, resumed.stderr[-3000:]
        start = 0
    assert start in (0, 4, 8)
    assert [r["step"] for r in _metrics_lines(log)] == list(range(1, 13)), "each step logged once, in order"
    got = _metrics(log)
    for s in range(start + 1, 13):
        assert got[s]["lag"] == want[s]["lag"]
        np.testing.assert_allclose(got[s]["loss"], want[s]["loss"], rtol=0, atol=RESUME_TOL)
        np.testing.assert_allclose(got[s]["grad_norm"], want[s]["grad_norm"], rtol=0, atol=RESUME_TOL)


@pytest.mark.slow
def test_in_process_resume_is_exact(tmp_path):
    """Same property without a subprocess: 6 steps straight vs 3 steps (stop_after), then --resume."""
    over = tiny_overrides(tmp_path, **{"optim.warmup_steps": 0, "checkpoint.every": 3,
                                       "checkpoint.async_save": "false", "train.steps": 6})
    run_lib.train(load_config(TINY, over + [f"log.metrics={tmp_path / 'a.jsonl'}",
                                            f"checkpoint.dir={tmp_path / 'a'}"]))
    cfg = load_config(TINY, over + [f"log.metrics={tmp_path / 'b.jsonl'}", f"checkpoint.dir={tmp_path / 'b'}"])
    run_lib.train(cfg, stop_after=3)
    with pytest.raises(Exception, match="--resume"):
        run_lib.train(cfg)
    run_lib.train(cfg, resume=True)
    a, b = _metrics(tmp_path / "a.jsonl"), _metrics(tmp_path / "b.jsonl")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):
        np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=0, atol=RESUME_TOL)


@pytest.fixture(scope="module")
def exported_draft(tmp_path_factory):
    """Train a tiny draft for 4 steps and export it (shared by the export tests)."""
    from longspec_jax.train import build

    tmp = tmp_path_factory.mktemp("export")
    cfg = load_config(TINY, tiny_overrides(tmp, **{"train.steps": 4, "checkpoint.export_dir": str(tmp / "draft")}))
    run_lib.train(cfg)
    target, tcfg, _ = build.build_target(cfg, build.build_mesh(cfg))  # the same seeded random target
    return str(tmp / "draft"), target, tcfg


def test_exported_draft_loads_in_inference_loader(exported_draft):
    from longspec_jax import draft_weights

    path, _, tcfg = exported_draft
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    draft = draft_weights.load_draft(path, tcfg, dtype=jnp.float32, window=8)
    assert draft.cfg.window == 8 and draft.cfg.hidden_size == tcfg.hidden_size
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx_state(draft)))


@pytest.mark.slow
def test_exported_draft_decodes_losslessly(exported_draft):
    from longspec_jax import draft_weights

    from longspec_jax.infer.decoder import generate_ar, generate_tree

    path, target, tcfg = exported_draft
    draft = draft_weights.load_draft(path, tcfg, dtype=jnp.float32, window=8)
    prompt = np.asarray([list(b"the draft reads the next token. the target")], np.int32)
    want = generate_ar(target, prompt, max_new_tokens=12, eos_ids=())
    got = generate_tree(target, draft, prompt, tree_shape=(2, 2), max_new_tokens=12, eos_ids=())
    assert got.tokens[0] == want.tokens[0]  # greedy speculative == greedy AR


def nnx_state(module):
    from flax import nnx

    return nnx.state(module)


def test_lm_objective_exports_a_loadable_target(tmp_path):
    from longspec_jax import weights

    over = tiny_overrides(tmp_path, **{"train.objective": "lm", "train.steps": 3,
                                       "checkpoint.export_dir": str(tmp_path / "lm")})
    last = run_lib.train(load_config(TINY, over))
    assert np.isfinite(last["loss"])
    model, cfg, tok = weights.load_target(str(tmp_path / "lm"), dtype=jnp.float32)
    assert cfg.vocab_size == 256 and tok.eos_token_id == 1
    assert tok.encode("abc", add_special_tokens=False) == [97, 98, 99]


def test_time_limit_stops_checkpoints_and_exports(tmp_path, capsys):
    """--time-limit: the run stops early, leaves a checkpoint at the step it reached and exports."""
    from longspec_jax import weights

    over = tiny_overrides(tmp_path, **{"train.objective": "lm", "train.steps": 1000,
                                       "checkpoint.async_save": "false", "checkpoint.every": 1000,
                                       "checkpoint.dir": str(tmp_path / "ck"),
                                       "log.metrics": str(tmp_path / "m.jsonl"),
                                       "checkpoint.export_dir": str(tmp_path / "lm")})
    assert run_lib.main(["--config", TINY, "--time-limit", "0.0001"] + over) == 0
    assert "--time-limit reached" in capsys.readouterr().err
    last = [json.loads(line) for line in open(tmp_path / "m.jsonl")][-1]
    assert last["stopped_early"] and last["step"] < 1000
    assert Checkpointer(str(tmp_path / "ck")).latest_step() == last["step"]
    weights.load_target(str(tmp_path / "lm"), dtype=jnp.float32)
    assert run_lib.main(["--config", TINY, "--time-limit", "-1"] + over) == 2
    assert "--time-limit must be a positive" in capsys.readouterr().err


def test_lm_from_a_bare_config_json_and_its_refusal_for_the_draft_objective(tmp_path, capsys):
    """model.target=config.json: random init of that shape for the lm objective; refused for draft."""
    from longspec_jax import configs, weights

    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(configs.to_hf_config(configs.tiny_config(num_layers=1))))
    over = tiny_overrides(tmp_path, **{"train.objective": "lm", "train.steps": 2, "model.tokenizer": "bytes",
                                       "model.target": str(cfg_path),
                                       "checkpoint.export_dir": str(tmp_path / "lm")})
    assert run_lib.main(["--config", TINY] + over) == 0
    _, cfg, _ = weights.load_target(str(tmp_path / "lm"), dtype=jnp.float32)
    assert cfg.num_layers == 1 and cfg.hidden_size == 64
    draft_over = tiny_overrides(tmp_path, **{"model.target": str(cfg_path), "train.steps": 1})
    assert run_lib.main(["--config", TINY] + draft_over) == 2
    assert "config file without weights" in capsys.readouterr().err


def _tree(path):
    """{relative file path: (size, mtime_ns)} under `path`: to show that a refused run wrote nothing."""
    out = {}
    for root, _, names in os.walk(path):
        for n in names:
            st = os.stat(os.path.join(root, n))
            out[os.path.relpath(os.path.join(root, n), path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("steps", [-5, -1])
def test_negative_steps_are_refused_before_anything_is_written(tmp_path, capsys, steps):
    over = tiny_overrides(tmp_path, **{"train.steps": steps, "checkpoint.dir": str(tmp_path / "ck"),
                                       "log.metrics": str(tmp_path / "m.jsonl"),
                                       "checkpoint.export_dir": str(tmp_path / "out")})
    assert run_lib.main(["--config", TINY] + over) == 2
    err = capsys.readouterr().err
    assert f"train.steps={steps} is negative" in err and ">= 1" in err and "0 for one epoch" in err
    assert sorted(os.listdir(tmp_path)) == []  # no checkpoint directory, metrics file or export


def test_resume_refusals_and_the_metrics_log_after_a_resume(tmp_path, capsys):
    """--resume into a missing directory, or with a changed model.window, is refused naming the
    problem and leaves the checkpoint and the log untouched; an allowed resume (a longer run) drops
    the log records after the restored step, so every step appears once, and continues exactly."""
    over = tiny_overrides(tmp_path, **{"optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0, "train.steps": 4,
                                       "checkpoint.every": 2, "checkpoint.async_save": "false",
                                       "checkpoint.dir": str(tmp_path / "ck"),
                                       "log.metrics": str(tmp_path / "m.jsonl")})
    run_lib.train(load_config(TINY, over), stop_after=3)  # steps 1-3, checkpoints at 2 and 3
    # A kill after step 3 but before its checkpoint was finalized: the run resumes from step 2 and
    # the log holds step 3 (and a line the kill cut short) that the resumed run repeats.
    shutil.rmtree(tmp_path / "ck" / "3")
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')
    first = _metrics_lines(tmp_path / "m.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3]
    before = _tree(tmp_path)

    assert run_lib.main(["--config", TINY, "--resume"] + over[:-2] + [f"checkpoint.dir={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert "--resume: checkpoint.dir=" in err and "does not exist" in err and "drop --resume" in err
    assert not (tmp_path / "nope").exists()

    assert run_lib.main(["--config", TINY, "--resume"] + over + ["model.window=4", "optim.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "the config differs from the one" in err and f"{tmp_path / 'ck'}/2" in err
    assert "model.window: 8 in the checkpoint, 4 now" in err and "optim.lr: 0.003 in the checkpoint, 0.001 now" in err
    assert "train.steps" in err.split("Keys that may change on resume:")[1]
    assert _tree(tmp_path) == before  # nothing written: checkpoints and log as they were

    over_longer = [o for o in over if not o.startswith("train.steps=")] + ["train.steps=5", "log.every=2"]
    assert run_lib.main(["--config", TINY, "--resume"] + over_longer) == 0
    assert "resumed from" in capsys.readouterr().err
    log = _metrics_lines(tmp_path / "m.jsonl")
    # Each step once: 3 (the invocation's first step, logged for its compile time), 4 (log.every=2), 5 (the last).
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(log[2]["loss"], first[2]["loss"], rtol=0, atol=RESUME_TOL)


def _metrics_lines(path):
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out
