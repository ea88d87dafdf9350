"""Fused Triton kernels for vrpo_fast, installed as `vrpo_fast.kernels`.

- `linear_logprob`: LM head + log-softmax + gather (+ per-segment sums), never building logits;
- `vrpo_loss`: the VRPO / DPO loss and its gradient w.r.t. the policy log-probs.
Kernels depend only on torch and triton; the trainer imports them, never the reverse. Their
PyTorch references are `vrpo_fast.chunked.chunked_linear_logprobs` and
`vrpo_fast.objective.vrpo_loss`; `vrpo_fast.ops` dispatches between the two.
"""

from .linear_logprob import (
    LinearLogprobFunction,
    linear_logprob_backward,
    linear_logprob_forward,
)
from .vrpo_loss import VRPOLossFunction, vrpo_loss_backward, vrpo_loss_forward

__all__ = [
    "LinearLogprobFunction",
    "VRPOLossFunction",
    "linear_logprob_backward",
    "linear_logprob_forward",
    "vrpo_loss_backward",
    "vrpo_loss_forward",
]
