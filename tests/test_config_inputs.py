"""Config input checks: model.tiny's keys and sizes, seeds, empty paths, duplicate YAML keys and
the eval section, each one line naming the key before any stage runs."""

import re
from pathlib import Path

import pytest

from vrpo_fast.cli import main as cli_main
from vrpo_fast.config import load_config, validate
from vrpo_fast.errors import UserError
from vrpo_fast.models import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = "hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64"


def tiny(extra: str) -> list[str]:
    return [f"--model.tiny={{{extra}}}"]


@pytest.mark.parametrize("extra, match", [
    ("hidden_size: -32", r"^model\.tiny\.hidden_size: expected a positive integer, got -32$"),
    ("hidden_size: abc", r"^model\.tiny\.hidden_size: expected a positive integer, got 'abc'$"),
    ("hidden_size: 32.5", r"^model\.tiny\.hidden_size: expected a positive integer, got 32\.5$"),
    ("hidden_size: true", r"^model\.tiny\.hidden_size: expected a positive integer, got True$"),
    ("num_heads: 0", r"^model\.tiny\.num_heads: expected a positive integer, got 0$"),
    ("vocab_size: '300'", r"^model\.tiny\.vocab_size: expected a positive integer, got '300'$"),
    ("hidden_size: 33, num_heads: 2",
     r"^model\.tiny\.hidden_size: hidden_size = 33 is not a multiple of num_heads = 2$"),
    ("num_heads: 5",             # the default hidden_size 64
     r"^model\.tiny\.num_heads: hidden_size = 64 is not a multiple of num_heads = 5$"),
    ("hidden_size: 6, num_heads: 2",
     r"^model\.tiny\.hidden_size: hidden_size / num_heads = 3 per head; RoPE needs an even "
     r"head size$"),
    ("num_kv_heads: 3", r"^model\.tiny\.num_kv_heads: 3 does not divide num_heads = 4$"),
    ("vocab_size: 10", r"^model\.tiny\.vocab_size: must be >= 259 \(the byte tokenizer's "
                       r"tokens\), got 10$"),
    ("num_layer: 1", r"^model\.tiny\.num_layer: unknown key for arch llama \(did you mean "
                     r"model\.tiny\.num_layers\?\)$"),
    ("bogus: 3", r"^model\.tiny\.bogus: unknown key for arch llama$"),
    ("sliding_window: 8", r"^model\.tiny\.sliding_window: unknown key for arch llama"),
    ("num_hidden_layers: 2", r"^model\.tiny\.num_hidden_layers: set by tiny_llama_config "
                             r"itself; use model\.tiny\.num_layers$"),
    ("arch: gpt2", r"^model\.tiny\.arch: unknown architecture 'gpt2' \(expected llama or "
                   r"qwen2\)$"),
    ("tie_word_embeddings: 1", r"^model\.tiny\.tie_word_embeddings: expected true or false"),
])
def test_bad_tiny_model_keys_are_named(extra, match):
    with pytest.raises(UserError, match=match):
        load_config(None, tiny(extra))


def test_tiny_model_must_be_a_mapping():
    cfg = load_config(None, tiny(SMALL))
    cfg.model.tiny = [32]
    with pytest.raises(UserError, match=r"^model\.tiny: expected a mapping of model config keys"):
        validate(cfg)


@pytest.mark.parametrize("extra", [
    SMALL, "hidden_size: 32",
    SMALL + ", attention_dropout: 0.5",                   # passed through to the config class
    SMALL + ", rope_theta: 10000.0, rms_norm_eps: 1.0e-5",
    SMALL + ", arch: qwen2, sliding_window: 8, tie_word_embeddings: true",
    SMALL + ", vocab_size: 300, max_position_embeddings: 64",
])
def test_good_tiny_models_load_and_build(extra):
    cfg = load_config(None, tiny(extra))
    config = tiny_llama_config(**cfg.model.tiny)        # what the model is built from
    assert config.hidden_size == cfg.model.tiny["hidden_size"]


def test_small_vocab_is_fine_with_a_tokenizer_of_its_own():
    cfg = load_config(None, tiny(SMALL + ", vocab_size: 50") + ["--model.tokenizer=some/tok"])
    assert cfg.model.tiny["vocab_size"] == 50


@pytest.mark.parametrize("key", ["eval.seed", "audit.seed"])
@pytest.mark.parametrize("value", [-1, 2**32])
def test_eval_and_audit_seeds_are_range_checked(key, value):
    with pytest.raises(UserError, match=rf"^{key}: must be in \[0, 2\*\*32\), got {value}$"):
        load_config(None, tiny(SMALL) + [f"--{key}={value}"])
    cfg = load_config(None, tiny(SMALL) + [f"--{key}={2**32 - 1}"])
    assert (cfg.eval if key == "eval.seed" else cfg.audit).seed == 2**32 - 1


@pytest.mark.parametrize("key", ["train.output_dir", "data.path", "model.path", "eval.output",
                                 "audit.output", "sample.output", "score.output",
                                 "data.cache_dir", "sample.input", "eval.prompts", "ref.path",
                                 "model.tokenizer"])
@pytest.mark.parametrize("value", ['""', "'   '"])
def test_empty_paths_are_refused(key, value):
    with pytest.raises(UserError, match=rf"^{key}: empty path$"):
        load_config(None, tiny(SMALL) + [f"--{key}={value}"])


def test_unset_paths_stay_none():
    cfg = load_config(None, tiny(SMALL) + ["--data.cache_dir=null", "--eval.baseline=",
                                           "--train.output_dir=out"])
    assert cfg.data.cache_dir is None and cfg.eval.baseline is None
    assert cfg.train.output_dir == "out"


@pytest.mark.parametrize("text, line, key", [
    ("model:\n  tiny: {hidden_size: 32}\ntrain:\n  max_steps: 3\ntrain:\n  lr: 0.1\n", 5,
     "train"),
    ("model:\n  tiny: {hidden_size: 32}\ntrain:\n  max_steps: 3\n  max_steps: 4\n", 5,
     "max_steps"),
    ("model:\n  tiny: {hidden_size: 32, hidden_size: 64}\n", 2, "hidden_size"),
])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, line, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    where = re.escape(str(path))
    with pytest.raises(UserError, match=rf"^--config: {where}: duplicate key '{key}' "
                                        rf"\(line {line}\)$"):
        load_config(path)


def test_yaml_without_duplicates_still_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  tiny: {hidden_size: 32}\ntrain:\n  max_steps: 3\n"
                    "eval:\n  max_new_tokens: 3\n")
    cfg = load_config(path, ["--train.max_steps=4"])     # an override is not a duplicate
    assert cfg.train.max_steps == 4 and cfg.eval.max_new_tokens == 3


@pytest.mark.parametrize("override, match", [
    ("--eval.num_samples=0", r"^eval\.num_samples: must be >= 1, got 0$"),
    ("--eval.max_new_tokens=0", r"^eval\.max_new_tokens: must be >= 1, got 0$"),
    ("--eval.batch_size=0", r"^eval\.batch_size: must be >= 1, got 0$"),
    ("--eval.num_prompts=0", r"^eval\.num_prompts: must be >= 1, got 0$"),
    ("--eval.temperatures=[]", r"^eval\.temperatures: expected a list of numbers > 0, got \[\]$"),
    ("--eval.temperatures=[0.5, 0]", r"^eval\.temperatures: expected a list of numbers > 0"),
    ("--eval.judge=bogus", r"^eval\.judge: unknown judge 'bogus'; expected synthetic, "
                           r"reward_model:PATH, lm:PATH or python:module:function$"),
    ("--eval.judge='lm: '", r"^eval\.judge: unknown judge 'lm: '"),
    ("--eval.judge=reward_model", r"^eval\.judge: unknown judge 'reward_model'"),
])
def test_bad_eval_settings_are_refused_at_load(override, match):
    with pytest.raises(UserError, match=match):
        load_config(TINY, [override])


@pytest.mark.parametrize("judge", ["synthetic", "reward_model:runs/rm/final", "lm:some/judge",
                                   "python:judges:shorter"])
def test_good_judges_load(judge):
    assert load_config(TINY, [f"--eval.judge={judge}"]).eval.judge == judge


def test_run_stops_before_training_on_a_bad_eval_setting(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["run", "--config", str(TINY), f"--train.output_dir={out}",
                   "--eval.judge=bogus"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "error: eval.judge: unknown judge 'bogus'" in err and "--judge" not in err
    assert not out.exists()


def test_shipped_configs_still_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
