"""Per-call times of a function, the way every benchmark here takes them.

GPU: `triton.testing.do_bench` (25 ms of warm-up calls, then about `rep_ms` of calls, each
between CUDA events, with the L2 cache flushed before each call so that no call reads the
previous one's inputs from cache). A call that needs a fresh untimed setup (the backward alone
needs a forward first) is timed the same way by hand: L2 flush, setup, CUDA events around the
call only. CPU: `time.perf_counter` around each call after `warmup` untimed calls, at least
`rounds` calls and at least `rep_ms` of them (so that a fast op gets enough calls for a
median that a busy machine's stalls do not move); the Triton interpreter is never timed (it
is a correctness tool).

Reported: the median with the min and max (`summary`), never the mean, which one preempted
call on a shared machine would move.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_calls(fn: Callable, *, setup: Callable | None = None, rounds: int = 5,
               warmup: int = 1, rep_ms: int = 500) -> list[float]:
    """Seconds per call of `fn()`, or of `fn(*setup())` with only `fn` timed.

    rounds / warmup: the fewest timed / the untimed calls (with `setup` on a GPU: at least 10
    timed); rep_ms: the time spent on timed calls (do_bench's `rep` on a GPU; on the CPU calls
    go on until both `rounds` and `rep_ms` are reached, 10000 calls at most)."""
    if torch.cuda.is_available():
        if setup is None:
            from triton.testing import do_bench

            return [ms / 1e3 for ms in do_bench(fn, warmup=25, rep=rep_ms, return_mode="all")]
        cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        seconds = []
        for i in range(warmup + max(rounds, 10)):
            args = setup()
            cache.zero_()           # the L2 flush do_bench does: overwrite 256 MiB
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                seconds.append(start.elapsed_time(end) / 1e3)
        return seconds
    for _ in range(warmup):
        fn(*(setup() if setup is not None else ()))
    seconds = []
    while len(seconds) < rounds or (sum(seconds) < rep_ms / 1e3 and len(seconds) < 10000):
        args = setup() if setup is not None else ()
        start = time.perf_counter()
        fn(*args)
        seconds.append(time.perf_counter() - start)
    return seconds


def summary(seconds: list[float]) -> dict:
    """{"median_s", "min_s", "max_s", "rounds"} of per-call times."""
    s = sorted(seconds)
    n = len(s)
    median = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return dict(median_s=median, min_s=s[0], max_s=s[-1], rounds=n)
