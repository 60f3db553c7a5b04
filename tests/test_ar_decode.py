"""Autoregressive decoding (`longspec_jax/infer/decoder.py` without a draft): exactness against naive and HF references, EOS,
batching, bucketing (compile once per shape bucket), chunked prefill, streaming, errors.

Shapes are chosen so most tests share compiled executables (prompt bucket 16, output bucket 16,
cache capacity 32): compiling is the slow part on a 2-core CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longspec_jax.infer import runtime
from longspec_jax.infer import decoder
from longspec_jax.infer.runtime import Compiler, capacity_bucket, output_bucket, prompt_bucket
from longspec_jax import init
from longspec_jax.configs import tiny_config
from longspec_jax import sampling as smp
from longspec_jax.sampling import SamplingParams, sample

# Tolerances: greedy / sampled tokens must match exactly (float32 model, random logits have no
# near-ties at this scale); HF parity is on tokens too.
CHUNK = 16
# The reference runs never stop early: no stop ids unless a test passes its own.
generate_ar = functools.partial(decoder.generate_ar, eos_ids=())


@pytest.fixture(scope="module")
def model():
    return init.random_target(tiny_config(), seed=7)


def _prompt(seed, n, vocab=256):
    return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 2, vocab)).tolist()


@functools.lru_cache(maxsize=None)
def _naive_logits_fn(graphdef, length):
    """Cache-free causal forward over a fixed-length buffer (one compile per length)."""

    @jax.jit
    def fn(params, tokens, index):
        m = nnx.merge(graphdef, params)
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
        h, _ = m.forward_train(tokens, pos)
        h_last = jnp.take_along_axis(h, index[:, None, None], axis=1)  # [B, 1, D]
        return m.logits(h_last)[:, 0]

    return fn


def naive_generate(model, prompt, n_new, *, sampling=SamplingParams(), seed=0, eos_ids=(), length=64):
    """Reference: recompute the whole sequence from scratch for every new token (no KV cache)."""
    graphdef, params = nnx.split(model)
    fn = _naive_logits_fn(graphdef, length)
    seq = list(prompt)
    out = []
    key = jax.random.key(seed)[None]  # row 0's key: the decoder gives row b the seed + b
    for i in range(n_new):
        buf = np.zeros((1, length), np.int32)
        buf[0, : len(seq)] = seq
        logits = fn(params, jnp.asarray(buf), jnp.asarray([len(seq) - 1]))
        # The decode state's key schedule: the first token from fold_in(key, 0); step i >= 1 from
        # the second half of split(fold_in(key, i)) (the first half is the draft's).
        step_key = smp.fold_in(key, i) if i == 0 else smp.split(smp.fold_in(key, i))[1]
        tok = int(sample(step_key, logits, sampling)[0])
        out.append(tok)
        seq.append(tok)
        if tok in eos_ids:
            break
    return out


def test_buckets():
    assert prompt_bucket(1, 512) == (16, 16)
    assert prompt_bucket(17, 512) == (32, 32)
    assert prompt_bucket(512, 512) == (512, 512)
    assert prompt_bucket(513, 512) == (1024, 512)
    assert prompt_bucket(40, 16) == (48, 16)
    assert prompt_bucket(5, 8) == (8, 8)
    assert output_bucket(1) == 16 and output_bucket(17) == 32 and output_bucket(1024) == 1024
    assert capacity_bucket(20) == 32 and capacity_bucket(257) == 384 and capacity_bucket(4096 + 1) == 5120 and capacity_bucket(300) % 128 == 0
    for n in (1, 100, 300, 5000, 40000):
        assert n <= capacity_bucket(n) < 1.25 * n + 128


def test_greedy_matches_naive_reference(model):
    prompt = _prompt(0, 11)
    res = generate_ar(model, prompt, max_new_tokens=14, prefill_chunk=CHUNK)
    assert res.tokens[0] == naive_generate(model, prompt, 14)
    assert len(res.tokens[0]) == 14 and res.stop_reason == ["max_new_tokens"]
    assert res.timings.decode_steps == 13 and res.timings.decode_tokens == 13
    assert res.shapes == dict(batch=1, padded_prompt=16, prefill_chunk=16, cache_capacity=32, output_buffer=16)


def test_sampled_matches_naive_reference_and_is_seeded(model):
    prompt = _prompt(1, 9)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9)
    a = generate_ar(model, prompt, max_new_tokens=12, sampling=params, seed=3, prefill_chunk=CHUNK)
    b = generate_ar(model, prompt, max_new_tokens=12, sampling=params, seed=3, prefill_chunk=CHUNK)
    c = generate_ar(model, prompt, max_new_tokens=12, sampling=params, seed=4, prefill_chunk=CHUNK)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.tokens[0] == naive_generate(model, prompt, 12, sampling=params, seed=3)


def test_compiles_once_per_bucket(model):
    # Prompt lengths 9 and 13 share bucket 16; 10 and 14 new tokens share output bucket 16 and
    # cache capacity 32: the second call must reuse every executable.
    compiler = Compiler()
    generate_ar(model, _prompt(2, 9), max_new_tokens=10, prefill_chunk=CHUNK, compiler=compiler)
    compiles = dict(compiler.compiles)
    res = generate_ar(model, _prompt(3, 13), max_new_tokens=14, prefill_chunk=CHUNK, compiler=compiler)
    assert dict(compiler.compiles) == compiles
    assert res.timings.compile_s == 0.0


def test_compiler_compiles_many_side_by_side():
    # get_many compiles on threads: every executable runs like get's, each compiles once, and keys
    # that lower to one program share it.
    compiler = Compiler()
    scale = jax.jit(lambda x, k: x * k, static_argnames="k")
    xs = {n: jnp.arange(n, dtype=jnp.float32) for n in (3, 5, 7)}
    jobs = {(n, k): ("scale", scale, (xs[n],), dict(k=k)) for n in xs for k in (2, 3)}
    jobs["again"] = jobs[3, 2]
    exe = compiler.get_many(jobs, workers=4)
    assert compiler.compiles["scale"] == 6 and exe["again"] is exe[3, 2]
    for (n, k), e in ((key, e) for key, e in exe.items() if key != "again"):
        np.testing.assert_array_equal(np.asarray(e(xs[n])), np.arange(n) * k)
    assert compiler.get("scale", scale, (xs[5],), dict(k=3)) is exe[5, 3]
    assert compiler.compiles["scale"] == 6


def test_eos_stops_with_several_ids(model):
    prompt = _prompt(4, 10)
    free = generate_ar(model, prompt, max_new_tokens=16, prefill_chunk=CHUNK).tokens[0]
    stop_at = 5
    # The stop token must not occur earlier in the free-running output.
    while free[stop_at] in free[:stop_at]:
        stop_at += 1
    eos = (255 if free[stop_at] != 255 and 255 not in free else 254, free[stop_at])
    res = generate_ar(model, prompt, max_new_tokens=16, eos_ids=eos, prefill_chunk=CHUNK)
    assert res.tokens[0] == free[: stop_at + 1]
    assert res.stop_reason == ["eos"]
    assert res.timings.decode_steps == stop_at  # the loop ended at the EOS, not at max_new_tokens
    # Streaming stops at the EOS too (the slice loop ends once every row is done).
    seen = []
    streamed = generate_ar(model, prompt, max_new_tokens=16, eos_ids=eos, prefill_chunk=CHUNK,
                           stream_callback=lambda t, n: seen.append(int(n[0])), stream_every=2, stream_interval_s=0)
    assert streamed.tokens == res.tokens and seen[-1] == stop_at + 1


def test_batch_rows_are_independent_and_finish_independently(model):
    p0, p1 = _prompt(5, 37), _prompt(6, 5)  # row 0 spans three prefill chunks, row 1 one
    single0 = generate_ar(model, p0, max_new_tokens=12, prefill_chunk=CHUNK).tokens[0]
    single1 = generate_ar(model, p1, max_new_tokens=12, prefill_chunk=CHUNK).tokens[0]
    assert single0 == naive_generate(model, p0, 12)
    eos = (single1[3],)
    res = generate_ar(model, [p0, p1], max_new_tokens=12, eos_ids=eos, prefill_chunk=CHUNK)
    k0 = single0.index(eos[0]) + 1 if eos[0] in single0 else 12
    assert res.tokens == [single0[:k0], single1[: single1.index(eos[0]) + 1]]
    assert res.timings.prefill_tokens == 37 + 5


def test_chunked_prefill_equals_unchunked(model):
    prompt = _prompt(8, 40)
    chunked = generate_ar(model, prompt, max_new_tokens=12, prefill_chunk=CHUNK, cache_capacity=64)
    whole = generate_ar(model, prompt, max_new_tokens=12, prefill_chunk=64, cache_capacity=64)
    assert chunked.shapes["padded_prompt"] == 48 and chunked.shapes["prefill_chunk"] == 16
    assert whole.shapes["padded_prompt"] == 64 and whole.shapes["prefill_chunk"] == 64
    assert chunked.tokens == whole.tokens


def test_one_decode_call_and_streaming_same_tokens(model):
    prompt = _prompt(9, 12)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9)
    plain = generate_ar(model, prompt, max_new_tokens=12, sampling=params, seed=3, prefill_chunk=CHUNK)
    seen = []
    streamed = generate_ar(model, prompt, max_new_tokens=12, sampling=params, seed=3, prefill_chunk=CHUNK,
                           stream_callback=lambda t, n: seen.append(t[0].tolist()), stream_every=5,
                           stream_interval_s=0.0)
    # Keys are fold_in(seed, step): splitting the loop into slices cannot change the tokens.
    assert streamed.tokens == plain.tokens
    assert [len(s) for s in seen] == [1, 6, 11, 12]
    assert all(s == plain.tokens[0][: len(s)] for s in seen)


def test_decode_loop_has_no_host_transfers(model):
    # generate_ar runs the loop under jax.transfer_guard("disallow"); check that the guard is real
    # (an implicit transfer inside it raises) and that a whole run of new tokens is one call.
    with pytest.raises(Exception, match="[Dd]isallowed"):
        with jax.transfer_guard("disallow"):
            jnp.asarray(np.ones(3)) + 1
    calls = []
    orig = runtime.Compiler.get

    def counting_get(self, name, *a, **k):
        exe = orig(self, name, *a, **k)
        if name != "run":
            return exe
        return lambda *args: (calls.append(1), exe(*args))[1]

    runtime.Compiler.get = counting_get
    try:
        res = generate_ar(model, _prompt(10, 7), max_new_tokens=16, prefill_chunk=CHUNK)
    finally:
        runtime.Compiler.get = orig
    assert calls == [1] and res.timings.decode_steps == 15


def test_errors(model):
    with pytest.raises(ValueError, match="empty"):
        generate_ar(model, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="row 1 is empty"):
        generate_ar(model, [[3, 4], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"max_new_tokens \(--max-new-tokens\) must be >= 1"):
        generate_ar(model, [3, 4], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"--cache-capacity\) 16 cannot hold the padded prompt \(32 slots\)"):
        generate_ar(model, list(range(2, 30)), max_new_tokens=1, cache_capacity=16)
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        generate_ar(model, [3, 300], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prefill_chunk \(--prefill-chunk\) must be >= 1"):
        generate_ar(model, [3, 4], max_new_tokens=4, prefill_chunk=0)
    limit = model.cfg.max_position_embeddings
    with pytest.raises(ValueError, match=rf"needs {limit + 1} positions but the model's limit.*is {limit}"):
        generate_ar(model, [3] * (limit - 3), max_new_tokens=4)


def test_small_cache_stops_with_a_warning(model):
    """A capacity too small for prompt + max_new_tokens is allowed: the row stops when the next
    step no longer fits, with stop_reason cache_full and a warning naming the capacity."""
    prompt = list(range(2, 12))
    free = generate_ar(model, prompt, max_new_tokens=20, prefill_chunk=CHUNK).tokens[0]
    with pytest.warns(UserWarning, match="cache_capacity"):
        res = generate_ar(model, prompt, max_new_tokens=20, cache_capacity=20, prefill_chunk=CHUNK)
    assert res.stop_reason == ["cache_full"] and res.tokens[0] == free[:len(res.tokens[0])]
    assert len(prompt) + len(res.tokens[0]) - 1 == 20  # every slot used, none overwritten


def test_matches_hf_generate(tmp_path):
    hf_utils = pytest.importorskip("tests.hf_utils")
    weights = pytest.importorskip("longspec_jax.weights")
    torch = pytest.importorskip("torch")
    path, hf_model = hf_utils.make_hf_checkpoint(tmp_path, "llama_gqa")
    model, cfg, tok = weights.load_target(path, dtype=jnp.float32, attention_impl="xla")
    prompt = tok("the quick brown fox jumps over the lazy dog")["input_ids"]
    n_new = 32
    hf_model.generation_config.eos_token_id = None  # compare 32 tokens without an early stop
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new,
                                   do_sample=False, pad_token_id=cfg.pad_token_id)
    hf_new = hf_out[0, len(prompt):].tolist()
    ours = generate_ar(model, prompt, max_new_tokens=n_new, prefill_chunk=CHUNK).tokens[0]
    assert ours == hf_new
