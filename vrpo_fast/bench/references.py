"""The references every provider is checked against before it is timed.

The fused LM-head log-prob has two: `oracle_linear_logprobs`, the float64 maths with full
(N, V) logits (the truth), and `eager_linear_logprobs`, what a user runs today (the LM head in
the inputs' dtype, log-softmax in float32; also the "eager" provider). The VRPO loss's reference
is `vrpo_fast.objective.vrpo_loss` in float64, and the chunked PyTorch reference of the kernel
is `vrpo_fast.chunked.chunked_linear_logprobs` (the CPU path of "ours").
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def oracle_linear_logprobs(hidden, weight, targets, temperature: float = 1.0):
    """(N,) log p(target) in float64 from full logits; ignored positions give 0."""
    logits = hidden.double() @ weight.double().T / temperature
    lp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets != IGNORE_INDEX, lp, torch.zeros_like(lp))


def eager_linear_logprobs(hidden, weight, targets, temperature: float = 1.0):
    """(N,) log p(target) as users compute it: logits in the inputs' dtype, upcast to float32
    (float64 stays float64), log_softmax, gather; ignored positions give 0."""
    logits = hidden @ weight.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets != IGNORE_INDEX, lp, torch.zeros_like(lp))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (a host sync: checks only, never in a timed call)."""
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
