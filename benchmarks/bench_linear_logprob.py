"""Fused linear log-prob: hidden (N, D) @ weight (V, D)^T -> log_softmax -> gather(targets),
forward, backward and both, per provider (eager, compile, liger, cce, ours), at the shapes of
the published rows. Providers, inputs, the float64 check, FLOP counts and the memory lower
bound are the package's (vrpo_fast.bench.linear_logprob: `vrpo-fast bench linear-logprob`
measures one shape of one's choosing the same way).

    python -m pytest benchmarks/bench_linear_logprob.py -q [--smoke]
"""

import pytest
import torch
from _suite import peak_memory, timed

from vrpo_fast.bench import linear_logprob as ll
from vrpo_fast.bench.env import Unavailable

SHAPES = {
    "smoke": [dict(N=64, D=32, V=1000)],
    "cpu": [dict(N=1024, D=512, V=32000), dict(N=2048, D=1024, V=32000)],
    "gpu": [dict(N=N, D=D, V=V) for N in (2048, 8192, 32768) for D in (2048, 4096)
            for V in (32000, 128256, 256000)],
}


@pytest.mark.parametrize("direction", ll.DIRECTIONS)
@pytest.mark.parametrize("provider", ll.PROVIDERS)
def bench_linear_logprob(benchmark, record, mode, provider, direction, shape):
    try:
        fn = ll.provider_fn(provider)
    except Unavailable as why:
        pytest.skip(str(why))
    dtype = ll.default_dtype()
    h, w, t, grad = ll.make_inputs(**shape, dtype=dtype)
    check = ll.check(fn, h, w, t, grad, dtype)
    assert check["ok"], f"{provider}: {check}"
    N, D, V = shape["N"], shape["D"], shape["V"]
    benchmark.group = f"linear_logprob {shape} {direction}"
    try:
        op, setup = ll.make_op(fn, h, w, t, grad, direction)
        seconds = timed(benchmark, op, setup=setup, rounds=1 if mode == "smoke" else 3,
                        warmup=0 if mode == "smoke" else 1)
    except torch.cuda.OutOfMemoryError:
        record("linear_logprob", provider, shape, None, direction=direction, dtype=str(h.dtype),
               error="out of memory")
        pytest.skip("out of memory")
    # bwd alone allocates what full does: its peak is not probed separately.
    mem = {} if mode == "smoke" or direction == "bwd" else peak_memory(
        "vrpo_fast.bench.linear_logprob:probe", provider=provider, direction=direction,
        **shape)
    median = sorted(seconds)[len(seconds) // 2]
    record("linear_logprob", provider, shape, seconds, direction=direction, dtype=str(h.dtype),
           tflops=ll.tflops(direction, N, D, V, median),
           lower_bound_bytes=ll.lower_bound_bytes(N, D, V, dtype, direction), **mem)
