"""The benchmark suite in its smoke mode (tiny shapes, one round), through `vrpo-fast bench
suite --quick`, so that neither the benchmarks nor the command rot. Every benchmark checks its
providers against a float64 or naive reference before timing, so a wrong provider fails here;
nothing is asserted about speed."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

ROW_FIELDS = {"op", "provider", "shape", "median_s", "min_s", "max_s", "device", "commit",
              "versions", "timestamp", "command"}


@pytest.mark.slow
def test_bench_quick_runs_every_benchmark_and_records_rows(tmp_path):
    # The benchmarks time real code paths: no Triton interpreter (the test conftest sets it).
    # ... and not as an xdist worker: the suite is its own pytest session, and pytest-benchmark
    # turns itself off where PYTEST_XDIST_* says it runs under xdist.
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_XDIST")}
    out = subprocess.run([sys.executable, "-m", "vrpo_fast.cli", "bench", "suite", "--quick",
                          "--dir=benchmarks", f"--results-dir={tmp_path}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    rows = [json.loads(line) for path in tmp_path.glob("*.jsonl")
            for line in path.read_text().splitlines()]
    assert rows, "no rows recorded"
    for row in rows:
        assert ROW_FIELDS <= set(row), f"row lacks {ROW_FIELDS - set(row)}: {row}"
        assert row["mode"] == "smoke" and row["min_s"] <= row["median_s"] <= row["max_s"]
    done = {(r["op"], r["provider"]) for r in rows}
    want = {("linear_logprob", "eager"), ("linear_logprob", "compile"),
            ("linear_logprob", "ours"), ("vrpo_loss", "eager"), ("vrpo_loss", "compile"),
            ("fused_linear_dpo", "eager"), ("fused_linear_dpo", "liger"),
            ("fused_linear_dpo", "ours"), ("sequence_logps", "naive"),
            ("sequence_logps", "packed"), ("train_step", "reference_layout"),
            ("train_step", "dpo_naive"), ("train_step", "vrpo_fast")}
    assert want <= done, f"missing rows: {sorted(want - done)}"
    # The command prints the table of the run.
    assert "### Training step" in out.stdout and "| hh | 1 | 2 |" in out.stdout


def test_bench_command_rejects_unknown_benchmark(capsys):
    from vrpo_fast.cli import main

    assert main(["bench", "suite", "--only", "nope", f"--dir={ROOT / 'benchmarks'}"]) == 1
    assert "--only: no benchmark file bench_nope.py" in capsys.readouterr().err


def test_bench_suite_outside_a_checkout_is_one_line_error(tmp_path, capsys):
    from vrpo_fast.cli import main

    assert main(["bench", "suite", f"--dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dir: no benchmark suite in" in err


def test_trainer_overhead_script_splits_the_step(capsys):
    """benchmarks/trainer_overhead.py (the trainer step's bookkeeping share) runs: each timed
    step's parts and the rest add up to the step, and the backward / clip patches are undone."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("trainer_overhead",
                                                  ROOT / "benchmarks" / "trainer_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    shares = module.main(["--smoke"])
    assert torch.Tensor.backward is backward and torch.nn.utils.clip_grad_norm_ is clip
    assert len(shares) == 2 and all(0 <= s < 1 for s in shares)
    out = capsys.readouterr().out
    assert out.count("step ") >= 2 and "the rest (bookkeeping), median over 2 steps" in out
