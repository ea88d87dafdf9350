"""The trainer: loss falls, exact resume, crash safety, FSDP2 across processes, aux modes."""

import json
import os
import signal
import subprocess
import sys
import time
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
SMALL = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
         "intermediate_size: 64}", "--train.batch_groups=4", "--train.micro_batch_groups=2"]


def cfg_for(tmp_path, *overrides, name="run"):
    return load_config(TINY, [f"--train.output_dir={tmp_path / name}", *SMALL, *overrides])


def run_train(cfg):
    from vrpo_fast.train.loop import Trainer

    return Trainer(cfg).fit()


def losses(out):
    return [r["loss"] for r in read_metrics(out)]


def test_tiny_config_trains_and_loss_falls(tmp_path):
    # The shipped config as it is (its model and data), with a larger batch so that the
    # training loss is a smooth enough curve to compare its ends.
    cfg = load_config(TINY, [f"--train.output_dir={tmp_path / 'run'}", "--train.max_steps=30",
                             "--train.save_every=0", "--train.batch_groups=32",
                             "--train.micro_batch_groups=16", "--loss.estimator=dpo"])
    final = run_train(cfg)
    log = read_metrics(cfg.train.output_dir)
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)   # policy = reference at step 1
    assert last < first - 0.04, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "term_dpo", "term_label", "term_mc",
                "margin", "accuracy", "mean_g"):
        assert key in log[0]
    # The final model loads as a plain Hugging Face model and reproduces the trained policy.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert (Path(final) / "config.json").is_file() and (Path(final) / "tokenizer.json").is_file()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = yaml_load(Path(cfg.train.output_dir) / "config.yaml")
    assert saved["train"]["max_steps"] == 30


def yaml_load(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def test_stop_and_resume_is_exact(tmp_path, monkeypatch):
    from vrpo_fast.train.loop import Trainer

    common = ["--train.max_steps=6", "--train.save_every=3", "--aux.mode=lagged",
              "--aux.refresh_every=2"]
    ref_cfg = cfg_for(tmp_path, *common, name="straight")
    run_train(ref_cfg)
    expected = losses(ref_cfg.train.output_dir)

    cfg = cfg_for(tmp_path, *common, name="stopped")
    original = Trainer.train_step

    def crash_at_5(self):
        if self.step == 4:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg)
    assert [r["step"] for r in read_metrics(cfg.train.output_dir)] == [1, 2, 3, 4]
    monkeypatch.setattr(Trainer, "train_step", original)
    run_train(cfg)  # the same command again: resumes from step 3
    got = losses(cfg.train.output_dir)
    assert [r["step"] for r in read_metrics(cfg.train.output_dir)] == list(range(1, 7))
    assert got == expected  # bitwise on one CPU process


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    cfg = cfg_for(tmp_path, "--train.max_steps=4", "--train.save_every=2")
    real_save = dcp.save
    calls = {"n": 0}

    def failing_save(state, checkpoint_id):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(state, checkpoint_id=checkpoint_id)  # shards written, then the crash
            raise OSError("disk full (simulated)")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(OSError, match="simulated"):
        run_train(cfg)
    latest = ckpt.latest_checkpoint(cfg.train.output_dir)
    assert latest is not None and latest.name == "step_00000002"
    assert (Path(cfg.train.output_dir) / "checkpoints" / "step_00000004.tmp").exists()
    monkeypatch.setattr(dcp, "save", real_save)
    run_train(cfg)  # resumes from step 2, removes the partial save, finishes
    assert [r["step"] for r in read_metrics(cfg.train.output_dir)] == [1, 2, 3, 4]
    names = sorted(p.name for p in (Path(cfg.train.output_dir) / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004"]


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    from vrpo_fast.train.loop import Trainer

    cfg = cfg_for(tmp_path, "--train.max_steps=6", "--train.save_every=0",
                  "--train.max_bad_steps=3")
    original = Trainer._micro_step

    def nan_from_step_2(self, groups):
        loss, stats, n = original(self, groups)
        return (loss * float("nan") if self.step >= 1 else loss), stats, n

    monkeypatch.setattr(Trainer, "_micro_step", nan_from_step_2)
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    with pytest.warns(UserWarning, match="non-finite"), \
            pytest.raises(UserError, match=r"3 non-finite steps in a row"):
        trainer.fit()
    log = read_metrics(cfg.train.output_dir)
    assert [r["skipped"] for r in log] == [0, 1, 1]
    assert log[-1]["skipped_total"] == 2
    # No checkpoint exists from a non-finite state, and the skipped steps left weights finite.
    assert ckpt.latest_checkpoint(cfg.train.output_dir) is None
    assert all(torch.isfinite(p.detach()).all() for p in trainer.policy.parameters())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.policy.parameters()))


def _save_tiny(tmp_path, kind):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.models import build_tiny_causal_lm, tiny_llama_config

    path = tmp_path / kind
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    if kind == "lm":
        build_tiny_causal_lm(seed=3, **kw).save_pretrained(path)
    else:
        conf = tiny_llama_config(num_labels=1, **kw)
        AutoModelForSequenceClassification.from_config(conf).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["given", "lm", "lagged", "reward_model", "none"])
def test_each_aux_mode_runs_a_step(tmp_path, mode):
    extra = ["--loss.estimator=dpo"] if mode == "none" else []
    if mode in ("lm", "reward_model"):
        extra.append(f"--aux.path={_save_tiny(tmp_path, mode)}")
    cfg = cfg_for(tmp_path, "--train.max_steps=1", "--train.save_every=0", f"--aux.mode={mode}",
                  *extra)
    run_train(cfg)
    (record,) = read_metrics(cfg.train.output_dir)
    assert record["skipped"] == 0 and torch.isfinite(torch.tensor(record["loss"]))
    if mode == "none":
        assert record["mean_g"] == pytest.approx(0.5)
    elif mode == "lagged":
        # At step 0 the lagged copy IS the policy, and both start at pi_ref: h = 0, g = 1/2.
        assert record["mean_g"] == pytest.approx(0.5, abs=1e-6)
    elif mode != "given":
        assert 0 < record["mean_g"] < 1 and record["mean_g"] != pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--train.max_stepz=3"], "train.max_stepz: unknown key"),
        (["--data.path=/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
        (["--model.tiny=null", "--model.path=/nonexistent/model"], "model.path"),
        (["--ref.source=cache"], "ref.source"),
        (["--loss.num_mc_pairs=5"], "loss.num_mc_pairs"),
    ],
)
def test_bad_configs_fail_with_the_key_named(tmp_path, capsys, overrides, match):
    out = tmp_path / "bad"
    rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={out}", *overrides])
    err = capsys.readouterr().err
    assert rc == 1 and match in err and "Traceback" not in err
    assert err.count("\n") == 1  # one line
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def _env(cpu: bool = False):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("TRITON_INTERPRET", None)
    if cpu:                                 # the gloo path on CPU processes, GPUs or not
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from vrpo_fast.errors import UserError
    from vrpo_fast.train.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"LOCAL_RANK=1 but this node has 1 visible CUDA"):
        init_distributed()


@pytest.mark.slow
def test_kill_9_then_rerun_logs_every_step_once(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vrpo_fast.cli", "train", "--config", str(TINY),
           f"--train.output_dir={out}", *SMALL, "--train.max_steps=12", "--train.save_every=2"]
    # The killed run pauses after each step, so that the kill lands mid-run however fast the
    # machine: a tiny model otherwise finishes all 12 steps between two polls.
    slowed = ("import sys, time\nimport vrpo_fast.train.loop as L\nstep = L.Trainer.train_step\n"
              "L.Trainer.train_step = lambda self: (step(self), time.sleep(0.3))[0]\n"
              "from vrpo_fast.cli import main\nsys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", slowed, *cmd[3:]], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_metrics_safe(out)) < 5:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 5 <= len(read_metrics_safe(out)) < 12
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))
    assert (out / "final" / "config.json").is_file()


def read_metrics_safe(out):
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tmp_path):
    common = [*SMALL, "--train.max_steps=3", "--train.save_every=0", "--train.batch_groups=4",
              "--train.micro_batch_groups=2"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "vrpo_fast.cli", "train", "--config", str(TINY),
                         f"--train.output_dir={one}", *common], env=_env(cpu=True),
                        capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                         "--standalone", "-m", "vrpo_fast.cli", "train", "--config",
                         str(TINY), f"--train.output_dir={two}", *common],
                        env=_env(cpu=True), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 3
    # The same loss, gradient norm, token count and statistics (each rank's share reduced).
    keys = sorted(set(a[0]) - {"tokens_per_s", "mfu"})
    assert {"loss", "grad_norm", "tokens", "accuracy", "margin"} <= set(keys)
    torch.testing.assert_close(torch.tensor([[r[k] for k in keys] for r in b], dtype=torch.float64),
                               torch.tensor([[r[k] for k in keys] for r in a], dtype=torch.float64),
                               rtol=1e-4, atol=1e-5, msg=lambda m: f"{keys}: {m}")


CRASH_AT_STEP_3 = ("import sys\nimport vrpo_fast.train.loop as L\nstep = L.Trainer.train_step\n"
                   "def crash(self):\n    if self.step == 3:\n"
                   "        raise RuntimeError('simulated crash')\n    return step(self)\n"
                   "L.Trainer.train_step = crash\n"
                   "from vrpo_fast.cli import main\nsys.exit(main())")


@pytest.mark.slow
def test_checkpoints_resume_on_another_number_of_processes(tmp_path, monkeypatch):
    """A run crashed after its step-2 checkpoint resumes on 2 processes (the world size that
    wrote it, or not) and on 1: each finished run logs every step once, with the losses and
    statistics of an uninterrupted one-process run (up to the order of gradient reductions)."""
    import shutil

    from vrpo_fast.train.loop import Trainer

    common = [*SMALL, "--train.max_steps=4", "--train.save_every=2", "--aux.mode=lagged",
              "--aux.refresh_every=3"]
    straight = cfg_for(tmp_path, *common, name="straight")
    run_train(straight)
    want = read_metrics(straight.train.output_dir)

    def torchrun(out, *, crash=False):
        args = ["--config", str(TINY), f"--train.output_dir={out}", *common]
        head = ["-c", CRASH_AT_STEP_3, "train"] if crash else ["-m", "vrpo_fast.cli", "train"]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                            "--standalone", "--no-python", sys.executable, *head, *args],
                           env=_env(cpu=True), capture_output=True, text=True, timeout=600)
        assert (r.returncode != 0) == crash, r.stderr[-3000:]
        return r

    def crashed_in_process(name):
        cfg = cfg_for(tmp_path, *common, name=name)
        original = Trainer.train_step
        monkeypatch.setattr(Trainer, "train_step",
                            lambda self: (_ for _ in ()).throw(RuntimeError("crash"))
                            if self.step == 3 else original(self))
        with pytest.raises(RuntimeError, match="crash"):
            run_train(cfg)
        monkeypatch.setattr(Trainer, "train_step", original)
        return cfg

    def assert_like_straight(out):
        got = read_metrics(out)
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        keys = ["loss", "grad_norm", "tokens", "accuracy", "margin", "lr"]
        torch.testing.assert_close(
            torch.tensor([[r[k] for k in keys] for r in got], dtype=torch.float64),
            torch.tensor([[r[k] for k in keys] for r in want], dtype=torch.float64),
            rtol=1e-4, atol=1e-5, msg=lambda m: f"{keys}: {m}")

    two = tmp_path / "two"
    torchrun(two, crash=True)                     # 2 processes, checkpoint at step 2
    assert [r["step"] for r in read_metrics_safe(two)] == [1, 2, 3]
    shutil.copytree(two, tmp_path / "two_then_one")
    r = torchrun(two)                             # resumed on 2
    assert "resumed from" in r.stdout and "written by 2 rank(s)" not in r.stdout
    assert_like_straight(two)
    one = cfg_for(tmp_path, *common, name="two_then_one")
    run_train(one)                                # resumed on 1 (in this process)
    assert_like_straight(one.train.output_dir)
    cfg = crashed_in_process("one_then_two")      # 1 process, checkpoint at step 2
    r = torchrun(cfg.train.output_dir)            # resumed on 2
    assert "written by 1 rank(s), this run has 2" in r.stdout
    assert_like_straight(cfg.train.output_dir)


def test_resume_refuses_settings_that_move_the_data_order_and_notes_the_others(tmp_path,
                                                                                capsys):
    first = cfg_for(tmp_path, "--train.max_steps=2", "--train.save_every=2")
    run_train(first)
    capsys.readouterr()
    written = (Path(first.train.output_dir) / "config.yaml").read_text()
    for override, key in (("--train.batch_groups=8", "train.batch_groups"),
                          ("--train.seed=1", "train.seed"),
                          ("--model.tiny={hidden_size: 32, num_layers: 3, num_heads: 2, "
                           "num_kv_heads: 1, intermediate_size: 64}", "model.tiny")):
        with pytest.raises(UserError, match=rf"^{key}: .*step_00000002 was written under other "
                                            rf"settings .*start a new train.output_dir"):
            run_train(cfg_for(tmp_path, "--train.max_steps=3", override))
    assert [r["step"] for r in read_metrics(first.train.output_dir)] == [1, 2]
    assert (Path(first.train.output_dir) / "config.yaml").read_text() == written
    run_train(cfg_for(tmp_path, "--train.max_steps=3", "--train.lr=0.001",
                      "--train.log_every=2", "--train.keep_last=3"))
    out = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("note: resuming"))
    assert (f"train.lr: {first.train.lr!r} -> 0.001; train.max_steps: 2 -> 3): the steps after "
            f"step_00000002 follow the new ones") in out
    assert "log_every" not in out and "keep_last" not in out
    assert [r["step"] for r in read_metrics(first.train.output_dir)] == [1, 2, 3]
