"""The memory planner against measurement: a CPU training step's peak tensor memory (the
profiler's allocation events, vrpo_fast.bench.memory, as the benchmarks count it) is within 15 %
of the plan for tiny configs with and without activation checkpointing and LoRA; its weight,
gradient and optimizer components equal the tensors the trainer holds; the command prints the
plan, and a plan that does not fit is one line naming the component that breaks the budget."""

import pytest
import torch
from helpers import ROOT

from vrpo_fast.cli import main as cli_main
from vrpo_fast.config import load_config

TINY = ROOT / "configs" / "tiny.yaml"


def _measured_step(cfg):
    """(peak bytes of one training step after a warm-up step, the tokens of its largest
    micro-batch, the trainer)."""
    import vrpo_fast.train.loop as loop
    from vrpo_fast.bench.memory import measure, tensor_bytes
    from vrpo_fast.train.loop import Trainer

    trainer = Trainer(cfg, quiet=True)
    tokens = []
    real = loop.pack_groups

    def counting(*args, **kwargs):
        batch = real(*args, **kwargs)
        tokens.append(batch.input_ids.numel())
        return batch

    loop.pack_groups = counting
    try:
        trainer.train_step()                 # optimizer states exist from here on
        tokens.clear()
        held = [trainer.policy, trainer.optimizer]
        if isinstance(trainer.ref, torch.nn.Module):
            held.append(trainer.ref)
        peak = measure(trainer.train_step, tensor_bytes(*held))["peak_bytes"]
    finally:
        loop.pack_groups = real
        trainer._release_lock()
    return peak, max(tokens), trainer


@pytest.mark.parametrize("overrides", [
    [],
    ["--train.activation_checkpointing=true"],
    ["--lora.enabled=true"],
    ["--model.tiny={hidden_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, "
     "intermediate_size: 256}", "--train.micro_batch_groups=16"],
], ids=["plain", "checkpointing", "lora", "wider"])
def test_plan_is_within_15_percent_of_the_measured_peak(tmp_path, overrides):
    from vrpo_fast.plan import plan_memory

    cfg = load_config(TINY, [f"--train.output_dir={tmp_path / 'run'}", "--train.save_every=0",
                             *overrides])
    peak, tokens, trainer = _measured_step(cfg)
    plan = plan_memory(cfg, gpus=1, tokens=tokens, device="cpu")
    assert abs(plan.total / peak - 1) < 0.15, (plan.components, peak)
    # The persistent components are the parameters and AdamW moments the trainer holds.
    held = sum(p.nbytes for p in trainer.policy.parameters()) + sum(
        s[k].nbytes for s in trainer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    persistent = sum(plan.components[k] for k in ("weights", "optimizer", "lora"))
    persistent -= plan.components["lora"] // 4      # less the adapters' gradients
    assert persistent == held


def test_plan_command_prints_the_plan_and_the_largest_budget(capsys):
    rc = cli_main(["plan", "--config", str(TINY), "--gpus", "2", "--gpu-memory", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("weights", "gradients", "optimizer", "activations", "lm_head", "ref", "total"):
        assert name in out
    assert "largest packing budget that fits" in out
    most = int(out.split("largest packing budget that fits: ")[1].split()[0])
    assert "micro-batch:" not in out

    group = max(1, most // 5) + 1                # 4 whole groups fit, a fifth does not
    assert cli_main(["plan", "--config", str(TINY), "--gpus", "2", "--gpu-memory", "1",
                     "--group-tokens", str(group), "--train.micro_batch_groups=8"]) == 0
    out = capsys.readouterr().out
    assert f"up to {most // group} groups (train.micro_batch_groups = 8 is over it)" in out
    assert most // group == 4
    assert cli_main(["plan", "--config", str(TINY), "--gpus", "2", "--gpu-memory", "1",
                     "--group-tokens", str(most + 1)]) == 0
    assert "a prompt group of" in capsys.readouterr().out


def test_a_plan_that_does_not_fit_names_the_component(capsys):
    rc = cli_main(["plan", "--config", str(TINY), "--gpu-memory", "0.001",
                   "--tokens", "100000"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "the largest component is activations" in err


def test_budget_and_gpu_search_agree_with_the_plan():
    from vrpo_fast.plan import GIB, fewest_gpus, largest_tokens, plan_memory

    cfg = load_config(TINY, ["--model.tiny={hidden_size: 4096, num_layers: 4, num_heads: 32, "
                             "num_kv_heads: 8, intermediate_size: 14336, vocab_size: 128256}"])
    budget = 32 * GIB
    most = largest_tokens(cfg, gpus=2, budget=budget)
    assert most > 0
    assert plan_memory(cfg, gpus=2, tokens=most).total <= budget
    assert plan_memory(cfg, gpus=2, tokens=most + 64).total > budget
    n = fewest_gpus(cfg, budget=budget, tokens=1024)
    assert plan_memory(cfg, gpus=n, tokens=1024).total <= budget
    assert n == 1 or plan_memory(cfg, gpus=n // 2, tokens=1024).total > budget
