"""Reward models on the synthetic non-Bradley-Terry task: variance-reduced vs plain BT training.

    python studies/study_reward.py --out runs/study-reward      # ~5-10 minutes on 2 cores

For each seed: pi_ref (SFT warm start), 2 + 2M samples per prompt from it, the first pair
labelled by the true preference, then two reward models with the same seed and data: the
variance-reduced objective (g = the truth, M Monte Carlo pairs) and plain Bradley-Terry. Each is
scored on held-out pairs (fresh pi_ref samples): pairwise accuracy against the observed labels,
accuracy against the true preference, and calibration (ECE). Seeds are fixed in advance
(SEEDS); one JSON per seed goes into studies/results/ (reward_seed<N>.json) and a seed already
there is not run again. Prints a table and each metric's paired difference (VR - plain, same
seed) with its 95% t-interval and sign test.
"""

import argparse
import json
import random
import shutil
from pathlib import Path

from vrpo_fast.stats import paired

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = list(range(32))          # fixed in advance; at least 32 for any headline


def one_seed(root: Path, seed: int, M: int, steps: int) -> list[dict]:
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.config import load_config
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.demo import TINY_MODEL, _label
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.sft import sft_warm_start
    from vrpo_fast.synthetic import SyntheticTask, write_jsonl
    from vrpo_fast.train.reward import evaluate_reward_model, train_reward

    task, tok = SyntheticTask(), byte_tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    ref = build_tiny_causal_lm(seed=seed, **TINY_MODEL)
    sft_warm_start(ref, tok, task, steps=150, seed=seed, progress=False)
    ref.save_pretrained(root / "ref")
    tok.save_pretrained(root / "ref")
    base = [f"--model.path={root / 'ref'}", "--model.tokenizer=byte"]
    for split, per_type, s in (("train", 24, seed), ("heldout", 16, seed + 100)):
        write_jsonl([{"prompt": p} for p in task.prompts() for _ in range(per_type)],
                    root / f"{split}_prompts.jsonl")
        sample_stage(load_config(None, base + [
            f"--data.path={root / f'{split}_prompts.jsonl'}",
            f"--sample.output={root / f'{split}_sampled'}", f"--sample.num_samples={2 + 2 * M}",
            "--sample.max_new_tokens=8", f"--sample.seed={s}"]), progress=False)
        rows = _label(task, root / f"{split}_sampled", random.Random(s), 0.0,
                      tok.eos_token)["true_g"]
        write_jsonl(rows, root / split / "data.jsonl")
        shutil.copyfile(root / f"{split}_sampled" / "provenance.json",
                        root / split / "provenance.json")
    heldout, _ = load_preference_data(str(root / "heldout" / "data.jsonl"))
    out = []
    for estimator in ("vrpo", "dpo"):
        final = train_reward(load_config(None, [
            f"--ref.path={root / 'ref'}", f"--model.tiny={json.dumps(TINY_MODEL)}",
            f"--model.seed={seed}", "--model.tokenizer=byte",
            f"--data.path={root / 'train' / 'data.jsonl'}", "--aux.mode=given",
            f"--loss.estimator={estimator}", f"--train.output_dir={root / estimator}",
            f"--train.max_steps={steps}", "--train.save_every=0", "--train.batch_groups=16",
            "--train.micro_batch_groups=16", "--train.lr=2e-3", "--train.warmup_steps=5",
            f"--train.seed={seed}"]), quiet=True)
        rm = AutoModelForSequenceClassification.from_pretrained(final)
        report = evaluate_reward_model(rm, tok, heldout, true_preference=task.preference)
        out.append({"seed": seed, "objective": f"VR (M={M})" if estimator == "vrpo"
                    else "plain BT", "accuracy": report["accuracy"],
                    "accuracy_vs_truth": report["accuracy_vs_truth"], "ece": report["ece"]})
        print(out[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study-reward")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--M", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--summarise", action="store_true", help="print the tables only")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for seed in [] if args.summarise else args.seeds:
        path = RESULTS / f"reward_seed{seed}.json"
        if not path.exists():
            rows = one_seed(Path(args.out) / f"seed{seed}", seed, args.M, args.steps)
            path.write_text(json.dumps({"seed": seed, "M": args.M, "steps": args.steps,
                                        "rows": rows}, indent=1))
    rows = [r for seed in args.seeds if (RESULTS / f"reward_seed{seed}.json").exists()
            for r in json.loads((RESULTS / f"reward_seed{seed}.json").read_text())["rows"]]
    if not rows:
        print("no results yet")
        return
    keys = ("accuracy", "accuracy_vs_truth", "ece")
    print("| objective | seeds | held-out accuracy | accuracy vs truth | ECE |")
    print("|---|---|---|---|---|")
    for name in dict.fromkeys(r["objective"] for r in rows):
        sel = [r for r in rows if r["objective"] == name]
        print(f"| {name} | {len(sel)} | " + " | ".join(
            f"{sum(r[k] for r in sel) / len(sel):.3f}" for k in keys) + " |")
    vr = {r["seed"]: r for r in rows if r["objective"] != "plain BT"}
    bt = {r["seed"]: r for r in rows if r["objective"] == "plain BT"}
    seeds = sorted(set(vr) & set(bt))
    for k in keys:
        print(f"VR - plain BT, {k}: {paired([vr[s][k] for s in seeds], [bt[s][k] for s in seeds])}")


if __name__ == "__main__":
    main()
