"""configs: strict HF config reading (both the transformers 4 and 5 layouts), the inverse export,
exact-name presets and draft/target matching."""

import json

import pytest
import transformers

from longspec_jax import configs
from longspec_jax.configs import ConfigError, DraftConfig, RopeConfig, from_hf_config, to_hf_config, tiny_config
from tests.hf_utils import KINDS, ROPES, hf_config


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rope", ROPES)
def test_reads_transformers_configs(tmp_path, kind, rope):
    hf = hf_config(kind, tie=kind == "llama_mha", rope=rope)
    hf.save_pretrained(tmp_path)
    cfg = from_hf_config(tmp_path)
    assert cfg.family == ("qwen2" if kind == "qwen2" else "llama")
    assert cfg.attention_bias == (kind == "qwen2")
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (hf.num_attention_heads, hf.num_key_value_heads,
                                                                hf.head_dim)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.rope.kind == rope and cfg.rope.theta == 10000.0
    if rope == "dynamic":
        # HF measures dynamic NTK against max_position_embeddings.
        assert cfg.rope.original_max_position_embeddings == hf.max_position_embeddings
    if rope == "llama3":
        assert cfg.rope.original_max_position_embeddings == 64 and cfg.rope.factor == 8.0


def test_reads_legacy_rope_scaling_layout():
    """transformers 4 files: top-level rope_theta and rope_scaling with the old "type" key."""
    cfg = from_hf_config({"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 5e5,
                          "max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert cfg.rope == RopeConfig(theta=5e5, kind="linear", factor=4.0)
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 8


@pytest.mark.parametrize("rope", [RopeConfig(), RopeConfig(kind="linear", factor=2.0),
                                  RopeConfig(kind="llama3", factor=8.0, original_max_position_embeddings=512),
                                  RopeConfig(kind="dynamic", factor=2.0, original_max_position_embeddings=2048)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_to_hf_config_round_trips_through_transformers(tmp_path, rope, family):
    cfg = tiny_config(rope=rope, family=family, attention_bias=family == "qwen2", eos_token_ids=(1, 2))
    hf_dict = to_hf_config(cfg)
    cls = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    cls(**hf_dict).save_pretrained(tmp_path)  # transformers accepts it...
    assert from_hf_config(tmp_path) == cfg  # ...and what it writes reads back identically
    assert from_hf_config(hf_dict) == cfg


def test_unknown_rope_scaling_type_is_refused():
    with pytest.raises(ConfigError, match="'yarn'"):
        from_hf_config({"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 2, "num_attention_heads": 4,
                        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_unknown_field_is_refused(tmp_path):
    hf = hf_config("llama_gqa").to_dict()
    hf["sliding_window_pattern"] = 4
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        from_hf_config(tmp_path)


def test_unsupported_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type='gemma'"):
        from_hf_config({"model_type": "gemma", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                        "num_hidden_layers": 1, "num_attention_heads": 1})


def test_presets_exact_names_only():
    assert configs.get_preset("llama3-8b").config.num_kv_heads == 8
    with pytest.raises(ConfigError, match="llama3-8b"):
        configs.get_preset("llama3_8b")


def test_draft_config_matches_target():
    target = tiny_config()
    draft = DraftConfig.from_target(target)
    draft.check_matches(target)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        draft.check_matches(target.replace(num_kv_heads=4))
