"""Draft checkpoints in the released sail/longspec format: safetensors and torch state dicts with
the original key names (prefixes, dead cross k/v), round trips, strict errors, the converter."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longspec_jax.configs import ConfigError, DraftConfig, tiny_config, to_hf_config
from longspec_jax.draft import Draft
from longspec_jax import draft_weights as dw

CFG = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, head_dim=8)
F = 40  # the draft's own intermediate size (differs from the target's on purpose)


def _draft(seed=0):
    return Draft(DraftConfig.from_target(CFG, intermediate_size=F), CFG.rope, rngs=nnx.Rngs(seed),
                 dtype=jnp.float32, param_dtype=jnp.float32)


def _sail_state_dict(seed=0):
    """A state dict built with the ORIGINAL layout (PyTorch [out, in] weights), independently of
    draft_state_dict, plus the dead cross-attention k/v tensors."""
    rng = np.random.default_rng(seed)
    D, N, K, H = CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    shapes = {
        "input_layernorm.weight": (D,), "post_self_attention_layernorm.weight": (D,),
        "post_cross_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (N * H, D), "self_attn.q_proj.bias": (N * H,),
        "self_attn.k_proj.weight": (K * H, D), "self_attn.k_proj.bias": (K * H,),
        "self_attn.v_proj.weight": (K * H, D), "self_attn.v_proj.bias": (K * H,),
        "self_attn.o_proj.weight": (D, N * H),
        "cross_attn.q_proj.weight": (N * H, D), "cross_attn.q_proj.bias": (N * H,),
        "cross_attn.k_proj.weight": (K * H, D), "cross_attn.k_proj.bias": (K * H,),
        "cross_attn.v_proj.weight": (K * H, D), "cross_attn.v_proj.bias": (K * H,),
        "cross_attn.o_proj.weight": (D, N * H),
        "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
    }
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _write_config(d, **over):
    hf = to_hf_config(CFG.replace(intermediate_size=F))
    hf.update(over)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf, f)


def _check_against_state_dict(draft, sd):
    """Spot-check the transposes: q projection and o projection act like torch Linear."""
    x = np.random.default_rng(1).normal(size=(CFG.hidden_size,)).astype(np.float32)
    q_ours = np.einsum("d,dnh->nh", x, np.asarray(draft.self_attn.q_kernel.value)).reshape(-1)
    np.testing.assert_allclose(q_ours, sd["self_attn.q_proj.weight"] @ x, rtol=1e-5, atol=1e-5)
    o_in = np.random.default_rng(2).normal(size=(CFG.num_heads, CFG.head_dim)).astype(np.float32)
    o_ours = np.einsum("nh,nhd->d", o_in, np.asarray(draft.cross_attn.o_kernel.value))
    np.testing.assert_allclose(o_ours, sd["cross_attn.o_proj.weight"] @ o_in.reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(draft.mlp.down_kernel.value), sd["mlp.down_proj.weight"].T)
    np.testing.assert_allclose(np.asarray(draft.self_attn.k_bias.value).reshape(-1), sd["self_attn.k_proj.bias"])


def test_safetensors_sail_layout(tmp_path):
    from safetensors.numpy import save_file

    sd = _sail_state_dict()
    d = tmp_path / "ckpt"
    _write_config(d)
    save_file({f"model.{k}": v for k, v in sd.items()}, str(d / "model.safetensors"))
    draft = dw.load_draft(d, CFG, dtype=jnp.float32)
    assert draft.cfg.intermediate_size == F
    _check_against_state_dict(draft, sd)


@pytest.mark.parametrize("name,prefix", [("pytorch_model.bin", "glide."), ("draft_model_weights.pth", "")])
def test_torch_state_dicts(tmp_path, name, prefix):
    torch = pytest.importorskip("torch")
    sd = _sail_state_dict(3)
    d = tmp_path / "ckpt"
    os.makedirs(d)
    torch.save({prefix + k: torch.from_numpy(v).to(torch.bfloat16 if "mlp" in k else torch.float32)
                for k, v in sd.items()}, str(d / name))
    if name == "pytorch_model.bin":
        _write_config(d)
    draft = dw.load_draft(d, CFG, dtype=jnp.float32)  # without config.json: shapes from target + tensors
    sd["mlp.down_proj.weight"] = np.asarray(
        torch.from_numpy(sd["mlp.down_proj.weight"]).to(torch.bfloat16).float().numpy())
    _check_against_state_dict(draft, sd)


def test_save_load_round_trip_and_converter(tmp_path):
    torch = pytest.importorskip("torch")
    draft = _draft(5)
    dw.save_draft(draft, tmp_path / "out", target_cfg=CFG)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    back = dw.load_draft(tmp_path / "out", CFG, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(nnx.state(draft)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the CLI default of infer.generate: no target config given, read from the checkpoint
    assert dw.load_draft(tmp_path / "out", dtype=jnp.float32).cfg == back.cfg
    # converter: torch .pth (training export, draft_model. prefix) -> safetensors directory
    sd = {f"draft_model.{k}": torch.from_numpy(np.array(v)) for k, v in dw.draft_state_dict(draft).items()}
    torch.save(sd, str(tmp_path / "draft_model_weights.pth"))
    _write_config(tmp_path / "target")
    from longspec_jax.infer import convert_draft

    rc = convert_draft.main([str(tmp_path / "draft_model_weights.pth"), str(tmp_path / "conv"),
                             "--target", str(tmp_path / "target" / "config.json"), "--dtype", "float32"])
    assert rc == 0
    conv = dw.load_draft(tmp_path / "conv", CFG, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(nnx.state(draft)), jax.tree.leaves(nnx.state(conv))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _saved(tmp_path, sd, **config_over):
    from safetensors.numpy import save_file

    d = tmp_path / "bad"
    _write_config(d, **config_over)
    save_file(sd, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 48, "hidden_size: draft 48 vs target 32"),
    ("num_attention_heads", 8, "num_attention_heads: draft 8 vs target 4"),
    ("num_key_value_heads", 4, "num_key_value_heads: draft 4 vs target 2"),
    ("vocab_size", 100, "vocab_size: draft 100 vs target 64"),
])
def test_config_mismatch_is_named(tmp_path, field, value, message):
    d = _saved(tmp_path, _sail_state_dict(), **{field: value})
    with pytest.raises(ConfigError, match=message):
        dw.load_draft(d, CFG)


def test_tensor_errors_are_named(tmp_path):
    sd = _sail_state_dict()
    missing = dict(sd)
    del missing["mlp.up_proj.weight"]
    with pytest.raises(dw.DraftWeightsError, match=r"missing tensors \['mlp.up_proj.weight'\]"):
        dw.load_draft(_saved(tmp_path, missing), CFG)
    extra = dict(sd, **{"lm_head.weight": np.zeros((64, 32), np.float32)})
    with pytest.raises(dw.DraftWeightsError, match="unexpected tensors.*lm_head.weight"):
        dw.load_draft(_saved(tmp_path, extra), CFG)
    shaped = dict(sd, **{"self_attn.k_proj.bias": np.zeros((8,), np.float32)})
    with pytest.raises(dw.DraftWeightsError, match=r"self_attn.k_proj.bias: file \(8,\) vs expected \(16,\)"):
        dw.load_draft(_saved(tmp_path, shaped), CFG)
    dup = dict(sd, **{"model.mlp.up_proj.weight": sd["mlp.up_proj.weight"]})
    with pytest.raises(dw.DraftWeightsError, match="duplicate"):
        dw.load_draft(_saved(tmp_path, dup), CFG)
    with pytest.raises(dw.DraftWeightsError, match="holds none of"):
        dw.load_draft(tmp_path / "nothing" if os.makedirs(tmp_path / "nothing") is None else None, CFG)


# ------------------------------------------------------------------------------------------------
# the converter's refusals and what it writes


def _pth(tmp_path, prefix="draft_model.", seed=5, name="draft_model_weights.pth"):
    """A training-style torch state dict of a random draft; returns (path, draft)."""
    torch = pytest.importorskip("torch")
    draft = _draft(seed)
    path = tmp_path / name
    torch.save({prefix + k: torch.from_numpy(np.array(v)) for k, v in dw.draft_state_dict(draft).items()}, str(path))
    return path, draft


def _convert(tmp_path, *argv):
    from longspec_jax.infer import convert_draft

    _write_config(tmp_path / "target")
    return convert_draft.main([*map(str, argv), "--target", str(tmp_path / "target" / "config.json"),
                               "--dtype", "float32"])


def _same_params(a, b):
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("prefix", ["module.", "module.draft_model."])
def test_deepspeed_prefixes_are_stripped(tmp_path, prefix):
    path, draft = _pth(tmp_path, prefix)
    assert _convert(tmp_path, path, tmp_path / "conv") == 0
    _same_params(draft, dw.load_draft(tmp_path / "conv", CFG, dtype=jnp.float32))


def _snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d))}


def test_converter_refuses_a_non_empty_output_unless_forced(tmp_path, capsys):
    path, draft = _pth(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "draft_vocab.json").write_text('{"ids": [1, 2, 3]}')  # built for other weights
    before = _snapshot(out)
    assert _convert(tmp_path, path, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: output directory") and "is not empty (config.json, draft_vocab.json)" in err
    assert "--force" in err and _snapshot(out) == before
    assert _convert(tmp_path, path, out, "--force") == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # the stale vocabulary is gone
    _same_params(draft, dw.load_draft(out, CFG, dtype=jnp.float32))
    assert sorted(os.listdir(tmp_path)) == ["draft_model_weights.pth", "out", "target"]  # no temporary left


def test_converter_ships_the_inputs_own_draft_vocab(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path, _ = _pth(src)
    (src / "draft_vocab.json").write_text('{"ids": [0, 5, 9]}')
    assert _convert(tmp_path, path, tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "draft_vocab.json").read_text()) == {"ids": [0, 5, 9]}
    (src / "draft_vocab.json").write_text('{"ids": [0, 5, 640]}')  # outside the 64-token target vocabulary
    assert _convert(tmp_path, path, tmp_path / "out2") == 2
    assert not os.path.exists(tmp_path / "out2")


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, capsys):
    import safetensors.flax

    path, _ = _pth(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.flax, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _convert(tmp_path, path, out, "--force")
    assert _snapshot(out) == {"model.safetensors": b"old weights"}
    assert sorted(os.listdir(tmp_path)) == ["draft_model_weights.pth", "out", "target"]


def test_converter_input_errors(tmp_path, capsys):
    path, _ = _pth(tmp_path)
    (tmp_path / "existing").write_text("a file")
    assert _convert(tmp_path, path, tmp_path / "existing") == 2
    assert "existing exists and is a file, not a directory; choose another output directory" in capsys.readouterr().err
    assert (tmp_path / "existing").read_text() == "a file"
    notes = tmp_path / "notes.pth"
    notes.write_text("these are my notes, not weights\n")
    assert _convert(tmp_path, notes, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "notes.pth is not a PyTorch file (torch.save writes a zip archive; this file starts with b'these ar')" in err
    assert not os.path.exists(tmp_path / "o")
    (tmp_path / "notes.safetensors").write_text("not weights either\n")
    assert _convert(tmp_path, tmp_path / "notes.safetensors", tmp_path / "o") == 2
    assert "notes.safetensors is not a readable safetensors file" in capsys.readouterr().err
    assert _convert(tmp_path, path, tmp_path / "o", "--window", "0") == 2
    assert "--window must be >= 1" in capsys.readouterr().err


def test_converter_bad_target_exits_2_with_error_prefix(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "infer.convert_draft", str(tmp_path / "in.pth"), str(tmp_path / "o"),
                           "--target", "llama-3-8b"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --target 'llama-3-8b' is neither a preset (") and "llama3-8b" in proc.stderr


def test_window_is_recorded_and_read_back(tmp_path):
    path, draft = _pth(tmp_path)
    assert _convert(tmp_path, path, tmp_path / "w64", "--window", "64") == 0
    assert json.loads((tmp_path / "w64" / "config.json").read_text())[dw.WINDOW_KEY] == 64
    assert dw.load_draft(tmp_path / "w64", CFG).cfg.window == 64
    assert dw.load_draft(tmp_path / "w64", dtype=jnp.float32).cfg.window == 64  # the target config from the draft's
    assert dw.load_draft(tmp_path / "w64", CFG, window=32).cfg.window == 32  # an explicit window wins
    # converting the converted draft again keeps its window unless told otherwise
    assert _convert(tmp_path, tmp_path / "w64", tmp_path / "again") == 0
    assert dw.load_draft(tmp_path / "again", CFG).cfg.window == 64
    # a released draft records none: the default
    _write_config(tmp_path / "released")
    dw.save_draft(draft, tmp_path / "tmp_out", target_cfg=CFG)
    os.replace(tmp_path / "tmp_out" / "model.safetensors", tmp_path / "released" / "model.safetensors")
    assert dw.load_draft(tmp_path / "released", CFG).cfg.window == dw.DEFAULT_WINDOW
    with pytest.raises(ConfigError, match="window must be an integer >= 1, got 0"):
        dw.load_draft(tmp_path / "released", CFG, window=0)
    _write_config(tmp_path / "released", **{dw.WINDOW_KEY: -3})
    with pytest.raises(ConfigError, match=f"{dw.WINDOW_KEY}: the draft self-attention window must be an integer "
                                          ">= 1, got -3"):
        dw.load_draft(tmp_path / "released", CFG)
