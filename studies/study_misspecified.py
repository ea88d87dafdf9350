"""The misspecified-preference study: VRPO vs DPO on the synthetic non-Bradley-Terry task.

    nice -n 15 python studies/study_misspecified.py --out runs/study     # resumes per seed
    python studies/study_misspecified.py --summarise                     # the tables

Seeds fixed in advance (SEEDS), M in {1, 2, 4, 8}, g = the true preference (and a noisy g at
M = 8): (a) gradient variance at pi_ref's parameters, (b) win rate against pi_ref and head to
head against DPO, (c) expected true reward against KL(pi || pi_ref). It is `vrpo-fast demo` at a
larger scale, one seed at a time: one JSON per seed in studies/results/
(misspecified_seed<N>.json); a seed already there is not run again. The summary gives each
run's paired difference from DPO (95% t-interval, sign test), the same without drifted runs
(KL > DRIFT_KL), and drift rates with Wilson intervals. The write-up is docs/study.md.
"""

import argparse
import json
from pathlib import Path

from vrpo_fast.demo import DemoSettings, run_demo
from vrpo_fast.stats import DRIFT_KL, run_comparisons

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SEEDS = list(range(32))          # fixed in advance; at least 32 for any headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--summarise", action="store_true", help="print the tables only")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for seed in [] if args.summarise else args.seeds:
        path = RESULTS / f"misspecified_seed{seed}.json"
        if not path.exists():
            res = run_demo(Path(args.out) / f"seed{seed}",
                           DemoSettings(seeds=[seed], Ms=[1, 2, 4, 8]))
            path.write_text(json.dumps({"seed": seed, "settings": res["settings"],
                                        "runs": res["runs"]}, indent=1))
    runs = [r for seed in args.seeds if (RESULTS / f"misspecified_seed{seed}.json").exists()
            for r in json.loads((RESULTS / f"misspecified_seed{seed}.json").read_text())["runs"]]
    print("\n".join(run_comparisons(runs, "DPO", DRIFT_KL)) or "no results yet")


if __name__ == "__main__":
    main()
