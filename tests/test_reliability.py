"""Nothing lost, nothing run that should not be: checkpoints that would run code are refused,
damaged ones are passed over for the one before, one writer per output folder, every step
logged once, settings and rows bounded, resumes on other data refused."""

import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrpo_fast.cli import main as cli_main
from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.train import checkpoint as ckpt
from vrpo_fast.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny.jsonl"
SMALL = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
         "intermediate_size: 64}", "--train.batch_groups=4", "--train.micro_batch_groups=2",
         "--train.max_steps=4", "--train.save_every=2"]


def cfg_at(out, *overrides):
    return load_config(TINY, [f"--train.output_dir={out}", *SMALL, *overrides])


def run_train(cfg):
    from vrpo_fast.train.loop import Trainer

    return Trainer(cfg).fit()


def steps(out):
    return [r["step"] for r in read_metrics(out)]


def step_dir(out, step):
    return Path(out) / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test)."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_train(cfg_at(out))
    assert steps(out) == [1, 2, 3, 4]
    return out


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


class MakesAFile:
    """Unpickling this creates `path`: what a crafted checkpoint would do with os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_fell_back_and_completed(out, finished, stdout, why):
    """The rerun passed over step 4 (saying why), resumed at step 2 and redid steps 3 and 4
    exactly as the uninterrupted run did, each logged once."""
    assert f"step_00000004 cannot be resumed ({why}" in stdout
    assert f"resumed from {step_dir(out, 2)} at step 2" in stdout
    assert steps(out) == [1, 2, 3, 4]
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(finished)]
    assert ckpt.checkpoint_problem(step_dir(out, 4)) is None      # written again, complete


@pytest.mark.parametrize("name", ["trainer_rank0.pt", ".metadata"])
def test_a_crafted_checkpoint_file_runs_nothing(finished, tmp_path, capsys, name):
    out = copy_of(finished, tmp_path)
    marker = tmp_path / "created_by_the_checkpoint"
    target = step_dir(out, 4) / name
    if name.endswith(".pt"):
        torch.save({"step": 4, "skipped_total": 0, "rng": MakesAFile(marker)}, target)
    else:
        target.write_bytes(pickle.dumps(MakesAFile(marker)))
    capsys.readouterr()
    run_train(cfg_at(out))
    assert not marker.exists()
    assert_fell_back_and_completed(out, finished, capsys.readouterr().out, name)


def test_a_crafted_optimizer_entry_in_a_shard_runs_nothing(finished, tmp_path, capsys,
                                                           monkeypatch):
    """DCP stores the optimizer's non-tensor entries (lr, betas, ...) pickled inside the shards;
    the save at step 4 gets one that would create a file when unpickled."""
    out = tmp_path / "run"
    marker = tmp_path / "created_by_the_checkpoint"
    real = ckpt.get_state_dict
    saves = []

    def crafted_at_second_save(model, optimizer):
        model_sd, optim_sd = real(model, optimizer)
        saves.append(1)
        if len(saves) == 2:
            optim_sd["param_groups"][0]["lr"] = MakesAFile(marker)
        return model_sd, optim_sd

    monkeypatch.setattr(ckpt, "get_state_dict", crafted_at_second_save)
    run_train(cfg_at(out))
    monkeypatch.setattr(ckpt, "get_state_dict", real)
    assert len(saves) == 2 and not marker.exists()
    capsys.readouterr()
    run_train(cfg_at(out))
    assert not marker.exists()
    assert_fell_back_and_completed(out, finished, capsys.readouterr().out, "shards")


@pytest.mark.parametrize("damage", ["truncate shard", "zero shard", "delete trainer state",
                                    "delete config"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, capsys,
                                                                   damage):
    out = copy_of(finished, tmp_path)
    newest = step_dir(out, 4)
    shard = newest / "__0_0.distcp"
    if damage == "truncate shard":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "zero shard":   # the right size, unreadable content: found only by loading
        shard.write_bytes(bytes(shard.stat().st_size))
    elif damage == "delete trainer state":
        (newest / "trainer_rank0.pt").unlink()
    else:
        (newest / "config.yaml").unlink()
    capsys.readouterr()
    run_train(cfg_at(out))
    why = {"truncate shard": "__0_0.distcp", "zero shard": "shards",
           "delete trainer state": "trainer_rank0.pt", "delete config": "config.yaml"}[damage]
    assert_fell_back_and_completed(out, finished, capsys.readouterr().out, why)


def test_no_loadable_checkpoint_stops_and_deletes_nothing(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    for step in (2, 4):
        (step_dir(out, step) / "trainer_rank0.pt").unlink()
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match=r"^train.output_dir: no checkpoint in .* can be resumed "
                                        r"\(step_00000004: .*; step_00000002: .*\)"):
        run_train(cfg_at(out))
    assert (out / "metrics.jsonl").read_text() == before
    assert step_dir(out, 2).is_dir() and step_dir(out, 4).is_dir()


def test_pruning_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch, capsys):
    """keep_last = 1 and the save at step 4 comes out damaged: step 2 stays, and the rerun
    resumes from it."""
    out = tmp_path / "run"
    real_save = torch.save

    def damaged_at_step_4(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == 4:
            os.truncate(path, 10)

    monkeypatch.setattr(torch, "save", damaged_at_step_4)
    run_train(cfg_at(out, "--train.keep_last=1"))
    assert step_dir(out, 2).is_dir() and step_dir(out, 4).is_dir()
    assert ckpt.checkpoint_problem(step_dir(out, 2)) is None
    assert ckpt.checkpoint_problem(step_dir(out, 4)) is not None
    monkeypatch.setattr(torch, "save", real_save)
    capsys.readouterr()
    run_train(cfg_at(out, "--train.keep_last=1"))
    assert f"resumed from {step_dir(out, 2)} at step 2" in capsys.readouterr().out
    assert steps(out) == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004"]


def test_a_rerun_without_a_checkpoint_logs_every_step_once(tmp_path, monkeypatch):
    from vrpo_fast.train.loop import Trainer

    out = tmp_path / "run"
    cfg = cfg_at(out, "--train.save_every=0", "--train.max_steps=3")
    original = Trainer.train_step

    def crash_at_3(self):
        if self.step == 2:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg)
    assert steps(out) == [1, 2] and not (out / "checkpoints").exists()
    monkeypatch.setattr(Trainer, "train_step", original)
    run_train(cfg)
    assert steps(out) == [1, 2, 3]


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / "writer.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={out}", *SMALL])
        err = capsys.readouterr().err
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
        assert f"train.output_dir: {out} is being written by process {other.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == ["writer.lock"]
    finally:
        other.kill()
        other.wait()
    lock.write_text(json.dumps({"pid": other.pid, "host": "elsewhere"}))  # cannot be checked
    with pytest.raises(UserError, match=rf"process {other.pid} on elsewhere"):
        run_train(cfg_at(out))
    lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))  # now dead
    capsys.readouterr()
    run_train(cfg_at(out, "--train.max_steps=1"))
    assert f"left by process {other.pid}, which is no longer running" in capsys.readouterr().out
    assert steps(out) == [1] and not lock.exists()   # released at the end


@pytest.mark.parametrize("override, key, shown", [
    ("--loss.beta=.nan", "loss.beta", "nan"),
    ("--loss.beta=.inf", "loss.beta", "inf"),
    ("--train.lr=.nan", "train.lr", "nan"),
    ("--loss.dro_tau=.nan", "loss.dro_tau", "nan"),
    ("--train.grad_clip=.nan", "train.grad_clip", "nan"),
    ("--aux.beta=-.inf", "aux.beta", "-inf"),
    ("--train.adam_betas=[0.9, .nan]", "train.adam_betas.1", "nan"),
    ("--model.tiny={hidden_size: 32, rope_theta: .inf}", "model.tiny.rope_theta", "inf"),
])
def test_non_finite_settings_are_named(tmp_path, capsys, override, key, shown):
    out = tmp_path / "run"
    rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={out}", override])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {key}: must be a finite number, got {shown}\n" in err
    assert not out.exists()


def test_settings_added_later_are_checked_for_finiteness_too():
    import dataclasses
    from dataclasses import dataclass

    from vrpo_fast.config import F, TrainConfig, validate

    @dataclass
    class MoreTrain(TrainConfig):
        new_knob: float = F(1.0, "A setting this file does not know.")

    # validate() walks the fields of the sections it is given, whatever they are.
    cfg = load_config(TINY)
    cfg.train = MoreTrain(**dataclasses.asdict(cfg.train), new_knob=float("nan"))
    with pytest.raises(UserError, match=r"^train.new_knob: must be a finite number, got nan"):
        validate(cfg)


def over_long_data(tmp_path, prompt_chars):
    """The tiny data's first 7 rows and, as line 5, one whose prompt alone is `prompt_chars`
    bytes (the byte tokenizer: one token each, plus BOS)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:7]]
    rows.insert(4, {**rows[0], "prompt": "a" * prompt_chars + ">"})
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_longer_than_the_context_are_bad_rows_in_train_and_check_data(tmp_path, capsys):
    from vrpo_fast.models import tiny_llama_config

    # The tiny model has 1024 positions; line 5's prompt is 1 + 1100 + 1 tokens.
    data = over_long_data(tmp_path, 1100)
    with pytest.raises(UserError, match=r"(?s)^data.path: .*line 5: field 'chosen': prompt \+ "
                                        r"response is 1\d{3} tokens, over the maximum length "
                                        r"1024"):
        run_train(cfg_at(tmp_path / "run", f"--data.path={data}"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    model = tmp_path / "model"
    tiny_llama_config(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64).save_pretrained(model)
    capsys.readouterr()
    rc = cli_main(["check-data", str(data), "--model", str(model), "--tokenizer", "byte"])
    out = capsys.readouterr().out
    assert rc == 1 and "line 5: field 'chosen'" in out and "over the maximum length 1024" in out
    assert "line 4" not in out and "line 6" not in out
    # data.max_length below the context applies too
    short = over_long_data(tmp_path, 40)
    with pytest.raises(UserError, match=r"line 5: .* over the maximum length 30"):
        run_train(cfg_at(tmp_path / "run2", f"--data.path={short}", "--data.max_length=30"))


def test_a_packing_budget_smaller_than_a_group_names_both_numbers(tmp_path):
    # The largest group, counted independently: BOS + prompt bytes, then each of the 2 + 2M
    # responses' bytes + EOS (byte tokenizer).
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    largest = max(1 + len(r["prompt"].encode()) + sum(
        len(x.encode()) + 1 for x in [r["chosen"], r["rejected"], *r["samples"]]) for r in rows)
    with pytest.raises(UserError, match=rf"^train.max_tokens: a packed row of 8 tokens cannot "
                                        rf"hold the largest prompt group \({largest} tokens.*at "
                                        rf"least {largest}"):
        run_train(cfg_at(tmp_path / "run", "--train.max_tokens=8"))


def test_resuming_on_other_rows_is_refused_unless_allowed(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    moved = tmp_path / "same_rows.jsonl"
    shutil.copy(DATA, moved)
    capsys.readouterr()
    run_train(cfg_at(out, f"--data.path={moved}"))     # the same content elsewhere: resumes
    assert f"resumed from {step_dir(out, 4)}" in capsys.readouterr().out
    edited = tmp_path / "edited.jsonl"
    lines = DATA.read_text().splitlines()
    lines[3] = lines[3].replace('"prompt": "', '"prompt": "x', 1)
    edited.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"^data.path: {re.escape(str(edited))} holds other "
                                        rf"rows than the data .*step_00000004 was trained on "
                                        rf".*train.allow_data_change=true"):
        run_train(cfg_at(out, f"--data.path={edited}"))
    capsys.readouterr()
    run_train(cfg_at(out, f"--data.path={edited}", "--train.allow_data_change=true",
                     "--train.max_steps=5"))
    printed = capsys.readouterr().out
    assert "on other data than its own (train.allow_data_change)" in printed
    assert steps(out) == [1, 2, 3, 4, 5]


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={blocker / 'run'}",
                   *SMALL])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"train.output_dir: cannot write to {blocker / 'run'}" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir(mode=0o500)
    rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={out}", *SMALL])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"cannot write to {out}" in err


@pytest.mark.parametrize("key", ["model.path", "aux.path"])
def test_a_truncated_safetensors_file_is_one_line(tmp_path, capsys, key):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.models import build_tiny_causal_lm, tiny_llama_config

    model = tmp_path / "model"
    shape = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    if key == "model.path":
        build_tiny_causal_lm(**shape).save_pretrained(model)
        flags = ["--model.tiny=null", f"--model.path={model}", "--model.tokenizer=byte"]
    else:   # a reward model as g
        AutoModelForSequenceClassification.from_config(
            tiny_llama_config(num_labels=1, **shape)).save_pretrained(model)
        flags = [*SMALL, "--aux.mode=reward_model", f"--aux.path={model}"]
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    capsys.readouterr()
    rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={tmp_path / 'run'}",
                   *flags])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{key}: {weights} is cut short" in err


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("train:\n  output_dir: runs/caf\xe9\n".encode("latin-1"))
    rc = cli_main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--config: {config} is not UTF-8 text" in err
