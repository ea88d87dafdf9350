"""The trainer: loss falls and final/ is the trained model, g wired the right way round in every
aux mode, micro-batches and processes that do not change the maths, exact resume (random
streams included), crash safety, checkpoint pruning, the refusals and warnings."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    assert_close_verbose,
    capture_g,
    float64_logps,
    float64_reward,
    mixed_data,
)

from vrpo_fast.cli import main as cli_main
from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.train import checkpoint as ckpt
from vrpo_fast.train.metrics import read_metrics

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


def test_tiny_config_trains_and_loss_falls_and_final_is_the_trained_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from vrpo_fast.logprobs import naive_sequence_logps
    from vrpo_fast.models import model_from_config
    from vrpo_fast.packing import pack_groups, row_padding
    from vrpo_fast.train.loop import Trainer

    # The shipped config as it is (its model and data), with a larger batch so that the
    # training loss is a smooth enough curve to compare its ends.
    # (fp32 on a GPU too, for the comparison with the float32 naive forward below.)
    cfg = load_config(TINY, [f"--train.output_dir={tmp_path / 'run'}", "--train.max_steps=30",
                             "--train.save_every=0", "--train.batch_groups=32",
                             "--train.micro_batch_groups=16", "--loss.estimator=dpo",
                             "--train.mixed_precision=fp32"])
    trainer = Trainer(cfg)
    final = trainer.fit()
    log = read_metrics(cfg.train.output_dir)
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)   # policy = reference at step 1
    assert last < first - 0.04, (first, last)
    for key in ("lr", "grad_norm", "tokens_per_s", "term_dpo", "term_label", "term_mc",
                "margin", "accuracy", "mean_g"):
        assert key in log[0]
    # The final model loads as a plain Hugging Face model and reproduces the trained policy:
    # its naive unpacked forward gives the log-probs of the trainer's own (sharded, packed)
    # policy, and they are not those of the starting weights.
    model = AutoModelForCausalLM.from_pretrained(final)
    assert (Path(final) / "config.json").is_file() and (Path(final) / "tokenizer.json").is_file()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    groups = trainer.groups.select(list(range(6)))
    trainer.policy.eval()
    batch = pack_groups(groups.prompt_ids, groups.response_ids, **row_padding(trainer.device))
    with torch.no_grad():
        trained = trainer.policy(batch.to(trainer.device)).cpu()
        exported = naive_sequence_logps(model, groups.prompt_ids, groups.response_ids)
        initial = naive_sequence_logps(model_from_config(cfg), groups.prompt_ids,
                                       groups.response_ids)
    assert_close_verbose(exported, trained, atol=1e-4, rtol=1e-5, name="final/ vs trainer")
    assert (exported - initial).abs().max() > 0.5, "training did not move the log-probs"
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


DROPOUT = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
           "intermediate_size: 64, attention_dropout: 0.5}"]


def test_resume_restores_the_random_streams_and_keeps_the_last_checkpoints(tmp_path,
                                                                          monkeypatch):
    """With attention dropout the policy's forward draws from torch's generator, so a resumed
    run equals an uninterrupted one only if the checkpoint's RNG states are restored: it does,
    and the same resume with the restore disabled does not. keep_last = 2 prunes the rest."""
    import shutil

    from vrpo_fast.train.loop import Trainer

    common = [*DROPOUT, "--train.max_steps=4", "--train.save_every=1", "--train.keep_last=2"]
    straight = cfg_for(tmp_path, *common, "--train.save_every=0", name="straight")
    run_train(straight)
    expected = losses(straight.train.output_dir)
    assert expected[0] != pytest.approx(0.6931, abs=1e-3)   # dropout acts (pi_ref runs in eval)

    cfg = cfg_for(tmp_path, *common, name="stopped")
    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: (_ for _ in ()).throw(
        RuntimeError("simulated crash")) if self.step == 3 else original(self))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_train(cfg)
    monkeypatch.setattr(Trainer, "train_step", original)
    checkpoints = Path(cfg.train.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000003"]
    shutil.copytree(cfg.train.output_dir, tmp_path / "no_rng")

    run_train(cfg)                                   # resumes from step 3
    assert losses(cfg.train.output_dir) == expected  # bitwise on one CPU process
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000003", "step_00000004"]

    monkeypatch.setattr(ckpt, "set_rng_state", lambda state: None)
    no_rng = cfg_for(tmp_path, *common, name="no_rng")
    run_train(no_rng)
    got = losses(no_rng.train.output_dir)
    assert got[:3] == expected[:3] and got[3] != expected[3]


@pytest.mark.parametrize("unlabelled", [False, True])
def test_micro_batches_do_not_change_the_maths(tmp_path, unlabelled):
    """One micro-batch of 4 groups, two of 2, four of 1: the same loss, gradient norm and
    statistics at every step (the loss is normalised by the step's groups, not a micro-batch's).
    With unlabelled prompts among them, the labelled terms, in the loss and in the logged
    statistics, are means over the labelled prompts of the step's whole batch, not averages of
    each micro-batch's mean (a micro-batch without labelled prompts has none)."""
    data = []
    if unlabelled:
        # Every third row loses its labelled pair (g keeps its 0.5 placeholder there).
        data = [f"--data.path={mixed_data(tmp_path)}"]
    runs = {}
    for micro in (4, 2, 1):
        cfg = cfg_for(tmp_path, "--train.max_steps=3", "--train.save_every=0",
                      f"--train.micro_batch_groups={micro}", "--train.mixed_precision=fp32",
                      *data, name=f"micro{micro}")
        run_train(cfg)
        runs[micro] = read_metrics(cfg.train.output_dir)
    keys = ["loss", "grad_norm", "tokens", "mean_g", "term_mc", "margin", "accuracy", "term_dpo",
            "term_label", "reward_chosen", "reward_rejected"]
    want = torch.tensor([[r[k] for k in keys] for r in runs[4]], dtype=torch.float64)
    assert want[:, 1].min() > 0
    # Step 1 runs at the policy pi_ref: every margin is 0, so each labelled pair's sigmoid
    # loss, and its expectation under g, is ln 2 whatever g is.
    for micro in (4, 2, 1):
        first = runs[micro][0]
        assert first["term_dpo"] == pytest.approx(math.log(2), abs=1e-5), micro
        assert first["term_label"] == pytest.approx(math.log(2), abs=1e-5), micro
    for micro in (2, 1):
        got = torch.tensor([[r[k] for k in keys] for r in runs[micro]], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=micro: f"micro {n}, {keys}: {m}")


def test_a_step_without_labelled_prompts_logs_no_labelled_statistics(tmp_path):
    """Statistics over labelled prompts are left out of a step that has none (not logged as 0);
    the Monte Carlo term, over all prompts, is there, and the next step has them all."""
    import json

    rows = [json.loads(line) for line in (ROOT / "configs/data/tiny.jsonl").open()]
    for row in rows[:4]:                        # step 1 in data order: no labelled pair
        del row["chosen"], row["rejected"]
        row["aux_prefs"][0] = 0.5
    path = tmp_path / "first_unlabelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(tmp_path, "--train.max_steps=2", "--train.save_every=0", "--train.shuffle=false",
                  f"--data.path={path}")
    run_train(cfg)
    first, second = read_metrics(cfg.train.output_dir)
    labelled = {"term_dpo", "term_label", "reward_chosen", "reward_rejected", "margin", "accuracy"}
    assert not labelled & set(first) and math.isfinite(first["term_mc"])
    assert labelled <= set(second)


def test_exploding_margin_warns_once(tmp_path, monkeypatch):
    from vrpo_fast.train.loop import Trainer

    original = Trainer.micro_step

    def inflated_from_step_2(self, groups):
        # The margin statistic as a diverging run would log it (the loss is left alone).
        loss, stats, n = original(self, groups)
        if self.step >= 1:
            stats = {**stats, "margin": stats["margin"] + 60.0}
        return loss, stats, n

    monkeypatch.setattr(Trainer, "micro_step", inflated_from_step_2)
    cfg = cfg_for(tmp_path, "--train.max_steps=3", "--train.save_every=0")
    with pytest.warns(UserWarning) as caught:
        run_train(cfg)
    margins = [r["margin"] for r in read_metrics(cfg.train.output_dir)]
    assert abs(margins[0]) < 50 and min(margins[1:]) > 50
    exploding = [str(w.message) for w in caught if "exploding" in str(w.message)]
    assert len(exploding) == 1 and exploding[0].startswith("step 2: mean chosen-rejected margin")
    assert "loss.loss_type=ramp" in exploding[0]


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
    original = Trainer.micro_step

    def nan_from_step_2(self, groups):
        loss, stats, n = original(self, groups)
        return (loss * float("nan") if self.step >= 1 else loss), stats, n

    monkeypatch.setattr(Trainer, "micro_step", nan_from_step_2)
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


def _implicit_g(aux64, ref64, groups, beta):
    """g of pair p = sigmoid(beta * h_p), h_p = [log aux - log ref](first) - [...](second), each
    log-prob from its own unpadded float64 forward: (G, 1 + M) float64."""
    out = []
    for prompt, responses in zip(groups.prompt_ids, groups.response_ids):
        r = [float64_logps(aux64, prompt, y) - float64_logps(ref64, prompt, y) for y in responses]
        out.append([1 / (1 + math.exp(-beta * (r[2 * p] - r[2 * p + 1])))
                    for p in range(len(r) // 2)])
    return torch.tensor(out, dtype=torch.float64)


def _reward_g(rm64, groups):
    out = []
    for prompt, responses in zip(groups.prompt_ids, groups.response_ids):
        r = [float64_reward(rm64, prompt, y) for y in responses]
        out.append([1 / (1 + math.exp(-(r[2 * p] - r[2 * p + 1]))) for p in range(len(r) // 2)])
    return torch.tensor(out, dtype=torch.float64)


def _given_g(tokenizer, groups):
    """The data's aux_prefs of each group's row, the row found by its decoded texts."""
    rows = [json.loads(line) for line in (ROOT / "configs/data/tiny.jsonl").open()]
    by_text = {}
    for row in rows:
        key = (row["prompt"], row["chosen"], row["rejected"], *row["samples"][:4])
        assert by_text.setdefault(key, row["aux_prefs"]) == row["aux_prefs"]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return torch.tensor([by_text[(decode(p), *map(decode, rs))]
                         for p, rs in zip(groups.prompt_ids, groups.response_ids)],
                        dtype=torch.float64)


@pytest.mark.parametrize("mode", ["given", "lm", "lagged", "reward_model", "none"])
def test_g_is_wired_the_right_way_round_in_every_aux_mode(tmp_path, monkeypatch, tokenizer,
                                                           mode):
    """The g the loss receives, for every micro-batch of two steps, equals g computed here from
    independent float64 forwards, one unpadded sequence at a time: column 0 for (chosen,
    rejected), column m for Monte Carlo pair m = (a_m1, a_m2), each P(first beats second)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from vrpo_fast.models import build_tiny_causal_lm

    extra = ["--loss.estimator=dpo"] if mode == "none" else []
    if mode in ("lm", "reward_model"):
        extra.append(f"--aux.path={_save_tiny(tmp_path, mode)}")
    seen = capture_g(monkeypatch, weights=mode == "lagged")
    cfg = cfg_for(tmp_path, "--train.max_steps=2", "--train.save_every=0", f"--aux.mode={mode}",
                  "--aux.beta=1.0", "--aux.refresh_every=1", "--train.lr=1e-2",
                  "--train.mixed_precision=fp32", *extra)
    run_train(cfg)
    records = read_metrics(cfg.train.output_dir)
    assert [r["skipped"] for r in records] == [0, 0]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert len(seen) == 4                    # 2 steps x 2 micro-batches
    ref64 = build_tiny_causal_lm(seed=cfg.model.seed, dtype=torch.float64, **cfg.model.tiny)
    if mode == "lm":
        aux64 = AutoModelForCausalLM.from_pretrained(cfg.aux.path, dtype=torch.float64)
    elif mode == "reward_model":
        rm64 = AutoModelForSequenceClassification.from_pretrained(cfg.aux.path,
                                                                  dtype=torch.float64)
    for entry in seen:
        groups = entry["groups"]
        if mode == "given":
            want = _given_g(tokenizer, groups)
        elif mode == "lm":
            want = _implicit_g(aux64, ref64, groups, cfg.aux.beta)
        elif mode == "lagged":
            # Refreshed after every step: the copy is the policy as the step starts.
            lagged64 = build_tiny_causal_lm(seed=1, dtype=torch.float64, **cfg.model.tiny)
            lagged64.load_state_dict(entry["weights"])
            want = _implicit_g(lagged64, ref64, groups, cfg.aux.beta)
        elif mode == "reward_model":
            want = _reward_g(rm64, groups)
        else:
            want = torch.full((len(groups), 3), 0.5, dtype=torch.float64)
        assert_close_verbose(entry["g"], want, atol=1e-4, rtol=0,
                             name=f"g at step {entry['step'] + 1}")
        if mode != "none" and (mode != "lagged" or entry["step"] > 0):
            # Power: g -> 1 - g (or a swapped pair) moves g by 2 |g - 1/2|, far beyond atol.
            assert (want - 0.5).abs().max() > 1e-3, want
    # The logged mean g is the mean of the g the loss used.
    for step, record in enumerate(records):
        mean = torch.cat([e["g"] for e in seen if e["step"] == step]).mean().item()
        assert record["mean_g"] == pytest.approx(mean, abs=1e-6)


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


CRASH_AT_STEP_3 = ("import sys\nimport vrpo_fast.train.loop as L\nstep = L.Trainer.train_step\n"
                   "def crash(self):\n    if self.step == 3:\n"
                   "        raise RuntimeError('simulated crash')\n    return step(self)\n"
                   "L.Trainer.train_step = crash\n"
                   "from vrpo_fast.cli import main\nsys.exit(main())")


@pytest.mark.slow
def test_checkpoints_resume_on_another_number_of_processes(tmp_path, monkeypatch):
    """FSDP2 on 2 gloo processes computes what one process computes, and a run crashed after
    its step-2 checkpoint resumes on 2 processes (the world size that wrote it, or not) and on
    1: each finished run logs every step once, with the loss, gradient norm, token count and
    every statistic of an uninterrupted one-process run (up to the order of gradient
    reductions). The one-process run accumulates 2 micro-batches per step, each of the 2
    processes 1: a loss normalised by anything but the step's groups shows. Every third prompt
    is unlabelled, so the ranks hold different counts of labelled prompts: the labelled
    statistics are means over the step's labelled prompts all the same."""
    import shutil

    from vrpo_fast.train.loop import Trainer

    common = [*SMALL, "--train.max_steps=4", "--train.save_every=2", "--aux.mode=lagged",
              "--aux.refresh_every=3", f"--data.path={mixed_data(tmp_path)}"]
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
        keys = sorted(set(want[0]) - {"tokens_per_s", "mfu"})
        assert {"loss", "grad_norm", "tokens", "accuracy", "margin", "lr", "mean_g"} <= set(keys)
        assert set(got[0]) - {"tokens_per_s", "mfu"} == set(keys)
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
                          ("--train.shuffle=false", "train.shuffle"),
                          ("--model.tiny={hidden_size: 32, num_layers: 3, num_heads: 2, "
                           "num_kv_heads: 1, intermediate_size: 64}", "model.tiny")):
        with pytest.raises(UserError, match=rf"^{key}: .*step_00000002 was written under other "
                                            rf"settings .*start a new train.output_dir"):
            run_train(cfg_for(tmp_path, "--train.max_steps=3", override))
    # Fewer steps than the checkpoint holds: final/ would be a step-2 model under max_steps 1.
    final = Path(first.train.output_dir) / "final"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in final.iterdir())
    with pytest.raises(UserError, match=r"^train\.max_steps: 1, but .* holds a checkpoint at "
                                        r"step 2; raise train\.max_steps"):
        run_train(cfg_for(tmp_path, "--train.max_steps=1"))
    assert sorted((p.name, p.stat().st_mtime_ns) for p in final.iterdir()) == before
    capsys.readouterr()
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
