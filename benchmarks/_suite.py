"""What the benchmark files share besides the package's measurement code (vrpo_fast.bench):
timing through pytest-benchmark, peak memory in a fresh process, and the rows they record.

Timing: on the CPU pytest-benchmark rounds (one call each, after warm-up calls); on a GPU
`vrpo_fast.bench.timing.time_calls` (`triton.testing.do_bench`: CUDA events, L2 flushed between
calls), whose per-call times are the recorded ones (pytest-benchmark's console table then shows
a few synchronised wall-clock rounds).
"""

import time
from pathlib import Path

import torch

from vrpo_fast.bench import memory
from vrpo_fast.bench.timing import summary, time_calls

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS: list[dict] = []
# Filled once per run by conftest.pytest_configure: device, versions, commit, command.
SESSION: dict = {}


def timed(benchmark, fn, *, rounds: int, warmup: int = 1, rep_ms: int = 500,
          setup=None) -> list[float]:
    """Per-call times of `fn` in seconds: pytest-benchmark rounds after `warmup` calls on the
    CPU; `time_calls` (do_bench, about `rep_ms` of calls) on a GPU.

    With `setup` (returning fn's positional arguments, e.g. a fresh forward's output for a
    backward-only timing), each call is `fn(*setup())` with only `fn` timed."""
    wrapped = None if setup is None else (lambda: (setup(), {}))
    if not torch.cuda.is_available():
        benchmark.pedantic(fn, setup=wrapped, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return list(benchmark.stats.stats.data)
    seconds = time_calls(fn, setup=setup, rounds=rounds, warmup=warmup, rep_ms=rep_ms)

    def synced(*args):
        fn(*args)
        torch.cuda.synchronize()
    benchmark.pedantic(synced, setup=wrapped, rounds=min(rounds, 3), iterations=1)
    return seconds


def peak_memory(target: str, **kwargs) -> dict:
    """The probe `target` ("module:function": a vrpo_fast.bench module or a benchmark file of
    this folder) in a fresh process on the CPU, in this one on a GPU (memory.peak_memory)."""
    return memory.peak_memory(target, fresh_process=True, sys_path=str(HERE), **kwargs)


def make_row(op, provider, mode, shape, seconds, **extra) -> dict:
    """One result row; `seconds=None` records a provider that could not run the shape (extra
    says why)."""
    times = summary(seconds) if seconds else {}
    row = {"op": op, "provider": provider, "mode": mode, "shape": shape, **times, **SESSION,
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    ROWS.append(row)
    return row
