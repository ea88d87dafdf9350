"""Configs: YAML + overrides, with one-line errors naming the key."""

import pytest

from vrpo_fast.config import Config, describe, load_config
from vrpo_fast.errors import UserError

TINY = "model:\n  tiny: {hidden_size: 32}\ntrain:\n  max_steps: 3\n"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, TINY), ["--train.max_steps=7", "--loss.beta=0.5",
                                              "--train.output_dir=out", "--loss.dro_tau=null"])
    assert isinstance(cfg, Config)
    assert cfg.train.max_steps == 7 and cfg.loss.beta == 0.5 and cfg.train.output_dir == "out"
    assert cfg.model.tiny == {"hidden_size": 32} and cfg.loss.dro_tau is None
    # ints are accepted where floats belong; the round trip through YAML is lossless
    cfg2 = load_config(write(tmp_path, cfg.to_yaml()), ["--loss.beta=1"])
    assert cfg2.loss.beta == 1.0 and isinstance(cfg2.loss.beta, float)
    assert cfg2.train == cfg.train


@pytest.mark.parametrize(
    "text, overrides, match",
    [
        (TINY + "  max_stepz: 3\n", [], r"^train\.max_stepz: unknown key \(did you mean "
                                        r"train\.max_steps\?\)"),
        (TINY + "trian: {}\n", [], r"^trian: unknown section"),
        (TINY, ["--train.max_steps=ten"], r"^train\.max_steps: expected an integer, got 'ten'"),
        (TINY, ["--train.max_steps=1.5"], r"^train\.max_steps: expected an integer"),
        (TINY, ["--loss.beta=abc"], r"^loss\.beta: expected a number"),
        (TINY, ["--loss.loss_type=logistic"], r"^loss\.loss_type: 'logistic' is not one of"),
        (TINY, ["--train.compile=maybe"], r"^train\.compile: expected true or false"),
        (TINY, ["--train.batch_groups=6", "--train.micro_batch_groups=4"],
         r"^train\.micro_batch_groups: 4 does not divide train\.batch_groups = 6"),
        (TINY, ["--aux.mode=lm"], r"^aux\.path: required with aux\.mode = lm"),
        (TINY, ["--sample.num_samples=3"], r"^sample\.num_samples: must be even"),
        (TINY, ["--loss.beta=0"], r"^loss\.beta: must be > 0"),
        (TINY, ["train.max_steps"], r"overrides are written --section\.key=value"),
        ("train: {max_steps: 2}\n", [], r"^model\.path: set a model path"),
        ("- a\n- b\n", [], r"must hold a mapping"),
        ("model: [\n", [], r"not valid YAML"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"--config: no such file"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    text = describe()
    assert "train:" in text and "  max_steps: 100" in text
    assert "# \n" not in text and "#  [" not in text  # no empty doc


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)
