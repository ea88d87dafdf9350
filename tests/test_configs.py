"""Every shipped config runs its whole recipe (`vrpo-fast run`: sample -> score -> train -> eval,
or its own stages) for a step, on a few HH-RLHF rows, with the model swapped by override for a
tiny random model of the same architecture family; and a config whose stages do not chain stops
with one line naming the key and the path, before anything is written.

One module-scoped run per config (the `recipe` fixture) serves every test of that config.
"""

import dataclasses
import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vrpo_fast.config import Config, load_config
from vrpo_fast.errors import UserError
from vrpo_fast.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# The recipes whose stages include `score` (run.stages, or its default, which has it).
SCORED = [c for c in CONFIGS
          if "score" in ((yaml.safe_load(c.read_text()) or {}).get("run") or {}).get(
              "stages", ["score"])]
HH = ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TINY = dict(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=64, max_position_embeddings=2048,
            bos_token_id=0, eos_token_id=1, pad_token_id=2)


def family(model_path: str) -> str:
    """The architecture family a shipped hub model belongs to."""
    name = model_path.lower()
    for arch in ("qwen2", "llama"):
        if arch.removesuffix("2") in name:
            return arch
    raise AssertionError(f"no tiny stand-in for {model_path}")


def tiny_config(arch: str, **extra):
    from transformers import LlamaConfig, Qwen2Config

    return {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](**TINY, **extra)


def save_tiny(folder: Path, arch: str, seed: int, *, reward: bool = False) -> str:
    """A random tiny causal LM (or a one-output sequence classifier) with the byte tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from vrpo_fast.models import byte_tokenizer

    torch.manual_seed(seed)
    if reward:
        model = AutoModelForSequenceClassification.from_config(tiny_config(arch, num_labels=1))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def hh_rows(start: int, count: int, path: Path) -> str:
    with gzip.open(HH, "rt") as f:
        lines = f.readlines()[start:start + count]
    path.write_text("".join(lines))
    return str(path)


def overrides_for(config: Path, root: Path) -> list[str]:
    """Outputs under `root`, a handful of rows and one step; hub models and data swapped for
    tiny local stand-ins of the same family. Everything else as shipped."""
    raw = yaml.safe_load(config.read_text())
    cfg = load_config(config)
    over = {"train.output_dir": root / "run", "train.max_steps": 1, "train.save_every": 1,
            "train.warmup_steps": 1, "train.batch_groups": 2, "train.micro_batch_groups": 1,
            "eval.num_samples": 2, "eval.max_new_tokens": 4, "eval.output": root / "eval",
            "eval.backend": "transformers"}
    if cfg.model.path:
        arch = family(cfg.model.path)
        over["model.path"] = save_tiny(root / "model", arch, seed=0)
        over["model.tokenizer"] = "byte"
        if cfg.aux.mode in ("lm", "reward_model"):
            over["aux.path"] = save_tiny(root / "aux", arch, seed=1,
                                         reward=cfg.aux.mode == "reward_model")
    else:
        arch = "llama"                       # model.tiny builds a Llama-style model
    judge = cfg.eval.judge or ""
    if judge.startswith("reward_model:"):
        over["eval.judge"] = "reward_model:" + save_tiny(root / "judge", arch, seed=2,
                                                         reward=True)
    if cfg.rl.reward_model:
        over["rl.reward_model"] = save_tiny(root / "rm", arch, seed=3, reward=True)
    if "sample" in cfg.run.stages:
        over.update({"sample.input": hh_rows(0, 4, root / "prompts.jsonl"),
                     "sample.output": root / "sampled", "sample.backend": "transformers",
                     "sample.max_new_tokens": 4, "score.output": root / "scored",
                     "data.max_prompt_length": 48, "data.max_response_length": 16})
    if "eval" in cfg.run.stages:
        if "sample" in cfg.run.stages:
            over["eval.prompts"] = hh_rows(100, 3, root / "heldout.jsonl")
        else:
            over["eval.num_prompts"] = 3
    assert "run" in raw, f"{config.name}: no run.stages"
    return [f"--{k}={v}" for k, v in over.items()]


@pytest.fixture(scope="module", params=CONFIGS, ids=[c.stem for c in CONFIGS])
def recipe(request, tmp_path_factory):
    """Run a config's whole recipe once, then again (which must find everything done)."""
    config = request.param
    root = tmp_path_factory.mktemp(config.stem)
    over = overrides_for(config, root)
    reads: set = set()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)                        # the configs' relative paths are the repository's
        cfg = load_config(config, over)
        for f in dataclasses.fields(Config):
            cls = type(getattr(cfg, f.name))
            mp.setattr(cls, "__getattribute__", recording(f.name, reads), raising=False)
        first = dict(run_pipeline(cfg, progress=False))
        stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
        second = dict(run_pipeline(load_config(config, over), progress=False))
    return {"config": config, "root": root, "over": over, "cfg": cfg, "first": first,
            "second": second, "stamps": stamps, "reads": reads}


def recording(section: str, reads: set):
    """A __getattribute__ that records which keys of a config section the code reads, leaving
    out config.py's own checks and dataclasses' whole-object copies (to_dict)."""
    skip = (str(Path(dataclasses.__file__)), str(ROOT / "vrpo_fast" / "config.py"))

    def getattribute(self, name):
        if not name.startswith("__") and sys._getframe(1).f_code.co_filename not in skip:
            reads.add(f"{section}.{name}")
        return object.__getattribute__(self, name)

    return getattribute


def test_every_stage_writes_its_output(recipe):
    cfg, first = recipe["cfg"], recipe["first"]
    assert list(first) == cfg.run.stages
    if "sample" in first:
        rows = read_shards(first["sample"])
        assert len(rows) == 4 and all(len(r["samples"]) == cfg.sample.num_samples for r in rows)
    if "score" in first:
        rows = read_shards(first["score"])
        m = cfg.sample.num_samples // 2
        assert all(len(r["ref_logps"]) == 2 + 2 * m for r in rows)
        if cfg.aux.mode in ("lm", "reward_model"):
            assert all(len(r["aux_prefs"]) == 1 + m for r in rows)
    for trainer in ("train", "train-reward", "train-rl"):
        if trainer in first:
            final = Path(first[trainer])
            assert final == Path(cfg.train.output_dir) / "final"
            model_type = json.loads((final / "config.json").read_text())["model_type"]
            if cfg.model.path:
                assert model_type == family(yaml.safe_load(
                    recipe["config"].read_text())["model"]["path"])
    if "eval" in first:
        out = Path(first["eval"])
        results = json.loads((out / "results.json").read_text())
        assert [r["temperature"] for r in results["rows"]] == cfg.eval.temperatures
        for row in results["rows"]:
            assert 0 <= row["vs_ref"]["lo"] <= row["vs_ref"]["mean"] <= row["vs_ref"]["hi"] <= 1
            assert "vs_chosen" in row          # every eval prompt set here has chosen responses
        assert (out / "report.md").is_file() and (out / "win_rates.png").stat().st_size > 0


def test_rerun_finds_everything_done(recipe):
    """The same command again: sample and score find every shard written (none rewritten),
    trainers and eval are skipped."""
    second = recipe["second"]
    for stage, out in second.items():
        if stage in ("sample", "score"):
            assert out is not None
        else:
            assert out is None, stage
    assert {p: p.stat().st_mtime_ns for p in recipe["root"].rglob("*.parquet")} == \
        recipe["stamps"]


@pytest.mark.parametrize("recipe", SCORED, ids=[c.stem for c in SCORED], indirect=True)
def test_scored_data_is_pi_refs_and_the_aux_lms_by_a_naive_forward(recipe):
    """The chain carried the right data: each scored row's ref_logps and g equal a naive
    (one unpacked sequence at a time) forward of the tiny pi_ref and aux model in float64."""
    cfg = recipe["cfg"]
    assert "score" in cfg.run.stages
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_example
    from vrpo_fast.logprobs import naive_sequence_logps
    from vrpo_fast.models import byte_tokenizer, load_causal_lm

    tok = byte_tokenizer()
    examples, _ = load_preference_data(str(recipe["first"]["score"]))
    ref = load_causal_lm(cfg.model.path, dtype=torch.float64).eval()
    aux = load_causal_lm(cfg.aux.path, dtype=torch.float64).eval()
    for ex in examples[:2]:
        t = tokenize_example(ex, tok, max_prompt_length=cfg.data.max_prompt_length,
                             max_response_length=cfg.data.max_response_length)
        with torch.no_grad():
            want = naive_sequence_logps(ref, [t.prompt_ids], [t.response_ids])[0].double()
            aux_lp = naive_sequence_logps(aux, [t.prompt_ids], [t.response_ids])[0].double()
        torch.testing.assert_close(torch.tensor(ex.ref_logps, dtype=torch.float64), want,
                                   atol=2e-3, rtol=1e-4)
        h = (aux_lp - want).view(-1, 2)
        g = torch.sigmoid(cfg.aux.beta * (h[:, 0] - h[:, 1]))
        torch.testing.assert_close(torch.tensor(ex.aux_prefs, dtype=torch.float64), g,
                                   atol=1e-4, rtol=1e-4)


# Keys that only a GPU run reads (the CPU run of this test samples with transformers).
GPU_ONLY = {"sample.tensor_parallel_size"}


def test_every_key_of_a_shipped_config_is_read_by_the_code(recipe):
    """No dead key: each section.key a shipped config sets is read while its recipe runs
    (outside config.py's validation)."""
    raw = yaml.safe_load(recipe["config"].read_text())
    keys = {f"{section}.{key}" for section, values in raw.items() for key in values or {}}
    assert keys - recipe["reads"] - GPU_ONLY == set()
    assert "sample.input" in recipe["reads"] or "sample" not in recipe["cfg"].run.stages


def read_shards(folder) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(Path(folder).glob("shard_*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


# -- configs whose stages do not chain -------------------------------------------------------

def test_outputs_of_another_config_are_refused_before_anything_runs(recipe, monkeypatch):
    """The recipe's outputs exist; the same recipe with a setting that decides them changed
    stops in `plan`, naming the output's key and path."""
    config, over, stages = recipe["config"], recipe["over"], recipe["cfg"].run.stages
    monkeypatch.chdir(ROOT)
    cases = []
    if "sample" in stages:
        cases.append(("--sample.temperature=0.5", r"^sample\.output: .*sampled was written with "
                                                  r"sample\.temperature = 1\.0, this config has "
                                                  r"0\.5"))
    if "score" in stages:
        cases.append(("--data.max_response_length=8", r"^score\.output: .*scored was written "
                                                      r"with data\.max_response_length = 16"))
    if any(t in stages for t in ("train", "train-reward", "train-rl")):
        cases.append(("--train.seed=7", r"^train\.output_dir: .*step_0+1 was written under "
                                        r"another config \(train\.seed: 0 -> 7\)"))
    for extra, match in cases:
        with pytest.raises(UserError, match=match) as err:
            run_pipeline(load_config(config, over + [extra]), progress=False)
        assert "\n" not in str(err.value)


QWEN = next(c for c in CONFIGS if c.stem.startswith("qwen"))


@pytest.mark.parametrize("extra, match", [
    # sample would read what score writes after it (the shipped configs' old mistake)
    (["--sample.input={root}/scored"], r"^sample\.input: .*scored is what score writes "
                                       r"\(score\.output\), which runs after sample"),
    # train would not read what score writes
    (["--data.path={root}/elsewhere"], r"^data\.path: .*elsewhere is not what score writes "
                                       r"\(.*scored\); the stages do not chain"),
    (["--score.input={root}/other"], r"^score\.input: .*other is not what sample writes"),
    # an input no stage writes, missing
    (["--sample.input={root}/nope.jsonl"], r"^sample\.input: .*nope\.jsonl does not exist$"),
    (["--run.stages=[score, train]"], r"^score\.input: .*sampled does not exist and sample is "
                                      r"not in run\.stages$"),
    (["--run.stages=[eval]"], r"^eval\.policy: .*run/final does not exist and train is not in "
                              r"run\.stages$"),
    (["--eval.judge=null"], r"^eval\.judge: not set; the eval stage needs a judge"),
    (["--run.stages=[train, sample]"], r"^run\.stages: .* must follow the pipeline order"),
    (["--run.stages=[train-reward, train]"], r"^run\.stages: train-reward and train both "
                                             r"write train\.output_dir"),
])
def test_stages_that_do_not_chain_stop_with_one_line_and_write_nothing(tmp_path, monkeypatch,
                                                                        extra, match):
    monkeypatch.chdir(ROOT)
    root = tmp_path / "r"
    base = [f"--sample.input={hh_rows(0, 2, tmp_path / 'p.jsonl')}",
            f"--sample.output={root}/sampled", f"--score.output={root}/scored",
            f"--train.output_dir={root}/run"]
    with pytest.raises(UserError, match=match) as err:
        run_pipeline(load_config(QWEN, base + [e.format(root=root) for e in extra]),
                     progress=False)
    assert "\n" not in str(err.value)
    assert not root.exists()                   # nothing half-written


def test_model_dtype_is_the_dtype_models_are_built_in():
    from vrpo_fast.models import model_from_config

    tiny = ["--model.tiny={hidden_size: 16, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
            "intermediate_size: 32}", "--model.tokenizer=byte"]
    assert model_from_config(load_config(None, tiny)).dtype == torch.float32
    bf16 = model_from_config(load_config(None, tiny + ["--model.dtype=bfloat16"]), "ref")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_config_doc_prints_every_key_with_its_default(capsys):
    """`vrpo-fast config-doc` is itself a config of the defaults, with a doc line per key."""
    import dataclasses

    from vrpo_fast.cli import main
    from vrpo_fast.config import Config

    assert main(["config-doc"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    want = Config().to_dict()
    assert printed == want
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                    else type(getattr(Config(), section.name))):
            assert f"# {f.metadata['doc']}" in text
    assert main(["config-doc", "nosuch"]) == 1
    assert "SECTION: unknown section 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sample", "score", "train", "train-reward", "train-rl",
                                     "run", "eval"])
def test_config_driven_help_says_where_every_key_is_documented(command, capsys):
    from vrpo_fast.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--section.key=value" in out and "vrpo-fast config-doc" in out


@pytest.mark.parametrize("stage, key", [("sample", "sample.input"), ("score", "score.input"),
                                        ("eval", "eval.prompts")])
def test_a_stage_names_its_own_input_key_when_the_input_cannot_be_read(tmp_path, stage, key):
    """Run alone (not through `run`), each stage reports an unreadable input under its key."""
    from vrpo_fast.pipeline import run_stage

    missing = tmp_path / "missing.jsonl"
    cfg = load_config(None, ["--model.tiny={hidden_size: 16, num_layers: 1, num_heads: 2, "
                             "num_kv_heads: 1, intermediate_size: 32}", "--model.tokenizer=byte",
                             f"--{key}={missing}", f"--sample.output={tmp_path / 's'}",
                             f"--score.output={tmp_path / 'c'}", "--eval.judge=synthetic",
                             f"--train.output_dir={tmp_path / 'r'}"])
    with pytest.raises(UserError, match=rf"^{key}: no such file or folder '{missing}'"):
        run_stage(cfg, stage, progress=False)
