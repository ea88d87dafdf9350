"""The VRPO loss on (B, 2 + 2M) sequence log-probs and (B, 1 + M) g, per prompt, forward,
backward and both, per provider:

  eager    the formula, `vrpo_fast.objective.vrpo_loss(reduction="none")`
  compile  torch.compile of eager
  ours     the fused Triton kernel, `vrpo_fast.ops.per_prompt_vrpo_loss(impl="triton")`: CUDA
           only (on the CPU that function IS the eager formula, so there is no separate row)

Checked against the formula in float64 (values and d loss / d policy) before timing. The work
is O(B M): microseconds, launch-bound; no TFLOP/s are reported. Peak memory against the lower
bound: the three inputs and the (B,) output, plus d policy with a backward.
"""

from __future__ import annotations

import torch

from vrpo_fast.bench.env import Unavailable, device
from vrpo_fast.bench.memory import measure, tensor_bytes
from vrpo_fast.bench.references import rel_err
from vrpo_fast.objective import vrpo_loss
from vrpo_fast.ops import per_prompt_vrpo_loss

PROVIDERS = ("eager", "compile", "ours")
DIRECTIONS = ("fwd", "bwd", "full")
BETA = 0.1
TOLERANCE = 1e-5


def make_inputs(B: int, M: int, seed: int = 0):
    """Policy (B, 2 + 2M) (a leaf), reference (B, 2 + 2M) log-probs of a few tens of nats, and
    g (B, 1 + M) in [0, 1], float32."""
    gen = torch.Generator().manual_seed(seed)
    pol = (-60 + 10 * torch.randn(B, 2 + 2 * M, generator=gen)).to(device())
    ref = (-60 + 10 * torch.randn(B, 2 + 2 * M, generator=gen)).to(device())
    g = torch.rand(B, 1 + M, generator=gen).to(device())
    return pol.requires_grad_(True), ref, g


def eager(pol, ref, g):
    return vrpo_loss(pol, ref, g, beta=BETA, reduction="none", check_inputs=False)[0]


_compiled = None


def provider_fn(name: str):
    """(pol, ref, g) -> (B,) per-prompt losses; raises Unavailable where it cannot run here."""
    global _compiled
    if name == "eager":
        return eager
    if name == "compile":
        _compiled = _compiled or torch.compile(eager)
        return _compiled
    if name == "ours":
        if device() != "cuda":
            raise Unavailable("ours: on the CPU the fused loss is the eager formula (the eager "
                              "row)")
        return lambda p, r, g: per_prompt_vrpo_loss(p, r, g, beta=BETA, loss_type="sigmoid",
                                                    estimator="vrpo", impl="triton")
    raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")


def check(fn, pol, ref, g) -> dict:
    """Values and d loss / d policy against the formula in float64."""
    p64 = pol.detach().double().requires_grad_(True)
    want = eager(p64, ref.double(), g.double())
    want.sum().backward()
    p = pol.detach().clone().requires_grad_(True)
    got = fn(p, ref, g)
    got.sum().backward()
    errs = {"loss": rel_err(got, want), "d policy": rel_err(p.grad, p64.grad)}
    return dict(reference="float64 formula", rel_err=errs, tol=TOLERANCE,
                ok=all(e <= TOLERANCE for e in errs.values()))


def make_op(fn, pol, ref, g, direction: str):
    """-> (op, setup) as in `linear_logprob.make_op`: the backward alone gets a fresh untimed
    forward from setup."""
    if direction == "fwd":
        return (lambda: fn(pol, ref, g)), None

    def backward(out):
        out.sum().backward()
        pol.grad = None
    if direction == "bwd":
        return backward, (lambda: (fn(pol, ref, g),))
    return (lambda: backward(fn(pol, ref, g))), None


def lower_bound_bytes(B: int, M: int, direction: str) -> int:
    """float32 policy, reference, g and the (B,) output, + d policy with a backward."""
    lower = (2 * B * (2 + 2 * M) + B * (1 + M) + B) * 4
    return lower + (B * (2 + 2 * M) * 4 if direction != "fwd" else 0)


def probe(provider: str, direction: str, B: int, M: int) -> dict:
    """Peak memory of one `fwd` or `full` call after a warm-up call."""
    pol, ref, g = make_inputs(B, M)
    op, _ = make_op(provider_fn(provider), pol, ref, g, direction)
    op()
    return measure(op, tensor_bytes(pol, ref, g))
