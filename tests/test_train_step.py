"""Train step: chunked loss == dense loss, sharded step == single-device step, loss falls, the
noisy-lag cross-attention equals the original's slice-and-shift formulation, the chunked and flash
attention cores and activation checkpointing equal the dense forwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longspec_jax import init, sharding
from longspec_jax.configs import DraftConfig, tiny_config
from pallas_kernels import reference as attn_ref
from longspec_jax.train import build as build_lib
from longspec_jax.train import loss as loss_lib
from longspec_jax.train import step as step_lib
from longspec_jax.train.config import from_dict

# Tolerances (float32, matmul precision "highest" from conftest).
TOL = {
    "chunked_vs_dense": 1e-5,      # relative, loss sum and gradients
    "near_zero": 1e-6,             # absolute floor for values near zero (gradient entries, loss parts)
    "loss_is_objective": 1e-5,     # relative: the logged loss is the CE (distill 0) or the KL (distill 1)
    "sharded_loss": 2e-6,          # relative, per step
    "sharded_params": 2e-5,        # absolute, after two Adam steps at lr 1e-2
    "lag_reference": 1e-5,         # absolute, draft hidden
    "core_vs_dense": 1e-5,         # absolute and relative: chunked / flash (XLA) cores vs dense, float32
    "remat_loss": 1e-6,            # relative: checkpointing recomputes the same ops in the same order
    "remat_grads": (1e-5, 1e-7),   # (relative, absolute): gradients of the recomputed forward
    "flash_bf16_vs_f32": 5e-2,     # absolute and relative: cuDNN bf16 forwards vs the float32 dense ones
}

T, B, A = 32, 4, 2


def make_cfg(**train):
    return from_dict({
        "model": {"target_dtype": "float32", "compute_dtype": "float32", "window": 8},
        "data": {"seq_len": T},
        "positions": {"max_offset": 256},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1},
        "train": {"batch_size": B, "grad_accum": A, "loss_chunk": 8, **train},
    })


_COMPILED = {}


def build(cfg, mesh):
    """(jitted step, fresh state, frozen target state, batch sharding); the step is compiled once per
    (objective, mesh) and shared by the tests (CPU compiles dominate this file's runtime)."""
    tcfg = tiny_config()
    target = init.random_target(tcfg, seed=0, mesh=mesh)
    draft = init.random_draft(DraftConfig.from_target(tcfg, window=8), tcfg.rope, seed=1, mesh=mesh)
    if cfg.train.objective == "lm":
        tg, params = nnx.split(target)
        fg, frozen = None, None
    else:
        fg, frozen = nnx.split(target)
        tg, params = nnx.split(draft)
    tx = step_lib.make_optimizer(cfg, 100)
    state = build_lib.place_replicated(step_lib.init_state(params, tx, 0), mesh)
    bsh = build_lib.batch_sharding(mesh)
    key = (cfg.train.objective, cfg.train.distill, tuple(mesh.shape.values()))
    if key not in _COMPILED:
        _COMPILED[key] = step_lib.jit_train_step(
            step_lib.make_train_step(cfg, tg, fg, tx, max_position_embeddings=tcfg.max_position_embeddings),
            build_lib.shardings_of(state), build_lib.shardings_of(frozen) if frozen is not None else None,
            {"tokens": bsh, "loss_mask": bsh})
    return _COMPILED[key], state, frozen, bsh


def random_batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 256, (A, B, T)).astype(np.int32)
    mask = (rng.random((A, B, T)) < 0.8).astype(np.int32)
    return {"tokens": tokens, "loss_mask": mask}


def test_chunked_cross_entropy_matches_dense():
    k = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(k[0], (2, 37, 16))
    w = jax.random.normal(k[1], (16, 300)) * 0.3
    toks = jax.random.randint(k[2], (2, 37), 0, 300)
    mask = jax.random.bernoulli(k[3], 0.7, (2, 37))
    f_chunk = lambda h, w: loss_lib.chunked_cross_entropy(h, w, toks, mask, chunk=8)[0]  # 36 = 4x8 + 4: padded
    f_dense = lambda h, w: loss_lib.dense_cross_entropy(h, w, toks, mask)[0]
    (lc, gc), (ld, gd) = [jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (f_chunk, f_dense)]
    np.testing.assert_allclose(lc, ld, rtol=TOL["chunked_vs_dense"])
    for a, b in zip(gc, gd):
        np.testing.assert_allclose(a, b, rtol=TOL["chunked_vs_dense"], atol=TOL["near_zero"])
    assert loss_lib.chunked_cross_entropy(h, w, toks, mask)[1] == mask[:, 1:].sum()


def _np_draft_losses(h, th, w, toks, mask, distill, temp):
    """float64 numpy reference of the draft objective's parts (independent of longspec_jax/train/loss.py)."""
    h, th, w = (np.asarray(x, np.float64) for x in (h, th, w))
    lg, tl = h[:, :-1] @ w, th[:, :-1] @ w
    y = np.asarray(toks)[:, 1:]
    m = np.asarray(mask)[:, 1:].astype(np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ce = -np.take_along_axis(log_softmax(lg), y[..., None], -1)[..., 0]
    tce = -np.take_along_axis(log_softmax(tl), y[..., None], -1)[..., 0]
    lp, lq = log_softmax(tl / temp), log_softmax(lg / temp)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    agree = (lg.argmax(-1) == tl.argmax(-1)).astype(np.float64)
    obj = (1 - distill) * ce + distill * temp ** 2 * kl
    return (obj * m).sum(), {"ce": (ce * m).sum(), "kl": (kl * m).sum(), "target_ce": (tce * m).sum(),
                             "agree": (agree * m).sum(), "count": m.sum()}


@pytest.mark.parametrize("distill,temp", [(0.0, 1.0), (0.5, 1.0), (1.0, 2.0)])
def test_chunked_draft_losses_match_references(distill, temp):
    """The draft objective's chunked pass (CE, distillation KL, target CE, argmax agreement) against
    a float64 numpy reference, and its gradient against the dense jnp form; no gradient reaches the
    target's hidden states."""
    k = jax.random.split(jax.random.key(1), 5)
    h = jax.random.normal(k[0], (2, 37, 16))
    th = h + 0.7 * jax.random.normal(k[4], (2, 37, 16))  # correlated, so some argmaxes agree
    w = jax.random.normal(k[1], (16, 300)) * 0.5
    toks = jax.random.randint(k[2], (2, 37), 0, 300)
    mask = jax.random.bernoulli(k[3], 0.7, (2, 37))
    total, parts = loss_lib.chunked_draft_losses(h, th, w, toks, mask, chunk=8, distill=distill, temperature=temp)
    ref_total, ref_parts = _np_draft_losses(h, th, w, toks, mask, distill, temp)
    np.testing.assert_allclose(total, ref_total, rtol=TOL["chunked_vs_dense"])
    for name in ("ce", "kl", "target_ce", "agree", "count"):
        np.testing.assert_allclose(parts[name], ref_parts[name], rtol=TOL["chunked_vs_dense"], atol=TOL["near_zero"],
                                   err_msg=name)
    assert 0 < ref_parts["agree"] < ref_parts["count"], "the agreement count must be a real test"
    f_chunk = lambda h, th: loss_lib.chunked_draft_losses(h, th, w, toks, mask, chunk=8, distill=distill,
                                                          temperature=temp)[0]
    f_dense = lambda h, th: loss_lib.dense_draft_losses(h, th, w, toks, mask, distill=distill,
                                                        temperature=temp)[0]
    gh, gth = jax.grad(f_chunk, argnums=(0, 1))(h, th)
    np.testing.assert_allclose(gh, jax.grad(f_dense)(h, th), rtol=TOL["chunked_vs_dense"], atol=TOL["near_zero"])
    assert float(jnp.abs(gth).max()) == 0.0, "the frozen target's logits must not carry gradient"
    if distill == 0.0:  # the plain objective is the CE of chunked_cross_entropy
        np.testing.assert_allclose(total, loss_lib.chunked_cross_entropy(h, w, toks, mask, chunk=8)[0],
                                   rtol=TOL["chunked_vs_dense"])


def test_distillation_raises_agreement_with_the_target():
    """train.distill=1 fits the draft to the frozen target's distribution. On random tokens (nothing
    to learn from the data) the KL falls and the draft's argmax comes to match the target's far more
    often than after the same steps of plain CE on the data."""
    mesh = sharding.make_mesh(1, 1, 1)
    runs = {}
    for distill in (0.0, 1.0):
        fn, state, frozen, _ = build(make_cfg(distill=distill), mesh)
        kls, agrees = [], []
        for s in range(40):
            state, m = fn(state, frozen, random_batch(100 + s % 4))
            assert set(m) >= {"loss", "ce", "kl", "agree", "target_loss"}
            objective = m["kl"] if distill else m["ce"]
            np.testing.assert_allclose(m["loss"], objective, rtol=TOL["loss_is_objective"])
            kls.append(float(m["kl"]))
            agrees.append(float(m["agree"]))
        runs[distill] = (kls, agrees)
    kls, agrees = runs[1.0]
    assert np.mean(kls[-4:]) < 0.5 * np.mean(kls[:2]), kls
    assert np.mean(agrees[-4:]) > np.mean(runs[0.0][1][-4:]) + 0.1, (agrees, runs[0.0][1])
    assert np.mean(kls[-4:]) < 0.5 * np.mean(runs[0.0][0][-4:]), (kls, runs[0.0][0])


@pytest.mark.parametrize("override,needle", [
    ({"distill": 1.5}, "train.distill"),
    ({"distill": 0.5, "distill_temperature": 0.0}, "train.distill_temperature"),
    ({"distill": 0.5, "objective": "lm"}, "train.objective=draft"),
])
def test_distill_config_errors(override, needle):
    from longspec_jax.train.config import TrainConfigError, validate
    with pytest.raises(TrainConfigError, match=needle):
        validate(make_cfg(**override))


def test_sharded_step_equals_single_device():
    cfg = make_cfg()
    results = []
    for shape in ((1, 1, 1), (2, 2, 2)):
        mesh = sharding.make_mesh(*shape)
        fn, state, frozen, bsh = build(cfg, mesh)
        losses = []
        for s in range(2):
            batch = {k: jax.device_put(v, bsh) for k, v in random_batch(s).items()}
            state, m = fn(state, frozen, batch)
            losses.append((float(m["loss"]), float(m["grad_norm"]), int(m["lag"])))
        results.append((losses, jax.device_get(state.params)))
    (l1, p1), (l8, p8) = results
    for a, b in zip(l1, l8):
        np.testing.assert_allclose(a[:2], b[:2], rtol=TOL["sharded_loss"])
        assert a[2] == b[2] and 1 <= a[2] <= 4
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, b, atol=TOL["sharded_params"])


@pytest.mark.parametrize("objective", ["draft", "lm"])
def test_loss_falls_on_learnable_task(objective):
    """Rows cycle through a fixed 8-token alphabet in a fixed order: a bigram task that the draft
    (frozen embedding and head) and the LM both learn in a few dozen steps."""
    cfg = make_cfg(objective=objective)
    mesh = sharding.make_mesh(1, 1, 1)
    fn, state, frozen, _ = build(cfg, mesh)
    rng = np.random.default_rng(0)
    cycle = rng.permutation(np.arange(2, 256))[:8]
    losses, lags = [], set()
    for s in range(30):
        start = rng.integers(0, 8, (A, B, 1))
        batch = {"tokens": cycle[(start + np.arange(T)) % 8].astype(np.int32),
                 "loss_mask": np.ones((A, B, T), np.int32)}
        state, m = fn(state, frozen, batch)
        losses.append(float(m["loss"]))
        lags.add(int(m["lag"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
    if objective == "draft":
        assert lags == {1, 2, 3, 4}, "one lag per step, drawn over 1..4"


@pytest.mark.parametrize("lag", [1, 2, 4])
def test_noisy_lag_cross_attention_matches_slice_formulation(lag):
    """Original flash noisy training: K/V truncated to [:T-j], queries to [j:], causal attention,
    zero output for the first j queries (spec 1.3). Draft.forward_train masks instead; they agree.
    The slice formulation enters the draft's forward as a callable attention core."""
    tcfg = tiny_config()
    draft = init.random_draft(DraftConfig.from_target(tcfg, window=8), tcfg.rope, seed=3)
    embed = init.random_target(tcfg, seed=4).embed
    k = jax.random.split(jax.random.key(5), 3)
    tokens = jax.random.randint(k[0], (2, T), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(T) + 100, (2, T))
    k_last = jax.random.normal(k[1], (2, T, tcfg.num_kv_heads, tcfg.head_dim))
    v_last = jax.random.normal(k[2], (2, T, tcfg.num_kv_heads, tcfg.head_dim))
    got = draft.forward_train(tokens, positions, k_last, v_last, jnp.int32(lag), embed=embed)

    def slice_core(q, k, v, *, window, lag):
        i, s = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
        if lag is None:  # the self-attention: the window rule as a dense mask
            return attn_ref.tree_attention_ref(q, k, v, jnp.broadcast_to((s <= i) & (s >= i - window), (2, T, T)))[0]
        j = int(lag)
        n = T - j
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (2, n, n))
        o = attn_ref.tree_attention_ref(q[:, j:], k[:, :n], v[:, :n], causal)[0]
        return jnp.concatenate([jnp.zeros_like(q[:, :j]), o], axis=1)

    want = draft.forward_train(tokens, positions, k_last, v_last, lag, embed=embed, attention=slice_core)
    np.testing.assert_allclose(got, want, atol=TOL["lag_reference"])


@pytest.mark.parametrize("policy", ["full", pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_remat_changes_memory_not_maths(policy):
    """Activation checkpointing (per layer of the LM, the whole draft block) gives the same loss and
    gradients as the plain forward."""
    tcfg = tiny_config()
    graphdef, params = nnx.split(init.random_target(tcfg, seed=0))
    dgraphdef, dparams = nnx.split(init.random_draft(DraftConfig.from_target(tcfg, window=8), tcfg.rope, seed=1))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def loss(p, dp, remat):
        target = nnx.merge(graphdef, p)
        h, (k, v) = target.forward_train(tokens, positions, remat=remat)
        d = nnx.merge(dgraphdef, dp).forward_train(tokens, positions, k, v, 2, embed=target.embed, remat=remat)
        return jnp.mean(h ** 2) + jnp.mean(d ** 2)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (l0, g0), (l1, g1) = f(params, dparams, "none"), f(params, dparams, policy)
    np.testing.assert_allclose(l0, l1, rtol=TOL["remat_loss"])
    rtol, atol = TOL["remat_grads"]
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("core,lag", [("chunked", 3), ("flash", 3), ("flash", 1)])
def test_attention_cores_match_dense(core, lag):
    """The memory-bounded cores (chunked, and flash through XLA on the CPU) == the dense [T, T] core,
    in both models' training forwards."""
    tcfg = tiny_config()
    target = init.random_target(tcfg, seed=0)
    draft = init.random_draft(DraftConfig.from_target(tcfg, window=8), tcfg.rope, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 29), 0, 256)  # 29: not a multiple of the chunk
    positions = jnp.broadcast_to(jnp.arange(29) + 7, (2, 29))

    @jax.jit
    def both(tokens, positions):
        out = []
        for attention in ("dense", core):
            h, (k, v) = target.forward_train(tokens, positions, attention=attention, chunk=8)
            d = draft.forward_train(tokens, positions, k, v, lag, embed=target.embed, attention=attention, chunk=8)
            out.append((h, k, v, d))
        return out

    for a, b in zip(*both(tokens, positions)):
        np.testing.assert_allclose(a, b, atol=TOL["core_vs_dense"], rtol=TOL["core_vs_dense"])


@pytest.mark.gpu
def test_flash_training_attention_on_gpu_matches_float32_reference():
    """cuDNN flash attention (bf16) in the training forwards against the float32 dense forwards."""
    tcfg = tiny_config(hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64, intermediate_size=256)
    dcfg = DraftConfig.from_target(tcfg, window=64)
    target = init.random_target(tcfg, seed=0)
    target16 = init.random_target(tcfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    draft = init.random_draft(dcfg, tcfg.rope, seed=1)
    draft16 = init.random_draft(dcfg, tcfg.rope, seed=1, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    tokens = jax.random.randint(jax.random.key(2), (2, 256), 0, 256)
    positions = jnp.broadcast_to(jnp.arange(256), (2, 256))
    tol = TOL["flash_bf16_vs_f32"]
    h0, (k0, v0) = jax.jit(target.forward_train)(tokens, positions)
    h1, (k1, v1) = jax.jit(lambda t, p: target16.forward_train(t, p, attention="flash", chunk=64))(tokens, positions)
    np.testing.assert_allclose(np.asarray(h1, np.float32), h0, atol=tol, rtol=tol)
    d0 = jax.jit(lambda: draft.forward_train(tokens, positions, k0, v0, 2, embed=target.embed))()
    d1 = jax.jit(lambda: draft16.forward_train(tokens, positions, k1, v1, 2, embed=target16.embed,
                                               attention="flash", chunk=64))()
    np.testing.assert_allclose(np.asarray(d1, np.float32), d0, atol=tol, rtol=tol)
