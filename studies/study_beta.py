"""The reward-KL frontier across beta: DPO vs VRPO on the synthetic non-Bradley-Terry task.

    nice -n 15 python studies/study_beta.py --out runs/study-beta --Ms 1 4 --noisy --lagged
    python studies/study_beta.py --summarise            # the tables from studies/results/

For each beta and seed (SEEDS, fixed in advance), `vrpo-fast demo`'s pipeline (pi_ref by SFT,
2 + 2M samples from it, the first pair labelled by the true preference, g = the truth) trains
DPO and VRPO with the same seed and data, then measures the expected true reward and
KL(pi || pi_ref) of each. One JSON per (beta, seed) goes into studies/results/
(beta_<b>_seed<N>.json); a seed already there is not run again, so an interrupted sweep resumes.
The summary gives, per beta, each run's paired difference from DPO (95% t-interval, sign test),
the same on the seeds where neither run drifted (KL > DRIFT_KL), and drift rates with Wilson
intervals. Writes the demo's outputs under <out>/, <out>/reward_vs_kl_beta.png and prints the
tables. The write-up is docs/study.md.
"""

import argparse
import json
from pathlib import Path

from vrpo_fast.demo import DemoSettings, run_demo
from vrpo_fast.stats import DRIFT_KL, run_comparisons

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = list(range(32))          # fixed in advance; at least 32 for any headline


def result_path(beta: float, seed: int) -> Path:
    return RESULTS / f"beta_{beta:g}_seed{seed}.json"


def load(betas: list[float], seeds: list[int]) -> dict:
    """beta -> the demo's per-run rows of every finished seed."""
    out = {}
    for beta in betas:
        rows = [json.loads(result_path(beta, s).read_text())["runs"] for s in seeds
                if result_path(beta, s).exists()]
        if rows:
            out[beta] = [r for seed_rows in rows for r in seed_rows]
    return out


def summarise(results: dict) -> list[dict]:
    """One row per (beta, run name): seed means of reward and KL, the seeds, and how many
    drifted."""
    rows = []
    for beta, runs in results.items():
        for name in dict.fromkeys(r["name"] for r in runs):
            sel = [r for r in runs if r["name"] == name]
            rows.append({"beta": beta, "name": name, "seeds": len(sel),
                         "true_reward": sum(r["true_reward"]["mean"] for r in sel) / len(sel),
                         "kl": sum(r["kl"]["mean"] for r in sel) / len(sel),
                         "drifted": sum(r["kl"]["mean"] > DRIFT_KL for r in sel)})
    return rows


def plot(rows: list[dict], ref_reward: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in dict.fromkeys(r["name"] for r in rows):
        line = sorted((r for r in rows if r["name"] == name), key=lambda r: -r["beta"])
        ax.plot([r["kl"] for r in line], [r["true_reward"] for r in line], marker="o",
                label=name)
        for r in line:
            ax.annotate(f"{r['beta']:g}", (r["kl"], r["true_reward"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.axhline(ref_reward, color="grey", linestyle=":", label="pi_ref")
    ax.set_xlabel("KL(pi || pi_ref) per response (nats; seed mean)")
    ax.set_ylabel("expected true reward (seed mean)")
    ax.set_title("labels: beta", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study-beta")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--Ms", type=int, nargs="+", default=[4])
    parser.add_argument("--noisy", action="store_true", help="also VRPO with a noisy g")
    parser.add_argument("--lagged", action="store_true",
                        help="also VRPO with g from a lagged copy of the policy")
    parser.add_argument("--rm", action="store_true",
                        help="also VRPO with g from a reward model trained on the same labels")
    parser.add_argument("--summarise", action="store_true", help="print the tables only")
    args = parser.parse_args()
    out = Path(args.out)
    RESULTS.mkdir(exist_ok=True)
    for beta in [] if args.summarise else args.betas:
        for seed in args.seeds:
            if result_path(beta, seed).exists():
                continue
            settings = DemoSettings(seeds=[seed], Ms=args.Ms, noisy_g=args.noisy,
                                    lagged_g=args.lagged, rm_g=args.rm,
                                    beta=beta, variance_batches=2)
            res = run_demo(out / f"beta_{beta:g}" / f"seed{seed}", settings)
            result_path(beta, seed).write_text(json.dumps(
                {"beta": beta, "seed": seed, "settings": res["settings"], "runs": res["runs"]},
                indent=1))
    results = load(args.betas, args.seeds)
    rows = summarise(results)
    if not rows:
        print("no results yet")
        return
    runs = [r for res in results.values() for r in res]
    ref_reward = sum(r["ref_true_reward"] for r in runs) / len(runs)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, ref_reward, out / "reward_vs_kl_beta.png")
    print(f"| beta | run | seeds | true reward (mean) | KL | drifted (KL > {DRIFT_KL:g}) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['beta']:g} | {r['name']} | {r['seeds']} | {r['true_reward']:.3f} | "
              f"{r['kl']:.2f} | {r['drifted']} |")
    print(f"pi_ref's expected true reward: {ref_reward:.3f}")
    for beta, res in results.items():
        print(f"\nbeta {beta:g}:")
        print("\n".join(run_comparisons(res, "DPO", DRIFT_KL)))


if __name__ == "__main__":
    main()
