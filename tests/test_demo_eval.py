"""The evaluator on cases with a known answer, `vrpo-fast eval`, and the demo pipeline."""

import json

import pytest
import torch
from helpers import TINY
from torch import nn

from vrpo_fast.cli import main as cli_main
from vrpo_fast.errors import UserError
from vrpo_fast.evaluate import (
    CallableJudge,
    Estimate,
    SyntheticJudge,
    evaluate_policy,
    make_judge,
    win_rate,
)
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.synthetic import SyntheticTask


class FixedPolicy(nn.Module):
    """A 'model' whose generate() always emits the same continuation, then EOS."""

    def __init__(self, tokenizer, pick):
        from transformers import GenerationConfig

        super().__init__()
        self.tokenizer, self.pick = tokenizer, pick
        self.anchor = nn.Parameter(torch.zeros(1))
        self.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)

    def generate(self, input_ids, num_return_sequences, max_new_tokens, **_):
        rows = []
        for row in input_ids.repeat_interleave(num_return_sequences, 0).tolist():
            prompt = self.tokenizer.decode([t for t in row if t > 2])
            cont = self.tokenizer(self.pick(prompt), add_special_tokens=False)["input_ids"]
            rows.append(row + (cont + [self.tokenizer.eos_token_id])[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_estimate_confidence_interval():
    est = Estimate.of([0.0, 1.0] * 50)
    assert est.mean == 0.5 and est.n == 100
    half = 1.96 * (0.25 * 100 / 99) ** 0.5 / 10
    assert est.hi - est.mean == pytest.approx(half) and est.mean - est.lo == pytest.approx(half)


def test_policy_emitting_the_preferred_response_wins_almost_always(tokenizer):
    task = SyntheticTask(weight=1.0, sharpness=50.0)     # one population, nearly deterministic
    judge = SyntheticJudge(task)
    best = FixedPolicy(tokenizer, lambda p: task.best_response(p[:3]))
    worst = FixedPolicy(tokenizer, lambda p: "d" if p[0] != "d" else "c")
    baseline = build_tiny_causal_lm(seed=0, **TINY)       # random bytes
    prompts = task.prompts()
    up = evaluate_policy(best, baseline, tokenizer, prompts, judge, n=8, max_new_tokens=6)
    assert up.win_rate_vs_baseline.mean > 0.99
    assert up.true_reward.mean == pytest.approx(6.0)      # six copies of the first letter
    down = evaluate_policy(worst, best, tokenizer, prompts, judge, n=4, max_new_tokens=6)
    assert down.win_rate_vs_baseline.mean < 0.01


def test_win_rate_is_the_mean_preference_by_enumeration():
    task = SyntheticTask()
    judge = SyntheticJudge(task)
    prompts = ["ab>", "cd>"]
    policy = [["aa", "b"], ["cc", "d"]]
    base = [["ba", "dd"], ["c", "ab"]]
    want = ((task.preference("ab>", "aa", "ba") + task.preference("ab>", "b", "dd")) / 2
            + (task.preference("cd>", "cc", "c") + task.preference("cd>", "d", "ab")) / 2) / 2
    assert win_rate(prompts, policy, base, judge).mean == pytest.approx(want)


def test_judges_from_specs(tmp_path, monkeypatch):
    assert isinstance(make_judge("synthetic"), SyntheticJudge)
    (tmp_path / "myjudge.py").write_text(
        "def judge(prompt, y, y2):\n    return 1.0 if len(y) > len(y2) else 0.0\n"
        "def bad(prompt, y, y2):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    j = make_judge("python:myjudge:judge")
    assert isinstance(j, CallableJudge) and j.preference("p", "aa", "a") == 1.0
    with pytest.raises(UserError, match="not a probability"):
        make_judge("python:myjudge:bad").preference("p", "a", "b")
    with pytest.raises(UserError, match="cannot import"):
        make_judge("python:myjudge:nope")
    with pytest.raises(UserError, match="unknown judge"):
        make_judge("oracle")


def test_eval_cli_on_saved_models(tmp_path, capsys, tokenizer):
    model_dir = tmp_path / "m"
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("ab>", "cd>")))
    rc = cli_main(["eval", "--model", str(model_dir), "--baseline", str(model_dir),
                   "--prompts", str(prompts), "--num-samples", "4", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "win rate of" in out and "expected reward" in out
    # The policy is pi_ref itself: every log-ratio is exactly zero.
    assert "KL(policy || ref): 0.000 [0.000, 0.000]" in out
    rc = cli_main(["eval", "--model", str(tmp_path / "missing"), "--baseline", str(model_dir),
                   "--prompts", str(prompts)])
    assert rc == 1 and f"eval.policy: no such folder '{tmp_path / 'missing'}'" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_writes_its_report(tmp_path, capsys):
    rc = cli_main(["demo", "--out", str(tmp_path / "demo"), "--quick"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| DPO |" in out and "| VRPO M=4 |" in out
    for name in ("report.md", "results.json", "reward_vs_kl.png", "grad_variance.png",
                 "loss_curves.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    names = {r["name"] for r in results["runs"]}
    assert names == {"DPO", "VRPO M=4", "VRPO M=4, noisy g"}
    for r in results["runs"]:
        assert 0 <= r["win_rate_vs_ref"]["mean"] <= 1 and r["grad_variance"] > 0


@pytest.mark.slow
def test_demo_lagged_and_reward_model_g_variants(tmp_path):
    from vrpo_fast.demo import DemoSettings, run_demo
    from vrpo_fast.train.metrics import read_metrics

    settings = DemoSettings(seeds=[0], Ms=[2], noisy_g=True, lagged_g=True, lagged_refresh=3,
                            rm_g=True, rm_steps=3, prompts_per_type=2, sft_steps=20,
                            train_steps=4, batch_groups=8, eval_samples=4, variance_batches=2)
    results = run_demo(tmp_path, settings)
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"DPO", "VRPO M=2", "VRPO M=2, noisy g", "VRPO M=2, lagged g",
                         "VRPO M=2, RM g"}
    assert runs["VRPO M=2, lagged g"]["g"] == "lagged" and runs["VRPO M=2"]["g"] == "true"
    lagged = read_metrics(tmp_path / "seed0" / "runs" / "VRPO_M2_lagged_g")
    given = read_metrics(tmp_path / "seed0" / "runs" / "VRPO_M2")
    # The copy is the policy at step 1 (zero margins: g = 1/2 everywhere), the truth is not.
    assert lagged[0]["mean_g"] == pytest.approx(0.5, abs=1e-6)
    assert abs(given[0]["mean_g"] - 0.5) > 1e-3
    assert runs["VRPO M=2, lagged g"]["grad_variance"] > 0
    # g's error against the truth: none for the truth itself, the clipped noise for the noisy
    # copy, something for the reward model's g (scored by the trained model, not copied).
    assert runs["VRPO M=2"]["g_error"] == 0 and runs["VRPO M=2, lagged g"]["g_error"] is None
    assert 0.1 < runs["VRPO M=2, noisy g"]["g_error"] < 0.25
    assert runs["VRPO M=2, RM g"]["g_error"] > 0.01
    from vrpo_fast.data.load import load_preference_data

    rm_rows, _ = load_preference_data(str(tmp_path / "seed0" / "rm_g" / "scored"))
    rm_model = tmp_path / "seed0" / "rm" / "final"
    assert rm_model.is_dir() and all(0 < p < 1 for ex in rm_rows for p in ex.aux_prefs)
