"""Parity of `Transformer` (loaded by `weights.load_target`) against Hugging Face transformers in
float32 on tiny random checkpoints: prefill and decode logits, chunked prefill, tree verification,
cache compaction, greedy generation, RoPE per kind, and sharded vs unsharded execution.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from longspec_jax import kv_cache as kvc
from longspec_jax import layers, sharding
from pallas_kernels.hybrid import causal_mask
from longspec_jax.kv_cache import KVCache
from longspec_jax.weights import load_target
from tests.hf_utils import make_hf_checkpoint

# Tolerances (float32, highest matmul precision): whole stack vs HF, one module vs HF, and two
# orderings of our own computation (chunked vs one-shot, sharded vs not).
ATOL_STACK = 1e-4
ATOL_MODULE = 1e-5
ATOL_SELF = 1e-5

# (kind, tie, rope): every kind, every rope kind, tied and untied, one sharded checkpoint.
CASES = [
    ("llama_mha", False, "default"),
    ("llama_gqa", True, "default"),
    ("qwen2", False, "default"),
    ("llama_gqa", False, "linear"),
    ("qwen2", True, "llama3"),
    ("llama_gqa", False, "dynamic"),
    ("llama_mqa", True, "linear"),
]


@functools.lru_cache(maxsize=None)
def _call_fn(graphdef):
    @functools.partial(jax.jit, donate_argnums=(3,))
    def fn(state, tokens, positions, cache, lengths, mask):
        model = nnx.merge(graphdef, state)
        h, cache = model(tokens, positions, cache, lengths, mask)
        return model.logits(h), cache

    return fn


def run(model, tokens, positions, cache, lengths, mask=None):
    """Jitted model call -> (logits [B,T,V] numpy, cache)."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    if mask is None:
        mask = causal_mask(*tokens.shape)
    logits, cache = _call_fn(graphdef)(state, tokens, positions, cache, jnp.asarray(lengths, jnp.int32), mask)
    return np.asarray(logits), cache


def arange_positions(batch, start, T):
    return np.broadcast_to(np.arange(start, start + T), (batch, T))


def reset_hf_rope(hf):
    """HF's dynamic RoPE keeps state across calls (its frequencies grow with the longest input seen):
    start each reference computation from a fresh rotary module of the same config."""
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=hf.config).to(next(hf.parameters()).device)


def hf_incremental(hf, ids, prompt_len):
    """HF logits for `ids` [B, N]: prefill of `prompt_len` tokens, then one token per step with the cache."""
    reset_hf_rope(hf)
    out = []
    with torch.no_grad():
        r = hf(torch.tensor(ids[:, :prompt_len]), use_cache=True)
        out.append(r.logits.numpy())
        # transformers renamed `past_key_values` to `cache` (5.2x deprecates the old name): use
        # whichever this version's forward takes, so the test runs on the CPU and GPU machines alike.
        name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        past = getattr(r, name)
        for t in range(prompt_len, ids.shape[1]):
            r = hf(torch.tensor(ids[:, t:t + 1]), use_cache=True, **{name: past})
            past = getattr(r, name)
            out.append(r.logits.numpy())
    return np.concatenate(out, axis=1)


def hf_full(hf, ids):
    reset_hf_rope(hf)
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@functools.lru_cache(maxsize=None)
def _load(parent, kind, tie, rope, sharded=False):
    path, hf = make_hf_checkpoint(parent, kind, tie=tie, rope=rope, sharded=sharded)
    model, cfg, tokenizer = load_target(path, dtype=jnp.float32)
    return path, hf, model, cfg, tokenizer


def _prompt_len(rope):
    # dynamic: go past max_position_embeddings (64) so the NTK rescaling is active.
    return 70 if rope == "dynamic" else 11


@pytest.mark.parametrize("kind,tie,rope", CASES)
def test_prefill_and_decode_match_hf(ckpt_dir, kind, tie, rope):
    _, hf, model, cfg, _ = _load(str(ckpt_dir), kind, tie, rope, kind == "qwen2" and not tie)
    B, P, steps = 2, _prompt_len(rope), 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (B, P + steps))
    ref = hf_incremental(hf, ids, P)

    cache = KVCache.init(cfg, B, P + steps + 3, jnp.float32)
    logits, cache = run(model, ids[:, :P], arange_positions(B, 0, P), cache, [0] * B)
    np.testing.assert_allclose(logits, ref[:, :P], atol=ATOL_STACK, rtol=0)
    for t in range(P, P + steps):
        logits, cache = run(model, ids[:, t:t + 1], arange_positions(B, t, 1), cache, [t] * B)
        np.testing.assert_allclose(logits, ref[:, t:t + 1], atol=ATOL_STACK, rtol=0, err_msg=f"decode step {t}")


FULL_MATRIX = [(k, t, r) for k in ("llama_mha", "llama_gqa", "llama_mqa", "qwen2") for t in (False, True)
               for r in ("default", "linear", "llama3", "dynamic") if (k, t, r) not in CASES]


@pytest.mark.slow
@pytest.mark.parametrize("kind,tie,rope", FULL_MATRIX)
def test_prefill_and_decode_match_hf_full_matrix(ckpt_dir, kind, tie, rope):
    """The rest of kind x tie x rope (CASES covers each value at least once in the fast run)."""
    test_prefill_and_decode_match_hf(ckpt_dir, kind, tie, rope)


def test_per_row_lengths_match_hf(ckpt_dir):
    """Rows at different lengths in one batch: each row equals HF run on that row alone."""
    _, hf, model, cfg, _ = _load(str(ckpt_dir), "qwen2", False, "default", True)
    rng = np.random.default_rng(1)
    lens = [5, 9]
    ids = rng.integers(0, cfg.vocab_size, (2, 12))
    cache = KVCache.init(cfg, 2, 16, jnp.float32)
    # Prefill 9 tokens in both rows (row 0's tail is garbage it will overwrite), then decode 3
    # tokens per row at that row's own length.
    _, cache = run(model, ids[:, :9], arange_positions(2, 0, 9), cache, [0, 0])
    new = rng.integers(0, cfg.vocab_size, (2, 3))
    logits, _ = run(model, new, np.stack([np.arange(l, l + 3) for l in lens]), cache, lens)
    for b, l in enumerate(lens):
        seq = np.concatenate([ids[b, :l], new[b]])[None]
        np.testing.assert_allclose(logits[b], hf_full(hf, seq)[0, l:], atol=ATOL_STACK, rtol=0)


def test_chunked_prefill_equals_one_shot(ckpt_dir):
    _, _, model, cfg, _ = _load(str(ckpt_dir), "llama_gqa", False, "linear")
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 23))
    one, _ = run(model, ids, arange_positions(2, 0, 23), KVCache.init(cfg, 2, 32, jnp.float32), [0, 0])
    cache = KVCache.init(cfg, 2, 32, jnp.float32)
    chunks = []
    for s in range(0, 23, 8):
        e = min(s + 8, 23)
        lg, cache = run(model, ids[:, s:e], arange_positions(2, s, e - s), cache, [s, s])
        chunks.append(lg)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), one, atol=ATOL_SELF, rtol=0)


def test_long_chunked_prefill_matches_hf(ckpt_dir):
    """Prefill chunks with enough query rows take the blockwise XLA prefix attention
    (pallas_kernels/xla_attention.py); the whole stack still matches HF's one-shot forward."""
    from pallas_kernels import xla_attention

    _, hf, model, cfg, _ = _load(str(ckpt_dir), "llama_mqa", True, "linear")
    G = cfg.num_heads // cfg.num_kv_heads
    chunk = -(-xla_attention.MIN_ROWS // G)
    n, capacity = 2 * chunk + 37, 640  # 128-slot key blocks: the loop runs several
    assert xla_attention.use_blockwise((2, chunk, cfg.num_heads, cfg.head_dim),
                                       (2, capacity, cfg.num_kv_heads, cfg.head_dim), None)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, n))
    cache = KVCache.init(cfg, 2, capacity, jnp.float32)
    logits = []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        lg, cache = run(model, ids[:, s:e], arange_positions(2, s, e - s), cache, [s, s])
        logits.append(lg)
    np.testing.assert_allclose(np.concatenate(logits, axis=1), hf_full(hf, ids), atol=ATOL_STACK, rtol=0)


def test_forward_train_matches_call(ckpt_dir):
    _, _, model, cfg, _ = _load(str(ckpt_dir), "qwen2", True, "llama3")
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 13))
    # Anchor-offset style positions: not contiguous from 0.
    pos = np.concatenate([np.arange(3), np.arange(3, 13) + 40])[None].repeat(2, 0)
    h, (k_last, v_last) = jax.jit(lambda m, t, p: m.forward_train(t, p))(model, ids, pos)
    logits, cache = run(model, ids, pos, KVCache.init(cfg, 2, 16, jnp.float32), [0, 0])
    np.testing.assert_allclose(np.asarray(model.logits(h)), logits, atol=ATOL_SELF, rtol=0)
    np.testing.assert_allclose(np.asarray(k_last), np.asarray(cache.k[-1][:, :13]), atol=ATOL_SELF, rtol=0)
    np.testing.assert_allclose(np.asarray(v_last), np.asarray(cache.v[-1][:, :13]), atol=ATOL_SELF, rtol=0)


# A 7-node tree: parents (root = node 0, the token after the prompt); BFS order.
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 3]


def _tree(parents):
    n = len(parents)
    mask = np.zeros((n, n), bool)
    depth = np.zeros(n, int)
    for u, p in enumerate(parents):
        if p >= 0:
            mask[u] = mask[p]
            depth[u] = depth[p] + 1
        mask[u, u] = True
    return mask, depth


def _path(parents, u):
    out = []
    while u >= 0:
        out.append(u)
        u = parents[u]
    return out[::-1]


@pytest.mark.parametrize("kind,tie,rope", [("llama_gqa", False, "default"), ("qwen2", True, "llama3")])
def test_tree_verification_matches_sequential_branches(ckpt_dir, kind, tie, rope):
    """Each tree node's logits equal HF's on prompt + the node's root-to-node path; after compacting an
    accepted branch into place, decoding continues exactly as HF on prompt + branch."""
    _, hf, model, cfg, _ = _load(str(ckpt_dir), kind, tie, rope)
    B, P = 2, 9
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, cfg.vocab_size, (B, P))
    tree_tok = rng.integers(0, cfg.vocab_size, (B, len(TREE_PARENTS)))
    mask, depth = _tree(TREE_PARENTS)
    cache = KVCache.init(cfg, B, P + len(TREE_PARENTS) + 2, jnp.float32)
    _, cache = run(model, prompt, arange_positions(B, 0, P), cache, [P - P] * B)
    logits, cache = run(model, tree_tok, P + np.broadcast_to(depth, (B, len(depth))), cache, [P] * B,
                        mask=jnp.broadcast_to(jnp.asarray(mask), (B,) + mask.shape))
    for u in range(len(TREE_PARENTS)):
        path = _path(TREE_PARENTS, u)
        seq = np.concatenate([prompt, tree_tok[:, path]], axis=1)
        np.testing.assert_allclose(logits[:, u], hf_full(hf, seq)[:, -1], atol=ATOL_STACK, rtol=0,
                                   err_msg=f"tree node {u}")

    # Accept branch 0 -> 1 -> 4 in row 0 and 0 -> 2 -> 5 in row 1, then decode one more token.
    branches = [[0, 1, 4], [0, 2, 5]]
    cache = kvc.compact(cache, jnp.array([P, P]), jnp.array(branches, jnp.int32), jnp.array([3, 3]))
    nxt = rng.integers(0, cfg.vocab_size, (B, 1))
    logits, _ = run(model, nxt, np.full((B, 1), P + 3), cache, [P + 3] * B)
    for b in range(B):
        seq = np.concatenate([prompt[b], tree_tok[b, branches[b]], nxt[b]])[None]
        np.testing.assert_allclose(logits[b, 0], hf_full(hf, seq)[0, -1], atol=ATOL_STACK, rtol=0)


def _greedy(model, cfg, prompt, n_new):
    """A minimal greedy loop over the model call (the real AR loop lives in infer/)."""
    B, P = prompt.shape
    cache = KVCache.init(cfg, B, P + n_new, jnp.float32)
    logits, cache = run(model, prompt, arange_positions(B, 0, P), cache, [0] * B)
    out = []
    for t in range(P, P + n_new):
        tok = logits[:, -1].argmax(-1)
        out.append(tok)
        logits, cache = run(model, tok[:, None], np.full((B, 1), t), cache, [t] * B)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("kind,tie,rope", [("llama_gqa", True, "default"), ("qwen2", False, "default"),
                                           ("llama_mha", False, "dynamic")])
def test_greedy_generation_equals_hf_generate(ckpt_dir, kind, tie, rope):
    _, hf, model, cfg, _ = _load(str(ckpt_dir), kind, tie, rope, kind == "qwen2" and not tie)
    P = 40 if rope == "dynamic" else 7  # dynamic: generation crosses max_position_embeddings = 64
    prompt = np.random.default_rng(5).integers(4, cfg.vocab_size, (2, P))
    ours = _greedy(model, cfg, prompt, 32)
    reset_hf_rope(hf)
    hf.generation_config.eos_token_id = None  # generate all 32 tokens, as our loop does
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False, pad_token_id=3,
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long)).numpy()[:, P:]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("rope", ["default", "linear", "llama3", "dynamic"])
def test_rope_matches_hf_rotary_embedding(ckpt_dir, rope):
    """cos/sin of `layers.rope_cos_sin` equal HF's rotary module (dynamic: past the original length)."""
    _, hf, model, cfg, _ = _load(str(ckpt_dir), "llama_gqa", False, rope) if rope != "llama3" else \
        _load(str(ckpt_dir), "qwen2", True, rope)
    for hi in (50, 200):
        pos = np.stack([np.arange(hi - 20, hi), np.arange(hi - 40, hi - 20)])
        reset_hf_rope(hf)
        with torch.no_grad():
            cos_ref, sin_ref = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.tensor(pos))
        cos, sin = layers.rope_cos_sin(cfg.rope, cfg.head_dim, jnp.asarray(pos))
        np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=ATOL_MODULE, rtol=0)
        np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=ATOL_MODULE, rtol=0)


def test_rmsnorm_matches_hf(ckpt_dir):
    _, hf, model, cfg, _ = _load(str(ckpt_dir), "llama_gqa", False, "default")
    x = np.random.default_rng(6).standard_normal((2, 5, cfg.hidden_size)).astype(np.float32) * 3
    with torch.no_grad():
        ref = hf.model.layers[0].input_layernorm(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(model.layers[0].input_norm(jnp.asarray(x))), ref, atol=ATOL_MODULE, rtol=0)


def test_sharded_model_matches_unsharded(ckpt_dir):
    """(data=2, fsdp=2, tensor=2) over the 8 fake CPU devices gives the unsharded logits."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes them on CPU)")
    path, _, model, cfg, _ = _load(str(ckpt_dir), "qwen2", False, "default", True)
    mesh = sharding.make_mesh(2, 2, 2)
    sharded, _, _ = load_target(path, dtype=jnp.float32, mesh=mesh, with_tokenizer=False)
    q = sharded.layers[0].attn.q_kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    B, P = 4, 10
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, (B, P + 1))
    ref, ref_cache = run(model, ids[:, :P], arange_positions(B, 0, P), KVCache.init(cfg, B, 16, jnp.float32), [0] * B)
    ref_step, _ = run(model, ids[:, P:], arange_positions(B, P, 1), ref_cache, [P] * B)
    cache = KVCache.init(cfg, B, 16, jnp.float32,
                         sharding=sharding.cache_sharding(mesh, shape=(B, 16, cfg.num_kv_heads, cfg.head_dim)))
    assert cache.k[0].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    out, cache = run(sharded, ids[:, :P], arange_positions(B, 0, P), cache, [0] * B)
    step, _ = run(sharded, ids[:, P:], arange_positions(B, P, 1), cache, [P] * B)
    np.testing.assert_allclose(out, ref, atol=ATOL_SELF, rtol=0)
    np.testing.assert_allclose(step, ref_step, atol=ATOL_SELF, rtol=0)


def test_bfloat16_load_runs(ckpt_dir):
    """bf16 parameters and compute: finite logits close to float32 (loose: bf16 has 8 mantissa bits)."""
    path, _, model32, cfg, _ = _load(str(ckpt_dir), "llama_gqa", False, "default")
    model, _, _ = load_target(path, dtype=jnp.bfloat16, with_tokenizer=False)
    assert model.layers[0].attn.q_kernel.get_value().dtype == jnp.bfloat16
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, (1, 6))
    lg, cache = run(model, ids, arange_positions(1, 0, 6), KVCache.init(cfg, 1, 8, jnp.bfloat16), [0])
    ref, _ = run(model32, ids, arange_positions(1, 0, 6), KVCache.init(cfg, 1, 8, jnp.float32), [0])
    assert lg.dtype == np.float32 and cache.k[0].dtype == jnp.bfloat16
    assert np.isfinite(lg).all()
    assert np.abs(lg - ref).max() < 0.1 * np.abs(ref).max()


def test_sharding_rules_refuse_collisions_and_replicate_indivisible_dims():
    with pytest.raises(sharding.ShardingError, match="'tensor' would shard both 'embed' and 'mlp'"):
        sharding.logical_to_spec(("embed", "mlp"), {"embed": ("tensor",), "mlp": ("tensor",)})
    with pytest.raises(sharding.ShardingError, match="unknown mesh axes"):
        sharding.check_rules({"embed": ("model",)})
    with pytest.raises(sharding.ShardingError, match="no sharding rule"):
        sharding.logical_to_spec(("experts",))
    if len(jax.devices()) >= 8:
        mesh = sharding.make_mesh(2, 2, 2)
        # 3 kv heads do not divide over tensor=2: that dimension is replicated, the others stay sharded.
        spec = sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), shape=(64, 3, 16), mesh=mesh)
        assert spec == jax.sharding.PartitionSpec("fsdp", None, None)
