"""The reward-KL frontier across beta: DPO vs VRPO on the synthetic non-Bradley-Terry task.

    python studies/study_beta.py --out runs/study-beta --Ms 1 4 --noisy --lagged --rm
                                                           # ~15 minutes on 2 cores

For each beta and seed, `vrpo-fast demo`'s pipeline (pi_ref by SFT, 2 + 2M samples from it, the
first pair labelled by the true preference, g = the truth) trains DPO and VRPO with the same
seed and data, then measures the expected true reward and KL(pi || pi_ref) of each. Sweeping
beta traces each estimator's reward-KL curve: an estimator that uses its data better reaches a
higher reward at the same KL. Writes <out>/beta_<b>/ (the demo's outputs), <out>/results.json,
<out>/reward_vs_kl_beta.png and prints a table. The write-up is docs/study.md.
"""

import argparse
import json
from pathlib import Path

from vrpo_fast.demo import DemoSettings, run_demo


def summarise(results: dict) -> list[dict]:
    """One row per (beta, run name): seed means of reward, KL and win rate against pi_ref, the
    median reward, and in how many seeds the run's reward beats DPO's."""
    import statistics

    rows = []
    for beta, res in results.items():
        names = dict.fromkeys(r["name"] for r in res["runs"])
        dpo = {r["seed"]: r["true_reward"]["mean"] for r in res["runs"] if r["name"] == "DPO"}
        for name in names:
            runs = [r for r in res["runs"] if r["name"] == name]
            mean = lambda key: sum(r[key]["mean"] for r in runs) / len(runs)  # noqa: E731
            rows.append({"beta": float(beta), "name": name, "seeds": len(runs),
                         "true_reward": mean("true_reward"), "kl": mean("kl"),
                         "median_reward": statistics.median(r["true_reward"]["mean"]
                                                            for r in runs),
                         "beats_dpo": sum(r["true_reward"]["mean"] > dpo[r["seed"]]
                                          for r in runs),
                         "win_rate_vs_ref": mean("win_rate_vs_ref"),
                         "win_rate_vs_dpo": mean("win_rate_vs_dpo") if name != "DPO" else None,
                         "g_error": (sum(r["g_error"] for r in runs) / len(runs)
                                     if runs[0].get("g_error") is not None else None),
                         "per_seed": [(r["seed"], r["true_reward"]["mean"], r["kl"]["mean"])
                                      for r in runs]})
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
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--Ms", type=int, nargs="+", default=[4])
    parser.add_argument("--noisy", action="store_true", help="also VRPO with a noisy g")
    parser.add_argument("--lagged", action="store_true",
                        help="also VRPO with g from a lagged copy of the policy")
    parser.add_argument("--rm", action="store_true",
                        help="also VRPO with g from a reward model trained on the same labels")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for beta in args.betas:
        settings = DemoSettings(seeds=list(range(args.seeds)), Ms=args.Ms, noisy_g=args.noisy,
                                lagged_g=args.lagged, rm_g=args.rm,
                                beta=beta, variance_batches=2)
        results[str(beta)] = run_demo(out / f"beta_{beta:g}", settings)
    rows = summarise(results)
    runs = [r for res in results.values() for r in res["runs"]]
    ref_reward = sum(r["ref_true_reward"] for r in runs) / len(runs)
    (out / "results.json").write_text(json.dumps({"rows": rows, "ref_true_reward": ref_reward},
                                                 indent=2))
    plot(rows, ref_reward, out / "reward_vs_kl_beta.png")
    print(f"{sum(res['seconds'] for res in results.values()):.0f} s")
    print("| beta | run | true reward (mean) | (median) | reward > DPO's | KL | win rate vs "
          "pi_ref | win rate vs DPO | mean abs g - P* |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs_dpo = "-" if r["win_rate_vs_dpo"] is None else f"{r['win_rate_vs_dpo']:.3f}"
        beats = "-" if r["name"] == "DPO" else f"{r['beats_dpo']} of {r['seeds']} seeds"
        g_err = "-" if r["g_error"] is None or r["name"] == "DPO" else f"{r['g_error']:.3f}"
        print(f"| {r['beta']:g} | {r['name']} | {r['true_reward']:.3f} | "
              f"{r['median_reward']:.3f} | {beats} | {r['kl']:.2f} | "
              f"{r['win_rate_vs_ref']:.3f} | {vs_dpo} | {g_err} |")
    print(f"pi_ref's expected true reward: {ref_reward:.3f}")


if __name__ == "__main__":
    main()
