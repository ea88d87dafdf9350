"""Peak tensor memory of one call.

GPU: `torch.cuda.max_memory_allocated` over the call (every live tensor counts, so the inputs
and persistent state are included). CPU: the same quantity reconstructed from the PyTorch
profiler's allocation events (`profile_memory=True`): the running sum of tensor allocations
and frees during the call, whose maximum is added to `base_bytes`, the live tensors the caller
holds when the call starts (inputs; parameters and optimizer state). This counts tensor memory
only, like the CUDA number, and is deterministic, unlike the process's resident set size, which
allocator caching and freed-but-unreturned pages blur.

A probe is a function `probe(**kwargs) -> measure(...)` that builds its own inputs, makes one
warm-up call (compilation, optimizer state) and measures the next. `peak_memory` runs it in a
fresh Python process on the CPU (the benchmark suites: one provider's caches and compiled
graphs never touch the next one's numbers) or in this process.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import subprocess
import sys

import torch
from torch import nn


def tensor_bytes(*things) -> int:
    """Bytes held by tensors, modules (parameters and buffers) and optimizers (their state)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for thing in things:
        if isinstance(thing, nn.Module):
            for t in [*thing.parameters(), *thing.buffers()]:
                add(t)
        elif isinstance(thing, torch.optim.Optimizer):
            for state in thing.state.values():
                for t in state.values():
                    add(t)
        elif isinstance(thing, (list, tuple)):
            for t in thing:
                add(t)
        else:
            add(thing)
    return total


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure(run, base_bytes: int) -> dict:
    """{"peak_bytes", "base_bytes"} of one call of `run()`; base_bytes: the caller's live tensors
    (used on the CPU; on a GPU the allocator's own count at the start is reported)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "base_bytes": base}
    from torch.profiler import ProfilerActivity, profile

    from vrpo_fast.chunked import workspace

    # The CPU sweep keeps its logit buffer between calls (vrpo_fast.chunked.workspace): freed
    # here, the measured call allocates it again and its peak counts it.
    workspace.release()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():           # the profiler logs its start and stop on fd 2
        prof.__enter__()
    try:
        run()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU]
    live = high = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()                      # negative for a free
        high = max(high, live)
    return {"peak_bytes": base_bytes + high, "base_bytes": base_bytes}


def peak_memory(target: str, *, fresh_process: bool, sys_path: str | None = None,
                **kwargs) -> dict:
    """Run the probe `target` ("module:function", called with kwargs) and return its dict.

    fresh_process (CPU only): in a new Python process, with `sys_path` put first on its path
    (the suites' own probe modules); the Triton interpreter is switched off there, as in every
    timed run. On a GPU, in this process, counted from the allocator's own statistics: bytes
    already allocated when the probe starts (the benchmark's own inputs) are subtracted, so the
    number is the probe's inputs plus what the call allocates."""
    module, function = target.split(":")
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        out = getattr(importlib.import_module(module), function)(**kwargs)
        gc.collect()
        torch.cuda.empty_cache()
        return {**out, "peak_bytes": out["peak_bytes"] - before,
                "base_bytes": out["base_bytes"] - before}
    if not fresh_process:
        return getattr(importlib.import_module(module), function)(**kwargs)
    code = (f"import json, sys, importlib; sys.path[:0] = {[sys_path] if sys_path else []!r}; "
            f"print('PEAK', json.dumps(getattr(importlib.import_module({module!r}), "
            f"{function!r})(**json.loads({json.dumps(kwargs)!r}))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=1800, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK "):
            return json.loads(line[5:])
    raise RuntimeError(f"peak-memory probe {target}({kwargs}) failed:\n{out.stderr[-3000:]}")
