"""The VRPO objective (arXiv 2504.03784) and its plain DPO / Bradley-Terry special cases.

Columns of the (B, 2 + 2M) inputs: chosen, rejected, a_11, a_12, ..., a_M1, a_M2. Pair 0 is
the labelled pair (chosen, rejected); pair m >= 1 is the Monte Carlo pair (a_m1, a_m2) drawn
from pi_ref.
With u_p the margin of pair p (beta * h for the one-stage form, a reward difference for the
two-stage form), g_p = g(first beats second) and l the pairwise loss,

    L_dpo  = l(u_0)
    L_vrpo = l(u_0) - [g_0 l(u_0) + (1 - g_0) l(-u_0)]
             + (1/M) sum_{m=1..M} [g_m l(u_m) + (1 - g_m) l(-u_m)]

The correction has mean zero when the labelled pairs were drawn from pi_ref, whatever g is, so
E[grad L_vrpo] = E[grad L_dpo]; the closer g is to the true preference, the less variance.
g is never differentiated. M = 0 is DPO for either estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ramp", "ipo", "hinge")
ESTIMATORS = ("vrpo", "dpo")
REDUCTIONS = ("mean", "sum", "none")
# The statistics that are means over a batch's labelled prompts (with `labelled`); the rest
# are means over all its prompts. A caller averaging them over batches weighs each batch by
# its count of the one kind or the other.
LABELLED_STATS = frozenset({"term_dpo", "term_label", "reward_chosen", "reward_rejected",
                            "margin", "accuracy", "cv_gap_step", "cv_gap_step_sq"})


def pairwise_loss(u: torch.Tensor, loss_type: str, beta: float = 1.0) -> torch.Tensor:
    """The primary model's loss l(u) of a margin u, elementwise.

    sigmoid: -log sigmoid(u); ramp: relu(1 - u) - relu(-0.5 - u); hinge: relu(1 - u);
    ipo: (u / beta - 1 / (2 beta))^2 (u = beta * h, so this is IPO's (h - 1/(2 beta))^2).
    """
    if loss_type == "sigmoid":
        return F.softplus(-u)
    if loss_type == "ramp":
        return F.relu(1 - u) - F.relu(-0.5 - u)
    if loss_type == "ipo":
        return (u / beta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return F.relu(1 - u)
    _check_choice("loss_type", loss_type, LOSS_TYPES)


def vrpo_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None,
              aux_prefs: torch.Tensor, *, beta: float = 0.1, loss_type: str = "sigmoid",
              estimator: str = "vrpo", dro_tau: float | None = None,
              labelled: torch.Tensor | None = None, label_scale: float | None = None,
              reduction: str = "mean", check_inputs: bool = True):
    """One-stage (DPO-style) VRPO loss.

    Args:
        policy_logps: (B, 2 + 2M) sequence log-probs under the policy (differentiable).
        ref_logps: (B, 2 + 2M) under pi_ref, or None for a reference-free run (zeros).
        aux_prefs: (B, 1 + M) g for (chosen, rejected), then for each Monte Carlo pair, in [0, 1].
        beta: KL strength; margins are u = beta * h.
        loss_type: sigmoid | ramp | ipo | hinge.
        estimator: vrpo | dpo (dpo ignores the Monte Carlo columns and g).
        dro_tau: if set, KL-DRO weighting over the prompts of THIS batch: w = softmax(L / tau)
            (not differentiated), loss = sum_i w_i L_i. tau -> infinity gives the plain mean.
            The normaliser is this batch's, so splitting a batch changes the result; the
            trainers keep it as state across steps instead (vrpo_fast.dro).
        labelled: optional (B,) bool. Unlabelled prompts contribute only the Monte Carlo term:
            loss = mean over labelled prompts of the first two terms + mean over all prompts of
            the Monte Carlo term (their chosen/rejected columns are ignored).
        label_scale: with `labelled`, the factor on a labelled prompt's first two terms in its
            per-prompt loss (the mean over prompts then weighs them as a mean over labelled
            prompts). Default: B / (labelled prompts of this batch). A caller that splits a batch
            (gradient accumulation, ranks) passes the whole batch's value, so the split cannot
            change the objective.
        reduction: mean | sum | none (per-prompt (B,), for callers that normalise themselves,
            e.g. by the global number of prompt groups under gradient accumulation).
        check_inputs: check values (finite, g in [0, 1]); each check is a host sync, so the
            trainer, which validates its data once at start-up, turns them off.

    Returns:
        (loss, stats): stats holds detached tensors (no host sync): the estimator's three terms,
        implicit rewards and margin of chosen/rejected, preference accuracy, mean g, the DRO
        weights' effective sample size, and with M >= 1 the mean and mean square over labelled
        prompts of d = term_label - term_mc (cv_gap_step, cv_gap_step_sq; float64).
    """
    _check_float(policy_logps, "policy_logps")
    if policy_logps.dim() != 2:
        raise ValueError(
            f"policy_logps: expected (B, 2 + 2M), got shape {tuple(policy_logps.shape)}")
    if ref_logps is None:
        ref_logps = torch.zeros_like(policy_logps)
    _check_float(ref_logps, "ref_logps")
    if ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps: shape {tuple(ref_logps.shape)} does not match policy_logps "
                         f"{tuple(policy_logps.shape)}")
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta}")
    rewards = beta * (policy_logps - ref_logps.to(policy_logps.dtype))
    return _estimate(rewards, aux_prefs, beta=beta, loss_type=loss_type, estimator=estimator,
                     dro_tau=dro_tau, labelled=labelled, label_scale=label_scale,
                     reduction=reduction, check_inputs=check_inputs, name="policy_logps")


def vrpo_reward_loss(rewards: torch.Tensor, aux_prefs: torch.Tensor, *,
                     loss_type: str = "sigmoid", estimator: str = "vrpo",
                     dro_tau: float | None = None, labelled: torch.Tensor | None = None,
                     label_scale: float | None = None, reduction: str = "mean",
                     check_inputs: bool = True):
    """Two-stage VRPO loss of a reward model: margins u = r(y) - r(y').

    rewards: (B, 2 + 2M) reward-model scores in the same column order as `vrpo_loss`; every
    other argument as in `vrpo_loss` (`ipo` is a one-stage loss and is rejected here).
    """
    _check_float(rewards, "rewards")
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected (B, 2 + 2M), got shape {tuple(rewards.shape)}")
    if loss_type == "ipo":
        raise ValueError("loss_type: 'ipo' is a one-stage (policy) loss; use sigmoid, ramp or "
                         "hinge for a reward model")
    return _estimate(rewards, aux_prefs, beta=1.0, loss_type=loss_type, estimator=estimator,
                     dro_tau=dro_tau, labelled=labelled, label_scale=label_scale,
                     reduction=reduction, check_inputs=check_inputs, name="rewards")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: unknown {value!r}; expected one of {', '.join(choices)}")


def _check_float(x, name):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")


def _estimate(rewards, aux_prefs, *, beta, loss_type, estimator, dro_tau, labelled,
              label_scale, reduction, check_inputs, name):
    B, K = rewards.shape
    if K < 2 or K % 2:
        raise ValueError(f"{name}: expected 2 + 2M columns (an even number >= 2), got shape "
                         f"{tuple(rewards.shape)}")
    M = (K - 2) // 2
    _check_float(aux_prefs, "aux_prefs")
    if aux_prefs.shape != (B, 1 + M):
        raise ValueError(f"aux_prefs: expected shape (B, 1 + M) = ({B}, {1 + M}) for {name} of "
                         f"shape {tuple(rewards.shape)}, got {tuple(aux_prefs.shape)}")
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("estimator", estimator, ESTIMATORS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if dro_tau is not None and not dro_tau > 0:
        raise ValueError(f"dro_tau: must be > 0 or None, got {dro_tau}")
    if dro_tau is not None and reduction != "mean":
        raise ValueError(f"reduction: DRO weighting (dro_tau={dro_tau}) defines its own weighted "
                         f"sum; use reduction='mean', got {reduction!r}")
    g = aux_prefs.detach().to(rewards.dtype)
    if check_inputs and not torch.isfinite(rewards.detach()).all():
        raise ValueError(f"{name}: contains non-finite values (shape {tuple(rewards.shape)})")
    if check_inputs and (not torch.isfinite(g).all() or (g < 0).any() or (g > 1).any()):
        raise ValueError(f"aux_prefs: every g must be a finite probability in [0, 1] (shape "
                         f"{tuple(aux_prefs.shape)}, min {g.min().item():.4g}, "
                         f"max {g.max().item():.4g})")
    if labelled is not None:
        if labelled.shape != (B,) or labelled.dtype != torch.bool:
            raise ValueError(f"labelled: expected a bool tensor of shape ({B},), got "
                             f"{labelled.dtype} {tuple(labelled.shape)}")
        if M == 0:
            raise ValueError("labelled: unlabelled prompts need Monte Carlo pairs (M >= 1)")

    u = rewards[:, 0::2] - rewards[:, 1::2]                      # (B, 1 + M) pair margins
    l_fwd = pairwise_loss(u, loss_type, beta)                    # l(u_p)
    l_rev = pairwise_loss(-u, loss_type, beta)                   # l(-u_p) = l(u(second, first))
    expected = g * l_fwd + (1 - g) * l_rev                       # E_g[l] for each pair
    term_dpo = l_fwd[:, 0]
    term_label = expected[:, 0]
    term_mc = expected[:, 1:].mean(dim=1) if M > 0 else torch.zeros_like(term_dpo)

    if estimator == "dpo" or M == 0:
        per_prompt = term_dpo
    elif labelled is None:
        per_prompt = term_dpo - term_label + term_mc
    else:
        # mean_labelled(first two terms) + mean_all(MC term), written per prompt so that the
        # mean over the batch (and DRO weighting) applies unchanged.
        lab = labelled.to(rewards.dtype)
        scale = B / lab.sum().clamp(min=1) if label_scale is None else label_scale
        per_prompt = lab * scale * (term_dpo - term_label) + term_mc

    if dro_tau is not None:
        weights = torch.softmax(per_prompt.detach() / dro_tau, dim=0)
        loss = (weights * per_prompt).sum()
        ess = 1.0 / (weights**2).sum()
    else:
        loss = {"mean": per_prompt.mean, "sum": per_prompt.sum, "none": lambda: per_prompt}[
            reduction]()
        ess = torch.tensor(float(B), dtype=rewards.dtype, device=rewards.device)

    r = rewards.detach()
    lab_mask = None if labelled is None else labelled
    stats = {
        "term_dpo": _masked_mean(term_dpo.detach(), lab_mask),
        "term_label": _masked_mean(term_label.detach(), lab_mask),
        "term_mc": term_mc.detach().mean(),
        "reward_chosen": _masked_mean(r[:, 0], lab_mask),
        "reward_rejected": _masked_mean(r[:, 1], lab_mask),
        "margin": _masked_mean(u[:, 0].detach(), lab_mask),
        "accuracy": _masked_mean((u[:, 0].detach() > 0).to(r.dtype), lab_mask),
        "mean_g": g.mean(),
        "dro_ess": ess.detach(),
    }
    if M > 0:
        # cv_gap's sufficient statistics (vrpo_fast.cv_gap): the mean over labelled prompts of
        # d = term_label - term_mc, and of d^2, in float64.
        d = (term_label - term_mc).detach().double()
        stats["cv_gap_step"] = _masked_mean(d, lab_mask)
        stats["cv_gap_step_sq"] = _masked_mean(d * d, lab_mask)
    return loss, stats


def _masked_mean(x, mask):
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1)


def implicit_preference(logps: torch.Tensor, ref_logps: torch.Tensor | None,
                        beta: float) -> torch.Tensor:
    """g of an auxiliary LM (or a lagged policy copy) from its implicit reward (not differentiated).

    logps, ref_logps: (B, 2 + 2M) in the column order of `vrpo_loss` -> (B, 1 + M) with
    g_p = sigmoid(beta * h_p), h_p the log-ratio margin of pair p against pi_ref.
    """
    r = logps.detach().float()
    if ref_logps is not None:
        r = r - ref_logps.detach().float()
    return torch.sigmoid(beta * (r[:, 0::2] - r[:, 1::2]))


def reward_preference(rewards: torch.Tensor) -> torch.Tensor:
    """g of a reward model: (B, 2 + 2M) scores -> (B, 1 + M) sigmoid(r(y) - r(y'))."""
    r = rewards.detach().float()
    return torch.sigmoid(r[:, 0::2] - r[:, 1::2])
