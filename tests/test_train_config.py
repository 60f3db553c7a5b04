"""Training config: strict keys, typed overrides, the shipped example configs parse."""

import glob
import os

import pytest

from longspec_jax.train.config import TrainConfigError, from_dict, load_config, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_typed_and_nested(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\ndata:\n  paths: [a]\n")
    cfg = load_config(str(p), ["optim.lr=1e-4", "train.grad_accum=4", "data.paths=[x, y]", "positions.sinks=2",
                               "mesh.distributed=false", "model.tiny={num_layers: 3}"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.grad_accum == 4
    assert cfg.data.paths == ("x", "y")
    assert cfg.positions.sinks == 2
    assert cfg.mesh.distributed is False
    assert cfg.model.tiny == {"num_layers": 3}


@pytest.mark.parametrize("override,key", [
    ("optim.lrr=1e-4", "optim.lrr"),
    ("trian.steps=3", "trian"),
    ("data.seq_length=10", "data.seq_length"),
])
def test_unknown_key_is_named(override, key):
    with pytest.raises(TrainConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  objective: draft\n  batchsize: 3\n")
    with pytest.raises(TrainConfigError, match="train.batchsize"):
        load_config(str(p))


@pytest.mark.parametrize("data,match", [
    ({"train": {"batch_size": "eight"}}, "train.batch_size must be an integer"),
    ({"train": {"objective": "distill"}}, "train.objective='distill' is not one of"),
    ({"train": {"min_lag": 3, "max_lag": 2}}, "min_lag"),
    ({"positions": {"sinks": "many"}}, "positions.sinks"),
    ({"mesh": {"data": -1, "fsdp": -1}}, "at most one -1"),
    ({"data": {"template": "chat", "seq_len": 512, "answer_reserve": 1024}}, "answer_reserve"),
])
def test_bad_values(data, match):
    with pytest.raises(TrainConfigError, match=match):
        from_dict(data)


def test_override_syntax_errors():
    with pytest.raises(TrainConfigError, match="section.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(TrainConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "train", "configs", "*.yaml"))))
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    assert cfg.data.seq_len >= 2
    assert cfg.to_dict()["optim"]["b2"] == 0.95
