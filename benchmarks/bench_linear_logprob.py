"""Fused linear log-prob: hidden (N, D) @ weight (V, D)^T -> log_softmax -> gather(targets),
forward, backward and both, per provider:

  eager    full (N, V) logits, log_softmax, gather (the logits upcast to fp32 in bf16)
  compile  torch.compile of eager
  liger    Liger-Kernel's fused linear cross entropy, reduction="none" (CUDA only)
  cce      Cut Cross-Entropy's linear_cross_entropy, reduction="none" (CUDA, where installed)
  ours     vrpo_fast.linear_logprobs: the Triton kernel on CUDA; on the CPU its chunked PyTorch
           reference (impl="torch"; the Triton interpreter is a correctness tool, never timed)

The upstream gradient is a random per-token vector (as when the loss weights tokens unequally).
Useful FLOPs: 2 N D V forward, 4 N D V backward, 6 N D V both (recomputed logits not counted).
Peak memory against the lower bound: inputs, output and (with backward) the two gradients.

    python -m pytest benchmarks/bench_linear_logprob.py -q [--smoke]
"""

import pytest
import torch
from conftest import device, peak_memory, timed

SHAPES = {
    "smoke": [dict(N=64, D=32, V=1000)],
    "cpu": [dict(N=1024, D=512, V=32000), dict(N=2048, D=1024, V=32000)],
    "gpu": [dict(N=N, D=D, V=V) for N in (2048, 8192, 32768) for D in (2048, 4096)
            for V in (32000, 128256, 256000)],
}
PROVIDERS = ["eager", "compile", "liger", "cce", "ours"]
FLOPS_PER_NDV = {"fwd": 2, "bwd": 4, "full": 6}


def make_inputs(N, D, V, seed=0):
    """hidden (N, D), weight (V, D) scaled like an LM head, targets (N,), upstream grad (N,)."""
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen).to(device(), dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5).to(device(), dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=gen).to(device())
    grad = torch.rand(N, generator=gen).to(device())
    return h, w, t, grad


def eager(h, w, t):
    logits = h @ w.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    return torch.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)


_compiled = None


def provider_fn(name):
    """(h, w, t) -> (N,) log p(t); skips the test where the provider cannot run here."""
    global _compiled
    if name == "eager":
        return eager
    if name == "compile":
        if _compiled is None:
            _compiled = torch.compile(eager)      # once per process, like a trainer would
        return _compiled
    if name == "liger":
        if device() != "cuda":
            pytest.skip("liger: its fused linear cross entropy is Triton, CUDA only")
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, t: -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    if name == "cce":
        if device() != "cuda":
            pytest.skip("cce: Cut Cross-Entropy's kernels are Triton, CUDA only")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            pytest.skip("cce: cut-cross-entropy is not installed")
        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none")
    from vrpo_fast.ops import linear_logprobs

    impl = "triton" if device() == "cuda" else "torch"
    return lambda h, w, t: linear_logprobs(h, w, t, impl=impl)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def check(fn, h, w, t, grad, rows=64):
    """Values and both gradients on the first `rows` tokens against float64 eager maths."""
    hs = h[:rows].detach().clone().requires_grad_(True)
    ws = w.detach().clone().requires_grad_(True)
    out = fn(hs, ws, t[:rows])
    out.backward(grad[:rows])
    h64 = hs.detach().double().requires_grad_(True)
    w64 = ws.detach().double().requires_grad_(True)
    ref = eager(h64, w64, t[:rows])
    ref.backward(grad[:rows].double())
    # fp32 maths agrees to ~1e-6; bf16 inputs leave the outputs / gradients ~4e-3 off.
    tol = 1e-4 if h.dtype == torch.float32 else 2e-2
    for name, got, want in (("log p", out, ref), ("d hidden", hs.grad, h64.grad),
                            ("d weight", ws.grad, w64.grad)):
        err = rel_err(got, want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:g} against float64"


def make_op(fn, h, w, t, grad, direction):
    """-> (op, setup): `op(*setup())` is one timed call; setup is None except for the backward
    alone, which runs an untimed forward first (compiled backwards donate their buffers, so a
    graph cannot be kept and re-run with retain_graph)."""
    if direction == "fwd":
        return (lambda: fn(h, w, t)), None

    def backward(out):
        out.backward(grad)
        h.grad = w.grad = None
    if direction == "bwd":
        return backward, (lambda: (fn(h, w, t),))
    return (lambda: backward(fn(h, w, t))), None


def probe(provider, direction, N, D, V):
    """Fresh-process peak memory of one call (after a warm-up call that compiles)."""
    from _peak import measure, tensor_bytes

    h, w, t, grad = make_inputs(N, D, V)
    op, _ = make_op(provider_fn(provider), h, w, t, grad, direction)
    op()
    return measure(op, tensor_bytes(h, w, t, grad))


@pytest.mark.parametrize("direction", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_linear_logprob(benchmark, record, mode, provider, direction, shape):
    fn = provider_fn(provider)
    h, w, t, grad = make_inputs(**shape)
    check(fn, h, w, t, grad)
    N, D, V = shape["N"], shape["D"], shape["V"]
    elem = h.element_size()
    lower = (N * D + V * D) * elem + N * 8 + N * 4 + N * 4       # h, w, targets, grad, out
    if direction != "fwd":
        lower += (N * D + V * D) * elem
    benchmark.group = f"linear_logprob {shape} {direction}"
    try:
        op, setup = make_op(fn, h, w, t, grad, direction)
        seconds = timed(benchmark, op, setup=setup, rounds=1 if mode == "smoke" else 3,
                        warmup=0 if mode == "smoke" else 1)
    except torch.cuda.OutOfMemoryError:
        record("linear_logprob", provider, shape, None, direction=direction, dtype=str(h.dtype),
               error="out of memory")
        pytest.skip("out of memory")
    # bwd alone allocates what full does: its peak is not probed separately.
    mem = {} if mode == "smoke" or direction == "bwd" else peak_memory(
        "bench_linear_logprob:probe", provider=provider, direction=direction, **shape)
    median = sorted(seconds)[len(seconds) // 2]
    record("linear_logprob", provider, shape, seconds, direction=direction, dtype=str(h.dtype),
           tflops=FLOPS_PER_NDV[direction] * N * D * V / median / 1e12,
           lower_bound_bytes=lower, **mem)
