"""Fused q|k|v and gate|up projections (`transformer.fuse_projections`, what `Decoder` runs): the
same outputs as the separate layout on fresh random inputs (Llama GQA / MQA, Qwen2 biases, the
draft's MLP), idempotent, exactly undone by `unfuse_projections`, sharded over "tensor" on a mesh
with the single-device outputs, refused by the savers, and applied by `Decoder` in place.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longspec_jax import init, sharding
from longspec_jax.configs import DraftConfig, tiny_config
from longspec_jax.draft_weights import save_draft
from longspec_jax.infer.decoder import Decoder
from longspec_jax.kv_cache import KVCache
from longspec_jax.transformer import fuse_projections, is_fused, unfuse_projections
from longspec_jax.weights import load_params, save_target

# float32, "highest" matmul precision (conftest): the fused matmul computes every output element as
# the same dot product, so fused and separate differ at most by the summation order of one GEMM.
ATOL_SELF = 1e-5

# name -> (num_heads, num_kv_heads, attention_bias): GQA, MQA (K = 1), Qwen2-like biases with GQA.
CONFIGS = {"llama_gqa": (8, 2, False), "llama_mqa": (4, 1, False), "qwen2_gqa": (8, 4, True)}
VOCAB = 96


def _cfg(name):
    heads, kv_heads, bias = CONFIGS[name]
    return tiny_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=8, attention_bias=bias, eos_token_ids=())


def _copy(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state, copy=True)


def _arrays(model):
    return {path: np.asarray(var.get_value()) for path, var in sharding.iter_params(model)}


def _inputs(seed, B=2, P=6, T=4):
    """Prompt tokens [B, P], then T tree tokens under a random ancestor mask (diagonal kept)."""
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(0, VOCAB, (B, P)), jnp.int32)
    tree = jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32)
    mask = np.tril(rng.random((B, T, T)) < 0.6) | np.eye(T, dtype=bool)
    return prompt, tree, jnp.asarray(mask)


def _forward(model, prompt, tree, mask, cache_sharding=None):
    """(prefill logits, tree logits, cache) of a prefill then a masked tree call, jitted."""
    cfg = model.cfg
    B, P = prompt.shape
    T = tree.shape[1]
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, prompt, tree, mask, cache):
        m = nnx.merge(graphdef, state)
        h, cache = m(prompt, jnp.broadcast_to(jnp.arange(P), (B, P)), cache, jnp.zeros(B, jnp.int32))
        first = m.logits(h)
        depth = jnp.sum(mask, axis=-1) - 1 + P  # tree positions: the prompt length plus the depth
        h, cache = m(tree, depth.astype(jnp.int32), cache, jnp.full(B, P, jnp.int32), mask)
        return first, m.logits(h), cache

    cache = KVCache.init(cfg, B, P + T, jnp.float32, sharding=cache_sharding)
    return run(state, prompt, tree, mask, cache), run


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_target_matches_separate(name):
    cfg = _cfg(name)
    model = init.random_target(cfg, seed=1, std=0.2)
    fused = fuse_projections(_copy(model))
    attn, mlp = fused.layers[0].attn, fused.layers[0].mlp
    K, G = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    assert attn.qkv_kernel[...].shape == (cfg.hidden_size, K, G + 2, cfg.head_dim)
    assert mlp.gate_up_kernel[...].shape == (cfg.hidden_size, 2, cfg.intermediate_size)
    assert hasattr(attn, "qkv_bias") == cfg.attention_bias
    assert not any(re.search(r"\.(q|k|v)_(kernel|bias)$|\.(gate|up)_kernel$", p) for p in _arrays(fused))

    prompt, tree, mask = _inputs(seed=2)
    (ref_first, ref_tree, ref_cache), _ = _forward(model, prompt, tree, mask)
    (first, tree_logits, cache), _ = _forward(fused, prompt, tree, mask)
    np.testing.assert_allclose(np.asarray(first), np.asarray(ref_first), atol=ATOL_SELF, rtol=0)
    np.testing.assert_allclose(np.asarray(tree_logits), np.asarray(ref_tree), atol=ATOL_SELF, rtol=0)
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL_SELF, rtol=0)


def test_fused_draft_matches_separate():
    """The draft's MLP is fused (its self-attention stays separate, see `Draft`)."""
    cfg = _cfg("llama_gqa")
    target = init.random_target(cfg, seed=3, std=0.2)
    draft = init.random_draft(DraftConfig.from_target(cfg, window=4), cfg.rope, seed=4, std=0.2)
    fused = fuse_projections(_copy(draft))
    assert fused.mlp.fused and not draft.mlp.fused
    assert hasattr(fused.self_attn, "q_kernel")
    tokens, _, _ = _inputs(seed=5, P=9)
    positions = jnp.broadcast_to(jnp.arange(9), tokens.shape)
    _, (k_last, v_last) = target.forward_train(tokens, positions)
    outs = [d.forward_train(tokens, positions, k_last, v_last, 2, embed=target.embed) for d in (draft, fused)]
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), atol=ATOL_SELF, rtol=0)


def test_fuse_is_idempotent_and_unfuse_restores_exactly():
    cfg = _cfg("qwen2_gqa")
    model = init.random_target(cfg, seed=6, std=0.2)
    original = _arrays(model)
    assert not is_fused(model)
    fuse_projections(model)
    once = _arrays(model)
    graphdef = nnx.graphdef(model)
    assert fuse_projections(model) is model and is_fused(model)
    assert nnx.graphdef(model) == graphdef
    twice = _arrays(model)
    assert once.keys() == twice.keys() and all(np.array_equal(once[k], twice[k]) for k in once)
    # Query head n = k * G + g of the separate layout is slot g of KV head k in the fused one.
    G = cfg.num_heads // cfg.num_kv_heads
    np.testing.assert_array_equal(once["layers.1.attn.qkv_kernel"][:, 1, G], original["layers.1.attn.k_kernel"][:, 1])
    np.testing.assert_array_equal(once["layers.1.attn.qkv_kernel"][:, 1, 0],
                                  original["layers.1.attn.q_kernel"][:, G])
    np.testing.assert_array_equal(once["layers.0.attn.qkv_bias"][0, G + 1], original["layers.0.attn.v_bias"][0])

    unfuse_projections(model)
    unfuse_projections(model)
    restored = _arrays(model)
    assert not is_fused(model) and restored.keys() == original.keys()
    assert all(np.array_equal(restored[k], original[k]) for k in original)


def test_fused_model_on_a_tensor_parallel_mesh():
    """Fusing a placed model keeps it split over "tensor" (each device's q, k, v and gate, up stay
    together: no collective added), with the single-device outputs."""
    cfg = _cfg("qwen2_gqa")
    model = init.random_target(cfg, seed=7, std=0.2)
    prompt, tree, mask = _inputs(seed=8)
    (ref_first, ref_tree, _), _ = _forward(model, prompt, tree, mask)

    mesh = sharding.tensor_parallel_mesh(2)
    placed = sharding.place_for_inference(model, mesh)
    fused = fuse_projections(_copy(placed))
    attn, mlp = fused.layers[0].attn, fused.layers[0].mlp
    # [D, K, G+2, H] over kv heads, [K, G+2, H] likewise, [D, 2, F] over F ("embed" -> "fsdp", size 1).
    assert tuple(attn.qkv_kernel[...].sharding.spec) == ("fsdp", "tensor", None, None)
    assert tuple(attn.qkv_bias[...].sharding.spec) == ("tensor", None, None)
    assert tuple(mlp.gate_up_kernel[...].sharding.spec) == ("fsdp", None, "tensor")
    K, G = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    assert {s.data.shape for s in attn.qkv_kernel[...].addressable_shards} == {(64, K // 2, G + 2, 8)}
    assert not is_fused(model) and not is_fused(placed)

    B, S = prompt.shape[0], prompt.shape[1] + tree.shape[1]
    cache_sharding = sharding.cache_sharding(mesh, shape=(B, S, K, cfg.head_dim))
    collectives = []
    with jax.set_mesh(mesh):
        for m in (placed, fused):
            (first, tree_logits, cache), fn = _forward(m, prompt, tree, mask, cache_sharding)
            np.testing.assert_allclose(np.asarray(first), np.asarray(ref_first), atol=ATOL_SELF, rtol=0)
            np.testing.assert_allclose(np.asarray(tree_logits), np.asarray(ref_tree), atol=ATOL_SELF, rtol=0)
            assert all(buf.sharding.spec[2] == "tensor" for buf in cache.k + cache.v)
            state = nnx.split(m)[1]
            hlo = fn.lower(state, prompt, tree, mask, KVCache.init(cfg, B, S, jnp.float32, sharding=cache_sharding)
                           ).compile().as_text()
            collectives.append(len(re.findall(r"(all-gather|all-to-all|collective-permute)(-start)?\(", hlo)))
    assert collectives[1] <= collectives[0], collectives


def test_savers_and_loader_refuse_a_fused_model(tmp_path):
    cfg = _cfg("llama_gqa")
    target = fuse_projections(init.random_target(cfg, seed=9))
    draft = fuse_projections(init.random_draft(DraftConfig.from_target(cfg, window=4), cfg.rope, seed=10))
    with pytest.raises(ValueError, match=r"save_target: .*fused.*unfuse_projections\(model\)"):
        save_target(target, cfg, str(tmp_path / "target"))
    with pytest.raises(ValueError, match=r"draft_state_dict: .*fused.*unfuse_projections"):
        save_draft(draft, str(tmp_path / "draft"), target_cfg=cfg)
    assert not (tmp_path / "target").exists() and not (tmp_path / "draft").exists()
    save_draft(unfuse_projections(draft), str(tmp_path / "draft"), target_cfg=cfg)
    save_target(unfuse_projections(target), cfg, str(tmp_path / "target"))
    with pytest.raises(ValueError, match=r"load_params: .*fused.*unfuse_projections"):  # loading refuses too
        load_params(fuse_projections(target), str(tmp_path / "target"), cfg)


def test_decoder_fuses_in_place():
    """A Decoder fuses the models it is given (same tokens as before: the lossless tests); with a
    mesh it fuses its placed copies and leaves the caller's models alone."""
    cfg = _cfg("llama_gqa")
    target = init.random_target(cfg, seed=11, std=0.2)
    draft = init.random_draft(DraftConfig.from_target(cfg, window=4), cfg.rope, seed=12)
    Decoder(target, draft, tree_shape=(2, 2), mesh=sharding.tensor_parallel_mesh(2))
    assert not is_fused(target) and not is_fused(draft)
    decoder = Decoder(target, draft, tree_shape=(2, 2))
    assert is_fused(target) and draft.mlp.fused and decoder.target is target
