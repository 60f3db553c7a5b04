"""`python -m train.run --config FILE.yaml [section.key=value ...] [--resume]`

Trains the LongSpec draft on a frozen target (train.objective=draft, spec section 5) or a target
model from scratch (train.objective=lm). The same command runs on one device, on every GPU of a
host (the mesh takes all local devices), and on a multi-host pod (each host runs the command;
`mesh.distributed=auto` calls `jax.distributed.initialize()` when the launcher is detected).

Examples:
    python -m train.run --config train/configs/tiny_cpu.yaml
    python -m train.run --config train/configs/stage1_slimpajama.yaml model.target=/ckpt/llama3-8b \\
        data.paths=[/data/slimpajama] checkpoint.dir=/ckpt/draft-s1 --resume

Outputs: a progress bar (loss, tokens/s, ETA), metrics JSONL (log.metrics), orbax checkpoints
(checkpoint.dir, every checkpoint.every steps) and, at the end, the trained draft (or target) as an
HF-format safetensors directory (checkpoint.export_dir) readable by the inference loaders.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
from flax import nnx

from longspec_jax.train import build
from longspec_jax.train import checkpoint as checkpoint_lib
from longspec_jax.train import config as config_lib
from longspec_jax.train import data as data_lib
from longspec_jax.train.loader import DataLoader
from longspec_jax.train import step as step_lib
from longspec_jax.train.checkpoint import CheckpointError, Checkpointer
from longspec_jax.train.metrics import MetricsWriter, RowsLog


def build_data(cfg, tcfg, target_path):
    """Tokenizer (checked against the target's vocabulary) and the resumable loader."""
    tok = data_lib.load_tokenizer(cfg.model.tokenizer, target_path)
    data_lib.check_tokenizer(tok, tcfg.vocab_size)
    docs = data_lib.load_documents(cfg.data, tok)
    loader = DataLoader(docs, cfg.data, pad_id=tok.pad_token_id,
                                 rows_per_step=cfg.train.batch_size * cfg.train.grad_accum)
    return tok, loader


def export(cfg, trained_graphdef, params, tcfg, tokenizer):
    """Write the trained model as an HF-format directory through the inference savers (process 0)."""
    out = cfg.checkpoint.export_dir
    if not out:
        return None
    if jax.process_count() > 1:
        # Sharded arrays span hosts: every process takes part in the gather, process 0 writes.
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return None
    model = nnx.merge(trained_graphdef, jax.device_get(params))
    if cfg.train.objective == "draft":
        from longspec_jax import draft_weights

        draft_weights.save_draft(model, out, target_cfg=tcfg)
    else:
        from longspec_jax import weights

        weights.save_target(model, tcfg, out, tokenizer.tok)
    return out


def train(cfg: config_lib.TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          time_limit_s: float | None = None) -> dict:
    """Run training to `train.steps` (or one epoch); returns the last logged metrics.

    stop_after: leave after this many steps of *this* invocation (checkpointing there), e.g. for a
    time-boxed job that resumes later; the LR schedule still spans `train.steps`.
    time_limit_s: wall-clock budget of this invocation (from its start, compilation included). When
    it runs out the run stops after the current step, checkpoints, and still exports the model (the
    metrics record `stopped_early`); the LR schedule still spans `train.steps`, so choose the steps
    to fit the budget and treat the limit as a safety net.
    """
    t_start = time.perf_counter()
    build.initialize_distributed(cfg.mesh.distributed, heartbeat_timeout_s=cfg.mesh.heartbeat_timeout_s)
    # Every refusal about checkpoint.dir comes before anything is built or written.
    resume_from = checkpoint_lib.resume_step(cfg, resume)
    mesh = build.build_mesh(cfg)
    t, lead = cfg.train, jax.process_index() == 0
    per_device_axes = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % per_device_axes:
        raise config_lib.TrainConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of mesh data x fsdp = {per_device_axes}")

    target, tcfg, target_path = build.build_target(cfg, mesh)
    tok, loader = build_data(cfg, tcfg, target_path if cfg.model.tokenizer == "auto" else cfg.model.tokenizer)
    if t.objective == "draft":
        trained = build.build_draft(cfg, tcfg, mesh)
        frozen_graphdef, frozen = nnx.split(target)
    else:
        trained, frozen_graphdef, frozen = target, None, None
    trained_graphdef, params = nnx.split(trained)
    total = t.steps or loader.steps_per_epoch
    tx = step_lib.make_optimizer(cfg, total)
    state = build.place_replicated(step_lib.init_state(params, tx, t.seed), mesh)

    ckpt = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save) if cfg.checkpoint.dir else None
    if resume_from is not None:
        state, meta = ckpt.restore(resume_from, state)
        loader.restore(meta["data"])
        if lead:
            print(f"resumed from {cfg.checkpoint.dir}/{resume_from} (data epoch {meta['data']['epoch']}, "
                  f"row {meta['data']['index']})", file=sys.stderr)

    state_sh = build.shardings_of(state)
    frozen_sh = build.shardings_of(frozen) if frozen is not None else None
    batch_sh = build.batch_sharding(mesh)
    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(cfg, trained_graphdef, frozen_graphdef, tx,
                                 max_position_embeddings=tcfg.max_position_embeddings),
        state_sh, frozen_sh, {"tokens": batch_sh, "loss_mask": batch_sh})

    start = int(state.step)
    writer = MetricsWriter(cfg.log.metrics, cfg.log.tensorboard, resumed_at=start if resume else None)
    bar = None
    if cfg.log.progress and lead:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
    last: dict = {}
    tokens_since, t_since, tok_acc = 0.0, time.perf_counter(), None
    compile_s, stopped_early = None, False
    end = total if stop_after is None else min(total, start + stop_after)
    rows_log = RowsLog(cfg.log.rows, resumed_at=start if resume else None)
    for s in range(start, end):
        epoch, ids = loader.next_step(t.grad_accum)
        batch, local_rows = loader.device_batch(epoch, ids, batch_sh)  # this host's rows only
        rows_log.write(s + 1, epoch, local_rows)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, frozen, batch)
        # Counted on the device, so steps between two logged ones add their tokens without a sync.
        tok_acc = metrics["tokens"] if tok_acc is None else tok_acc + metrics["tokens"]
        out_of_time = time_limit_s is not None and s + 1 < end and _from_process_0(
            time.perf_counter() - t_start > time_limit_s)
        if (s + 1) % cfg.log.every == 0 or s + 1 == end or compile_s is None or out_of_time:
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            tokens_since += float(tok_acc)
            tok_acc = None
            if compile_s is None:
                # The first step includes compilation: report it apart, keep it out of tokens/s.
                compile_s = now - t0
                tokens_since, t_since = 0.0, now
                tps = float("nan")
            else:
                tps = tokens_since / max(now - t_since, 1e-9)
                tokens_since, t_since = 0.0, now
            last = {"step": s + 1, **m, "lag": int(m["lag"]), "lr": float(step_lib.schedule(cfg, total)(s)),
                    "tokens_per_s": tps, "epoch": loader.epoch, "compile_s": compile_s}
            if out_of_time:
                last["stopped_early"] = True
            writer.write(last)
            if bar is not None:
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:.0f}")
        if bar is not None:
            bar.update(1)
        if out_of_time and lead:
            print(f"\n--time-limit reached after step {s + 1} of {total}: checkpointing and exporting "
                  "the model as it is", file=sys.stderr)
        if ckpt is not None and ((s + 1) % cfg.checkpoint.every == 0 or s + 1 == end or out_of_time):
            ckpt.save(s + 1, state, {"data": loader.position(), "config": cfg.to_dict()})
        if out_of_time:
            end, stopped_early = s + 1, True
            break
    if bar is not None:
        bar.close()
    if ckpt is not None:
        ckpt.close()
    writer.close()
    rows_log.close()
    out = export(cfg, trained_graphdef, state.params, tcfg, tok) if end == total or stopped_early else None
    if lead and out:
        print(f"exported the trained {'draft' if t.objective == 'draft' else 'target'} to {out}", file=sys.stderr)
    return last


def _from_process_0(flag: bool) -> bool:
    """Process 0's `flag`, on every process: a decision taken from a local clock (the time limit) must
    be the same everywhere, or one host would leave the step loop while the others wait for it."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _user_errors() -> tuple[type[Exception], ...]:
    from longspec_jax import configs, draft_weights, sharding, weights

    return (config_lib.TrainConfigError, data_lib.DataError, CheckpointError, configs.ConfigError,
            sharding.ShardingError, weights.CheckpointError, draft_weights.DraftWeightsError)


_USER_ERRORS = _user_errors()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see train/configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in checkpoint.dir")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop after this many minutes (checkpoint + export), even before train.steps")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    args = p.parse_args(argv)
    try:
        cfg = config_lib.load_config(args.config, args.overrides)
        if args.time_limit is not None and args.time_limit <= 0:
            raise config_lib.TrainConfigError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
        train(cfg, resume=args.resume, time_limit_s=None if args.time_limit is None else 60.0 * args.time_limit)
    except _USER_ERRORS as e:
        # Config / data / checkpoint / model-loading refusals carry an actionable message: print it
        # without a traceback (anything else is a bug and keeps its traceback).
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
