"""Fused linear log-prob: hidden (N, D) @ weight (V, D)^T / T -> log_softmax -> gather(targets),
forward, backward and both, and the forward without gradient (`score`: what `vrpo-fast score`
and the online reference pass run), per provider:

  eager    full (N, V) logits, log_softmax, gather (the logits upcast to fp32 in bf16)
  compile  torch.compile of eager
  liger    Liger-Kernel's fused linear cross entropy, reduction="none" (Triton: CUDA only)
  cce      Cut Cross-Entropy's linear_cross_entropy, reduction="none" (Triton: CUDA only)
  ours     vrpo_fast.linear_logprobs: the Triton kernel on CUDA; on the CPU its chunked PyTorch
           reference (impl="torch"; the Triton interpreter is a correctness tool, never timed);
           without gradient, the one sweep's forward (GEMM into a chunk buffer, a row pass)

Liger and CCE take no temperature: they get hidden / T, the same logits (the division is part
of their timed call). The upstream gradient is a random per-token vector (as when the loss
weights tokens unequally). Useful FLOPs: 2 N D V forward (and score), 4 N D V backward, 6 N D V both
(logits a kernel recomputes in its backward are not counted). Peak memory against the lower
bound: inputs and output, plus the two input gradients with a backward.
"""

from __future__ import annotations

import torch

from vrpo_fast.bench.env import Unavailable, device
from vrpo_fast.bench.memory import measure, tensor_bytes
from vrpo_fast.bench.references import eager_linear_logprobs, oracle_linear_logprobs, rel_err
from vrpo_fast.ops import linear_logprobs

PROVIDERS = ("eager", "compile", "liger", "cce", "ours")
DIRECTIONS = ("fwd", "bwd", "full", "score")
FLOPS_PER_NDV = {"fwd": 2, "bwd": 4, "full": 6, "score": 2}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error allowed against the float64 oracle: fp32 maths agrees to ~1e-6; bf16 / fp16
# inputs leave outputs and gradients ~4e-3 off.
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


def default_dtype() -> str:
    return "bf16" if device() == "cuda" else "fp32"


def make_inputs(N: int, D: int, V: int, dtype: str, seed: int = 0):
    """hidden (N, D), weight (V, D) scaled like an LM head, targets (N,), upstream grad (N,)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen).to(device(), DTYPES[dtype]).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5).to(device(), DTYPES[dtype])
    t = torch.randint(0, V, (N,), generator=gen).to(device())
    grad = torch.rand(N, generator=gen).to(device())
    return h, w.requires_grad_(True), t, grad


_compiled = {}


def fused_cross_entropy(name: str):
    """Liger-Kernel's ("liger") or Cut Cross-Entropy's ("cce") fused linear cross-entropy,
    (h, w, t, reduction="none") -> per-token loss; Unavailable off CUDA or not installed."""
    if device() != "cuda":
        raise Unavailable(f"{name}: its kernels are Triton, CUDA only (GPU-only provider)")
    try:
        if name == "liger":
            from liger_kernel.transformers.functional import (
                liger_fused_linear_cross_entropy as fused,
            )
        else:
            from cut_cross_entropy import linear_cross_entropy as fused
    except ImportError:
        dist = "liger-kernel" if name == "liger" else "cut-cross-entropy"
        raise Unavailable(f"{name}: {dist} is not installed") from None
    return fused


def provider_fn(name: str, temperature: float = 1.0):
    """(h, w, t) -> (N,) log p(t); raises Unavailable where the provider cannot run here."""
    if name == "eager":
        return lambda h, w, t: eager_linear_logprobs(h, w, t, temperature)
    if name == "compile":
        if temperature not in _compiled:      # once per process, like a trainer would
            _compiled[temperature] = torch.compile(
                lambda h, w, t: eager_linear_logprobs(h, w, t, temperature))
        return _compiled[temperature]
    if name in ("liger", "cce"):
        fused = fused_cross_entropy(name)
        scale = 1.0 / temperature
        return lambda h, w, t: -fused(h * scale if scale != 1.0 else h, w, t, reduction="none")
    if name == "ours":
        impl = "triton" if device() == "cuda" else "torch"
        return lambda h, w, t: linear_logprobs(h, w, t, temperature=temperature, impl=impl)
    raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")


def check(fn, h, w, t, grad, dtype: str, temperature: float = 1.0, rows: int = 64) -> dict:
    """Values and both gradients on the first `rows` tokens against the float64 oracle:
    {"reference", "rel_err": {"log p", "d hidden", "d weight"}, "tol", "ok"}."""
    hs = h[:rows].detach().clone().requires_grad_(True)
    ws = w.detach().clone().requires_grad_(True)
    out = fn(hs, ws, t[:rows])
    out.backward(grad[:rows].to(out.dtype))
    h64 = hs.detach().double().requires_grad_(True)
    w64 = ws.detach().double().requires_grad_(True)
    ref = oracle_linear_logprobs(h64, w64, t[:rows], temperature)
    ref.backward(grad[:rows].double())
    errs = {name: rel_err(got, want) for name, got, want in (
        ("log p", out, ref), ("d hidden", hs.grad, h64.grad), ("d weight", ws.grad, w64.grad))}
    tol = TOLERANCE[dtype]
    return dict(reference="float64 full logits", rows=min(rows, h.shape[0]), rel_err=errs,
                tol=tol, ok=all(e <= tol for e in errs.values()))


def make_op(fn, h, w, t, grad, direction: str):
    """-> (op, setup): `op(*setup())` is one timed call; setup is None except for the backward
    alone, which runs an untimed forward first (compiled backwards donate their buffers, so a
    graph cannot be kept and re-run with retain_graph)."""
    if direction == "fwd":
        return (lambda: fn(h, w, t)), None
    if direction == "score":
        def score():
            with torch.no_grad():
                return fn(h, w, t)
        return score, None

    def backward(out):
        out.backward(grad.to(out.dtype))
        h.grad = w.grad = None
    if direction == "bwd":
        return backward, (lambda: (fn(h, w, t),))
    return (lambda: backward(fn(h, w, t))), None


def lower_bound_bytes(N: int, D: int, V: int, dtype: str, direction: str) -> int:
    """Inputs (h, w, int64 targets, fp32 upstream grad) + fp32 output, + dh and dw with a
    backward: nothing of size N x V."""
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    lower = (N * D + V * D) * elem + N * 8 + N * 4 + N * 4
    return lower + ((N * D + V * D) * elem if direction in ("bwd", "full") else 0)


def tflops(direction: str, N: int, D: int, V: int, median_s: float) -> float:
    return FLOPS_PER_NDV[direction] * N * D * V / median_s / 1e12


def probe(provider: str, direction: str, N: int, D: int, V: int, dtype: str | None = None,
          temperature: float = 1.0) -> dict:
    """Peak memory of one `fwd`, `full` or `score` call, after a warm-up call (which compiles). The
    backward alone allocates what `full` does: its peak is not probed separately."""
    dtype = dtype or default_dtype()
    h, w, t, grad = make_inputs(N, D, V, dtype)
    op, _ = make_op(provider_fn(provider, temperature), h, w, t, grad, direction)
    op()
    return measure(op, tensor_bytes(h, w, t, grad))
