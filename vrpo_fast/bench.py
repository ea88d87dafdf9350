"""`vrpo-fast bench [--quick] [--only OP]`: run the benchmark suite, then print the tables.

The suite is pytest-benchmark files in benchmarks/ of a source checkout (they are not part of
the installed package); rows are appended to benchmarks/results/ and RESULTS.md is regenerated.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vrpo_fast.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one round (seconds; nothing recorded)")
    parser.add_argument("--only", help="one benchmark file, e.g. train_step or linear_logprob")
    parser.add_argument("--dir", default=None, help="the benchmarks/ folder (default: the one "
                                                    "beside the installed source)")


def run(args) -> int:
    bench_dir = Path(args.dir) if args.dir else Path(__file__).resolve().parents[1] / \
        "benchmarks"
    if not (bench_dir / "conftest.py").is_file():
        raise UserError(f"--dir: no benchmark suite in {bench_dir} (run from a source "
                        f"checkout, or pass --dir)")
    target = str(bench_dir / f"bench_{args.only}.py") if args.only else str(bench_dir)
    if args.only and not Path(target).is_file():
        raise UserError(f"--only: no benchmark file {target}")
    cmd = [sys.executable, "-m", "pytest", target, "-q", "--benchmark-columns=median,min,max"]
    if args.quick:
        cmd.append("--smoke")
    rc = subprocess.call(cmd, cwd=bench_dir)
    if rc == 0 and not args.quick:
        subprocess.call([sys.executable, str(bench_dir / "report.py")], cwd=bench_dir)
    return rc
