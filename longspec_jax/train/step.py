"""One optimizer step of draft training (or plain LM training), jit-compiled once.

Draft objective (spec 5.1): per micro-batch,
    pos        = anchor_offset(step key)                       # longspec_jax/train/positions.py, same for target
    _, (k, v)  = target.forward_train(tokens, pos)              # frozen (bf16), no gradient
    h          = draft.forward_train(tokens, pos, k, v, lag)    # lag j ~ U{min_lag..max_lag}, one per step
    loss       = CE(h @ W_head (float32, chunked), next tokens) # only loss-mask tokens count
    (train.distill = a > 0: loss = (1 - a) CE + a T^2 KL(target || draft) at temperature T, the
    target's logits computed chunk by chunk from its last hidden states; not in the spec's recipe)
LM objective: the target itself is trained, `h = target.forward_train(tokens, pos)[0]`.
Both forwards take the attention core (`train.attention`: dense, chunked or flash) and the draft's
or the LM's activation checkpointing (`train.remat`) as arguments; see `longspec_jax.attention`.

Gradient accumulation is an explicit `lax.scan` over the A micro-batches of a step; gradients of
the per-token loss *sums* are accumulated and divided once by the global token count, so the
result is the exact mean over the global batch whatever the mesh or the accumulation factor
(which is also what makes the sharded step equal the single-device step).

Only the trained model's parameters are differentiated and held in the optimizer state; the
frozen target's state is a separate, non-donated argument.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from longspec_jax.train import loss as loss_lib
from longspec_jax.train import positions as pos_lib
from longspec_jax.train.config import TrainConfig


@flax.struct.dataclass
class TrainState:
    """Everything that changes from step to step (and is checkpointed).

    step: [] int32 optimizer steps done so far.
    params: nnx.State of the trained model (draft, or target for "lm"), float32 master weights.
    opt_state: optax state over `params` only.
    rng: [2] uint32 raw base key; step s uses fold_in(rng, s), so resuming reproduces the draws.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at `total_steps` (spec 5.3)."""
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_ratio * total_steps)
    warmup = min(warmup, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
                                              decay_steps=max(total_steps, warmup + 1),
                                              end_value=o.lr * o.min_lr_ratio)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (b1, b2, eps, wd) on `schedule` with global-norm clipping (spec 5.3).

    Weight decay applies to matrices only (ndim >= 2): decaying RMSNorm scales and biases towards
    zero is the usual thing to avoid.
    """
    o = cfg.optim
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(schedule(cfg, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=decay_mask),
    )


def make_train_step(cfg: TrainConfig, trained_graphdef, frozen_graphdef, tx: optax.GradientTransformation, *,
                    max_position_embeddings: int):
    """Build `step(state, frozen, batch) -> (state, metrics)` (un-jitted; see `jit_train_step`).

    Args:
      trained_graphdef: graphdef of the trained model (draft, or target for "lm").
      frozen_graphdef: graphdef of the frozen target ("draft" objective; None for "lm").
      batch: {"tokens": [A, B, T] int32, "loss_mask": [A, B, T]} (A micro-batches).
    Metrics: loss (mean objective over counted tokens: the CE, or the distillation mix), tokens
      (count), grad_norm, lag; for the draft objective with the target's logits computed
      (log_target_loss or distill > 0) also ce (the draft's CE on the data), agree (share of counted
      tokens where the draft's argmax equals the target's at this step's lag), target_loss (the
      frozen target's CE on the same tokens, logged only, spec 5.1) and kl (KL(target || draft) at
      distill_temperature).
    """
    t, p = cfg.train, cfg.positions
    objective = t.objective
    T = cfg.data.seq_len
    max_off = pos_lib.max_offset_for(T, max_position_embeddings, p.max_offset)
    # The target's logits are needed for distillation and for the logged target loss / agreement.
    with_target_logits = objective == "draft" and (t.distill > 0 or t.log_target_loss)

    def positions_for(key, B):
        return pos_lib.anchor_offset_positions(
            key, B, T, sinks=p.sinks, max_sinks=p.max_sinks, max_offset=max_off,
            switch_off_len=p.switch_off_len, enabled=p.enabled)

    def draft_loss(params, frozen, tokens, mask, positions, lag):
        # The frozen target: no gradient flows into it (it is not an argument of the grad).
        target = nnx.merge(frozen_graphdef, frozen)
        tgt_h, (k_last, v_last) = target.forward_train(tokens, positions, attention=t.attention,
                                                       chunk=t.attention_chunk)
        k_last, v_last, tgt_h = jax.lax.stop_gradient((k_last, v_last, tgt_h))
        head = jax.lax.stop_gradient(target.head_weight())
        draft = nnx.merge(trained_graphdef, params)
        h = draft.forward_train(tokens, positions, k_last, v_last, lag, embed=target.embed, attention=t.attention,
                                chunk=t.attention_chunk, remat=t.remat)
        if with_target_logits:
            total, parts = loss_lib.chunked_draft_losses(h, tgt_h, head, tokens, mask, chunk=t.loss_chunk,
                                                         distill=t.distill, temperature=t.distill_temperature)
            count = parts.pop("count")
        else:
            total, count = loss_lib.chunked_cross_entropy(h, head, tokens, mask, chunk=t.loss_chunk)
            parts = {}
        return total, (count, parts)

    def lm_loss(params, frozen, tokens, mask, positions, lag):
        del frozen, lag
        model = nnx.merge(trained_graphdef, params)
        h, _ = model.forward_train(tokens, positions, attention=t.attention, chunk=t.attention_chunk, remat=t.remat)
        total, count = loss_lib.chunked_cross_entropy(h, model.head_weight(), tokens, mask, chunk=t.loss_chunk)
        return total, (count, {})

    loss_fn = draft_loss if objective == "draft" else lm_loss
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, frozen, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_lag, k_pos = jax.random.split(key)
        # One lag per step (shared by its micro-batches), as the original draws one per forward call.
        lag = jax.random.randint(k_lag, (), t.min_lag, t.max_lag + 1, dtype=jnp.int32)
        tokens, mask = batch["tokens"], batch["loss_mask"]
        A, B = tokens.shape[:2]

        def micro(carry, xs):
            g_acc, loss_acc, n_acc, parts_acc = carry
            a, tok, m = xs
            positions = positions_for(jax.random.fold_in(k_pos, a), B)
            (total, (count, parts)), g = grad_fn(state.params, frozen, tok, m, positions, lag)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            parts_acc = jax.tree.map(jnp.add, parts_acc, parts)
            return (g_acc, loss_acc + total, n_acc + count, parts_acc), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.params)
        part_names = loss_lib.DRAFT_PARTS if with_target_logits else ()
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                {k: jnp.zeros((), jnp.float32) for k in part_names})
        (g_sum, loss_sum, n, parts_sum), _ = jax.lax.scan(micro, init, (jnp.arange(A), tokens, mask))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "tokens": n,
            "grad_norm": optax.global_norm(grads),
            "lag": lag,
        }
        if with_target_logits:
            metrics["ce"] = parts_sum["ce"] / denom
            metrics["agree"] = parts_sum["agree"] / denom
            metrics["kl"] = parts_sum["kl"] / denom
            if t.log_target_loss:
                metrics["target_loss"] = parts_sum["target_ce"] / denom
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return step


def jit_train_step(step_fn, state_sharding=None, frozen_sharding=None, batch_sharding=None):
    """jit with the state donated (updated in place) and, on a mesh, explicit shardings."""
    if state_sharding is None:
        return jax.jit(step_fn, donate_argnums=(0,))
    return jax.jit(step_fn, donate_argnums=(0,),
                   in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                   out_shardings=(state_sharding, None))


def init_state(params, tx, seed: int) -> TrainState:
    """Fresh TrainState: step 0, optimizer state over `params`, base key from `seed`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))
