"""`python -m train.run` as a pod runs it: several processes, each with its own devices, joined by
`jax.distributed` through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (the
variables train/README.md documents), here two processes of fake CPU devices on one machine with
CPU collectives (gloo, jax's default).

Checked against a single-process run over the same mesh shape and global batch: per-step losses,
the data rows each process read (disjoint shares that cover each global batch), a checkpoint
written by two processes and restored by two, the exported draft (written by process 0), and, in
the slow test, `kill -9` of one process (the other stops with JAX's error within the heartbeat
timeout) followed by a relaunch with --resume, and a mesh whose batch is not split over the hosts.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "train", "configs", "tiny_cpu.yaml")
TOL = {
    # relative, per-step loss and gradient norm: the all-reduce over gloo may sum in another order
    # than the in-process one (bitwise equal when this was written)
    "loss": 1e-5,
    # absolute, exported parameters after a few Adam steps of float32 maths on either side
    "params": 1e-5,
}
HEARTBEAT_S = 10  # mesh.heartbeat_timeout_s of the runs: how long a survivor waits for a dead peer
PROCESS_TIMEOUT_S = 600


def _overrides(out, **extra):
    """The tiny config on 4 devices in all: constant LR (the trajectory does not depend on train.steps,
    so a resumed run may extend the schedule), small rows, everything logged."""
    base = {
        "data.paths": f"[{os.path.join(ROOT, 'tests', 'data', 'tiny_text')}]",
        "data.seq_len": 32, "train.batch_size": 4, "train.loss_chunk": 16, "model.window": 8,
        "optim.warmup_steps": 0, "optim.min_lr_ratio": 1.0, "log.progress": "false", "log.every": 1,
        "log.metrics": str(out / "metrics.jsonl"), "log.rows": str(out / "rows"),
        "mesh.heartbeat_timeout_s": HEARTBEAT_S,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, overrides, *, processes, devices, resume=False, tag="run"):
    """Start `python -m train.run` as `processes` processes of `devices` CPU devices each, the way a
    pod launcher does: the same command everywhere, the coordinator and ids in the environment."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "train.run", "--config", TINY] + overrides + (["--resume"] if resume else [])
    procs = []
    for i in range(processes):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax-cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                       JAX_PROCESS_ID=str(i))
        err = open(out / f"{tag}.{i}.err", "w")  # a file: a full pipe would block the process
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
    return procs


def _run(out, overrides, **kw):
    """Launch and wait; every process must succeed. Returns each process's stderr."""
    procs = _launch(out, overrides, **kw)
    tag = kw.get("tag", "run")
    errs = []
    for i, p in enumerate(procs):
        p.wait(timeout=PROCESS_TIMEOUT_S)
        errs.append((out / f"{tag}.{i}.err").read_text())
        assert p.returncode == 0, f"process {i}:\n{errs[-1][-3000:]}"
    return errs


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _records_prefix(path):
    """The complete records of a log another process may be writing (a last line may be cut)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def _check_losses(got, want, steps):
    assert [r["step"] for r in got] == list(steps), "each step logged once, in order"
    by_step = {r["step"]: r for r in want}
    for r in got:
        w = by_step[r["step"]]
        assert r["lag"] == w["lag"] and r["tokens"] == w["tokens"]
        np.testing.assert_allclose([r["loss"], r["grad_norm"]], [w["loss"], w["grad_norm"]], rtol=TOL["loss"],
                                   err_msg=f"step {r['step']}")


def _check_rows(out, ref, steps):
    """Per step: the processes' rows are disjoint, none is empty, and together they are the global
    batch the single-process run read."""
    shares = [{r["step"]: (r["epoch"], r["rows"]) for r in _records(out / f"rows.{i}")} for i in range(2)]
    whole = {r["step"]: (r["epoch"], r["rows"]) for r in _records(ref / "rows.0")}
    for s in steps:
        (e0, r0), (e1, r1) = shares[0][s], shares[1][s]
        assert e0 == e1 == whole[s][0]
        assert r0 and r1 and not set(r0) & set(r1), (s, r0, r1)
        assert sorted(r0 + r1) == sorted(whole[s][1]), (s, r0, r1, whole[s])


def _draft_params(path):
    from longspec_jax import draft_weights
    from longspec_jax.configs import tiny_config

    draft = draft_weights.load_draft(path, tiny_config(), dtype=jnp.float32, window=8)
    return jax.tree.leaves(nnx.state(draft))


def test_two_processes_train_checkpoint_resume_and_export_like_one(tmp_path):
    """4 steps on one process of 4 devices == 2 steps on two processes of 2 devices, checkpointed,
    then 2 more after a two-process --resume (reading the token cache both wrote): same losses, the
    data split over the hosts, the same exported draft."""
    ref, mp = tmp_path / "ref", tmp_path / "mp"
    _run(ref, _overrides(ref, **{"train.steps": 4, "checkpoint.export_dir": str(ref / "draft")}),
         processes=1, devices=4)
    common = _overrides(mp, **{"checkpoint.dir": str(mp / "ck"), "checkpoint.every": 2,
                               "checkpoint.export_dir": str(mp / "draft"), "data.cache_dir": str(mp / "tokens")})
    _run(mp, common + ["train.steps=2"], processes=2, devices=2, tag="first")
    assert sorted(os.listdir(mp / "ck")) == ["2"]
    assert len(os.listdir(mp / "tokens")) == 1  # both processes wrote the token cache: one complete file
    errs = _run(mp, common + ["train.steps=4"], processes=2, devices=2, resume=True, tag="resumed")
    assert f"resumed from {mp / 'ck'}/2" in errs[0]

    want = _records(ref / "metrics.jsonl")
    _check_losses(_records(mp / "metrics.jsonl"), want, range(1, 5))
    _check_rows(mp, ref, range(1, 5))
    # The export: process 0 alone writes it (and says so); it equals the single-process one.
    assert "exported the trained draft" in errs[0] and "exported" not in errs[1]
    assert sorted(os.listdir(mp / "draft")) == ["config.json", "model.safetensors"]
    for a, b in zip(_draft_params(mp / "draft"), _draft_params(ref / "draft")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=TOL["params"])


@pytest.mark.slow
def test_kill_one_process_then_resume_both(tmp_path):
    """kill -9 of one of two processes mid-run: the other stops with JAX's error within the heartbeat
    timeout (no hang); relaunching both with --resume continues from the last complete checkpoint
    (an async save cut by the kill is ignored) with the uninterrupted run's losses. Then a mesh whose
    batch is not split over the hosts (tensor parallelism across them): every host reads the whole
    batch and the losses are the single-process ones."""
    ref, mp = tmp_path / "ref", tmp_path / "mp"
    _run(ref, _overrides(ref, **{"train.steps": 12}), processes=1, devices=4)
    common = _overrides(mp, **{"checkpoint.dir": str(mp / "ck"), "checkpoint.every": 2,
                               "checkpoint.async_save": "true"})
    procs = _launch(mp, common + ["train.steps=1000"], processes=2, devices=2, tag="killed")
    deadline = time.time() + PROCESS_TIMEOUT_S
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (mp / "metrics.jsonl").exists() and len((mp / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), (mp / "killed.0.err").read_text()[-3000:]
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    logged = len(_records_prefix(mp / "metrics.jsonl"))
    procs[1].wait()
    procs[0].wait(timeout=HEARTBEAT_S + 60)  # bounded: raises TimeoutExpired on a hang
    assert time.time() - killed_at < HEARTBEAT_S + 60
    err = (mp / "killed.0.err").read_text()
    assert procs[0].returncode != 0 and "another task died" in err, err[-3000:]

    assert logged < 12, "the kill must come before the compared steps"
    errs = _run(mp, common + ["train.steps=12"], processes=2, devices=2, resume=True, tag="resumed")
    start = int(errs[0].split(f"resumed from {mp / 'ck'}/")[1].split()[0])
    assert start % 2 == 0 and 2 <= start <= logged + 1, (start, logged, errs[0][-3000:])
    _check_losses(_records(mp / "metrics.jsonl"), _records(ref / "metrics.jsonl"), range(1, 13))
    _check_rows(mp, ref, range(1, 13))

    tp, tp_ref = tmp_path / "tp", tmp_path / "tp_ref"
    mesh = {"mesh.data": 1, "mesh.tensor": 4, "train.steps": 2}
    _run(tp_ref, _overrides(tp_ref, **mesh), processes=1, devices=4)
    _run(tp, _overrides(tp, **mesh), processes=2, devices=2)
    _check_losses(_records(tp / "metrics.jsonl"), _records(tp_ref / "metrics.jsonl"), range(1, 3))
    whole = _records(tp_ref / "rows.0")
    for i in range(2):
        assert [r["rows"] for r in _records(tp / f"rows.{i}")] == [r["rows"] for r in whole]
