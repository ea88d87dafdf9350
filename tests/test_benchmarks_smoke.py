"""The benchmark suite in its smoke mode (tiny shapes, one round), so that it never rots.
Correctness checks inside each benchmark run too; nothing is timed or asserted about speed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_suite_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--smoke", "-q",
                          f"--results-dir={tmp_path}", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    rows = (tmp_path).glob("*.jsonl")
    lines = [line for path in rows for line in path.read_text().splitlines()]
    ops = {__import__("json").loads(line)["op"] for line in lines}
    assert {"linear_logprob", "vrpo_loss", "sequence_logps", "train_step", "sampling"} <= ops


def test_bench_command_rejects_unknown_benchmark(capsys):
    from vrpo_fast.cli import main

    assert main(["bench", "--only", "nope"]) == 1
    assert "--only: no benchmark file" in capsys.readouterr().err
