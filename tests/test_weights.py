"""Checkpoint loading: the strict checks each refuse with a CheckpointError that names the problem,
repo ids resolve offline, sharded checkpoints load, and save_target round-trips through HF."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from longspec_jax import hub, weights
from longspec_jax.kv_cache import KVCache
from longspec_jax.weights import CheckpointError, load_target, save_target
from tests.hf_utils import make_hf_checkpoint
from tests.hub_utils import cache_snapshot

ATOL_STACK = 1e-4  # float32 whole-model parity vs HF


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    path, hf = make_hf_checkpoint(tmp_path_factory.mktemp("base"), "qwen2", tie=False, rope="default")
    return path, hf


@pytest.fixture
def ckpt(base_ckpt, tmp_path):
    """A fresh, writable copy of a valid checkpoint for each test to break."""
    dst = str(tmp_path / "ckpt")
    shutil.copytree(base_ckpt[0], dst)
    return dst


def _edit_tensors(path, fn):
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _logits(model, cfg, ids):
    cache = KVCache.init(cfg, ids.shape[0], ids.shape[1], jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    h, _ = jax.jit(lambda m, t, p, c: m(t, p, c, jnp.zeros(ids.shape[0], jnp.int32)))(model, ids, pos, cache)
    return np.asarray(model.logits(h))


def test_valid_checkpoint_loads(ckpt):
    model, cfg, tok = load_target(ckpt, dtype=jnp.float32)
    assert cfg.family == "qwen2" and cfg.attention_bias and len(tok) == cfg.vocab_size
    assert model.layers[1].attn.k_bias.get_value().shape == (cfg.num_kv_heads, cfg.head_dim)


def test_missing_weights_file(ckpt):
    os.remove(os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_target(ckpt)


def test_missing_shard_listed_in_index(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama_gqa", sharded=True)
    index = json.load(open(os.path.join(path, weights.INDEX_FILE)))
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(path, gone))
    with pytest.raises(CheckpointError, match=gone):
        load_target(path)


def test_truncated_safetensors(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt).*re-download"):
        load_target(ckpt)


def test_wrong_shape(ckpt):
    key = "model.layers.1.self_attn.k_proj.weight"
    _edit_tensors(ckpt, lambda t: t.__setitem__(key, t[key][:-1]))
    with pytest.raises(CheckpointError, match=rf"{key}.*shape"):
        load_target(ckpt)


def test_extra_key(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", np.ones(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_target(ckpt)


def test_missing_key(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_target(ckpt)


def test_layer_beyond_config(ckpt):
    src = "model.layers.0.input_layernorm.weight"
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.7.input_layernorm.weight", t[src]))
    with pytest.raises(CheckpointError, match=r"model\.layers\.7.*num_hidden_layers"):
        load_target(ckpt)


def test_integer_tensor(ckpt):
    key = "model.norm.weight"
    _edit_tensors(ckpt, lambda t: t.__setitem__(key, t[key].astype(np.int32)))
    with pytest.raises(CheckpointError, match=rf"{key}.*dtype I32"):
        load_target(ckpt)


def test_bias_in_a_config_without_bias(tmp_path):
    """Weights with q/k/v biases under a Llama config that says attention_bias=false: unmapped keys."""
    path, _ = make_hf_checkpoint(tmp_path, "llama_gqa")
    cfg = json.load(open(os.path.join(path, "config.json")))
    _edit_tensors(path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias",
                                                np.zeros(cfg["hidden_size"], np.float32)))
    with pytest.raises(CheckpointError, match=r"q_proj\.bias.*attention_bias=False"):
        load_target(path)


def test_unknown_rope_scaling_type(ckpt):
    p = os.path.join(ckpt, "config.json")
    cfg = json.load(open(p))
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                              "original_max_position_embeddings": 64}
    json.dump(cfg, open(p, "w"))
    with pytest.raises(CheckpointError, match=r"config\.json.*'yarn'.*not supported"):
        load_target(ckpt)


def test_tokenizer_larger_than_vocab(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama_gqa", tokenizer_vocab=140)
    with pytest.raises(CheckpointError, match=r"140 tokens.*vocab_size=128"):
        load_target(path)


def test_missing_tokenizer(ckpt):
    os.remove(os.path.join(ckpt, "tokenizer.json"))
    os.remove(os.path.join(ckpt, "tokenizer_config.json"))
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_target(ckpt)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_target(str(tmp_path / "nope"))


def test_repo_id_not_in_cache_lists_missing_files(tmp_path):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    with pytest.raises(CheckpointError) as e:
        hub.resolve_checkpoint("someone/absent-model", cache_dir=str(cache))
    msg = str(e.value)
    for needed in ("config.json", "model.safetensors", "tokenizer_config.json", str(cache),
                   "huggingface-cli download someone/absent-model --local-dir DIR", "--checkpoint DIR"):
        assert needed in msg, (needed, msg)


def test_repo_id_resolves_from_cache(base_ckpt, tmp_path):
    snap = cache_snapshot(tmp_path / "hf-cache", "org/tiny", base_ckpt[0])
    assert os.path.samefile(hub.resolve_checkpoint("org/tiny", cache_dir=str(tmp_path / "hf-cache")), snap)


def test_repo_id_partially_cached(base_ckpt, tmp_path):
    cache_snapshot(tmp_path / "hf-cache", "org/tiny", base_ckpt[0], skip=("model.safetensors",))
    with pytest.raises(CheckpointError, match=r"missing \['model\.safetensors"):
        hub.resolve_checkpoint("org/tiny", cache_dir=str(tmp_path / "hf-cache"))


def test_sharded_checkpoint_matches_single_file(tmp_path):
    single, hf = make_hf_checkpoint(tmp_path, "llama_gqa", tie=True, seed=3)
    sharded, _ = make_hf_checkpoint(tmp_path, "llama_gqa", tie=True, seed=3, sharded=True)
    assert os.path.exists(os.path.join(sharded, weights.INDEX_FILE))
    m1, cfg, _ = load_target(single, dtype=jnp.float32)
    m2, _, _ = load_target(sharded, dtype=jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 6)))
    np.testing.assert_array_equal(_logits(m1, cfg, ids), _logits(m2, cfg, ids))


@pytest.mark.parametrize("max_shard_bytes", [None, 60_000])
def test_save_target_round_trips_through_hf(base_ckpt, tmp_path, max_shard_bytes):
    """save_target output loads in transformers (same logits as the source HF model) and in ours."""
    import transformers

    src, hf = base_ckpt
    model, cfg, tok = load_target(src, dtype=jnp.float32)
    out = save_target(model, cfg, str(tmp_path / "export"), tokenizer=tok, max_shard_bytes=max_shard_bytes)
    assert os.path.exists(os.path.join(out, weights.INDEX_FILE)) == bool(max_shard_bytes)
    assert os.listdir(tmp_path) == ["export"]  # no temporary directory left beside it
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7))
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                    attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
        again = reloaded_hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(again, ref, atol=ATOL_STACK, rtol=0)
    model2, cfg2, _ = load_target(out, dtype=jnp.float32)
    assert cfg2 == cfg
    np.testing.assert_allclose(_logits(model2, cfg, jnp.asarray(ids)), ref, atol=ATOL_STACK, rtol=0)


def test_old_llama_inv_freq_buffers_are_ignored(ckpt):
    want, _, _ = load_target(ckpt, dtype=jnp.float32, with_tokenizer=False)
    _edit_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                np.ones(8, np.float32)))
    got, _, _ = load_target(ckpt, dtype=jnp.float32, with_tokenizer=False)
    for a, b in zip(jax.tree.leaves(nnx.state(want)), jax.tree.leaves(nnx.state(got))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tensor_stored_in_two_shards(tmp_path):
    path, _ = make_hf_checkpoint(tmp_path, "llama_gqa", sharded=True)
    index = json.load(open(os.path.join(path, weights.INDEX_FILE)))["weight_map"]
    key = "model.norm.weight"
    other = next(f for f in sorted(set(index.values())) if f != index[key])
    tensors = load_file(os.path.join(path, other))
    tensors[key] = load_file(os.path.join(path, index[key]))[key]
    save_file(tensors, os.path.join(path, other), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored twice"):
        load_target(path)


def test_save_target_replaces_a_checkpoint_whole(base_ckpt, tmp_path):
    """A sharded save then a single-file save into one directory: no stale shard or index survives
    (the loader would read the index first); overwrite=False refuses and leaves the files alone."""
    model, cfg, tok = load_target(base_ckpt[0], dtype=jnp.float32)
    out = str(tmp_path / "export")
    save_target(model, cfg, out, tokenizer=tok, max_shard_bytes=60_000)
    assert os.path.exists(os.path.join(out, weights.INDEX_FILE))
    save_target(model, cfg, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["export"]
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    with pytest.raises(CheckpointError, match=r"export is not empty \(config\.json, model\.safetensors\); choose a "
                                              r"new directory, or replace it .* --force"):
        save_target(model, cfg, out, overwrite=False)
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


def test_failed_save_leaves_nothing(base_ckpt, tmp_path, monkeypatch):
    model, cfg, _ = load_target(base_ckpt[0], dtype=jnp.float32, with_tokenizer=False)
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_target(model, cfg, str(out), max_shard_bytes=60_000)
    assert sorted(os.listdir(tmp_path)) == ["export"] and os.listdir(out) == ["config.json"]
    assert (out / "config.json").read_text() == "{}"


@pytest.mark.parametrize("entry,message", [("file", "exists and is a file"), ("subdir", "holds subdirectories")])
def test_output_directory_refusals(tmp_path, entry, message):
    if entry == "file":
        target = tmp_path / "out"
        target.write_text("not a directory")
    else:
        target = tmp_path
        (tmp_path / "notes").mkdir()
    with pytest.raises(CheckpointError, match=message):
        hub.check_output_dir(target, overwrite=True)


def test_draft_kind_needs_a_weight_file_not_a_tokenizer(tmp_path):
    """A cached draft (config.json + pytorch_model.bin, no tokenizer) resolves as a draft, not as a target."""
    src = tmp_path / "draft"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"")
    cache = tmp_path / "hf-cache"
    snap = cache_snapshot(cache, "org/draft", src)
    assert os.path.samefile(hub.resolve_checkpoint("org/draft", kind="draft", cache_dir=str(cache)), snap)
    with pytest.raises(CheckpointError, match=r"target checkpoint 'org/draft' is not available offline: missing "
                                              r"\['model\.safetensors .*tokenizer_config\.json"):
        hub.resolve_checkpoint("org/draft", cache_dir=str(cache))
    os.remove(os.path.join(snap, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match=r"(?s)draft checkpoint 'org/draft' is not available offline: missing "
                                              r"\['model\.safetensors or pytorch_model\.bin or "
                                              r"draft_model_weights\.pth'\].*--draft DIR"):
        hub.resolve_checkpoint("org/draft", kind="draft", cache_dir=str(cache))
