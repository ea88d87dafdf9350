"""Peak-memory probes, each run in a fresh process by conftest.peak_memory."""

import resource

import torch


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(run) -> int:
    """Peak extra bytes of `run()` (inputs already built by the caller)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    before = _rss_bytes()
    run()
    return max(0, _rss_bytes() - before)
