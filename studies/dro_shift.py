"""Distributionally robust training under a prompt-distribution shift, on the synthetic task.

    nice -n 10 .venv/bin/python studies/dro_shift.py --out runs/dro-shift      # every seed
    .venv/bin/python studies/dro_shift.py --summarise                          # the tables

Domains are the prompt's first letter (a, b, c, d; three prompt types each). Training prompts
are skewed: every type of domain `a` appears SKEW times as often as any other type. Evaluation
is balanced: all 12 prompt types, the same number of samples each, judged by the true
preference. Per seed (seeds fixed in advance: 0-4), one pi_ref and one training set, and with
the same seed, data and settings:
  policies   DPO, DRO-DPO (KL-DRO over prompts), VRPO and DRO-VRPO (M = 2, g = the truth);
  reward     a Bradley-Terry reward model and its KL-DRO version, scored on balanced held-out
  models     pairs (accuracy against the truth, per domain).
Each run reports the mean over domains and the worst domain; the summary gives each DRO run's
paired difference from its plain twin over seeds with a 95% t-interval. Per-seed results are
written as JSON into studies/results/ (small), the models into --out (large, not kept).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = [0, 1, 2, 3, 4]
SKEW = 10
SETTINGS = {
    "per_type_rare": 3,          # training prompts of each type outside domain a
    "skew": SKEW,                # ... and SKEW times as many of each type of domain a
    "M": 2,
    "sft_steps": 40,
    "train_steps": 30,
    "batch_groups": 8,
    "lr": 1e-3,
    "beta": 0.1,
    "dro_tau": 0.2,              # KL-DRO temperature (losses start at log 2 = 0.69)
    "dro_gamma": 0.1,
    "rm_steps": 30,
    "rm_lr": 1e-3,
    "heldout_per_type": 16,      # balanced held-out labelled pairs for the reward models
    "eval_samples": 16,          # responses per prompt type for the policies
    "max_new_tokens": 8,
}
POLICY_RUNS = {                  # name -> (estimator, DRO overrides)
    "DPO": ("dpo", {}),
    "DRO-DPO": ("dpo", {"loss.dro_tau": SETTINGS["dro_tau"],
                        "loss.dro_gamma": SETTINGS["dro_gamma"]}),
    "VRPO": ("vrpo", {}),
    "DRO-VRPO": ("vrpo", {"loss.dro_tau": SETTINGS["dro_tau"],
                          "loss.dro_gamma": SETTINGS["dro_gamma"]}),
}
RM_RUNS = {
    "RM": {},
    "DRO-RM": {"loss.dro_tau": SETTINGS["dro_tau"], "loss.dro_gamma": SETTINGS["dro_gamma"]},
}
PAIRS = [("DRO-DPO", "DPO"), ("DRO-VRPO", "VRPO"), ("DRO-RM", "RM")]


def domain(prompt: str) -> str:
    return prompt[0]


def prepare(root: Path, seed: int) -> None:
    """pi_ref (SFT warm start), the skewed training set (sampled, labelled by the truth,
    scored) and the balanced held-out labelled pairs, in `root`."""
    from vrpo_fast.demo import TINY_MODEL, _config, _label
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.score import score_stage
    from vrpo_fast.sft import sft_warm_start
    from vrpo_fast.synthetic import SyntheticTask, write_jsonl

    s = SETTINGS
    task, tokenizer = SyntheticTask(), byte_tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    model = build_tiny_causal_lm(seed=seed, **TINY_MODEL)
    sft_warm_start(model, tokenizer, task, steps=s["sft_steps"], seed=seed, progress=False)
    shutil.rmtree(root / "ref", ignore_errors=True)
    model.save_pretrained(root / "ref")
    tokenizer.save_pretrained(root / "ref")
    for name, prompts in training_sets(task).items():
        write_jsonl([{"prompt": p} for p in prompts], root / f"{name}_prompts.jsonl")
        sample_stage(_config(root, **{"sample.input": root / f"{name}_prompts.jsonl",
                                      "sample.output": root / f"{name}_sampled",
                                      "sample.num_samples": 2 + 2 * s["M"],
                                      "sample.max_new_tokens": s["max_new_tokens"],
                                      "sample.seed": seed + (0 if name == "train" else 500),
                                      "sample.shard_size": 256}))
        rows = _label(task, root / f"{name}_sampled", random.Random(seed), 0.0,
                      tokenizer.eos_token)["true_g"]
        for row in rows:
            row["domain"] = domain(row["prompt"])
        write_jsonl(rows, root / name / "data.jsonl")
        shutil.copyfile(root / f"{name}_sampled" / "provenance.json",
                        root / name / "provenance.json")
    score_stage(_config(root, **{"score.input": root / "train" / "data.jsonl",
                                 "score.output": root / "train" / "scored",
                                 "score.shard_size": 256}))


def training_sets(task) -> dict:
    s = SETTINGS

    def count(p):
        return s["per_type_rare"] * (s["skew"] if domain(p) == "a" else 1)

    return {"train": [p for p in task.prompts() for _ in range(count(p))],
            "heldout": [p for p in task.prompts() for _ in range(s["heldout_per_type"])]}


def common_settings(seed: int) -> dict:
    s = SETTINGS
    return {"ref.source": "cache", "aux.mode": "given", "loss.beta": s["beta"],
            "loss.num_mc_pairs": s["M"], "train.save_every": 0, "train.seed": seed,
            "train.batch_groups": s["batch_groups"],
            "train.micro_batch_groups": s["batch_groups"]}


def policies(root: Path, seed: int) -> dict:
    """Each policy run's true reward on the balanced prompts: mean over domains, worst."""
    from vrpo_fast.demo import _config
    from vrpo_fast.evaluate import SyntheticJudge, evaluate_policy
    from vrpo_fast.models import byte_tokenizer, load_causal_lm
    from vrpo_fast.synthetic import SyntheticTask
    from vrpo_fast.train.loop import train

    s = SETTINGS
    task, tokenizer = SyntheticTask(), byte_tokenizer()
    judge = SyntheticJudge(task)
    ref = load_causal_lm(str(root / "ref")).eval()
    eval_prompts = task.prompts()
    domains = [domain(p) for p in eval_prompts]
    out = {}
    for name, (estimator, dro) in POLICY_RUNS.items():
        final = train(_config(root, **{
            **common_settings(seed), "data.path": root / "train" / "scored",
            "loss.estimator": estimator, "train.output_dir": root / "runs" / name,
            "train.max_steps": s["train_steps"], "train.lr": s["lr"],
            "train.warmup_steps": max(1, s["train_steps"] // 10), **dro}), quiet=True)
        rep = evaluate_policy(load_causal_lm(str(final)).eval(), ref, tokenizer, eval_prompts,
                              judge, ref=ref, n=s["eval_samples"], seed=1000 + seed,
                              max_new_tokens=s["max_new_tokens"], name=name, domains=domains)
        by = rep.by_domain["true_reward"]
        out[name] = {
            "reward_mean": by["domain_mean"], "reward_worst": by["domains"][by["worst"]].mean,
            "worst_domain": by["worst"], "kl": rep.kl.mean,
            "win_rate_vs_ref": rep.win_rate_vs_baseline.mean,
            "reward_by_domain": {d: e.mean for d, e in by["domains"].items()}}
        print(f"[seed {seed}] {name}: mean {by['domain_mean']:.3f}, worst {by['worst']} "
              f"{by['domains'][by['worst']].mean:.3f}, KL {rep.kl.mean:.2f}", flush=True)
    return out


def reward_models(root: Path, seed: int) -> dict:
    """Each reward model's accuracy against the truth on balanced held-out pairs."""
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.demo import _config
    from vrpo_fast.models import byte_tokenizer
    from vrpo_fast.synthetic import SyntheticTask
    from vrpo_fast.train.reward import evaluate_reward_model, train_reward

    s = SETTINGS
    task, tokenizer = SyntheticTask(), byte_tokenizer()
    heldout, _ = load_preference_data(str(root / "heldout" / "data.jsonl"))
    out = {}
    for name, dro in RM_RUNS.items():
        final = train_reward(_config(root, **{
            **common_settings(seed), "ref.source": "none",
            "data.path": root / "train" / "data.jsonl", "loss.estimator": "dpo",
            "train.output_dir": root / "rm" / name, "train.max_steps": s["rm_steps"],
            "train.lr": s["rm_lr"], "train.warmup_steps": max(1, s["rm_steps"] // 10), **dro}),
            quiet=True)
        rm = AutoModelForSequenceClassification.from_pretrained(final)
        rep = evaluate_reward_model(rm, tokenizer, heldout, true_preference=task.preference)
        by = rep["by_domain"]["accuracy_vs_truth"]
        out[name] = {
            "accuracy_mean": by["domain_mean"], "accuracy_worst": by["domains"][by["worst"]].mean,
            "worst_domain": by["worst"],
            "accuracy_by_domain": {d: e.mean for d, e in by["domains"].items()}}
        print(f"[seed {seed}] {name}: accuracy vs truth mean {by['domain_mean']:.3f}, worst "
              f"{by['worst']} {by['domains'][by['worst']].mean:.3f}", flush=True)
    return out


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of paired differences (vrpo_fast.stats)."""
    from vrpo_fast.stats import paired

    p = paired(values, [0.0] * len(values))
    return p.mean, p.lo, p.hi


def summarise() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("dro_shift_seed*.json"))]
    seeds = [r["seed"] for r in rows]
    lines = [f"seeds: {seeds}", "",
             "| run | mean over domains | worst domain | KL(pi ‖ pi_ref) |", "|---|---|---|---|"]
    for name in POLICY_RUNS:
        vals = [r["policies"][name] for r in rows if name in r["policies"]]
        if vals:
            lines.append(f"| {name} | {sum(v['reward_mean'] for v in vals) / len(vals):.3f} | "
                         f"{sum(v['reward_worst'] for v in vals) / len(vals):.3f} | "
                         f"{sum(v['kl'] for v in vals) / len(vals):.2f} |")
    lines += ["", "| reward model | accuracy vs truth, mean over domains | worst domain |",
              "|---|---|---|"]
    for name in RM_RUNS:
        vals = [r["reward_models"][name] for r in rows if name in r.get("reward_models", {})]
        if vals:
            lines.append(f"| {name} | {sum(v['accuracy_mean'] for v in vals) / len(vals):.3f} | "
                         f"{sum(v['accuracy_worst'] for v in vals) / len(vals):.3f} |")
    lines += ["", "| paired difference (per seed, then mean [95% t-interval]) | mean over "
              "domains | worst domain |", "|---|---|---|"]
    for a, b in PAIRS:
        section, keys = (("reward_models", ("accuracy_mean", "accuracy_worst")) if "RM" in a
                         else ("policies", ("reward_mean", "reward_worst")))
        have = [r for r in rows if a in r.get(section, {}) and b in r.get(section, {})]
        if len(have) < 2:
            continue
        cells = []
        for k in keys:
            diffs = [r[section][a][k] - r[section][b][k] for r in have]
            m, lo, hi = t_interval(diffs)
            per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
            cells.append(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}] ({per_seed})")
        lines.append(f"| {a} - {b} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dro-shift")
    parser.add_argument("--seeds", type=int, nargs="*", default=SEEDS)
    parser.add_argument("--phases", nargs="*", default=["policies", "reward_models"],
                        choices=["policies", "reward_models"],
                        help="the policy runs (which prepare each seed's data first), then the "
                             "reward models (on the data the policy phase prepared)")
    parser.add_argument("--summarise", action="store_true", help="print the tables only")
    args = parser.parse_args()
    from vrpo_fast.synthetic import SyntheticTask

    if not args.summarise:
        RESULTS.mkdir(exist_ok=True)
        # Every seed's policies first, then every seed's reward models.
        for phase in args.phases:
            for seed in args.seeds:
                root = Path(args.out) / f"seed{seed}"
                path = RESULTS / f"dro_shift_seed{seed}.json"
                if phase == "policies":
                    start = time.time()
                    prepare(root, seed)
                    train_prompts = training_sets(SyntheticTask())["train"]
                    result = {"seed": seed, "settings": SETTINGS,
                              "train_domains": {d: sum(domain(p) == d for p in train_prompts)
                                                for d in "abcd"},
                              "policies": policies(root, seed)}
                    result["policy_seconds"] = time.time() - start
                else:
                    result = json.loads(path.read_text())
                    result["reward_models"] = reward_models(root, seed)
                path.write_text(json.dumps(result, indent=1))
    print(summarise())


if __name__ == "__main__":
    main()
