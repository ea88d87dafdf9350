"""Benchmark plumbing: shapes per mode, timing, peak memory in a fresh process, and rows written
with device, versions, commit, command and timestamp to benchmarks/results/<device>.jsonl.

    python -m pytest benchmarks                 # CPU shapes, or the GPU shapes on a GPU
    python -m pytest benchmarks --smoke         # tiny shapes, one round: what CI runs
    python benchmarks/report.py                 # RESULTS.md tables and the chart from the rows

Timing: on the CPU pytest-benchmark rounds (one call each, after warm-up calls); on a GPU
`triton.testing.do_bench` (CUDA events, L2 flushed between calls), whose per-call times are the
recorded ones (pytest-benchmark's console table then shows a few synchronised wall-clock rounds).
"""

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption("--smoke", action="store_true", help="tiny shapes, one round, no peak "
                                                          "memory probes")
    parser.addoption("--results-dir", default=None, help="where rows are appended (default "
                                                         "benchmarks/results; --smoke: nowhere)")


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


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def device_slug() -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name())


def commit() -> str:
    """`git rev-parse --short HEAD`, with `-dirty` when tracked files differ from it;
    $VRPO_BENCH_COMMIT overrides it (a copy of the tree without its .git, e.g. on a GPU box)."""
    if os.environ.get("VRPO_BENCH_COMMIT"):
        return os.environ["VRPO_BENCH_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    out = {}
    for dist in ("torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


_SESSION = {}


def pytest_configure(config):
    # Computed once: git and package metadata are the same for every row of a run.
    args = " ".join(config.invocation_params.args)
    _SESSION.update(device=device_name(), commit=commit(), versions=versions(),
                    threads=torch.get_num_threads(), command=f"python -m pytest {args}".strip())


@pytest.fixture
def record(mode):
    """record(op, provider, shape: dict, seconds: list[float] | None, **extra) -> the row.
    `seconds=None` records a provider that could not run the shape (extra says why)."""

    def _record(op, provider, shape, seconds, **extra):
        times = {}
        if seconds:
            s = sorted(seconds)
            times = dict(median_s=s[len(s) // 2] if len(s) % 2 else
                         (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2,
                         min_s=s[0], max_s=s[-1], rounds=len(s))
        row = {"op": op, "provider": provider, "mode": mode, "shape": shape, **times,
               **_SESSION, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **extra}
        ROWS.append(row)
        return row

    return _record


def timed(benchmark, fn, *, rounds: int, warmup: int = 1, rep_ms: int = 500,
          setup=None) -> list[float]:
    """Per-call times of `fn` in seconds: pytest-benchmark rounds after `warmup` calls on the
    CPU; `triton.testing.do_bench` (about `rep_ms` of calls, at least one) on a GPU.

    With `setup` (returning fn's positional arguments, e.g. a fresh forward's output for a
    backward-only timing), each call is `fn(*setup())` with only `fn` timed: pytest-benchmark's
    setup on the CPU, CUDA events around `fn` on a GPU (max(rounds, 10) calls)."""
    if not torch.cuda.is_available():
        wrapped = None if setup is None else (lambda: (setup(), {}))
        benchmark.pedantic(fn, setup=wrapped, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return list(benchmark.stats.stats.data)
    if setup is None:
        from triton.testing import do_bench

        seconds = [m / 1e3 for m in do_bench(fn, warmup=25, rep=rep_ms, return_mode="all")]
    else:
        seconds = []
        for i in range(warmup + max(rounds, 10)):
            args = setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                seconds.append(start.elapsed_time(end) / 1e3)

    def synced(*args):
        fn(*args)
        torch.cuda.synchronize()
    wrapped = None if setup is None else (lambda: (setup(), {}))
    benchmark.pedantic(synced, setup=wrapped, rounds=min(rounds, 3), iterations=1)
    return seconds


def peak_memory(target: str, **kwargs) -> dict:
    """Run `target` ("module:function", called with kwargs) and return what it returns (the dict
    of `_peak.measure`). On the CPU in a fresh Python process: one provider's allocations, caches
    and compiled graphs must not touch the next one's resident numbers. On a GPU in this process,
    counted from the allocator's own statistics: bytes already allocated when the probe starts
    (the benchmark's own inputs) are subtracted, so the number is the probe's inputs plus what
    the call allocates (`torch.cuda.max_memory_allocated`, as BENCHMARKS.md asks)."""
    if torch.cuda.is_available():
        import gc
        import importlib

        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        module, function = target.split(":")
        out = getattr(importlib.import_module(module), function)(**kwargs)
        gc.collect()
        torch.cuda.empty_cache()
        return {**out, "peak_bytes": out["peak_bytes"] - before,
                "base_bytes": out["base_bytes"] - before}
    code = (f"import json, sys, importlib; sys.path.insert(0, {str(HERE)!r}); "
            f"m, f = {target!r}.split(':'); "
            f"print('PEAK', json.dumps(importlib.import_module(m).__dict__[f]("
            f"**json.loads({json.dumps(kwargs)!r}))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=1800, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK "):
            return json.loads(line[5:])
    raise RuntimeError(f"peak-memory probe {target}({kwargs}) failed:\n{out.stderr[-3000:]}")


def pytest_sessionfinish(session, exitstatus):
    target = session.config.getoption("--results-dir")
    if not ROWS or (session.config.getoption("--smoke") and target is None):
        return
    directory = Path(target) if target else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{device_slug()}.jsonl", "a") as f:
        for row in ROWS:
            f.write(json.dumps(row) + "\n")
