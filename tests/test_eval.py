"""`vrpo-fast eval`: its 95% intervals against an independent computation, and the options of a
real evaluation (conversational prompts, temperatures, win rates against pi_ref, a baseline and
the data's chosen responses, the report) on a tiny model."""

import json
import math
import random
import statistics
import sys

import pytest
import torch

from vrpo_fast.cli import main as cli_main
from vrpo_fast.evaluate import CallableJudge, Estimate, RewardModelJudge, win_rate
from vrpo_fast.models import build_tiny_causal_lm

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.mark.parametrize("n", [2, 7, 50])
def test_interval_is_the_normal_95_interval_of_the_mean(n):
    """mean +- z_0.975 * s / sqrt(n), s the sample standard deviation, from the standard
    library's statistics (z to the 1.96 the code uses)."""
    rng = random.Random(n)
    values = [rng.random() for _ in range(n)]
    est = Estimate.of(values)
    z = statistics.NormalDist().inv_cdf(0.975)
    half = z * statistics.stdev(values) / math.sqrt(n)
    mean = statistics.fmean(values)
    assert est.n == n and est.mean == pytest.approx(mean, rel=1e-12)
    assert est.lo == pytest.approx(mean - half, rel=1e-4)
    assert est.hi == pytest.approx(mean + half, rel=1e-4)


def test_interval_covers_the_truth_at_its_nominal_rate():
    """Over many draws of 200 Bernoulli(0.3) win indicators, the interval holds 0.3 in about 95%
    of them (2000 repetitions: 95% +- 1.5 points at three standard errors)."""
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        est = Estimate.of([float(rng.random() < 0.3) for _ in range(200)])
        hits += est.lo <= 0.3 <= est.hi
    assert abs(hits / 2000 - 0.95) < 0.015


def test_win_rate_against_one_fixed_response_per_prompt_by_enumeration():
    """The chosen response plays every sample of its prompt; prompts weigh equally."""
    judge = CallableJudge(lambda p, y, y2: 1.0 / (1.0 + len(y2) / (1 + len(y))))
    prompts = ["a", "b"]
    policy = [["x", "xyz", "xy"], ["pq", "p"]]
    chosen = [["chosen one"], ["c"]]
    per_prompt = [statistics.fmean(judge.fn(p, y, c[0]) for y in ys)
                  for p, ys, c in zip(prompts, policy, chosen)]
    est = win_rate(prompts, policy, chosen, judge)
    assert est.mean == pytest.approx(statistics.fmean(per_prompt))
    assert est.hi - est.lo == pytest.approx(2 * 1.96 * statistics.stdev(per_prompt) /
                                            math.sqrt(2))


def test_reward_model_judge_renders_conversations_with_its_chat_template(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.models import tiny_llama_config

    AutoModelForSequenceClassification.from_config(
        tiny_llama_config(num_labels=1, **TINY)).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"))
    chat = [{"role": "user", "content": "hi"}]
    want = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": "yo"}],
                                         tokenize=False)
    assert judge.text(chat, "yo") == want
    assert judge.text("plain> ", "yo") == "plain> yo"
    p = judge.preference(chat, "yo", "hey")
    assert p + judge.preference(chat, "hey", "yo") == pytest.approx(1.0)


JUDGE = '''
PROMPTS = []

def shorter(prompt, y, y2):
    """1 when y is shorter than y2, 0 when longer, 1/2 on a tie."""
    PROMPTS.append(prompt)
    return 0.5 if len(y) == len(y2) else float(len(y) < len(y2))
'''


def test_eval_options_on_a_tiny_model(tmp_path, tokenizer, capsys, monkeypatch):
    """Conversational prompts, two temperatures, a baseline and the data's chosen responses.
    The policy, baseline and pi_ref are one model sampled under one seed per temperature, so
    their samples are the same: against each other every win rate is exactly 1/2 (a symmetric
    judge on ties); the chosen responses are longer than any 3-token sample, so the shorter-wins
    judge gives exactly 1 against them; KL(pi || pi) is 0."""
    model_dir = tmp_path / "m"
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "judges.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": [{"role": "user", "content": f"question {i}?"}],
             "chosen": [{"role": "assistant", "content": "a long chosen answer"}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(3)]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    rc = cli_main(["eval", "--model", str(model_dir), "--baseline", str(model_dir),
                   "--ref", str(model_dir), "--prompts", str(prompts),
                   "--judge", "python:judges:shorter", "--num-samples", "2",
                   "--max-new-tokens", "3", "--temperatures", "0.7,1", "--output", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    results = json.loads((out / "results.json").read_text())
    assert [r["temperature"] for r in results["rows"]] == [0.7, 1.0]
    for row in results["rows"]:
        for key in ("vs_ref", "vs_baseline"):
            assert (row[key]["mean"], row[key]["lo"], row[key]["hi"]) == (0.5, 0.5, 0.5)
        assert row["vs_chosen"]["mean"] == 1.0 and row["vs_chosen"]["n"] == 3
    assert results["kl"]["mean"] == 0.0
    assert all(isinstance(p, list) and p[0]["role"] == "user"
               for p in sys.modules["judges"].PROMPTS)      # the judge saw the conversations
    report = (out / "report.md").read_text()
    assert "| 0.7 |" in report and "vs chosen responses" in report
    assert (out / "win_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_samples_prompts_through_the_chat_template(tmp_path, tokenizer, monkeypatch):
    """The prompt ids eval samples from are the template's rendering (with the generation
    prompt), as `sample` and training tokenize them."""
    from vrpo_fast import evaluate
    from vrpo_fast.config import load_config

    seen = []
    real = evaluate._sampler

    def spy(*args, **kwargs):
        sampler = real(*args, **kwargs)
        inner = sampler.sample
        sampler.sample = lambda ids, n, seed: (seen.append(ids), inner(ids, n, seed))[1]
        return sampler

    monkeypatch.setattr(evaluate, "_sampler", spy)
    (tmp_path / "judges.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    chat = [{"role": "user", "content": "hi"}]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": chat}) + "\n")
    cfg = load_config(None, ["--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, "
                             "num_kv_heads: 1, intermediate_size: 64}", "--model.tokenizer=byte",
                             f"--eval.policy={tmp_path / 'policy'}",
                             "--eval.judge=python:judges:shorter",
                             f"--eval.prompts={tmp_path / 'p.jsonl'}",
                             f"--eval.output={tmp_path / 'report'}",
                             "--eval.temperatures=[0.5]", "--eval.max_new_tokens=2",
                             "--eval.num_samples=1"])
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(tmp_path / "policy")
    evaluate.eval_stage(cfg)
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert seen and all(ids == [want] for ids in seen)


@pytest.mark.parametrize("args, match", [
    (["--temperatures", "0.5,hot"], "--temperatures: expected numbers"),
    (["--temperatures", "0"], "eval.temperatures: expected a list of numbers > 0"),
    (["--num-samples", "0"], "eval.num_samples: must be >= 1"),
])
def test_eval_bad_options_are_one_line(tmp_path, capsys, args, match):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ab>"}) + "\n")
    rc = cli_main(["eval", "--model", str(tmp_path), "--ref", str(tmp_path), "--prompts",
                   str(prompts), *args])
    err = capsys.readouterr().err
    assert rc == 1 and match in err and err.count("\n") == 1


def test_eval_device_is_float32_on_the_cpu():
    from vrpo_fast.evaluate import eval_device

    device, dtype = eval_device()
    want = (torch.device("cuda", 0), torch.bfloat16) if torch.cuda.is_available() else \
        (torch.device("cpu"), torch.float32)
    assert (device, dtype) == want
