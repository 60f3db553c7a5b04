"""Tree speculative decoding end to end: greedy output == autoregressive greedy output token for
token; both acceptance regimes (full and zero) proven by the statistics; EOS inside an accepted
path; a nearly full cache; one compile per shape bucket and no host round trip in the loop; and
T > 0 losslessness by chi-square against the exact target distribution.

Every test shares one executable per (tree shape, sampling) bucket: weights, prompts (within a
bucket), EOS ids and max_new_tokens are run-time values, so seeds are cheap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax.infer import decoder as spec
from longspec_jax.infer.decoder import generate_ar
from longspec_jax.infer.loop import DecodeLoop, start_jit
from longspec_jax.infer.runtime import Compiler
from longspec_jax import init
from longspec_jax.configs import DraftConfig, tiny_config
from longspec_jax.draft import ring_capacity
from longspec_jax.kv_cache import KVCache
from longspec_jax.sampling import RowSampling, SamplingParams, process_logits
from longspec_jax.tree import TreeShape

CAPACITY = 128  # one cache shape for every greedy test (prompts <= 16 tokens, max_new <= 40)
WINDOW = 8  # small draft window so the ring wraps within a test
CHI2_ALPHA = 1e-3  # false-alarm rate of each chi-square test (fixed seeds: deterministic anyway)

CHAIN, WIDE, DEEP, DEFAULT = (1, 1, 1, 1), (8, 8), (1,) * 8, (4, 16, 16, 16, 16)


def _cfg(vocab=96):
    return tiny_config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                       head_dim=8, eos_token_ids=())


def random_models(seed, vocab=96, scale=1.0):
    """A random target (logits sharpened by `scale` on the LM head) and a random draft."""
    cfg = _cfg(vocab)
    target = init.random_target(cfg, seed=seed)
    target.lm_head.kernel.value = target.lm_head.kernel.value * (50.0 * scale)
    draft = init.random_draft(DraftConfig.from_target(cfg, window=WINDOW), cfg.rope, seed=seed + 1000)
    return target, draft


def agreeing_models(seed, vocab=96, scale=1.0):
    """Full-acceptance regime: the target's attention and MLP outputs are zeroed, so its logits are
    head(final_norm(E[token])); the draft's three output projections are zeroed, so its logits are
    head(E[token]) = the target's logits divided by a positive per-token scalar (RMSNorm with unit
    weights). Same argmax at every node: greedy drafting always follows the target."""
    target, draft = random_models(seed, vocab, scale)
    for layer in target.layers:
        layer.attn.o_kernel.value = jnp.zeros_like(layer.attn.o_kernel.value)
        layer.mlp.down_kernel.value = jnp.zeros_like(layer.mlp.down_kernel.value)
    for p in (draft.self_attn.o_kernel, draft.cross_attn.o_kernel, draft.mlp.down_kernel):
        p.value = jnp.zeros_like(p.value)
    return target, draft


def disagreeing_models(seed, vocab=96, n_bad=16):
    """Zero-acceptance regime: hidden channel 0 is invisible to the target (final-norm weight 0)
    and is the only channel the LM-head columns of the last `n_bad` tokens read, so the target
    gives those tokens logit exactly 0 and never picks them (some other logit is positive). The
    draft adds a large constant to channel 0 (constant self-attention values through o_proj), so
    its top candidates at every node are exactly those tokens."""
    target, draft = random_models(seed, vocab)
    bad = np.arange(vocab - n_bad, vocab)
    w = np.array(target.lm_head.kernel.value)
    w[0, :] = 0.0
    w[:, bad] = 0.0
    w[0, bad] = 1.0 + 0.01 * np.arange(n_bad)
    target.lm_head.kernel.value = jnp.asarray(w)
    target.final_norm.scale.value = target.final_norm.scale.value.at[0].set(0.0)
    sa = draft.self_attn
    sa.v_kernel.value = jnp.zeros_like(sa.v_kernel.value)
    sa.v_bias.value = jnp.zeros_like(sa.v_bias.value).at[0, 0].set(1.0)
    sa.o_kernel.value = jnp.zeros_like(sa.o_kernel.value).at[:, 0, 0].set(100.0)
    return target, draft


def _prompts(seed, lengths, vocab=96):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _ar(target, prompts, n, eos=(), capacity=CAPACITY):
    res = generate_ar(target, prompts, max_new_tokens=n, eos_ids=eos, cache_capacity=capacity)
    return res.tokens


def _spec(target, draft, shape, prompts, n, eos=(), capacity=CAPACITY, sampling=None, seed=0, sample_drafts=True,
          verification="block", compiler=None):
    return spec.generate_tree(target, draft, prompts, tree_shape=shape, max_new_tokens=n, eos_ids=eos,
                              cache_capacity=capacity, sampling=sampling, seed=seed, sample_drafts=sample_drafts,
                              verification=verification, compiler=compiler)


def _check_equal(target, draft, shape, seed, n=40, lengths=(5, 11, 16)):
    prompts = _prompts(seed, lengths)
    res = _spec(target, draft, shape, prompts, n)
    want = _ar(target, prompts, n)
    assert res.tokens == want, (seed, shape)
    assert res.stop_reason == ["max_new_tokens"] * len(prompts)
    return res


@pytest.mark.parametrize("shape", [CHAIN, WIDE], ids=["chain", "wide"])
def test_greedy_matches_ar(shape):
    for seed in range(3):
        _check_equal(*random_models(seed), shape, seed)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [DEEP, DEFAULT], ids=["deep", "default"])
def test_greedy_matches_ar_slow(shape):
    for seed in range(4):
        _check_equal(*random_models(seed), shape, seed)
    res = _check_equal(*agreeing_models(7), shape, 7)
    assert res.spec.tau > 0.75 * len(shape)


def test_full_acceptance_regime():
    for seed in range(2):
        res = _check_equal(*agreeing_models(seed), CHAIN, seed)
        # every drafted depth was accepted, most iterations accepted all D = 4 drafts
        assert min(res.spec.accepted_by_depth) > 0
        assert res.spec.accept_hist[-1] >= 0.8 * sum(res.spec.accept_hist)
        assert res.spec.tau > 4.0  # at most 5 = D + 1 tokens per target forward


def test_zero_acceptance_regime():
    for seed in range(2):
        res = _check_equal(*disagreeing_models(seed), WIDE, seed)
        assert res.spec.accepted_by_depth == [0, 0]
        assert res.spec.tau == 1.0  # exactly one token per target forward


def test_eos_inside_accepted_path():
    target, draft = agreeing_models(3)
    prompts = _prompts(3, (9,))
    free = _ar(target, prompts, 40)[0]
    # an EOS that first occurs mid-iteration (iterations emit 5 tokens after the prefill token)
    idx = next(i for i in range(2, 40) if free[i] not in free[:i] and (i - 1) % 5 not in (4,))
    eos = (free[idx], 10_000)  # several ids; one never occurs
    res = _spec(target, draft, CHAIN, prompts, 40, eos=eos)
    assert res.tokens[0] == free[:idx + 1] == _ar(target, prompts, 40, eos=eos)[0]
    assert res.stop_reason == ["eos"]
    assert res.spec.accepted_by_depth[-1] > 0


def test_cache_nearly_full_stops_cleanly():
    target, draft = random_models(5)
    prompts = _prompts(5, (100, 105, 110))
    with pytest.warns(UserWarning, match="cache_capacity"):
        res = _spec(target, draft, CHAIN, prompts, 40, capacity=CAPACITY)
    assert res.stop_reason == ["cache_full"] * 3
    want = _ar(target, prompts, 40, capacity=256)
    for got, ref, p in zip(res.tokens, want, prompts):
        assert 0 < len(got) < 40 and got == ref[:len(got)]
        # it stopped exactly when another tree (5 slots after the committed length) would not fit
        committed = len(p) + len(got) - 1
        assert CAPACITY < committed + 5 <= CAPACITY + 5
    with pytest.raises(ValueError, match=r"--cache-capacity\) 120 cannot hold"):
        _spec(target, draft, CHAIN, [[1] * 118], 4, capacity=120)


def test_compiles_once_per_bucket_without_host_sync():
    compiler = Compiler()
    target, draft = random_models(11)
    _spec(target, draft, CHAIN, _prompts(0, (4, 7, 9)), 20, compiler=compiler)
    before = dict(compiler.compiles)
    t2, d2 = random_models(12)
    # other weights, prompt lengths in the same bucket, EOS ids, max_new in the same output bucket
    _spec(t2, d2, CHAIN, _prompts(1, (12, 3, 16)), 24, eos=(3, 4), compiler=compiler)
    _spec(target, draft, CHAIN, _prompts(2, (1, 2, 3)), 17, eos=(5,), seed=3, compiler=compiler)
    assert dict(compiler.compiles) == before
    loops = compiler.executables("run")
    assert loops
    for exe in loops:
        hlo = exe.as_text().lower()
        for marker in ("outfeed", "infeed", "host_callback", "xla_python_cpu_callback", "send(", "recv("):
            assert marker not in hlo, marker


def test_decode_loop_refuses_unknown_methods():
    with pytest.raises(ValueError, match="draft_sampling must be one of"):
        DecodeLoop(TreeShape(CHAIN), draft_sampling="nucleus")
    with pytest.raises(ValueError, match="verification must be one of"):
        DecodeLoop(TreeShape(CHAIN), verification="tree")
    with pytest.raises(ValueError, match="needs a tree shape"):
        DecodeLoop(None, draft_sampling="sampled")


def test_draft_ring_shape_independent_of_context():
    target, draft = random_models(0)
    dec = spec.Decoder(target, draft, tree_shape=WIDE)
    loop = dec.loop_for(16, 4)
    assert dec.ring_slots(loop.max_accept) == ring_capacity(WINDOW, 3, multiple=8) == 16  # xla path: smallest ring
    shapes = []
    for P, cap in ((16, 128), (256, 1024)):
        B = 2
        cache = KVCache.init(target.cfg, B, cap, jnp.float32)
        out = jax.eval_shape(
            lambda ts, ds, c: start_jit(ts, ds, c, jnp.zeros((B, 32)), jnp.zeros((B, 16), jnp.int32),
                                        jnp.full((B,), P, jnp.int32), jax.random.split(jax.random.key(0), B),
                                        jnp.full((B,), 4, jnp.int32), jnp.zeros((B, 4), jnp.int32),
                                        RowSampling.rows(SamplingParams(), B), loop=loop, t_graph=dec.t_graph,
                                        d_graph=dec.d_graph, out_size=64, max_accept=loop.max_accept,
                                        ring_slots=16),
            dec.t_state, dec.d_state, cache)
        shapes.append((out.ring.k.shape, out.cache.k[0].shape))
    assert shapes[0][0] == shapes[1][0] == (2, 16, 2, 8)
    assert shapes[0][1] != shapes[1][1]


# ------------------------------------------------------------------------------------------------
# T > 0: the output distribution equals plain sampling from the target


def _exact_first_tokens(target, prompt, params, V):
    """Exact p(y1, y2) [V, V] and p(y3) [V] of the target's processed distributions."""
    def next_logp(seqs):
        seqs = jnp.asarray(seqs, jnp.int32)
        B, T = seqs.shape
        cache = KVCache.init(target.cfg, B, T, jnp.float32)
        h, _ = target(seqs, jnp.broadcast_to(jnp.arange(T), (B, T)), cache, jnp.zeros((B,), jnp.int32))
        return np.exp(np.asarray(process_logits(target.logits(h[:, -1:])[:, 0], params), np.float64))

    p1 = next_logp([prompt])[0]
    p2 = next_logp([prompt + [a] for a in range(V)])  # [V, V]
    joint = p1[:, None] * p2
    p3_given = next_logp([prompt + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    p3 = np.einsum("ab,abc->c", joint, p3_given)
    return joint, p3


def _chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square with cells of expected count < min_expected pooled into one."""
    from scipy import stats

    counts, probs = np.asarray(counts, np.float64).ravel(), np.asarray(probs, np.float64).ravel()
    n = counts.sum()
    exp = probs * n
    assert counts[exp == 0].sum() == 0, "sampled a token of probability 0 (filtered by top-k/top-p)"
    big = exp >= min_expected
    obs_cells = list(counts[big]) + [counts[~big & (exp > 0)].sum()]
    exp_cells = list(exp[big]) + [exp[~big & (exp > 0)].sum()]
    if exp_cells[-1] < min_expected:  # merge the pooled tail into the smallest big cell
        i = int(np.argmin(exp_cells[:-1]))
        obs_cells[i] += obs_cells.pop()
        exp_cells[i] += exp_cells.pop()
    if len(obs_cells) == 1:  # a single possible outcome: nothing to test beyond the zero cells
        return 1.0
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs_cells, exp_cells))
    return stats.chi2.sf(chi2, len(obs_cells) - 1)


def _check_distribution(params, models, n_samples, seed, shape=(3, 3), sample_drafts=True, verification="block"):
    V = 16
    target, draft = models
    prompt = _prompts(seed, (6,), vocab=V)[0]
    res = _spec(target, draft, shape, [prompt] * n_samples, 3, sampling=params, seed=seed, capacity=64,
                sample_drafts=sample_drafts, verification=verification)
    toks = np.array(res.tokens)
    assert toks.shape == (n_samples, 3)
    joint, p3 = _exact_first_tokens(target, prompt, params, V)
    counts12 = np.zeros((V, V))
    np.add.at(counts12, (toks[:, 0], toks[:, 1]), 1)
    counts3 = np.bincount(toks[:, 2], minlength=V)
    assert _chi2_pvalue(counts12, joint) > CHI2_ALPHA
    assert _chi2_pvalue(counts3, p3) > CHI2_ALPHA
    # the tree path was exercised: drafts were accepted at depth 1 and 2 in many rows
    assert res.spec.accepted_by_depth[0] > 0.05 * n_samples
    assert res.spec.accepted_by_depth[1] > 0
    return res


def test_sampling_is_lossless_plain():
    _check_distribution(SamplingParams(temperature=1.0), random_models(21, vocab=16, scale=0.1), 3000, seed=1)


def test_sampling_is_lossless_top_k_top_p():
    _check_distribution(SamplingParams(temperature=0.8, top_k=6, top_p=0.9),
                        agreeing_models(22, vocab=16, scale=0.1), 3000, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.3, top_k=4), SamplingParams(temperature=0.7, top_p=0.8)])
def test_sampling_is_lossless_more(params):
    _check_distribution(params, random_models(23, vocab=16, scale=0.1), 6000, seed=3, sample_drafts=False)


@pytest.mark.parametrize("verification", ["token", "block"])
def test_sampled_chain_is_lossless(verification):
    """Chains at T > 0 draw their drafts from q and accept by rejection sampling (token-wise:
    min(1, p/q) and residual draws; block: the whole path's ratio): the joint law of the first
    three tokens is still the target's."""
    _check_distribution(SamplingParams(temperature=1.0), random_models(24, vocab=16, scale=0.1), 3000, seed=4,
                        shape=(1, 1, 1), verification=verification)


def test_sampled_chain_is_lossless_top_k_top_p():
    """With top-k / top-p the draft's q is filtered like the target's p (drafts never leave q's
    support; the residual then carries the target mass q lacks)."""
    _check_distribution(SamplingParams(temperature=0.8, top_k=6, top_p=0.9), random_models(25, vocab=16, scale=0.1),
                        3000, seed=5, shape=(1, 1), verification="token")


def test_sampled_tree_is_lossless():
    """Sampled trees (children drawn from q without replacement), block verification, top-k and
    top-p on both distributions, a draft that partly agrees with the target."""
    _check_distribution(SamplingParams(temperature=1.0, top_k=8, top_p=0.95), agreeing_models(27, vocab=16, scale=0.1),
                        3000, seed=7, shape=(3, 2))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3)], ids=["chain", "tree"])
@pytest.mark.parametrize("verification", ["token", "block"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.5, top_k=6), SamplingParams(temperature=1.0, top_p=0.8),
                                    SamplingParams(temperature=1.0)], ids=["T0.5-topk", "T1-topp", "T1"])
def test_sampled_drafts_are_lossless_more(shape, verification, params):
    _check_distribution(params, agreeing_models(28, vocab=16, scale=0.1), 4000, seed=8, shape=shape,
                        verification=verification)


def test_sampled_tree_greedy_rows_of_a_mixed_batch_equal_ar():
    """A batch mixing greedy and sampled rows runs the sampled loop; its greedy rows still emit
    the target's greedy output token for token (their drafts are the draft's top children)."""
    target, draft = agreeing_models(29)
    prompts = _prompts(9, (5, 11, 8, 16))
    rows = [SamplingParams(), SamplingParams(temperature=1.0, top_k=10)] * 2
    dec = spec.Decoder(target, draft, tree_shape=(3, 2, 2))
    assert dec.loop_for(16, 30, sampled=True).sampled
    res = dec.generate(prompts, max_new_tokens=30, sampling=rows, eos_ids=(), cache_capacity=CAPACITY)
    want = _ar(target, prompts, 30)
    assert res.tokens[0] == want[0] and res.tokens[2] == want[2]
    assert res.spec.accepted_by_depth[-1] > 0


def test_sampled_chain_accepts_more_when_both_are_spread():
    """At T = 1 with flat distributions the argmax draft is accepted with probability ~p(argmax q)
    while the sampled draft is accepted with probability 1 - TV(p, q): tau must be clearly higher."""
    target, draft = agreeing_models(26, vocab=16, scale=0.02)
    prompts = _prompts(6, (6,) * 64, vocab=16)
    params = SamplingParams(temperature=1.0)
    sampled = _spec(target, draft, CHAIN, prompts, 24, sampling=params, seed=6, capacity=64)
    matched = _spec(target, draft, CHAIN, prompts, 24, sampling=params, seed=6, capacity=64, sample_drafts=False)
    assert sampled.spec.tau > 1.5 * matched.spec.tau, (sampled.spec.tau, matched.spec.tau)


def test_detects_a_biased_sampler():
    """Power check of the statistical test itself: a slightly wrong distribution is rejected."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(64))
    q = 0.85 * p + 0.15 * rng.dirichlet(np.ones(64))
    counts = np.bincount(rng.choice(64, 3000, p=q), minlength=64)
    assert _chi2_pvalue(counts, p) < CHI2_ALPHA
    counts = np.bincount(rng.choice(64, 3000, p=p), minlength=64)
    assert _chi2_pvalue(counts, p) > CHI2_ALPHA
