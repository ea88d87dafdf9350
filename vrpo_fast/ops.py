"""The fused operations with device dispatch: Triton kernels on CUDA, the PyTorch reference of
the same maths on the CPU.

`impl="auto"` picks Triton for CUDA tensors and the reference otherwise; `impl="triton"` forces
the kernels (on CPU tensors they run only in Triton's interpreter, TRITON_INTERPRET=1, which is
how the tests check them); `impl="torch"` forces the reference
(`vrpo_fast.chunked.chunked_linear_logprobs`, `vrpo_fast.objective.vrpo_loss`).
Arguments are validated here once, without host syncs, for both paths.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vrpo_fast.chunked import (
    TorchSweep,
    chunked_linear_logprobs,
    group_offsets,
    one_sweep_vrpo_loss,
    sweep_logprobs,
)
from vrpo_fast.objective import ESTIMATORS, LOSS_TYPES, _check_choice, vrpo_loss

IMPLS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    _check_choice("impl", impl, IMPLS)
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return on_cuda and all(t.dtype in KERNEL_DTYPES for t in tensors)
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl: 'triton' on CPU tensors needs Triton's interpreter "
                         "(TRITON_INTERPRET=1 set before the first kernel import); use "
                         "impl='auto' or 'torch' on the CPU")
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"impl: the Triton kernels take float32, bfloat16 or float16 "
                             f"inputs, got {t.dtype}; use impl='torch'")
    return True


def _check_linear_args(hidden, weight, targets, segment_ids, num_segments, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden, weight: expected (N, D) and (V, D), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"hidden, weight: expected floating-point tensors, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if targets.shape != hidden.shape[:1] or targets.is_floating_point():
        raise ValueError(f"targets: expected integer ids of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments: given without segment_ids")
    else:
        if segment_ids.shape != targets.shape or segment_ids.is_floating_point():
            raise ValueError(f"segment_ids: expected integer ids of shape "
                             f"{tuple(targets.shape)}, got {segment_ids.dtype} "
                             f"{tuple(segment_ids.shape)}")
        if not isinstance(num_segments, int) or num_segments < 0:
            raise ValueError(f"num_segments: expected an int >= 0 with segment_ids, got "
                             f"{num_segments!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The whole (V, D) LM-head weight when a sharding wrapper holds only a piece of it.

    FSDP2 (or tensor parallelism) keeps a parameter as a sharded DTensor outside the forward of
    the module that owns it; a loss that takes the head weight next to the hidden states runs
    there. The shards are all-gathered, and the gradient of the gathered weight is treated as
    each rank's partial contribution: its backward reduce-scatters the average over ranks into
    the shard, as FSDP2 does for the parameters its own forward unshards. DeepSpeed ZeRO-3
    leaves an empty placeholder instead, which cannot be gathered from here: ValueError saying
    what to do.
    """
    from torch.distributed.tensor import DTensor, Partial

    if isinstance(weight, DTensor):
        return weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    if hasattr(weight, "ds_id") and weight.numel() == 0:
        raise ValueError("weight: the LM-head weight is partitioned by DeepSpeed ZeRO-3 (an empty "
                         "placeholder here); compute the loss inside "
                         "deepspeed.zero.GatheredParameters([weight]) or inside the model's "
                         "forward")
    return weight


def _kernel_inputs(hidden: torch.Tensor, weight: torch.Tensor):
    """The dtype the LM head would run in: autocast's when it is on (as F.linear would),
    else the promoted dtype of the two (the kernels multiply tiles of one dtype)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dtype), weight.to(dtype)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    segment_ids: torch.Tensor | None = None, num_segments: int | None = None,
                    temperature: float = 1.0, ignore_index: int = -100,
                    impl: str = "auto") -> torch.Tensor:
    """log p(target) from hidden states and the LM-head weight, never materialising logits.

    Args:
        hidden: (N, D) hidden states of the positions that predict the targets.
        weight: (V, D) LM-head weight.
        targets: (N,) token ids; positions equal to `ignore_index` contribute 0 and no gradient.
        segment_ids: optional (N,) ids in [0, num_segments): sum the log-probs per segment.
        num_segments: S, required with segment_ids (empty segments give 0).
        temperature: logits are divided by it.
        impl: auto | triton | torch (see the module docstring).

    Returns:
        (N,) float32 per-token log-probs, or (S,) float32 per-segment sums; differentiable in
        hidden and weight. A sharded weight (FSDP2 DTensor) is gathered first (`full_weight`).

    Without a gradient to prepare for (no_grad, or inputs that do not require it; 16/32-bit),
    the one sweep's forward runs instead (`vrpo_fast.chunked.sweep_logprobs`: the logits once
    per chunk into a reused buffer by a GEMM, cuBLAS on CUDA, then a row pass, Triton or
    PyTorch by `impl`): the scoring path, with the training head's values.
    """
    weight = full_weight(weight)
    _check_linear_args(hidden, weight, targets, segment_ids, num_segments, temperature)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad and hidden.dtype in KERNEL_DTYPES:
        # Scoring and reference passes: the one sweep's forward steps (the logits once per
        # chunk into a reused buffer by a GEMM, cuBLAS on CUDA, then a row pass): no backward
        # to prepare for, and the values of the training head's one sweep. (float64 stays on
        # the chunked reference, which computes in it.)
        backend = TorchSweep
        if _use_triton(impl, hidden, weight):
            from vrpo_fast.kernels.fused_linear_vrpo import TritonSweep

            hidden, weight = _kernel_inputs(hidden, weight)
            backend = TritonSweep
        sweep = backend(hidden, weight, temperature=float(temperature),
                        ignore_index=int(ignore_index))
        return sweep_logprobs(sweep, hidden, targets, segment_ids, num_segments)
    if not _use_triton(impl, hidden, weight):
        return chunked_linear_logprobs(hidden, weight, targets, segment_ids=segment_ids,
                                       num_segments=num_segments, temperature=temperature,
                                       ignore_index=ignore_index)
    from vrpo_fast.kernels.linear_logprob import LinearLogprobFunction

    hidden, weight = _kernel_inputs(hidden, weight)
    return LinearLogprobFunction.apply(hidden, weight, targets, segment_ids, num_segments,
                                       float(temperature), int(ignore_index))


def _check_loss_args(policy_logps, ref_logps, aux_prefs, beta, loss_type, estimator):
    """The shape and name checks of vrpo_loss, for the kernel path (no host syncs)."""
    if policy_logps.dim() != 2 or policy_logps.shape[1] < 2 or policy_logps.shape[1] % 2:
        raise ValueError(f"policy_logps: expected (B, 2 + 2M), got shape "
                         f"{tuple(policy_logps.shape)}")
    B, K = policy_logps.shape
    if ref_logps is not None and ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps: shape {tuple(ref_logps.shape)} does not match "
                         f"policy_logps {tuple(policy_logps.shape)}")
    if aux_prefs.shape != (B, K // 2):
        raise ValueError(f"aux_prefs: expected shape (B, 1 + M) = ({B}, {K // 2}), got "
                         f"{tuple(aux_prefs.shape)}")
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("estimator", estimator, ESTIMATORS)


def per_prompt_vrpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                         aux_prefs: torch.Tensor, *, beta: float, loss_type: str,
                         estimator: str, impl: str = "auto") -> torch.Tensor:
    """Per-prompt VRPO / DPO losses (B,), differentiable in policy_logps.

    policy_logps, ref_logps: (B, 2 + 2M) (ref None: zeros); aux_prefs: (B, 1 + M). The fused
    Triton kernel (one launch each way) on CUDA; `vrpo_loss(..., reduction="none")` otherwise.
    Values are not checked (no host syncs): use `vrpo_loss` for that.
    """
    if not _use_triton(impl, policy_logps):
        per, _ = vrpo_loss(policy_logps, ref_logps, aux_prefs, beta=beta, loss_type=loss_type,
                           estimator=estimator, reduction="none", check_inputs=False)
        return per
    _check_loss_args(policy_logps, ref_logps, aux_prefs, beta, loss_type, estimator)
    from vrpo_fast.kernels.vrpo_loss import VRPOLossFunction

    return VRPOLossFunction.apply(policy_logps, ref_logps, aux_prefs.detach(), float(beta),
                                  loss_type, estimator)


def dispatch_vrpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                       aux_prefs: torch.Tensor, *, beta: float, loss_type: str, estimator: str,
                       dro_tau: float | None = None, labelled: torch.Tensor | None = None,
                       label_scale: float | None = None, reduction: str = "mean",
                       check_inputs: bool = True, impl: str = "auto"):
    """`objective.vrpo_loss` with device dispatch: the fused loss kernel for the loss and its
    gradient on CUDA, the reference formula for everything else.

    Same arguments and returns as `vrpo_fast.vrpo_loss` (policy_logps, ref_logps: (B, 2 + 2M);
    aux_prefs: (B, 1 + M); reduction mean | sum | none), plus `impl` (auto | triton | torch).
    On the kernel path the validation and the detached statistics still come from the
    reference formula, run without gradient on the (B, K) detached log-probs: B x K numbers,
    negligible beside the pass that produced them, and one definition of every statistic.
    Labelled masks (`labelled`, `label_scale`) have no kernel: the reference formula computes
    those batches (impl="triton" refuses them). The trainers' two-pass path and
    `FusedLinearVRPOLoss` both call this, so the kernel and the formula cannot drift apart
    between them (the one sweep, `linear_vrpo_loss`, runs the same loss kernels).
    """
    common = dict(beta=beta, loss_type=loss_type, estimator=estimator, dro_tau=dro_tau,
                  labelled=labelled, label_scale=label_scale, reduction=reduction,
                  check_inputs=check_inputs)
    if labelled is not None:
        if impl == "triton":
            raise ValueError("labelled: the fused loss kernel has no labelled mask; use "
                             "impl='auto' or 'torch'")
        return vrpo_loss(policy_logps, ref_logps, aux_prefs, **common)
    if not _use_triton(impl, policy_logps):
        return vrpo_loss(policy_logps, ref_logps, aux_prefs, **common)
    with torch.no_grad():
        _, stats = vrpo_loss(policy_logps.detach(), ref_logps, aux_prefs, **common)
    per = per_prompt_vrpo_loss(policy_logps, ref_logps, aux_prefs, beta=beta,
                               loss_type=loss_type, estimator=estimator, impl=impl)
    if dro_tau is not None:
        weights = torch.softmax(per.detach() / dro_tau, dim=0)
        return (weights * per).sum(), stats
    if reduction == "mean":
        return per.mean(), stats
    if reduction == "sum":
        return per.sum(), stats
    return per, stats


def linear_vrpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     segment_ids: torch.Tensor, offsets: list[int], group_size: int,
                     ref_logps: torch.Tensor | None, aux_prefs: torch.Tensor, *, beta: float,
                     loss_type: str, estimator: str, reduction: str, temperature: float = 1.0,
                     labelled: torch.Tensor | None = None, label_scale=None,
                     impl: str = "auto", chunk_tokens: int | None = None):
    """The one-sweep LM head + VRPO loss (`vrpo_fast.chunked.one_sweep_vrpo_loss`) with
    device dispatch: the Triton steps (`TritonSweep`) in the LM head's compute dtype on CUDA,
    the PyTorch steps in fp32 otherwise. Same arguments and returns (loss () and the detached
    (G, K) policy log-probs), plus `impl`; g is never differentiated. Not validated here: the
    callers (`FusedLinearVRPOLoss`, `vrpo_fast.passes.SequenceVRPOLoss`) check once."""
    backend = {}
    if _use_triton(impl, hidden, weight):
        from vrpo_fast.kernels.fused_linear_vrpo import TritonSweep

        hidden, weight = _kernel_inputs(hidden, weight)
        backend["backend_cls"] = TritonSweep
    return one_sweep_vrpo_loss(hidden, weight, targets, segment_ids, offsets, group_size,
                               ref_logps, aux_prefs.detach(), beta=beta, loss_type=loss_type,
                               estimator=estimator, reduction=reduction,
                               temperature=float(temperature), labelled=labelled,
                               label_scale=label_scale, chunk_tokens=chunk_tokens, **backend)


class FusedLinearVRPOLoss(nn.Module):
    """Response hidden states + LM-head weight -> the VRPO loss, for embedding in any trainer.

    One sweep (reduction mean or sum, no DRO): per chunk of whole prompt groups the logits are
    formed once, then the log-sum-exp and target logits, the sequence log-probs, the groups'
    losses and their derivative, and at once the logit gradients, dH and dW
    (`vrpo_fast.chunked.linear_vrpo_sweep`: 6 N D V flops, no (N, V) logits, a bounded chunk
    buffer); backward only scales the stored gradients by its incoming scalar. On CUDA the
    logits and gradient GEMMs are cuBLAS, the softmax passes and the loss Triton
    (`vrpo_fast.kernels.fused_linear_vrpo`); on the CPU the same steps in PyTorch. It needs each
    group's tokens contiguous (the packed layout's order), found with one host sync per call.

    Two passes otherwise: the fused linear log-prob (per-response sums), then the fused loss
    kernel, with the log-probs' backward as a separate pass recomputing the logits. That path
    serves KL-DRO weighting (w = softmax(L / dro_tau) couples every group of the batch, so no
    chunk's gradient is known before the last chunk), reduction="none" (a vector backward) and
    segment ids whose groups are not contiguous.

    Args:
        beta, loss_type, estimator, dro_tau: as in `vrpo_fast.vrpo_loss`.
        temperature: the policy's logits are divided by it.
        impl: auto | triton | torch.
        check_inputs: check values (finite log-probs, g in [0, 1]) as `vrpo_loss` does; each
            check is a host sync, so a trainer that validated its data can turn them off.
        chunk_tokens: tokens per one-sweep chunk (default: a ~128 MiB logit buffer on CUDA,
            64 MiB in fp32 on the CPU, widened up to 4x to hold the largest group whole); an
            operational setting that never changes the result.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", estimator: str = "vrpo",
                 dro_tau: float | None = None, temperature: float = 1.0, impl: str = "auto",
                 check_inputs: bool = True, chunk_tokens: int | None = None):
        super().__init__()
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        _check_choice("estimator", estimator, ESTIMATORS)
        _check_choice("impl", impl, IMPLS)
        if not beta > 0:
            raise ValueError(f"beta: must be > 0, got {beta}")
        if dro_tau is not None and not dro_tau > 0:
            raise ValueError(f"dro_tau: must be > 0 or None, got {dro_tau}")
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        self.beta, self.loss_type, self.estimator = beta, loss_type, estimator
        self.dro_tau, self.temperature, self.impl = dro_tau, temperature, impl
        if chunk_tokens is not None and not (isinstance(chunk_tokens, int) and chunk_tokens > 0):
            raise ValueError(f"chunk_tokens: expected an int > 0 or None, got {chunk_tokens!r}")
        self.check_inputs, self.chunk_tokens = check_inputs, chunk_tokens

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                segment_ids: torch.Tensor, num_groups: int, group_size: int,
                ref_logps: torch.Tensor | None, aux_prefs: torch.Tensor,
                reduction: str = "mean"):
        """The loss of B = num_groups prompt groups of K = group_size = 2 + 2M responses.

        Args:
            hidden: (N, D) hidden states predicting the response tokens; weight: (V, D).
            targets: (N,) response token ids (ignore_index -100 contributes nothing).
            segment_ids: (N,) response of each token, g * K + k for response k of group g
                (`PackedBatch.segment_ids`).
            ref_logps: (B, K) reference sequence log-probs, or None (zeros).
            aux_prefs: (B, 1 + M) g for (chosen, rejected), then for each Monte Carlo pair.
            reduction: mean | sum | none (DRO weighting needs mean).

        Returns:
            (loss, stats): stats are the detached statistics of `vrpo_fast.vrpo_loss`.
        """
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"group_size: expected 2 + 2M (an even int >= 2), got "
                             f"{group_size!r}")
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups: expected an int >= 1, got {num_groups!r}")
        common = dict(beta=self.beta, loss_type=self.loss_type, estimator=self.estimator,
                      dro_tau=self.dro_tau, reduction=reduction,
                      check_inputs=self.check_inputs)
        weight = full_weight(weight)     # a sharded head (FSDP2 DTensor) is gathered once
        if self.dro_tau is None and reduction in ("mean", "sum"):
            _check_linear_args(hidden, weight, targets, segment_ids, num_groups * group_size,
                               self.temperature)
            _check_group_args(ref_logps, aux_prefs, num_groups, group_size)
            offsets = group_offsets(segment_ids, num_groups, group_size)
            if offsets is not None:
                return self._one_sweep(hidden, weight, targets, segment_ids, offsets,
                                       group_size, ref_logps, aux_prefs, common)
        logps = linear_logprobs(hidden, weight, targets, segment_ids=segment_ids,
                                num_segments=num_groups * group_size,
                                temperature=self.temperature, impl=self.impl)
        return self.from_logps(logps.view(num_groups, group_size), ref_logps, aux_prefs,
                               reduction=reduction)

    def from_logps(self, policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                   aux_prefs: torch.Tensor, reduction: str = "mean"):
        """The loss from (B, K) sequence log-probs already summed (by `linear_logprobs` with
        segment_ids, inside a model's forward): for trainers whose LM head must run inside the
        forward of a sharding wrapper. Same returns as `forward`."""
        return dispatch_vrpo_loss(policy_logps, ref_logps, aux_prefs, beta=self.beta,
                                  loss_type=self.loss_type, estimator=self.estimator,
                                  dro_tau=self.dro_tau, reduction=reduction,
                                  check_inputs=self.check_inputs, impl=self.impl)

    def _one_sweep(self, hidden, weight, targets, segment_ids, offsets, group_size, ref_logps,
                   aux_prefs, common):
        loss, policy = linear_vrpo_loss(
            hidden, weight, targets, segment_ids, offsets, group_size, ref_logps, aux_prefs,
            beta=self.beta, loss_type=self.loss_type, estimator=self.estimator,
            reduction=common["reduction"], temperature=self.temperature, impl=self.impl,
            chunk_tokens=self.chunk_tokens)
        # Validation and the detached statistics: the reference formula on (B, K) numbers.
        with torch.no_grad():
            _, stats = vrpo_loss(policy, ref_logps, aux_prefs, **common)
        return loss, stats


def _check_group_args(ref_logps, aux_prefs, num_groups, group_size):
    """The shape checks of the one-sweep path, before any work (vrpo_loss repeats them on the
    sweep's log-probs, too late to spare it)."""
    for name, x, shape in (("ref_logps", ref_logps, (num_groups, group_size)),
                           ("aux_prefs", aux_prefs, (num_groups, group_size // 2))):
        if x is None and name == "ref_logps":
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape != shape:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else \
                type(x).__name__
            raise ValueError(f"{name}: expected a floating-point tensor of shape {shape}, got "
                             f"{got}")
