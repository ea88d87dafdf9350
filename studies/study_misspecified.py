"""The misspecified-preference study: VRPO vs DPO on the synthetic non-Bradley-Terry task.

    python studies/study_misspecified.py --out runs/study      # ~10-15 minutes on 2 cores

Five seeds, M in {1, 2, 4, 8}, g = the true preference (and a noisy g at M = 8): (a) gradient
variance at pi_ref's parameters, (b) win rate against pi_ref and head to head against DPO,
(c) expected true reward against KL(pi || pi_ref). It is `vrpo-fast demo` at a larger scale;
the write-up of its results is docs/study.md.
"""

import argparse
from pathlib import Path

from vrpo_fast.demo import DemoSettings, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    run_demo(Path(args.out), DemoSettings(seeds=list(range(args.seeds)), Ms=[1, 2, 4, 8]))


if __name__ == "__main__":
    main()
