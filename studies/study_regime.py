"""Where does VRPO beat DPO? Paired runs over 32 seeds fixed in advance, on the synthetic task.

    nice -n 15 .venv/bin/python studies/study_regime.py --out runs/study-regime   # resumes
    .venv/bin/python studies/study_regime.py --summarise                          # the tables

The theory (docs/study.md) predicts a gain where the estimator's gradient variance limits the
final policy: few labels, a learning rate low enough that runs do not drift, several Monte Carlo
pairs, and a g close to the true preference. Per seed (SEEDS), the demo's pipeline builds one
pi_ref (tiny model, SFT warm start) and ONE data set of few labelled prompts (4 per prompt
type, 48 in all) with 2 + 2 * 4 responses each from pi_ref; then every run of RUNS trains on
it with the same seed and settings, and is judged under the true preference (expected true
reward and KL(pi || pi_ref) on all 12 prompt types). The labels axis: a second labelled set of
MORE_LABELS prompts per type (144), from the same pi_ref, for DPO and VRPO M = 4. The gradient
variance of each estimator at pi_ref's parameters is measured on the same data
(VARIANCE_BATCHES mini-batches).

g's quality, for VRPO: `true` (the true preference), `noisy` (the truth plus N(0, 0.25) noise,
clipped), `judge` (a judge that models the majority annotators alone: the Bradley-Terry
preference of population 1, a systematic error as an LLM judge or a reward model would make),
and `lagged` (a frozen copy of the policy, refreshed every 10 steps: no information beyond the
labels).

Runs are ordered by priority (PHASES): every seed's first phase runs before any seed's second,
so an interrupted sweep still has complete pairs. One JSON per seed in studies/results/
(regime_seed<N>.json) holds every finished run; a run already there is not run again. The
summary compares each VRPO run with DPO at the same lr (paired by seed): mean difference of
the true reward with its 95% t-interval and sign test, the same on the seeds where neither run
drifted (KL > DRIFT_KL), and each estimator's drift rate with a Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = list(range(100, 132))        # fixed before running; disjoint from the older studies' 0-15
DRIFT_KL = 4.0                       # nats: a run with KL(pi || pi_ref) above this has drifted
VARIANCE_BATCHES = 8
SETTINGS = {
    "prompts_per_type": 4,           # 48 labelled prompts: few labels
    "M_max": 4,
    "sft_steps": 40,
    "train_steps": 30,
    "batch_groups": 8,
    "beta": 0.1,
    "loss_type": "sigmoid",
    "noise": 0.25,
    "lagged_refresh": 10,
    "eval_samples": 16,
    "max_new_tokens": 8,
}
LOW_LR, HIGH_LR = 1e-3, 3e-3
MORE_LABELS = 12                     # prompts per type of the larger labelled set (144)
# name -> (g variant, estimator, M, aux mode, lr, labelled prompts per type)
FEW = SETTINGS["prompts_per_type"]
RUNS = {
    "DPO": ("true", "dpo", 4, "given", LOW_LR, FEW),
    "VRPO M=4": ("true", "vrpo", 4, "given", LOW_LR, FEW),
    "VRPO M=4 noisy g": ("noisy", "vrpo", 4, "given", LOW_LR, FEW),
    "VRPO M=4 judge g": ("judge", "vrpo", 4, "given", LOW_LR, FEW),
    "VRPO M=1": ("true", "vrpo", 1, "given", LOW_LR, FEW),
    "VRPO M=4 lagged g": ("true", "vrpo", 4, "lagged", LOW_LR, FEW),
    "DPO high lr": ("true", "dpo", 4, "given", HIGH_LR, FEW),
    "VRPO M=4 high lr": ("true", "vrpo", 4, "given", HIGH_LR, FEW),
    "DPO 144 labels": ("true", "dpo", 4, "given", LOW_LR, MORE_LABELS),
    "VRPO M=4 144 labels": ("true", "vrpo", 4, "given", LOW_LR, MORE_LABELS),
}
PHASES = [["DPO", "VRPO M=4"], ["VRPO M=4 noisy g", "VRPO M=4 judge g"],
          ["DPO high lr", "VRPO M=4 high lr"], ["VRPO M=1", "VRPO M=4 lagged g"],
          ["DPO 144 labels", "VRPO M=4 144 labels"]]
# Each VRPO run is compared with the DPO run of the same lr and labelled set.
BASELINE = {name: next(d for d, spec in RUNS.items()
                       if spec[1] == "dpo" and spec[4:] == RUNS[name][4:])
            for name in RUNS}


def judge_preference(task, prompt: str, y: str, y2: str) -> float:
    """The majority population's Bradley-Terry preference alone (a biased, informative g)."""
    a, _ = task.rewards(prompt, y)
    b, _ = task.rewards(prompt, y2)
    return 1 / (1 + math.exp(-task.sharpness * (a - b)))


def data_root(root: Path, per_type: int) -> Path:
    """The folder of one labelled set; a larger set shares the seed's pi_ref (a link)."""
    if per_type == FEW:
        return root
    sub = root / f"labels{per_type}"
    sub.mkdir(parents=True, exist_ok=True)
    if not (sub / "ref").exists():
        (sub / "ref").symlink_to((root / "ref").resolve())
    return sub


def prepare(root: Path, seed: int, per_type: int = FEW,
            variants: tuple = ("true", "noisy", "judge")) -> None:
    """pi_ref (in `root`) and the scored data of `variants` of g for a labelled set of
    `per_type` prompts per type (kept: later phases reuse them)."""
    from vrpo_fast.demo import TINY_MODEL, _config, _label
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.score import score_stage
    from vrpo_fast.sft import sft_warm_start
    from vrpo_fast.synthetic import SyntheticTask, write_jsonl

    s = SETTINGS
    if all((data_root(root, per_type) / v / "scored" / "DONE").exists() for v in variants):
        return
    task, tokenizer = SyntheticTask(), byte_tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "ref" / "config.json").is_file():
        model = build_tiny_causal_lm(seed=seed, **TINY_MODEL)
        sft_warm_start(model, tokenizer, task, steps=s["sft_steps"], seed=seed, progress=False)
        model.save_pretrained(root / "ref.tmp")
        tokenizer.save_pretrained(root / "ref.tmp")
        shutil.rmtree(root / "ref", ignore_errors=True)
        (root / "ref.tmp").rename(root / "ref")
    root = data_root(root, per_type)
    prompts = [p for p in task.prompts() for _ in range(per_type)]
    write_jsonl([{"prompt": p} for p in prompts], root / "prompts.jsonl")
    sample_stage(_config(root, **{"sample.input": root / "prompts.jsonl",
                                  "sample.output": root / "sampled",
                                  "sample.num_samples": 2 + 2 * s["M_max"],
                                  "sample.max_new_tokens": s["max_new_tokens"],
                                  "sample.seed": seed, "sample.shard_size": 256}),
                 progress=False)
    labelled = _label(task, root / "sampled", random.Random(seed), s["noise"],
                      tokenizer.eos_token)
    def raw(text):        # _label writes an empty response as the EOS token's text
        return "" if text == tokenizer.eos_token else text

    judge_rows = []
    for row in labelled["true_g"]:
        texts = [raw(t) for t in row["samples"]]
        pairs = [(raw(row["chosen"]), raw(row["rejected"]))] + list(zip(texts[0::2],
                                                                         texts[1::2]))
        judge_rows.append({**row, "aux_prefs": [judge_preference(task, row["prompt"], a, b)
                                                for a, b in pairs]})
    for variant, rows in (("true", labelled["true_g"]), ("noisy", labelled["noisy_g"]),
                          ("judge", judge_rows)):
        if variant not in variants:
            continue
        write_jsonl(rows, root / variant / "data.jsonl")
        shutil.copyfile(root / "sampled" / "provenance.json", root / variant / "provenance.json")
        score_stage(_config(root, **{"score.input": root / variant / "data.jsonl",
                                     "score.output": root / variant / "scored",
                                     "score.shard_size": 256}), progress=False)
        (root / variant / "scored" / "DONE").touch()


def one_run(root: Path, seed: int, name: str) -> dict:
    """Train run `name` on the seed's data; its true reward, KL and win rate against pi_ref."""
    from vrpo_fast.demo import _config
    from vrpo_fast.evaluate import SyntheticJudge, evaluate_policy
    from vrpo_fast.models import byte_tokenizer, load_causal_lm
    from vrpo_fast.synthetic import SyntheticTask
    from vrpo_fast.train.loop import train

    s = SETTINGS
    variant, estimator, M, aux, lr, per_type = RUNS[name]
    root = data_root(root, per_type)
    run_dir = root / "runs" / name.replace(" ", "_").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.time()
    final = train(_config(root, **{
        "data.path": root / variant / "scored", "ref.source": "cache", "aux.mode": aux,
        "aux.beta": s["beta"], "aux.refresh_every": s["lagged_refresh"],
        "loss.estimator": estimator, "loss.num_mc_pairs": M, "loss.beta": s["beta"],
        "loss.loss_type": s["loss_type"], "train.output_dir": run_dir,
        "train.max_steps": s["train_steps"], "train.save_every": 0, "train.seed": seed,
        "train.batch_groups": s["batch_groups"], "train.micro_batch_groups": s["batch_groups"],
        "train.lr": lr, "train.warmup_steps": max(1, s["train_steps"] // 10)}), quiet=True)
    task, tokenizer = SyntheticTask(), byte_tokenizer()
    ref = load_causal_lm(str(root / "ref")).eval()
    rep = evaluate_policy(load_causal_lm(str(final)).eval(), ref, tokenizer, task.prompts(),
                          SyntheticJudge(task), ref=ref, n=s["eval_samples"], seed=1000 + seed,
                          max_new_tokens=s["max_new_tokens"], name=name)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"true_reward": rep.true_reward.mean, "kl": rep.kl.mean,
            "win_rate_vs_ref": rep.win_rate_vs_baseline.mean, "seconds": time.time() - start}


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


def variance(root: Path, seed: int, name: str) -> float:
    """Trace of the mini-batch gradient's covariance at pi_ref for run `name`'s estimator."""
    from vrpo_fast.demo import DemoSettings, _gradient_variance

    variant, estimator, M, aux, _, per_type = RUNS[name]
    root = data_root(root, per_type)
    s = DemoSettings(batch_groups=SETTINGS["batch_groups"], beta=SETTINGS["beta"],
                     loss_type=SETTINGS["loss_type"], variance_batches=VARIANCE_BATCHES)
    return _gradient_variance(root / variant / "scored", root / "ref", estimator, M, s, seed,
                              lagged=aux == "lagged")


def write_merged(path: Path, result: dict) -> None:
    """Write a seed's result, keeping runs another worker wrote to the file meanwhile."""
    if path.exists():
        disk = json.loads(path.read_text())
        for key in ("runs", "grad_variance"):
            result[key] = {**disk[key], **result[key]}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def sweep(out: Path, seeds: list[int], phases: list[int]) -> None:
    import torch

    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    for phase in phases:
        for seed in seeds:
            path = RESULTS / f"regime_seed{seed}.json"
            result = (json.loads(path.read_text()) if path.exists() else
                      {"seed": seed, "settings": SETTINGS, "lrs": [LOW_LR, HIGH_LR],
                       "runs": {}, "grad_variance": {}})
            todo = [n for n in PHASES[phase] if n not in result["runs"]]
            if not todo:
                continue
            root = out / f"seed{seed}"
            prepare(root, seed)
            for per_type in sorted({RUNS[n][5] for n in todo} - {FEW}):
                prepare(root, seed, per_type, variants=("true",))
            if "ref_true_reward" not in result:
                result["ref_true_reward"] = reference_reward(root, seed)
            for name in todo:
                result["runs"][name] = {"spec": RUNS[name], **one_run(root, seed, name)}
                if RUNS[name][4] == LOW_LR:
                    result["grad_variance"][name] = variance(root, seed, name)
                r = result["runs"][name]
                print(f"[seed {seed}] {name}: reward {r['true_reward']:.3f}, KL {r['kl']:.2f} "
                      f"({r['seconds']:.0f} s)", flush=True)
                write_merged(path, result)


def summarise() -> str:
    from vrpo_fast.stats import compare, correlation, paired, wilson

    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("regime_seed*.json"))]
    rows = [r for r in rows if r["seed"] in SEEDS]
    lines = [f"seeds fixed in advance: {SEEDS[0]}-{SEEDS[-1]}; drift: KL > {DRIFT_KL:g} nats; "
             f"low lr {LOW_LR:g}, high lr {HIGH_LR:g}", ""]
    ref = [r["ref_true_reward"] for r in rows if "ref_true_reward" in r]
    if ref:
        lines.append(f"pi_ref's expected true reward: {sum(ref) / len(ref):.3f} "
                     f"({len(ref)} seeds)\n")
    lines += ["| run | seeds | true reward | KL | drifted |", "|---|---|---|---|---|"]
    for name in RUNS:
        have = [r["runs"][name] for r in rows if name in r["runs"]]
        if have:
            n = len(have)
            lines.append(f"| {name} | {n} | {sum(h['true_reward'] for h in have) / n:.3f} | "
                         f"{sum(h['kl'] for h in have) / n:.2f} | "
                         f"{sum(h['kl'] > DRIFT_KL for h in have)} |")
    lines.append("")
    table = ["| run - its DPO | seeds | true reward, paired difference [95%] | sign test p | "
             "without drifted runs | drifted (Wilson 95%): VRPO / DPO | grad variance / DPO's |",
             "|---|---|---|---|---|---|---|"]
    for name, base in BASELINE.items():
        if name == base:
            continue
        a = {r["seed"]: (r["runs"][name]["true_reward"], r["runs"][name]["kl"])
             for r in rows if name in r["runs"]}
        b = {r["seed"]: (r["runs"][base]["true_reward"], r["runs"][base]["kl"])
             for r in rows if base in r["runs"]}
        if len(set(a) & set(b)) < 2:
            continue
        c = compare(a, b, name, base, DRIFT_KL)
        lines += c.lines()
        both = [r for r in rows if name in r["grad_variance"] and base in r["grad_variance"]]
        ratio = (sum(r["grad_variance"][name] / r["grad_variance"][base] for r in both)
                 / len(both) if both else math.nan)
        wa, wb = wilson(c.drift_a, c.n), wilson(c.drift_b, c.n)
        table.append(
            f"| {name} - {base} | {c.n} | {c.reward.mean:+.3f} [{c.reward.lo:+.3f}, "
            f"{c.reward.hi:+.3f}] | {c.reward.p_sign:.2g} | {c.reward_no_drift.mean:+.3f} "
            f"[{c.reward_no_drift.lo:+.3f}, {c.reward_no_drift.hi:+.3f}] (n={c.reward_no_drift.n})"
            f" | {c.drift_a} [{wa[0]:.2f}, {wa[1]:.2f}] / {c.drift_b} [{wb[0]:.2f}, {wb[1]:.2f}]"
            f" | {'-' if math.isnan(ratio) else f'{ratio:.2f}'} |")
        if both:
            ratios = [r["grad_variance"][name] / r["grad_variance"][base] for r in both]
            logs = [math.log(x) for x in ratios]
            lines.append(f"  gradient variance at pi_ref / {base}'s: mean "
                         f"{sum(ratios) / len(ratios):.3f} (per seed {min(ratios):.2f}-"
                         f"{max(ratios):.2f}); log ratio {paired(logs, [0.0] * len(logs))}")
            if len(both) >= 4:
                diffs = [r["runs"][name]["true_reward"] - r["runs"][base]["true_reward"]
                         for r in both]
                rho, lo, hi = correlation(logs, diffs)
                lines.append(f"  correlation over seeds of the log variance ratio with the "
                             f"reward difference: {rho:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        lines.append("")
    return "\n".join(lines + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study-regime", help="models and data (large)")
    parser.add_argument("--seeds", type=int, nargs="*", default=SEEDS)
    parser.add_argument("--phases", type=int, nargs="*", default=list(range(len(PHASES))))
    parser.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"),
                        help="run every N-th seed starting at the I-th (parallel workers)")
    parser.add_argument("--summarise", action="store_true", help="print the tables only")
    args = parser.parse_args()
    if not args.summarise:
        i, n = args.shard
        sweep(Path(args.out), args.seeds[i::n], args.phases)
    print(summarise())


if __name__ == "__main__":
    main()
