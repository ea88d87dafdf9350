"""Benchmark plumbing: shapes per mode, and rows written with device, versions, commit, command
and timestamp to benchmarks/results/<device>.jsonl. The measurement code is the package's
(vrpo_fast.bench, what `vrpo-fast bench` runs); _suite.py holds the suites' own helpers.

    python -m pytest benchmarks                 # CPU shapes, or the GPU shapes on a GPU
    python -m pytest benchmarks --smoke         # tiny shapes, one round: what CI runs
    python benchmarks/report.py                 # RESULTS.md tables and the chart from the rows
"""

import json
from pathlib import Path

import pytest
import torch
from _suite import RESULTS, ROWS, SESSION, make_row

from vrpo_fast.bench.command import SYSTEM_MALLOC
from vrpo_fast.bench.env import commit, device_slug, session
from vrpo_fast.host_memory import keep_freed_memory


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true", help="tiny shapes, one round, no peak "
                                                          "memory probes")
    parser.addoption("--results-dir", default=None, help="where rows are appended (default "
                                                         "benchmarks/results; --smoke: nowhere)")
    parser.addoption("--system-malloc", action="store_true", help=SYSTEM_MALLOC)


def _mode(config) -> str:
    if config.getoption("--smoke"):
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def mode(request) -> str:
    return _mode(request.config)


def pytest_generate_tests(metafunc):
    """A module's SHAPES[mode] (or SHAPES_<FUNCTION>[mode]) parametrises its `shape` argument."""
    if "shape" in metafunc.fixturenames:
        table = getattr(metafunc.module, f"SHAPES_{metafunc.function.__name__.upper()}",
                        metafunc.module.SHAPES)
        shapes = table[_mode(metafunc.config)]
        metafunc.parametrize("shape", shapes, ids=[
            "-".join(f"{k}{v}" for k, v in s.items()) for s in shapes])


def pytest_configure(config):
    if not config.getoption("--system-malloc") and not torch.cuda.is_available():
        # Every provider (ours, TRL, eager, compiled) runs in this process with the CPU
        # trainer's allocator setting, so the comparison is like for like
        # (vrpo_fast/host_memory.py).
        keep_freed_memory()
    # Computed once: git and package metadata are the same for every row of a run. A tree
    # without its .git records "unknown" unless $VRPO_BENCH_COMMIT names the commit.
    args = " ".join(config.invocation_params.args)
    SESSION.update(session(), commit=commit() or "unknown",
                   command=f"python -m pytest {args}".strip())


@pytest.fixture
def record(mode):
    """record(op, provider, shape: dict, seconds: list[float] | None, **extra) -> the row.
    `seconds=None` records a provider that could not run the shape (extra says why)."""
    return lambda op, provider, shape, seconds, **extra: make_row(op, provider, mode, shape,
                                                                  seconds, **extra)


def pytest_sessionfinish(session, exitstatus):
    target = session.config.getoption("--results-dir")
    if not ROWS or (session.config.getoption("--smoke") and target is None):
        return
    directory = Path(target) if target else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{device_slug()}.jsonl", "a") as f:
        for row in ROWS:
            f.write(json.dumps(row) + "\n")
