"""`LigerFusedLinearDPOLoss` with Liger-Kernel's call shape, on the fused log-prob operation.

A user of `liger_kernel.chunked_loss.LigerFusedLinearDPOLoss` switches by changing the import:

    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss        # before
    from vrpo_fast.integrations.liger import LigerFusedLinearDPOLoss     # after

    loss, aux = loss_fn(lm_head.weight, hidden, target, ref_input=ref_hidden,
                        ref_weight=ref_lm_head.weight)

with `hidden` (2B, T, D) (B chosen rows, then B rejected rows), `target` (2B, T) aligned with it
(target[:, t] is predicted by hidden[:, t]; -100 ignored), and `aux` Liger's tuple (chosen_logps,
rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
rejected_rewards). The log-probs come from `vrpo_fast.ops.linear_logprobs` (Triton on CUDA, its
chunked PyTorch reference elsewhere) on the response tokens only; the loss from
`vrpo_fast.vrpo_loss` with the DPO estimator. Liger settings this module cannot honour are
refused by name; `compiled` and `chunk_size` are Liger's implementation knobs and are ignored.
For VRPO (Monte Carlo pairs and g), use `FusedLinearVRPOLoss` with
`vrpo_fast.integrations.padded.padded_response_tokens`.
"""

from __future__ import annotations

import torch
from torch import nn

from vrpo_fast.integrations.padded import padded_response_tokens
from vrpo_fast.objective import vrpo_loss
from vrpo_fast.ops import full_weight, linear_logprobs

LOSS_TYPES = ("sigmoid", "hinge")


class LigerFusedLinearDPOLoss(nn.Module):
    """DPO from hidden states and the LM-head weight, Liger's arguments and returns.

    Args (Liger's): ignore_index, beta, use_ref_model, loss_type (sigmoid | hinge, which mean
    the same in both libraries). compute_nll_loss, average_log_prob, a non-zero
    label_smoothing and the other loss types are ValueErrors; alpha and discopop_tau only act
    with those; compiled and chunk_size are ignored.
    impl: auto | triton | torch, as in `vrpo_fast.ops`.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True,
                 use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, discopop_tau: float = 0.05, *,
                 impl: str = "auto"):
        super().__init__()
        if compute_nll_loss:
            raise ValueError("compute_nll_loss: not supported (no NLL term); add it from the "
                             "chosen log-probs in aux[0] if needed")
        if average_log_prob:
            raise ValueError("average_log_prob: not supported; sequence log-probs are sums")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: {loss_type!r} not supported; expected one of "
                             f"{', '.join(LOSS_TYPES)}")
        if label_smoothing:
            raise ValueError(f"label_smoothing: {label_smoothing} not supported (only 0)")
        if not beta > 0:
            raise ValueError(f"beta: must be > 0, got {beta}")
        self.ignore_index, self.beta, self.loss_type = ignore_index, beta, loss_type
        self.use_ref_model, self.impl = use_ref_model, impl

    def _logps(self, weight, hidden, target):
        """(B, 2) summed log-probs: column 0 chosen, 1 rejected."""
        h, t, s = padded_response_tokens(hidden, target, group_size=2, layout="stacked",
                                         shifted=True, ignore_index=self.ignore_index)
        n = hidden.shape[0]
        return linear_logprobs(h, weight, t, segment_ids=s, num_segments=n,
                               ignore_index=self.ignore_index, impl=self.impl).view(n // 2, 2)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None,
                ref_bias=None):
        """lin_weight (V, D), _input (2B, T, D), target (2B, T) -> (loss, aux) as Liger's."""
        if bias is not None or ref_bias is not None:
            raise ValueError("bias: LM heads with a bias are not supported")
        if _input.dim() != 3 or _input.shape[0] % 2:
            raise ValueError(f"_input: expected (2B, T, D) (chosen rows, then rejected), got "
                             f"{tuple(_input.shape)}")
        policy = self._logps(lin_weight, _input, target)
        ref = None
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("ref_input, ref_weight: required with use_ref_model=True")
            with torch.no_grad():
                ref = self._logps(ref_weight, ref_input, target)
        aux_prefs = torch.ones(policy.shape[0], 1, device=policy.device)   # unused by DPO
        loss, _ = vrpo_loss(policy, ref, aux_prefs, beta=self.beta, loss_type=self.loss_type,
                            estimator="dpo")
        rewards = self.beta * (policy - (0 if ref is None else ref)).detach()
        chosen_mean, rejected_mean = _logits_means(full_weight(lin_weight), _input)
        logps = policy.detach()
        aux = (logps[:, 0], logps[:, 1], chosen_mean, rejected_mean,
               torch.zeros((), device=policy.device), rewards[:, 0], rewards[:, 1])
        return loss, aux


@torch.no_grad()
def _logits_means(weight: torch.Tensor, hidden: torch.Tensor):
    """Liger's mean logit of the chosen and of the rejected rows, over every position and the
    vocabulary, without the logits: sum_{t, v} h_t . w_v = (sum_t h_t) . (sum_v w_v)."""
    n, T, _ = hidden.shape
    w = weight.float().sum(0)
    sums = hidden.float().sum(1) @ w                                  # (2B,)
    scale = n // 2 * T * weight.shape[0]
    return sums[: n // 2].sum() / scale, sums[n // 2:].sum() / scale
