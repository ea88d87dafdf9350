"""The fused operations with device dispatch: Triton kernels on CUDA, the PyTorch reference of
the same maths on the CPU. `impl="triton"` forces the kernels (on CPU tensors they run only in
Triton's interpreter, TRITON_INTERPRET=1, which is how the tests check them); `impl="torch"`
forces the reference.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vrpo_fast.chunked import chunked_linear_logprobs
from vrpo_fast.objective import _check_choice, vrpo_loss

IMPLS = ("auto", "triton", "torch")


def _use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    _check_choice("impl", impl, IMPLS)
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return on_cuda
    if impl == "torch":
        return False
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl: 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's "
                         "interpreter); use impl='auto' or 'torch' on the CPU")
    return True


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    segment_ids: torch.Tensor | None = None, num_segments: int | None = None,
                    temperature: float = 1.0, ignore_index: int = -100,
                    impl: str = "auto") -> torch.Tensor:
    """log p(target) from hidden states and the LM-head weight, never materialising logits.

    hidden: (N, D), weight: (V, D), targets: (N,) (ignore_index -> 0). Returns (N,) float32
    per-token log-probs, or (num_segments,) sums with segment_ids (N,). Differentiable in
    hidden and weight.
    """
    if not _use_triton(impl, hidden, weight):
        return chunked_linear_logprobs(hidden, weight, targets, segment_ids=segment_ids,
                                       num_segments=num_segments, temperature=temperature,
                                       ignore_index=ignore_index)
    # Shape checks are shared with the reference; it validates the same arguments.
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if segment_ids is not None and num_segments is None:
        raise ValueError("num_segments: required with segment_ids")
    from vrpo_fast.kernels.linear_logprob import LinearLogprobFunction

    return LinearLogprobFunction.apply(hidden, weight, targets, segment_ids, num_segments,
                                       float(temperature), ignore_index)


def per_prompt_vrpo_loss(policy_logps, ref_logps, aux_prefs, *, beta: float, loss_type: str,
                         estimator: str, impl: str = "auto") -> torch.Tensor:
    """(B,) per-prompt losses: the fused Triton kernel on CUDA, vrpo_loss otherwise."""
    if not _use_triton(impl, policy_logps):
        per, _ = vrpo_loss(policy_logps, ref_logps, aux_prefs, beta=beta, loss_type=loss_type,
                           estimator=estimator, reduction="none", check_inputs=False)
        return per
    from vrpo_fast.kernels.vrpo_loss import VRPOLossFunction

    return VRPOLossFunction.apply(policy_logps, ref_logps, aux_prefs, beta, loss_type,
                                  estimator)


class FusedLinearVRPOLoss(nn.Module):
    """Response hidden states + LM-head weight -> the VRPO loss, for embedding in any trainer.

    forward(hidden (N, D), weight (V, D), targets (N,), segment_ids (N,) with values g * K + k,
    num_groups B, group_size K = 2 + 2M, ref_logps (B, K) or None, aux_prefs (B, 1 + M))
    -> (loss, stats) with the stats of `vrpo_fast.vrpo_loss`.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", estimator: str = "vrpo",
                 dro_tau: float | None = None, temperature: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.beta, self.loss_type, self.estimator = beta, loss_type, estimator
        self.dro_tau, self.temperature, self.impl = dro_tau, temperature, impl

    def forward(self, hidden, weight, targets, segment_ids, num_groups: int, group_size: int,
                ref_logps, aux_prefs, reduction: str = "mean"):
        logps = linear_logprobs(hidden, weight, targets, segment_ids=segment_ids,
                                num_segments=num_groups * group_size,
                                temperature=self.temperature, impl=self.impl)
        policy = logps.view(num_groups, group_size)
        # Validation and the detached statistics come from the reference formula (cheap: B x K).
        _, stats = vrpo_loss(policy.detach(), ref_logps, aux_prefs, beta=self.beta,
                             loss_type=self.loss_type, estimator=self.estimator,
                             dro_tau=self.dro_tau, reduction="none" if self.dro_tau is None
                             else "mean")
        per = per_prompt_vrpo_loss(policy, ref_logps, aux_prefs, beta=self.beta,
                                   loss_type=self.loss_type, estimator=self.estimator,
                                   impl=self.impl)
        if self.dro_tau is not None:
            if reduction != "mean":
                raise ValueError("reduction: DRO weighting (dro_tau) needs reduction='mean'")
            weights = torch.softmax(per.detach() / self.dro_tau, dim=0)
            return (weights * per).sum(), stats
        if reduction == "mean":
            return per.mean(), stats
        if reduction == "sum":
            return per.sum(), stats
        _check_choice("reduction", reduction, ("mean", "sum", "none"))
        return per, stats
