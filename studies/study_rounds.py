"""On-policy rounds on the synthetic task: iterative VRPO against iterative DPO, and against one
round on a fixed labelled set, at the same label budget. Paired over 64 seeds fixed in advance.

    nice -n 19 .venv/bin/python -P studies/study_rounds.py --out runs/study-rounds    # resumes
    .venv/bin/python -P studies/study_rounds.py --summarise                          # tables

Per seed (SEEDS), one pi_ref_0 (the demo's tiny Llama-style model, SFT warm start) and one
prompt set of LABELS prompts (4 per prompt type, shuffled by the seed). Every arm spends the
same LABELS labels, draws the same number of Monte Carlo responses (M per labelled prompt; none
for DPO) and takes the same total number of optimizer steps, through the project's own rounds
driver (`vrpo_fast.rounds`: sample -> label -> score -> train per round); the labeller is the
task's true preference (one Bernoulli draw per pair) and g, for VRPO, either the same truth
(the labeller's own p: VRPO then distils the truth, docs/rounds.md) or a biased judge that
models the majority annotators alone (`majority_g`, label.g_function):

    iterative VRPO          ROUNDS rounds of LABELS / ROUNDS fresh prompts, pi_ref_r = round
                            r-1's policy, g = the truth
    iterative DPO           the same rounds with the DPO estimator
    fixed VRPO              one round of all LABELS prompts from pi_ref_0 (the offline recipe)
    iterative VRPO judge g  iterative VRPO with the biased g
    fixed VRPO judge g      fixed VRPO with the biased g

Each arm's final policy is judged under the true preference on all 12 prompt types: expected
true reward and KL(pi || pi_ref_0) from EVAL_SAMPLES samples per prompt. A run whose KL passes
DRIFT_KL nats has drifted: counted apart, and the reward comparison repeated without the seeds
where either run drifted (vrpo_fast.stats.compare).

Resumable twice over: a seed's JSON in studies/results/ (rounds_seed<N>.json) holds each
finished arm, which is not run again; an arm killed half-way resumes inside its rounds
(`vrpo-fast run`'s own resume). Arms are ordered by priority, every seed's first arm before
any seed's second, so an interrupted sweep still has complete pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = list(range(200, 264))    # 64 seeds fixed before running; disjoint from the older studies
DRIFT_KL = 4.0                   # nats: a run with KL(pi || pi_ref_0) above this has drifted
ROUNDS = 3
LABELS = 48                      # the label budget of every arm (4 prompts per prompt type)
SETTINGS = {
    "rounds": ROUNDS,
    "labels": LABELS,
    "M": 4,                      # Monte Carlo pairs per labelled prompt (VRPO)
    "sft_steps": 40,
    "steps_per_label_round": 8,  # optimizer steps per ROUNDS-th of the labels
    "batch_groups": 8,
    "lr": 1e-3,
    "beta": 0.1,
    "loss_type": "sigmoid",
    "max_new_tokens": 8,
    "eval_samples": 16,
}
# name -> (rounds, estimator, g: the labeller's own p (the truth) or the majority judge's)
ARMS = {"iterative VRPO": (ROUNDS, "vrpo", "truth"), "iterative DPO": (ROUNDS, "dpo", None),
        "fixed VRPO": (1, "vrpo", "truth"),
        "iterative VRPO judge g": (ROUNDS, "vrpo", "judge"),
        "fixed VRPO judge g": (1, "vrpo", "judge")}
ORDER = list(ARMS)
PAIRS = [("iterative VRPO", "iterative DPO"), ("iterative VRPO", "fixed VRPO"),
         ("fixed VRPO", "iterative DPO"), ("iterative VRPO judge g", "iterative DPO"),
         ("iterative VRPO judge g", "fixed VRPO judge g")]


def majority_g(prompt: str, y: str, y2: str) -> float:
    """A biased, informative g (label.g_function of the judge-g arms): the majority
    population's Bradley-Terry preference alone, the systematic error a judge or reward model
    would make (studies/study_regime.py's `judge`). The labels stay the truth's."""
    import math

    from vrpo_fast.synthetic import SyntheticTask

    task = SyntheticTask()
    a, _ = task.rewards(prompt, y)
    b, _ = task.rewards(prompt, y2)
    return 1 / (1 + math.exp(-task.sharpness * (a - b)))


def prepare(root: Path, seed: int) -> None:
    """pi_ref_0 (root/ref) and the seed's prompt set (root/prompts.jsonl)."""
    import random

    from vrpo_fast.demo import TINY_MODEL
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
    from vrpo_fast.sft import sft_warm_start
    from vrpo_fast.synthetic import SyntheticTask, write_jsonl

    task = SyntheticTask()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "ref" / "config.json").is_file():
        tokenizer = byte_tokenizer()
        model = build_tiny_causal_lm(seed=seed, **TINY_MODEL)
        sft_warm_start(model, tokenizer, task, steps=SETTINGS["sft_steps"], seed=seed,
                       progress=False)
        model.save_pretrained(root / "ref.tmp")
        tokenizer.save_pretrained(root / "ref.tmp")
        shutil.rmtree(root / "ref", ignore_errors=True)
        (root / "ref.tmp").rename(root / "ref")
    prompts = [p for p in task.prompts() for _ in range(LABELS // len(task.prompts()))]
    random.Random(seed).shuffle(prompts)
    if not (root / "prompts.jsonl").is_file():
        write_jsonl([{"prompt": p} for p in prompts], root / "prompts.jsonl")


def arm_config(root: Path, seed: int, name: str):
    from vrpo_fast.config import load_config

    s = SETTINGS
    rounds, estimator, g = ARMS[name]
    steps = s["steps_per_label_round"] * ROUNDS // rounds
    over = {"model.path": root / "ref", "model.tokenizer": "byte",
            "sample.input": root / "prompts.jsonl", "sample.num_samples": 2 * s["M"],
            "sample.max_new_tokens": s["max_new_tokens"], "sample.seed": seed,
            "sample.shard_size": LABELS, "sample.batch_size": 16,
            "label.mode": "truth", "label.seed": seed,
            "rounds.output": root / name.replace(" ", "_"),
            "rounds.prompts_per_round": LABELS // rounds,
            "ref.source": "cache", "aux.mode": "given", "loss.estimator": estimator,
            "loss.beta": s["beta"], "loss.loss_type": s["loss_type"],
            "score.shard_size": LABELS, "train.max_steps": steps, "train.save_every": 0,
            "train.seed": seed, "train.batch_groups": s["batch_groups"],
            "train.micro_batch_groups": s["batch_groups"], "train.lr": s["lr"],
            "train.warmup_steps": 1, "run.rounds": rounds,
            "run.stages": "[sample, score, train]"}
    if g == "judge":
        if str(HERE) not in sys.path:          # label.g_function imports this script
            sys.path.insert(0, str(HERE))
        over["label.g_function"] = "study_rounds:majority_g"
    return load_config(None, [f"--{k}={v}" for k, v in over.items()])


def run_arm(root: Path, seed: int, name: str) -> dict:
    """Run (or resume) arm `name`; its final policy's true reward, KL and win rate against
    pi_ref_0, and the per-round training statistics."""
    import contextlib
    import io

    from vrpo_fast.evaluate import SyntheticJudge, evaluate_policy
    from vrpo_fast.models import byte_tokenizer, load_causal_lm
    from vrpo_fast.rounds import round_dir, run_rounds
    from vrpo_fast.synthetic import SyntheticTask
    from vrpo_fast.train.metrics import read_metrics

    cfg = arm_config(root, seed, name)
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        run_rounds(cfg, progress=False)
    last = round_dir(cfg, cfg.run.rounds - 1) / "train" / "final"
    task, tokenizer = SyntheticTask(), byte_tokenizer()
    ref = load_causal_lm(str(root / "ref")).eval()
    rep = evaluate_policy(load_causal_lm(str(last)).eval(), ref, tokenizer, task.prompts(),
                          SyntheticJudge(task), ref=ref, n=SETTINGS["eval_samples"],
                          seed=1000 + seed, max_new_tokens=SETTINGS["max_new_tokens"], name=name)
    per_round = []
    for r in range(cfg.run.rounds):
        log = read_metrics(round_dir(cfg, r) / "train")
        gaps = [x["term_label"] - x["term_mc"] for x in log if "term_mc" in x]
        per_round.append({"final_loss": log[-1]["loss"],
                          "mean_term_gap": sum(gaps) / len(gaps) if gaps else None})
    shutil.rmtree(cfg.rounds.output, ignore_errors=True)
    return {"true_reward": rep.true_reward.mean, "kl": rep.kl.mean,
            "win_rate_vs_ref": rep.win_rate_vs_baseline.mean, "rounds": per_round,
            "seconds": time.time() - start}


def write_result(path: Path, result: dict) -> None:
    """Write a seed's result, keeping arms another worker wrote to the file meanwhile."""
    if path.exists():
        result["arms"] = {**json.loads(path.read_text())["arms"], **result["arms"]}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def reference_reward(root: Path, seed: int) -> float:
    from vrpo_fast.evaluate import SyntheticJudge, expected_reward
    from vrpo_fast.models import byte_tokenizer, load_causal_lm
    from vrpo_fast.samplers import draw
    from vrpo_fast.synthetic import SyntheticTask

    task = SyntheticTask()
    ys, _, _ = draw(load_causal_lm(str(root / "ref")).eval(), byte_tokenizer(), task.prompts(),
                    SETTINGS["eval_samples"], seed=3000 + seed,
                    max_new_tokens=SETTINGS["max_new_tokens"])
    return expected_reward(task.prompts(), ys, SyntheticJudge(task)).mean


def sweep(out: Path, seeds: list[int], arms: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    for name in arms:
        for seed in seeds:
            path = RESULTS / f"rounds_seed{seed}.json"
            result = (json.loads(path.read_text()) if path.exists() else
                      {"seed": seed, "settings": SETTINGS, "arms": {}})
            if name in result["arms"]:
                continue
            root = out / f"seed{seed}"
            prepare(root, seed)
            if "ref_true_reward" not in result:
                result["ref_true_reward"] = reference_reward(root, seed)
            result["arms"][name] = run_arm(root, seed, name)
            r = result["arms"][name]
            print(f"[seed {seed}] {name}: reward {r['true_reward']:.3f}, KL {r['kl']:.2f} "
                  f"({r['seconds']:.0f} s)", flush=True)
            write_result(path, result)
            if all(a in result["arms"] for a in ARMS):
                shutil.rmtree(root, ignore_errors=True)


def summarise() -> str:
    from vrpo_fast.stats import compare, paired, wilson

    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("rounds_seed*.json"))]
    rows = [r for r in rows if r["seed"] in SEEDS]
    lines = [f"seeds fixed in advance: {SEEDS[0]}-{SEEDS[-1]} ({len(SEEDS)}); with results: "
             f"{len(rows)}; drift: KL(pi || pi_ref_0) > {DRIFT_KL:g} nats; settings {SETTINGS}",
             ""]
    ref = [r["ref_true_reward"] for r in rows if "ref_true_reward" in r]
    if ref:
        lines.append(f"pi_ref_0's expected true reward: {sum(ref) / len(ref):.3f} "
                     f"({len(ref)} seeds)\n")
    lines += ["| arm | seeds | true reward | KL | win rate vs pi_ref_0 | drifted |",
              "|---|---|---|---|---|---|"]
    for name in ORDER:
        have = [r["arms"][name] for r in rows if name in r["arms"]]
        if have:
            n = len(have)
            lines.append(f"| {name} | {n} | {sum(h['true_reward'] for h in have) / n:.3f} | "
                         f"{sum(h['kl'] for h in have) / n:.2f} | "
                         f"{sum(h['win_rate_vs_ref'] for h in have) / n:.3f} | "
                         f"{sum(h['kl'] > DRIFT_KL for h in have)} |")
    lines.append("")
    table = ["| a - b | seeds | true reward, paired difference [95%] | sign test p | without "
             "drifted seeds [95%] | KL difference [95%] | drifted (Wilson 95%): a / b |",
             "|---|---|---|---|---|---|---|"]
    for a_name, b_name in PAIRS:
        a = {r["seed"]: (r["arms"][a_name]["true_reward"], r["arms"][a_name]["kl"])
             for r in rows if a_name in r["arms"]}
        b = {r["seed"]: (r["arms"][b_name]["true_reward"], r["arms"][b_name]["kl"])
             for r in rows if b_name in r["arms"]}
        if len(set(a) & set(b)) < 2:
            continue
        c = compare(a, b, a_name, b_name, DRIFT_KL)
        lines += c.lines() + [""]
        wa, wb = wilson(c.drift_a, c.n), wilson(c.drift_b, c.n)
        nd = c.reward_no_drift
        table.append(f"| {a_name} - {b_name} | {c.n} | {c.reward.mean:+.3f} "
                     f"[{c.reward.lo:+.3f}, {c.reward.hi:+.3f}] | {c.reward.p_sign:.2g} | "
                     f"{nd.mean:+.3f} [{nd.lo:+.3f}, {nd.hi:+.3f}] (n={nd.n}) | "
                     f"{c.kl.mean:+.2f} [{c.kl.lo:+.2f}, {c.kl.hi:+.2f}] | {c.drift_a} "
                     f"[{wa[0]:.2f}, {wa[1]:.2f}] / {c.drift_b} [{wb[0]:.2f}, {wb[1]:.2f}] |")
    gaps = [g for r in rows for name in ARMS if ARMS[name][1] == "vrpo" and name in r["arms"]
            for g in [x["mean_term_gap"] for x in r["arms"][name]["rounds"]] if g is not None]
    if gaps:
        lines.append(f"term_label - term_mc, mean over each VRPO round's steps: "
                     f"{paired(gaps, [0.0] * len(gaps))} ({len(gaps)} rounds; zero in "
                     f"expectation when the pairs come from pi_ref_r)")
        lines.append("")
    return "\n".join(lines + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study-rounds", help="models and data (large)")
    parser.add_argument("--seeds", type=int, nargs="*", default=SEEDS)
    parser.add_argument("--arms", nargs="*", default=ORDER, choices=ORDER)
    parser.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"),
                        help="run every N-th seed starting at the I-th (parallel workers)")
    parser.add_argument("--summarise", action="store_true", help="print the tables only")
    args = parser.parse_args()
    if not args.summarise:
        i, n = args.shard
        sweep(Path(args.out), args.seeds[i::n], args.arms)
    print(summarise())


if __name__ == "__main__":
    main()
