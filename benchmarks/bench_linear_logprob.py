"""Fused linear log-prob (LM head + log-softmax + gather), forward and forward+backward.

Providers: eager PyTorch (full logits), torch.compile of the same, Liger-Kernel's fused linear
cross entropy (reduction none; CUDA only), and ours (`vrpo_fast.linear_logprobs`: the Triton
kernel on CUDA, the chunked PyTorch reference on the CPU). Useful FLOPs: 2 N D V forward,
6 N D V forward + backward (the recomputed logits in backward are not counted).
"""

import pytest
import torch
from conftest import peak_memory, timed

SHAPES = {
    "smoke": [dict(N=64, D=32, V=1000)],
    "cpu": [dict(N=1024, D=512, V=32000), dict(N=2048, D=1024, V=32000)],
    "gpu": [dict(N=N, D=D, V=V) for N in (2048, 8192, 32768) for D in (2048, 4096)
            for V in (32000, 128256, 256000)],
}
PROVIDERS = ["eager", "compile", "liger", "ours"]


def make_inputs(N, D, V, device=None, dtype=None, seed=0):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5).to(device, dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    return h, w, t


def eager(h, w, t):
    logits = h @ w.T
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    return torch.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)


_compiled = None


def provider_fn(name):
    global _compiled
    if name == "eager":
        return eager
    if name == "compile":
        if _compiled is None:
            _compiled = torch.compile(eager)
        return _compiled
    if name == "liger":
        if not torch.cuda.is_available():
            pytest.skip("Liger-Kernel's Triton kernels need a GPU")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    from vrpo_fast import linear_logprobs

    return lambda h, w, t: linear_logprobs(h, w, t)


def run_once(provider, N, D, V, backward):
    h, w, t = make_inputs(N, D, V)
    fn = provider_fn(provider)

    def op():
        out = fn(h, w, t)
        if backward:
            out.sum().backward()
    return op


def probe(provider, N, D, V, backward):
    """Entry point of the fresh-process peak-memory probe."""
    from _peak import measure

    return measure(run_once(provider, N, D, V, backward))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_linear_logprob(benchmark, record, mode, provider, backward, shape):
    h, w, t = make_inputs(**shape)
    fn = provider_fn(provider)
    # Correctness first, against eager in float64 on a slice.
    ref = eager(h[:64].double(), w.double(), t[:64])
    got = fn(h, w, t)[:64].double()
    tol = 1e-3 if h.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)

    def op():
        out = fn(h, w, t)
        if backward:
            out.sum().backward()
            h.grad = w.grad = None
    benchmark.group = f"linear_logprob {shape} {'fwd+bwd' if backward else 'fwd'}"
    rounds = 1 if mode == "smoke" else 5
    seconds = timed(benchmark, op, rounds=rounds)
    N, D, V = shape["N"], shape["D"], shape["V"]
    flops = (6 if backward else 2) * N * D * V
    peak = None if mode == "smoke" else peak_memory("bench_linear_logprob:probe",
                                                    provider=provider, backward=backward,
                                                    **shape)
    elem = h.element_size()
    lower_bound = (N * D + V * D) * elem * (2 if backward else 1) + N * 4
    row = record("linear_logprob", provider, shape, seconds, backward=backward,
                 dtype=str(h.dtype), tflops=flops / sorted(seconds)[len(seconds) // 2] / 1e12,
                 peak_bytes=peak, lower_bound_bytes=lower_bound)
    benchmark.extra_info.update(tflops=row["tflops"], peak_bytes=peak)
