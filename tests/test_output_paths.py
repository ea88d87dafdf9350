"""Outputs that cannot be written (a file where a folder goes, a folder under a file) and
optional loggers or plan flags that cannot work: one error line naming the key, before any
work and before anything is written, from every command that writes."""

from __future__ import annotations

import pytest
from helpers import ROOT

from vrpo_fast.cli import main as cli_main
from vrpo_fast.errors import UserError, check_output

TINY = str(ROOT / "configs" / "tiny.yaml")
DATA = str(ROOT / "configs" / "data" / "tiny.jsonl")


def test_check_output(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    check_output(tmp_path / "new" / "deeper", "k")          # created later: fine
    check_output(tmp_path, "k")                             # an existing folder: fine
    check_output(tmp_path / "new.json", "k", folder=False)
    with pytest.raises(UserError, match=r"^k: cannot write to .*afile: it is a file, not a "
                       r"folder$"):
        check_output(afile, "k")
    with pytest.raises(UserError, match=r"^k: cannot write to .*afile/x/y: .*afile is a file$"):
        check_output(afile / "x" / "y", "k")
    with pytest.raises(UserError, match=r"^k: cannot write to .*: it is a folder, not a file$"):
        check_output(tmp_path, "k", folder=False)


def one_line_error(capsys, argv) -> str:
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["score", "--config", TINY, f"--score.input={DATA}", "--score.output={afile}"],
     "score.output: cannot write to {afile}: it is a file, not a folder"),
    (["sample", "--config", TINY, f"--sample.input={DATA}", "--sample.output={afile}/x"],
     "sample.output: cannot write to {afile}/x: {afile} is a file"),
    (["eval", "--config", TINY, f"--eval.prompts={DATA}", "--eval.judge=synthetic",
      "--eval.output={afile}/rep", "--train.output_dir={tmp}/run"],
     "eval.output: cannot write to {afile}/rep: {afile} is a file"),
    (["audit-g", "--config", TINY, f"--data.path={DATA}", "--audit.output={afile}"],
     "audit.output: cannot write to {afile}: it is a file, not a folder"),
    (["train", "--config", TINY, f"--data.path={DATA}", "--data.cache_dir={afile}",
      "--train.output_dir={tmp}/run"],
     "data.cache_dir: cannot write to {afile}: it is a file, not a folder"),
    # run: every stage's output is checked before the first stage starts.
    (["run", "--config", TINY, f"--data.path={DATA}", "--train.output_dir={tmp}/run",
      "--eval.output={afile}/rep", "--eval.judge=synthetic", "--run.stages=[train, eval]"],
     "eval.output: cannot write to {afile}/rep: {afile} is a file"),
    (["bench", "vrpo-loss", "--groups", "2", "--json", "{afile}/x.jsonl"],
     "--json: cannot write to {afile}/x.jsonl: {afile} is a file"),
    (["bench", "vrpo-loss", "--groups", "2", "--plot", "{afile}/x.png"],
     "--plot: cannot write to {afile}/x.png: {afile} is a file"),
])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, argv,
                                                                       message):
    afile = tmp_path / "afile"
    afile.write_text("x")
    fill = dict(afile=afile, tmp=tmp_path)
    err = one_line_error(capsys, [a.format(**fill) for a in argv])
    assert message.format(**fill) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]     # nothing written


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "0"], "--tokens: must be >= 1, got 0"),
    (["--tokens", "-5"], "--tokens: must be >= 1, got -5"),
    (["--gpu-memory", "inf"], "--gpu-memory: must be a number of GiB > 0, got inf"),
    (["--gpu-memory", "nan"], "--gpu-memory: must be a number of GiB > 0, got nan"),
])
def test_plan_refuses_token_counts_and_memory_it_cannot_plan_for(capsys, flags, message):
    assert message in one_line_error(capsys, ["plan", "--config", TINY, *flags])


@pytest.mark.parametrize("key, value, module", [("train.tensorboard", "true", "tensorboard"),
                                                ("train.wandb_project", "demo", "wandb")])
def test_a_logger_that_is_not_installed_is_refused_before_the_run(tmp_path, capsys,
                                                                   monkeypatch, key, value,
                                                                   module):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    err = one_line_error(capsys, ["train", "--config", TINY, f"--data.path={DATA}",
                                  f"--train.output_dir={tmp_path / 'run'}", f"--{key}={value}"])
    assert f"{key}: needs the {module} package (pip install {module})" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["--model.tiny=null", "--model.path={tmp}/nope"], "model.path: no such folder '{tmp}/nope'"),
    (["--aux.mode=lm", "--aux.path={tmp}/afile"], "aux.path: {tmp}/afile is a file, not a model "
                                                   "folder"),
])
def test_a_model_path_that_cannot_be_a_model_is_refused_before_the_run(tmp_path, capsys,
                                                                        overrides, message):
    """Before the lock, the data and its tokenized cache are written."""
    (tmp_path / "afile").write_text("x")
    err = one_line_error(capsys, ["train", "--config", TINY, f"--data.path={DATA}",
                                  f"--train.output_dir={tmp_path / 'run'}",
                                  *[o.format(tmp=tmp_path) for o in overrides]])
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "run").exists()
