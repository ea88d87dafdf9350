"""`vrpo-fast bench [--quick] [--only NAME]`: run the benchmark suite, then print its tables.

The suite is the pytest-benchmark files in benchmarks/ of a source checkout (not part of the
installed package). A full run appends its rows to benchmarks/results/<device>.jsonl and
regenerates benchmarks/RESULTS.md and the step chart; --quick runs the smoke mode (tiny shapes,
one round, no memory probes: seconds to a minute), records nothing unless --results-dir is given,
and prints the table of that run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from vrpo_fast.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: tiny shapes, one round, nothing recorded")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="one benchmark file, e.g. train_step, linear_logprob, vrpo_loss, "
                             "packing (repeatable; default: all)")
    parser.add_argument("--dir", default=None,
                        help="the benchmarks/ folder (default: the one beside this package's "
                             "source)")
    parser.add_argument("--results-dir", default=None,
                        help="where the rows go (default: benchmarks/results; --quick: a "
                             "temporary folder)")


def _load_report(bench_dir: Path):
    spec = importlib.util.spec_from_file_location("_vrpo_bench_report", bench_dir / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> int:
    bench_dir = Path(args.dir) if args.dir else Path(__file__).resolve().parents[1] / \
        "benchmarks"
    if not (bench_dir / "conftest.py").is_file() or not (bench_dir / "report.py").is_file():
        raise UserError(f"--dir: no benchmark suite in {bench_dir} (run from a source "
                        f"checkout, or pass --dir)")
    targets = []
    for name in args.only or []:
        path = bench_dir / f"bench_{name}.py"
        if not path.is_file():
            known = sorted(p.stem[len("bench_"):] for p in bench_dir.glob("bench_*.py"))
            raise UserError(f"--only: no benchmark file {path.name} (known: "
                            f"{', '.join(known)})")
        targets.append(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        # Rows of this run land in their own folder first, so the printed table is this run's.
        run_dir = Path(tmp)
        cmd = [sys.executable, "-m", "pytest", *(targets or [str(bench_dir)]), "-q",
               "-p", "no:cacheprovider", f"--results-dir={run_dir}",
               "--benchmark-columns=median,min,max,rounds"]
        if args.quick:
            cmd.append("--smoke")
        print("running:", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=bench_dir)
        report = _load_report(bench_dir)
        rows = report.load_rows(run_dir)
        for device, device_rows in report.latest(rows, include_smoke=True).items():
            print(f"\n## {device}\n\n{report.tables(device_rows)}")
        keep = args.results_dir or (None if args.quick else bench_dir / "results")
        if keep is not None and rows:
            keep = Path(keep)
            keep.mkdir(parents=True, exist_ok=True)
            for path in run_dir.glob("*.jsonl"):
                with open(keep / path.name, "a") as f:
                    f.write(path.read_text())
            if not args.quick and keep.resolve() == (bench_dir / "results").resolve():
                report.main(keep)
    return rc
