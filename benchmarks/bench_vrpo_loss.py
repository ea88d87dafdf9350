"""The VRPO loss on (B, 2 + 2M) log-probs: eager formula (vrpo_fast.vrpo_loss), torch.compile
of it, and ours (the fused Triton kernel on CUDA; on the CPU `per_prompt_vrpo_loss` falls back
to the eager formula, so the CPU ratio is 1 by construction)."""

import pytest
import torch
from conftest import timed

SHAPES = {
    "smoke": [dict(B=8, M=1)],
    "cpu": [dict(B=B, M=M) for B in (8, 64, 512) for M in (1, 2, 4)],
    "gpu": [dict(B=B, M=M) for B in (8, 64, 512) for M in (1, 2, 4)],
}


def inputs(B, M):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    pol = (-30 + 5 * torch.randn(B, 2 + 2 * M, generator=gen)).to(device).requires_grad_(True)
    ref = (-30 + 5 * torch.randn(B, 2 + 2 * M, generator=gen)).to(device)
    g = torch.rand(B, 1 + M, generator=gen).to(device)
    return pol, ref, g


def eager(pol, ref, g):
    from vrpo_fast.objective import vrpo_loss

    return vrpo_loss(pol, ref, g, beta=0.1, reduction="none", check_inputs=False)[0]


_compiled = None


def provider_fn(name):
    global _compiled
    if name == "eager":
        return eager
    if name == "compile":
        _compiled = _compiled or torch.compile(eager)
        return _compiled
    from vrpo_fast.ops import per_prompt_vrpo_loss

    return lambda p, r, g: per_prompt_vrpo_loss(p, r, g, beta=0.1, loss_type="sigmoid",
                                                estimator="vrpo")


@pytest.mark.parametrize("provider", ["eager", "compile", "ours"])
def bench_vrpo_loss(benchmark, record, mode, provider, shape):
    pol, ref, g = inputs(**shape)
    fn = provider_fn(provider)
    torch.testing.assert_close(fn(pol, ref, g), eager(pol, ref, g), atol=1e-5, rtol=1e-5)

    def op():
        fn(pol, ref, g).sum().backward()
        pol.grad = None
    benchmark.group = f"vrpo_loss {shape}"
    seconds = timed(benchmark, op, rounds=1 if mode == "smoke" else 20)
    record("vrpo_loss", provider, shape, seconds, backward=True)
