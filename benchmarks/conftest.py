"""Benchmark plumbing: shapes per mode, correctness before timing, rows written with device,
versions, commit and timestamp to benchmarks/results/<device>.jsonl.

    python -m pytest benchmarks                 # CPU shapes (or the GPU shapes on a GPU)
    python -m pytest benchmarks --smoke         # tiny shapes, one round: CI keeps this alive
"""

import json
import os
import platform
import subprocess
import time
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
ROWS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true", help="tiny shapes, one round")
    parser.addoption("--results-dir", default=None, help="where rows go (default "
                                                         "benchmarks/results; smoke: nowhere)")


def _mode(config) -> str:
    if config.getoption("--smoke"):
        return "smoke"
    return "gpu" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def mode(request) -> str:
    return _mode(request.config)


def pytest_generate_tests(metafunc):
    """A module's SHAPES[mode] parametrises its `shape` argument."""
    if "shape" in metafunc.fixturenames:
        shapes = metafunc.module.SHAPES[_mode(metafunc.config)]
        metafunc.parametrize("shape", shapes, ids=[
            "-".join(f"{k}{v}" for k, v in s.items()) for s in shapes])


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers", "liger_kernel"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or a broken install: the row says so
            out[name] = None
    return out


@pytest.fixture
def record(request, mode):
    """record(op, provider, shape: dict, seconds: list[float], **extra) -> the row."""

    def _record(op, provider, shape, seconds, **extra):
        seconds = sorted(seconds)
        row = {"op": op, "provider": provider, "mode": mode, "shape": shape,
               "median_s": seconds[len(seconds) // 2], "min_s": seconds[0],
               "max_s": seconds[-1], "rounds": len(seconds), "device": device_name(),
               "commit": commit(), "versions": versions(),
               "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        ROWS.append(row)
        return row

    return _record


def timed(benchmark, fn, *, rounds: int, warmup: int = 1) -> list[float]:
    """Times `fn` with pytest-benchmark (one call per round, after `warmup` calls); returns the
    round times in seconds. On a GPU every call ends with a synchronisation."""
    if torch.cuda.is_available():
        def call():
            fn()
            torch.cuda.synchronize()
    else:
        call = fn
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return list(benchmark.stats.stats.data)


def peak_memory(target: str, **kwargs) -> int:
    """Peak bytes used by one run of `target` ("module:function", called with kwargs after it
    builds its inputs), measured in a fresh process: on a GPU torch.cuda.max_memory_allocated,
    on the CPU the growth of the process's peak resident set (ru_maxrss) during the op."""
    import sys

    here, args = str(Path(__file__).parent), json.dumps(kwargs)
    code = (f"import json, sys, importlib; sys.path.insert(0, {here!r}); "
            f"m, f = {target!r}.split(':'); "
            f"print('PEAK', importlib.import_module(m).__dict__[f](**json.loads({args!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK "):
            return int(line.split()[1])
    raise RuntimeError(f"peak-memory probe {target} failed:\n{out.stderr[-2000:]}")


def pytest_sessionfinish(session, exitstatus):
    target = session.config.getoption("--results-dir")
    smoke = session.config.getoption("--smoke")
    if not ROWS or (smoke and target is None):
        return
    directory = Path(target) if target else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    slug = device_name().replace(" ", "_").replace("/", "_")
    with open(directory / f"{slug}.jsonl", "a") as f:
        for row in ROWS:
            f.write(json.dumps(row) + "\n")
