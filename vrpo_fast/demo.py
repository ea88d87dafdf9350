"""`vrpo-fast demo [--out DIR]`: VRPO beside DPO on a task whose true preference is known and
deliberately not Bradley-Terry (vrpo_fast.synthetic), on a CPU, with no download.

Every step goes through the project's own stages:
  1. a tiny Llama-style model built from a config, SFT warm start -> pi_ref      (ref/)
  2. `sample`: 2 + 2M responses per prompt from pi_ref                          (sampled/)
  3. the first two become the labelled pair, labelled by the true preference; g is the truth or
     a noisy copy of it                                                         (labelled.jsonl)
  4. `score`: reference log-probs, one packed pass per group                    (scored/)
  5. `train`: DPO and VRPO with the same seed and data                          (runs/)
  6. evaluation under the true preference: win rate against pi_ref, head to head, expected true
     reward and KL(pi || pi_ref); the gradient variance of each estimator at pi_ref
Writes report.md and PNG plots into DIR and prints the headline table. The study script
(studies/study_misspecified.py) runs the same pipeline over more seeds and M.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vrpo_fast.config import load_config
from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.tokenize import tokenize_example
from vrpo_fast.evaluate import SyntheticJudge, evaluate_policy, win_rate
from vrpo_fast.logprobs import sequence_logps
from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer, load_causal_lm
from vrpo_fast.objective import vrpo_loss
from vrpo_fast.sample import sample_stage
from vrpo_fast.samplers import draw
from vrpo_fast.score import score_stage
from vrpo_fast.sft import sft_warm_start
from vrpo_fast.shards import read_shards
from vrpo_fast.stats import DRIFT_KL, run_comparisons
from vrpo_fast.synthetic import SyntheticTask, write_jsonl
from vrpo_fast.train.loop import train
from vrpo_fast.train.metrics import read_metrics
from vrpo_fast.train.reward import train_reward

TINY_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 128}


@dataclass
class DemoSettings:
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    Ms: list = field(default_factory=lambda: [1, 4])  # Monte Carlo pairs per prompt to compare
    noisy_g: bool = True                              # also train VRPO with a noisy g
    # Two g that add no information beyond the labels (the study's controls): a lagged copy of
    # the policy, refreshed every lagged_refresh steps, and a reward model trained on the same
    # labels (plain Bradley-Terry, initialised from pi_ref) for rm_steps steps.
    lagged_g: bool = False
    lagged_refresh: int = 20
    rm_g: bool = False
    rm_steps: int = 100
    prompts_per_type: int = 24                        # 12 prompt types -> 288 training prompts
    sft_steps: int = 150
    train_steps: int = 120
    batch_groups: int = 16
    lr: float = 5e-4
    beta: float = 0.1
    loss_type: str = "sigmoid"
    eval_samples: int = 64                            # responses per held-out prompt
    variance_batches: int = 24                        # mini-batches for the gradient variance
    max_new_tokens: int = 8
    noise: float = 0.25                               # std of the noise on the noisy g


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="./vrpo-demo", help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller setting (for tests; a minute on 2 cores)")


def run(args) -> int:
    settings = DemoSettings()
    if args.quick:
        settings = DemoSettings(seeds=[0], Ms=[4], prompts_per_type=4, sft_steps=40,
                                train_steps=6, batch_groups=8, eval_samples=6,
                                variance_batches=4)
    run_demo(Path(args.out), settings)
    return 0


def run_demo(out: Path, s: DemoSettings) -> dict:
    """The whole pipeline; returns the results it reports."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = {"settings": vars(s), "runs": []}
    for seed in s.seeds:
        results["runs"].extend(_one_seed(out / f"seed{seed}", seed, s))
    results["seconds"] = time.time() - start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plots(out, results)
    report = _report(results)
    (out / "report.md").write_text(report)
    print(_headline(results))
    print(f"\nreport: {out / 'report.md'} ({results['seconds']:.0f} s)")
    return results


# --- the pipeline of one seed -----------------------------------------------------------------

def _config(root: Path, **overrides):
    flat = [f"--{k}={v}" for k, v in overrides.items()]
    return load_config(None, [f"--model.path={root / 'ref'}", "--model.tokenizer=byte", *flat])


def _one_seed(root: Path, seed: int, s: DemoSettings) -> list[dict]:
    task = SyntheticTask()
    tokenizer = byte_tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    M_max = max(s.Ms)
    print(f"[seed {seed}] 1/6 SFT warm start of a tiny Llama-style model -> pi_ref")
    if not (root / "ref" / "config.json").is_file():
        model = build_tiny_causal_lm(seed=seed, **TINY_MODEL)
        sft_warm_start(model, tokenizer, task, steps=s.sft_steps, seed=seed)
        model.save_pretrained(root / "ref.tmp")
        tokenizer.save_pretrained(root / "ref.tmp")
        shutil.rmtree(root / "ref", ignore_errors=True)
        (root / "ref.tmp").rename(root / "ref")

    print(f"[seed {seed}] 2/6 sampling 2 + 2M = {2 + 2 * M_max} responses per prompt from pi_ref")
    prompts = [p for p in task.prompts() for _ in range(s.prompts_per_type)]
    write_jsonl([{"prompt": p} for p in prompts], root / "prompts.jsonl")
    cfg = _config(root, **{"sample.input": root / "prompts.jsonl",
                           "sample.output": root / "sampled",
                           "sample.num_samples": 2 + 2 * M_max,
                           "sample.max_new_tokens": s.max_new_tokens,
                           "sample.seed": seed, "sample.shard_size": 64})
    sample_stage(cfg)

    print(f"[seed {seed}] 3/6 labelling the first pair with the true (non-BT) preference")
    rng = random.Random(seed)
    labelled = _label(task, root / "sampled", rng, s.noise, tokenizer.eos_token)
    for variant, rows in labelled.items():
        write_jsonl(rows, root / variant / "data.jsonl")
        shutil.copyfile(root / "sampled" / "provenance.json", root / variant / "provenance.json")

    print(f"[seed {seed}] 4/6 scoring: reference log-probs in one packed pass per group")
    for variant in labelled:
        score_stage(_config(root, **{"score.input": root / variant / "data.jsonl",
                                     "score.output": root / variant / "scored",
                                     "score.shard_size": 64}))

    if s.rm_g:
        print(f"[seed {seed}] 4/6 reward model on the same labels -> g on every pair")
        _reward_model_g(root, seed, s)

    print(f"[seed {seed}] 5/6 training DPO and VRPO (same seed, same data)")
    # (name, data variant, estimator, M, where g comes from)
    runs = [("DPO", "true_g", "dpo", M_max, "given")]
    runs += [(f"VRPO M={M}", "true_g", "vrpo", M, "given") for M in s.Ms]
    if s.noisy_g:
        runs.append((f"VRPO M={M_max}, noisy g", "noisy_g", "vrpo", M_max, "given"))
    if s.lagged_g:
        runs.append((f"VRPO M={M_max}, lagged g", "true_g", "vrpo", M_max, "lagged"))
    if s.rm_g:
        runs.append((f"VRPO M={M_max}, RM g", "rm_g", "vrpo", M_max, "given"))
    # cv_gap's error budget (vrpo_fast.cv_gap) spread over the demo's VRPO runs, every seed's:
    # the demo's labelled pairs are drawn from pi_ref, and any of its runs warns in at most 5 %
    # of demos.
    vrpo_runs = len(s.seeds) * sum(est == "vrpo" and M > 0 for _, _, est, M, _ in runs)
    finals = {}
    for name, variant, estimator, M, aux in runs:
        run_dir = root / "runs" / name.replace(" ", "_").replace(",", "").replace("=", "")
        train_cfg = _config(root, **{
            "data.path": root / variant / "scored", "ref.source": "cache", "aux.mode": aux,
            "aux.beta": s.beta, "aux.refresh_every": s.lagged_refresh,
            "loss.estimator": estimator, "loss.num_mc_pairs": M, "loss.beta": s.beta,
            "loss.loss_type": s.loss_type, "train.output_dir": run_dir,
            "train.max_steps": s.train_steps, "train.save_every": 0, "train.seed": seed,
            "train.batch_groups": s.batch_groups, "train.micro_batch_groups": s.batch_groups,
            "train.lr": s.lr, "train.warmup_steps": max(1, s.train_steps // 10),
            "train.cv_gap_alpha": 0.05 / max(1, vrpo_runs)})
        finals[name] = train(train_cfg, quiet=True)

    print(f"[seed {seed}] 6/6 evaluating under the true preference")
    return _evaluate(root, seed, s, task, tokenizer, finals, runs)


def _reward_model_g(root: Path, seed: int, s: DemoSettings) -> None:
    """Train a reward model on the labelled pairs alone (plain Bradley-Terry, the body of pi_ref
    under a new score head), then score g = sigmoid(r(y) - r(y')) on every pair of the data:
    a g with no information beyond the labels and the model's inductive bias."""
    rm = train_reward(_config(root, **{
        "data.path": root / "true_g" / "data.jsonl", "aux.mode": "given",
        "loss.estimator": "dpo", "train.output_dir": root / "rm",
        "train.max_steps": s.rm_steps, "train.save_every": 0, "train.seed": seed,
        "train.batch_groups": s.batch_groups, "train.micro_batch_groups": s.batch_groups,
        "train.lr": 1e-3, "train.warmup_steps": max(1, s.rm_steps // 10)}), quiet=True)
    (root / "rm_g").mkdir(exist_ok=True)
    shutil.copyfile(root / "true_g" / "data.jsonl", root / "rm_g" / "data.jsonl")
    shutil.copyfile(root / "sampled" / "provenance.json", root / "rm_g" / "provenance.json")
    score_stage(_config(root, **{"score.input": root / "rm_g" / "data.jsonl",
                                 "score.output": root / "rm_g" / "scored",
                                 "score.shard_size": 64, "aux.mode": "reward_model",
                                 "aux.path": rm}))


def _label(task, sampled: Path, rng: random.Random, noise: float, eos_text: str) -> dict:
    """The first two samples form the labelled pair (drawn from pi_ref, as VRPO requires)."""
    def as_text(t):
        # A response that is EOS alone decodes to ""; written as the EOS token it stays a
        # valid, non-empty row and tokenizes back to [EOS].
        return t or eos_text

    true_rows, noisy_rows = [], []
    for row in read_shards(sampled):
        prompt, texts, ids = row["prompt"], row["samples"], row["sample_ids"]
        first, second = task.label(prompt, texts[0], texts[1], rng)
        pairs = [(first, second)] + list(zip(texts[2::2], texts[3::2]))
        g = [task.preference(prompt, a, b) for a, b in pairs]
        noisy = [min(1.0, max(0.0, p + rng.gauss(0.0, noise))) for p in g]
        base = {"prompt": prompt, "chosen": as_text(first), "rejected": as_text(second),
                "samples": [as_text(t) for t in texts[2:]], "sample_ids": ids[2:]}
        true_rows.append({**base, "aux_prefs": g})
        noisy_rows.append({**base, "aux_prefs": noisy})
    return {"true_g": true_rows, "noisy_g": noisy_rows}


def _evaluate(root, seed, s, task, tokenizer, finals, runs) -> list[dict]:
    judge = SyntheticJudge(task)
    ref = load_causal_lm(str(root / "ref")).eval()
    prompts = task.prompts()
    results = []
    samples = {}
    for name, variant, estimator, M, aux in runs:
        policy = load_causal_lm(str(finals[name])).eval()
        rep = evaluate_policy(policy, ref, tokenizer, prompts, judge, ref=ref,
                              n=s.eval_samples, seed=1000 + seed,
                              max_new_tokens=s.max_new_tokens, name=name)
        samples[name], _, _ = draw(policy, tokenizer, prompts, s.eval_samples,
                                   seed=2000 + seed, max_new_tokens=s.max_new_tokens)
        variance = _gradient_variance(root / variant / "scored", root / "ref", estimator, M, s,
                                      seed, lagged=aux == "lagged")
        results.append({"seed": seed, "name": name, "estimator": estimator, "M": M,
                        "g": "lagged" if aux == "lagged" else variant.removesuffix("_g"),
                        "g_error": None if aux == "lagged" else _g_error(root, variant),
                        "win_rate_vs_ref": vars(rep.win_rate_vs_baseline),
                        "true_reward": vars(rep.true_reward), "kl": vars(rep.kl),
                        "grad_variance": variance})
    ref_samples, _, _ = draw(ref, tokenizer, prompts, s.eval_samples, seed=3000 + seed,
                             max_new_tokens=s.max_new_tokens)
    ref_reward = sum(task.true_reward(p, y) for p, ys in zip(prompts, ref_samples) for y in ys)
    dpo = samples["DPO"]
    for r in results:
        r["ref_true_reward"] = ref_reward / (len(prompts) * s.eval_samples)
        if r["name"] != "DPO":
            r["win_rate_vs_dpo"] = vars(win_rate(prompts, samples[r["name"]], dpo, judge))
    return results


def _g_error(root: Path, variant: str) -> float:
    """Mean |g - P*| over every pair (labelled and Monte Carlo) of a variant's scored data."""
    def prefs(v):
        examples, _ = load_preference_data(str(root / v / "scored"))
        return [p for ex in examples for p in ex.aux_prefs]

    got, truth = prefs(variant), prefs("true_g")
    return sum(abs(a - b) for a, b in zip(got, truth, strict=True)) / len(truth)


def _gradient_variance(data: Path, ref_path: Path, estimator: str, M: int, s: DemoSettings,
                       seed: int, lagged: bool = False) -> float:
    """Total variance (trace of the covariance) of the mini-batch gradient at pi_ref. A lagged
    g at pi_ref's parameters is the copy's implicit preference with zero margins: 1/2."""
    model = load_causal_lm(str(ref_path))
    tokenizer = byte_tokenizer()
    examples, _ = load_preference_data(str(data))
    tok = [tokenize_example(ex, tokenizer) for ex in examples]
    K = 2 + 2 * M
    rng = random.Random(seed)
    grads = []
    for _ in range(s.variance_batches):
        batch = rng.sample(tok, min(s.batch_groups, len(tok)))
        logps = sequence_logps(model, [t.prompt_ids for t in batch],
                               [t.response_ids[:K] for t in batch])
        ref = torch.tensor([t.ref_logps[:K] for t in batch])
        g = torch.tensor([t.aux_prefs[:1 + M] for t in batch])
        if lagged:
            g = torch.full_like(g, 0.5)
        loss, _ = vrpo_loss(logps, ref, g, beta=s.beta, loss_type=s.loss_type,
                            estimator=estimator)
        model.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    stacked = torch.stack(grads).double()
    return stacked.var(dim=0).sum().item()


# --- reporting --------------------------------------------------------------------------------

def _mean(rows, key, sub="mean"):
    vals = [r[key][sub] if isinstance(r[key], dict) else r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def _by_name(results):
    names = []
    for r in results["runs"]:
        if r["name"] not in names:
            names.append(r["name"])
    return [(n, [r for r in results["runs"] if r["name"] == n]) for n in names]


def _variance_ratios(results) -> dict:
    """name -> per-seed gradient variance divided by the same seed's DPO variance."""
    dpo = {r["seed"]: r["grad_variance"] for r in results["runs"] if r["name"] == "DPO"}
    return {name: [r["grad_variance"] / dpo[r["seed"]] for r in rows]
            for name, rows in _by_name(results)}


def _headline(results) -> str:
    lines = ["| run | win rate vs pi_ref | win rate vs DPO | true reward | KL | grad variance "
             "/ DPO's (per seed: mean, min-max) |", "|---|---|---|---|---|---|"]
    ratios = _variance_ratios(results)
    for name, rows in _by_name(results):
        vs_dpo = f"{_mean(rows, 'win_rate_vs_dpo'):.3f}" if name != "DPO" else "-"
        rs = ratios[name]
        lines.append(f"| {name} | {_mean(rows, 'win_rate_vs_ref'):.3f} | {vs_dpo} | "
                     f"{_mean(rows, 'true_reward'):.3f} | {_mean(rows, 'kl'):.3f} | "
                     f"{sum(rs) / len(rs):.3f} ({min(rs):.2f}-{max(rs):.2f}) |")
    ref_reward = _mean(results["runs"], "ref_true_reward")
    seeds = results["settings"]["seeds"]
    lines.append(f"\npi_ref's expected true reward: {ref_reward:.3f}; seeds: {seeds}. "
                 f"{len(seeds)} seed(s) illustrate the pipeline; they are not evidence for either "
                 f"estimator (report.md gives the paired intervals; docs/study.md the 32-seed "
                 f"study).")
    return "\n".join(lines)


def _report(results) -> str:
    s = results["settings"]
    ci_lines = []
    for r in results["runs"]:
        w = r["win_rate_vs_ref"]
        ci_lines.append(f"| {r['seed']} | {r['name']} | {w['mean']:.3f} [{w['lo']:.3f}, "
                        f"{w['hi']:.3f}] | {r['true_reward']['mean']:.3f} | "
                        f"{r['kl']['mean']:.3f} | {r['grad_variance']:.4g} |")
    return f"""# vrpo-fast demo: VRPO vs DPO under a misspecified (non-Bradley-Terry) preference

Task: prompts "xy>", responses of 1-{s['max_new_tokens']} letters over "abcd". Two annotator
populations (70% like the prompt's first letter; 30% like its second letter and dislike length):
the true preference is a mixture of two Bradley-Terry models, so DPO's Bradley-Terry model is
misspecified. pi_ref is a tiny Llama-style model after an SFT warm start on random valid
responses. Each training prompt carries a labelled pair drawn from pi_ref (labelled by one draw
of the true preference) and M Monte Carlo pairs from pi_ref; g is the true preference (or a
noisy copy, std {s['noise']}). Same seed, same data and hyper-parameters for every run:
{s['train_steps']} steps of {s['batch_groups']} groups, lr {s['lr']}, beta {s['beta']},
loss {s['loss_type']}.

## Means over seeds

{_headline(results)}

- win rates: expected true preference of the run's samples over pi_ref's (or DPO's), held-out
  draws on all 12 prompt types, {s['eval_samples']} samples each;
- grad variance: trace of the covariance of the mini-batch gradient at pi_ref's parameters
  ({s['variance_batches']} batches of {s['batch_groups']} groups), relative to the same seed's
  DPO; with that many batches one estimate has a relative standard error of about
  sqrt(2 / {s['variance_batches']}) = {(2 / s['variance_batches']) ** 0.5:.0%}, so single-seed
  ratios are noisy (tests/test_objective.py checks the variance property exactly).

## Per run (95% confidence intervals)

| seed | run | win rate vs pi_ref | true reward | KL | grad variance |
|---|---|---|---|---|---|
{chr(10).join(ci_lines)}

## Paired differences from DPO (same seed, same data)

{_uncertainty(results)}

## Reading it

This demo runs {len(s['seeds'])} seed(s): an illustration of the pipeline, not evidence for or
against VRPO. Outcomes at this scale vary more between seeds than between estimators, and a run
that drifts (KL above {DRIFT_KL:g} nats) decides a mean over a few seeds; the intervals above
say how little {len(s['seeds'])} seed(s) pin down. The estimators share their expected gradient
(VRPO's correction has mean zero because the labelled pairs come from pi_ref), so differences in
outcome come from variance. The variance reduction needs several Monte Carlo pairs: one pair
removes almost nothing (Var = E[Var(l | pair)] + Var(E[l | pair]) / M). What 32 paired seeds
do and do not support is in docs/study.md (`studies/study_regime.py`).

Plots: `reward_vs_kl.png` (expected true reward against KL to pi_ref, the paper's Figure 3
shape), `grad_variance.png`, `loss_curves.png`. Total time: {results['seconds']:.0f} s.
"""


def _uncertainty(results) -> str:
    """Each run against DPO: paired mean difference of the true reward with its 95% t-interval
    and sign test, the same without drifted runs, drift counts with Wilson intervals."""
    lines = run_comparisons(results["runs"], "DPO", DRIFT_KL)
    if len(results["settings"]["seeds"]) < 2:
        lines.append("(one seed: no interval can be given)")
    return "```\n" + "\n".join(lines) + "\n```"


def _plots(out: Path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, rows in _by_name(results):
        ax.scatter([r["kl"]["mean"] for r in rows], [r["true_reward"]["mean"] for r in rows],
                   label=name)
    ref_reward = _mean(results["runs"], "ref_true_reward")
    ax.axhline(ref_reward, color="grey", linestyle=":", label="pi_ref")
    ax.set_xlabel("KL(pi || pi_ref)")
    ax.set_ylabel("expected true reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_kl.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ratios = _variance_ratios(results)
    names = list(ratios)
    ax.bar(names, [sum(v) / len(v) for v in ratios.values()])
    for i, v in enumerate(ratios.values()):
        ax.scatter([i] * len(v), v, color="black", s=8, zorder=3)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_ylabel("gradient variance / DPO's (dots: seeds)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "grad_variance.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    seed = results["settings"]["seeds"][0]
    for run_dir in sorted((out / f"seed{seed}" / "runs").iterdir()):
        log = read_metrics(run_dir)
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], label=run_dir.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
