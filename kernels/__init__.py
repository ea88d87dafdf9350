"""Fused Triton kernels for vrpo_fast, installed as `vrpo_fast.kernels`.

- `linear_logprob`: LM head + log-softmax + gather (+ per-segment sums), never building logits;
- `vrpo_loss`: the VRPO / DPO loss and its gradient w.r.t. the policy log-probs;
- `fused_linear_vrpo`: the GPU steps of the one-sweep LM head + VRPO loss (per chunk of whole
  groups: cuBLAS logits, Triton log-sum-exp and in-place logit-gradient passes, the loss).
Kernels depend only on torch and triton; the trainer imports them, never the reverse. Their
PyTorch references are `vrpo_fast.chunked.chunked_linear_logprobs`,
`vrpo_fast.objective.vrpo_loss` and `vrpo_fast.chunked.TorchSweep` (whose loop,
`linear_vrpo_sweep`, drives both); `vrpo_fast.ops` dispatches between them.
"""

from .fused_linear_vrpo import TritonSweep, sweep_dlogits_, sweep_lse_logp
from .linear_logprob import (
    LinearLogprobFunction,
    linear_logprob_backward,
    linear_logprob_forward,
)
from .vrpo_loss import VRPOLossFunction, vrpo_loss_backward, vrpo_loss_forward

__all__ = [
    "LinearLogprobFunction",
    "TritonSweep",
    "VRPOLossFunction",
    "linear_logprob_backward",
    "linear_logprob_forward",
    "sweep_dlogits_",
    "sweep_lse_logp",
    "vrpo_loss_backward",
    "vrpo_loss_forward",
]
