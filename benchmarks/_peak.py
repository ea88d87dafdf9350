"""Peak memory of one call, for the probes that conftest.peak_memory runs in a fresh process.

GPU: `torch.cuda.max_memory_allocated` over the call (every live tensor counts, so the inputs
and persistent state are included). CPU: the same quantity reconstructed from the PyTorch
profiler's allocation events (`profile_memory=True`): the running sum of tensor allocations
and frees during the call, whose maximum is added to `base_bytes`, the live tensors the caller
holds when the call starts (inputs; parameters and optimizer state). This counts tensor memory
only, like the CUDA number, and is deterministic, unlike the process's resident set size, which
allocator caching and freed-but-unreturned pages blur.
"""

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

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU]
    live = high = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()                      # negative for a free
        high = max(high, live)
    return {"peak_bytes": base_bytes + high, "base_bytes": base_bytes}
