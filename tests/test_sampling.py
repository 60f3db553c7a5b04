"""SamplingParams validation, process_logits against numpy and HF references, sample() statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longspec_jax.sampling import RowSampling, SamplingParams, greedy, process_logits, sample

# Tolerances (float32 log-probs; the filtering masks themselves must match exactly).
LOGP_ATOL = 1e-5
CHI2_P_MIN = 1e-3  # chi-square p-value below which the sampler is declared wrong (fixed seed)


def _np_reference(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
    """HF order (temperature, top-k, top-p) in float64 numpy with HF's sorted-scatter top-p."""
    x = logits.astype(np.float64)
    if t == 0:
        out = np.full_like(x, -np.inf)
        np.put_along_axis(out, x.argmax(-1)[..., None], 0.0, axis=-1)
        return out
    x = x / t
    v = x.shape[-1]
    if 0 < k < v:
        kth = np.sort(x, axis=-1)[..., -k][..., None]
        x = np.where(x < kth, -np.inf, x)
    if p < 1.0:
        order = np.argsort(x, axis=-1, kind="stable")
        s = np.take_along_axis(x, order, axis=-1)
        e = np.exp(s - s.max(-1, keepdims=True))
        cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
        remove_sorted = cum <= 1.0 - p
        remove_sorted[..., -1] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        x = np.where(remove, -np.inf, x)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _random_logits(seed, shape, scale=3.0):
    # Continuous random values: ties (where the threshold rule and HF's scatter may differ) have
    # probability zero.
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32) * scale)


@pytest.mark.parametrize("bad,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
])
def test_params_validation_names_the_field(bad, field):
    """From Python the message names the argument (the CLI maps it to its flag)."""
    with pytest.raises(ValueError, match=rf"^{field} must be .*got {list(bad.values())[0]!r}"):
        SamplingParams(**bad)


def test_params_frozen_hashable_normalised():
    a = SamplingParams(temperature=1, top_k=np.int64(5), top_p=np.float32(0.5))
    b = SamplingParams(temperature=1.0, top_k=5, top_p=0.5)
    assert a == b and hash(a) == hash(b)
    with pytest.raises(Exception):
        a.temperature = 2.0  # frozen
    assert SamplingParams().is_greedy and not b.is_greedy


@pytest.mark.parametrize("t,k,p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.8, 20, 0.6), (1.0, 1, 1.0), (2.0, 0, 0.05),
    (1.0, 1000, 0.95),  # k >= V disables top-k
])
def test_process_logits_matches_numpy_reference(t, k, p):
    logits = _random_logits(0, (3, 4, 97))
    ours = np.asarray(jax.jit(process_logits, static_argnums=1)(jnp.asarray(logits), SamplingParams(t, k, p)))
    ref = _np_reference(logits, t, k, p)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    kept = ~np.isneginf(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], atol=LOGP_ATOL)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.exp(ours).sum(-1), 1.0, atol=LOGP_ATOL)


def test_top_k_keeps_exactly_k():
    logits = _random_logits(1, (5, 64))
    out = np.asarray(process_logits(jnp.asarray(logits), SamplingParams(1.0, 7, 1.0)))
    assert (np.isfinite(out).sum(-1) == 7).all()


def test_top_p_always_keeps_the_argmax():
    logits = _random_logits(2, (4, 50), scale=10.0)  # peaked: the top token alone exceeds p
    out = np.asarray(process_logits(jnp.asarray(logits), SamplingParams(1.0, 0, 1e-6)))
    assert (np.isfinite(out).sum(-1) == 1).all()
    assert (out.argmax(-1) == logits.argmax(-1)).all()


def test_greedy_is_one_hot_argmax():
    logits = _random_logits(3, (2, 3, 41))
    params = SamplingParams(0.0, top_k=3, top_p=0.5)  # filters are irrelevant when greedy
    out = np.asarray(process_logits(jnp.asarray(logits), params))
    assert (np.isfinite(out).sum(-1) == 1).all()
    np.testing.assert_array_equal(out.argmax(-1), logits.argmax(-1))
    np.testing.assert_array_equal(out.max(-1), 0.0)
    toks = sample(None, jnp.asarray(logits), params)
    assert toks.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))


def test_matches_hf_logits_warpers():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = _random_logits(4, (6, 120))
    t, k, p = 0.8, 30, 0.7
    warpers = [lp.TemperatureLogitsWarper(t), lp.TopKLogitsWarper(k), lp.TopPLogitsWarper(p)]
    scores = torch.from_numpy(logits.copy())
    for w in warpers:
        scores = w(None, scores)
    ref = torch.log_softmax(scores, dim=-1).numpy()
    ours = np.asarray(process_logits(jnp.asarray(logits), SamplingParams(t, k, p)))
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], atol=LOGP_ATOL)


def test_sample_deterministic_given_key_and_rows_independent():
    logits = jnp.asarray(_random_logits(5, (4, 33)))
    params = SamplingParams(1.0, 0, 0.9)
    key = jax.random.key(11)
    a, b = sample(key, logits, params), sample(key, logits, params)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (4,) and a.dtype == jnp.int32
    with pytest.raises(ValueError, match="PRNG key"):
        sample(None, logits, params)


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 6, 1.0), (1.5, 0, 0.8), (1.0, 8, 0.9)])
def test_sample_frequencies_match_processed_softmax(t, k, p):
    scipy_stats = pytest.importorskip("scipy.stats")
    v, n = 16, 40_000
    logits = jnp.asarray(_random_logits(6, (v,), scale=1.5))
    params = SamplingParams(t, k, p)
    probs = np.exp(np.asarray(process_logits(logits, params), np.float64))
    keys = jax.random.split(jax.random.key(1234), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda kk: sample(kk, logits, params)))(keys))
    counts = np.bincount(draws, minlength=v)
    assert counts[probs == 0].sum() == 0, "sampled a filtered token"
    kept = probs > 0
    _, pval = scipy_stats.chisquare(counts[kept], probs[kept] / probs[kept].sum() * n)
    assert pval > CHI2_P_MIN, (counts, probs * n)


def test_greedy_equals_jnp_argmax_on_ties_nans_and_infs():
    """`greedy` is written as reductions (so tensor parallelism all-reduces instead of all-gathering);
    it must still be jnp.argmax exactly: first index on ties, first NaN, all -inf -> 0."""
    rng = np.random.default_rng(5)
    for dtype in (jnp.float32, jnp.bfloat16):
        for trial in range(60):
            x = rng.integers(-3, 3, (5, 37)).astype(np.float32)  # many ties
            x[1, rng.integers(0, 37, 3)] = np.nan
            x[2, :] = -np.inf
            x[3, rng.integers(0, 37, 2)] = np.inf
            x[4, rng.integers(0, 37, 2)] = [np.inf, np.nan][trial % 2]
            xj = jnp.asarray(x, dtype)
            np.testing.assert_array_equal(np.asarray(greedy(xj)), np.asarray(jnp.argmax(xj, axis=-1)))


def test_row_sampling_equals_each_rows_own_settings():
    """Per-row settings as data: one call over mixed rows gives each row exactly what its own
    SamplingParams gives alone (greedy rows one-hot, filters per row)."""
    logits = jnp.asarray(_random_logits(7, (5, 3, 61)))
    rows = [SamplingParams(), SamplingParams(0.7, 5, 1.0), SamplingParams(1.3, 0, 0.8), SamplingParams(1.0),
            SamplingParams(0.9, 12, 0.6)]
    mixed = np.asarray(jax.jit(process_logits)(logits, RowSampling.of(rows)))
    for b, params in enumerate(rows):
        np.testing.assert_array_equal(mixed[b], np.asarray(process_logits(logits[b:b + 1], params))[0])
    keys = jax.random.split(jax.random.key(3), 5)
    toks = np.asarray(jax.jit(sample)(keys, logits, RowSampling.of(rows)))
    np.testing.assert_array_equal(toks[0], np.asarray(logits[0]).argmax(-1))  # the greedy row
    for b, params in enumerate(rows):  # a row's draws depend on its own key only
        np.testing.assert_array_equal(toks[b], np.asarray(sample(keys[b:b + 1], logits[b:b + 1], params))[0])
    assert (np.isfinite(mixed[1]).sum(-1) == 5).all()


def test_row_sampling_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="2 rows but the batch has 3"):
        RowSampling.rows([SamplingParams(), SamplingParams()], 3)
