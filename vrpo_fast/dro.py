"""Distributionally robust weighting of prompts (or of domains) with state across steps.

KL-DRO over prompts. The objective is the soft maximum of the per-prompt losses L_x,

    F = tau log E_x[exp(L_x / tau)],     grad F = E[w_x grad L_x],   w_x = exp(L_x / tau) / Z,

with Z = E[exp(L / tau)]. Normalising the weights within each mini-batch (softmax over the
batch) makes the objective depend on the batch size, hence on micro-batching and ranks. The
stochastic compositional estimate keeps Z as state instead (a moving average, as in SCGD /
SOX):

    u_t = (1 - gamma) u_{t-1} + gamma * mean over the step's global batch of exp(L / tau)
    w_x = exp(L_x / tau) / u_{t-1}                (not differentiated)

so a prompt's weight depends on its own loss and the state only; the step's loss is
(1 / N) sum_x w_x L_x over its N prompts, whichever rank and micro-batch holds them. u is kept
as log u (float64) and the batch term is a log-sum-exp, so no exponential overflows; it is
updated once per optimizer step from one gather of (log-sum-exp, count) per rank. Before the
first update u is unknown: the first step uses weights 1 (the plain mean) and sets u_1 to that
batch's mean. tau -> infinity gives the plain mean; tau -> 0 the worst prompt.

Chi-square DRO over prompts (penalised form, penalty tau): the dual gives weights
w_x = (1 + (L_x - eta) / tau)_+ with eta such that E[w] = 1. eta is the state, moved towards
that root once per step: eta_t = eta_{t-1} + gamma * tau * (mean over the batch of w - 1)
(when no weight is clipped at 0 this is eta <- (1 - gamma) eta + gamma * mean L). The first
step uses weights 1 and sets eta to the batch's mean loss.

Group DRO over domains (Sagawa et al. 2020): one weight q_d per domain, the loss
sum_d q_d L_d with L_d the mean loss of domain d's prompts in the step, and q updated by
exponentiated gradient on the domains' losses once per step, q_d <- q_d exp(eta L_d) (domains
present in the step), then normalised. A prompt of domain d weighs w_x = N q_d / n_d (n_d of
the step's N prompts are from d), which the step's data order fixes in advance.

Every estimator here is a small state object: `begin(domains)` before a step's micro-batches,
`weights(values, domains)` and `observe(values, domains)` per micro-batch, `update(gather)`
once after them (`gather(t)` stacks a (k,) tensor of every rank into (world, k)), and
`state_dict` / `load_state_dict` for checkpoints. The functional `vrpo_loss(..., dro_tau=...)`
keeps its one-batch weighting (softmax over the batch it is given).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity_gather(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


def _tau_gamma(tau: float, gamma: float) -> tuple[float, float]:
    """The running states' settings, checked: tau > 0, gamma in (0, 1]."""
    if not tau > 0:
        raise ValueError(f"tau: must be > 0, got {tau}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma: must be in (0, 1], got {gamma}")
    return float(tau), float(gamma)


class KLDRO:
    """Running-normaliser KL-DRO over prompts (see the module docstring).

    tau: temperature (> 0); gamma: step size of the running normaliser, in (0, 1].
    The state lives on the device (log u is NaN until the first update), so nothing here
    waits for the device.
    """

    kind = "kl"

    def __init__(self, tau: float, gamma: float, device: torch.device | str = "cpu"):
        self.tau, self.gamma = _tau_gamma(tau, gamma)
        self.device = torch.device(device)
        self.log_u = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        self.begin()

    def begin(self, domains: Sequence[int] | None = None) -> None:
        """Start a step: this rank's share of the batch term is empty."""
        self._lse = torch.full((), -math.inf, dtype=torch.float64, device=self.device)
        self._count = torch.zeros((), dtype=torch.float64, device=self.device)

    def weights(self, values: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) losses -> (B,) weights exp(L / tau) / u_{t-1} (ones before the first update)."""
        w = torch.exp(values.detach().double() / self.tau - self.log_u)
        return torch.where(torch.isnan(self.log_u), torch.ones_like(w), w).to(values.dtype)

    def observe(self, values: torch.Tensor, domains: torch.Tensor | None = None) -> None:
        """Add a micro-batch's losses to this rank's share of the step's batch term."""
        v = values.detach().double() / self.tau
        self._lse = torch.logaddexp(self._lse, torch.logsumexp(v, dim=0))
        self._count = self._count + v.numel()

    def update(self, gather: Gather = _identity_gather) -> None:
        """u_t from the step's global batch: one gather of (log-sum-exp, count) per rank."""
        ranks = gather(torch.stack([self._lse, self._count]))           # (world, 2)
        log_mean = torch.logsumexp(ranks[:, 0], dim=0) - torch.log(ranks[:, 1].sum())
        kept = self.log_u + (math.log1p(-self.gamma) if self.gamma < 1 else -math.inf)
        new = torch.logaddexp(kept, log_mean + math.log(self.gamma))
        new = torch.where(torch.isnan(self.log_u), log_mean, new)
        # A batch with non-finite losses (a step the trainer skips) leaves the state alone.
        self.log_u = torch.where(torch.isfinite(new), new, self.log_u)
        self.begin()

    def objective(self) -> torch.Tensor:
        """tau log u: the running estimate of the DRO objective tau log E[exp(L / tau)]."""
        return self.tau * self.log_u

    def state_dict(self) -> dict:
        return {"kind": self.kind, "log_u": float(self.log_u)}   # host sync: once per checkpoint

    def load_state_dict(self, state: dict) -> None:
        self.log_u = torch.tensor(state["log_u"], dtype=torch.float64, device=self.device)


class Chi2DRO:
    """Chi-square-penalised DRO over prompts with a running dual variable eta (module
    docstring). tau: penalty (> 0); gamma: step size of eta, in (0, 1]. eta is NaN until the
    first update."""

    kind = "chi2"

    def __init__(self, tau: float, gamma: float, device: torch.device | str = "cpu"):
        self.tau, self.gamma = _tau_gamma(tau, gamma)
        self.device = torch.device(device)
        self.eta = torch.full((), math.nan, dtype=torch.float64, device=self.device)
        self.begin()

    def begin(self, domains: Sequence[int] | None = None) -> None:
        # This rank's sums of the loss and of the weight, and its count of prompts.
        self._sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    def _raw_weights(self, values: torch.Tensor) -> torch.Tensor:
        return torch.relu(1 + (values.detach().double() - self.eta) / self.tau)

    def weights(self, values: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        w = self._raw_weights(values)
        return torch.where(torch.isnan(self.eta), torch.ones_like(w), w).to(values.dtype)

    def observe(self, values: torch.Tensor, domains: torch.Tensor | None = None) -> None:
        v = values.detach().double()
        w = torch.nan_to_num(self._raw_weights(v), nan=1.0)
        self._sums = self._sums + torch.stack([v.sum(), w.sum(), v.new_tensor(v.numel())])

    def update(self, gather: Gather = _identity_gather) -> None:
        loss_sum, weight_sum, count = gather(self._sums).sum(dim=0).unbind()
        new = torch.where(torch.isnan(self.eta), loss_sum / count,
                          self.eta + self.gamma * self.tau * (weight_sum / count - 1))
        self.eta = torch.where(torch.isfinite(new), new, self.eta)
        self.begin()

    def objective(self) -> torch.Tensor:
        """eta: the dual variable, the loss level at which a prompt weighs 1."""
        return self.eta

    def state_dict(self) -> dict:
        return {"kind": self.kind, "eta": float(self.eta)}   # host sync: once per checkpoint

    def load_state_dict(self, state: dict) -> None:
        self.eta = torch.tensor(state["eta"], dtype=torch.float64, device=self.device)


class GroupDRO:
    """Group DRO over `num_domains` domains with exponentiated-gradient step size eta."""

    kind = "group"

    def __init__(self, num_domains: int, eta: float, device: torch.device | str = "cpu"):
        if num_domains < 1:
            raise ValueError(f"num_domains: must be >= 1, got {num_domains}")
        if not eta > 0:
            raise ValueError(f"eta: must be > 0, got {eta}")
        self.num_domains, self.eta = num_domains, float(eta)
        self.device = torch.device(device)
        self.log_q = torch.full((num_domains,), -math.log(num_domains), dtype=torch.float64,
                                device=self.device)
        self._scale = self._counts = self._sums = None     # set by begin()

    def begin(self, domains: Sequence[int] | None = None) -> None:
        """domains: the domain of each of the step's N prompts (all ranks): fixes n_d."""
        if domains is None:
            raise ValueError("domains: group DRO needs the domain of every prompt of the step")
        counts = torch.bincount(torch.as_tensor(list(domains), dtype=torch.long),
                                minlength=self.num_domains).double().to(self.device)
        self._counts = counts
        # w_x = N q_d / n_d; domains absent from the step get no prompt to weigh.
        self._scale = len(domains) / counts.clamp(min=1)
        self._sums = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)

    def weights(self, values: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        w = (self.log_q.exp() * self._scale)[domains]
        return w.to(values.dtype)

    def observe(self, values: torch.Tensor, domains: torch.Tensor | None = None) -> None:
        self._sums = self._sums.index_add(0, domains, values.detach().double())

    def update(self, gather: Gather = _identity_gather) -> None:
        sums = gather(self._sums).sum(dim=0)
        present = self._counts > 0
        mean = torch.where(present, sums / self._counts.clamp(min=1), torch.zeros_like(sums))
        new = self.log_q + self.eta * mean
        new = new - torch.logsumexp(new, dim=0)
        self.log_q = torch.where(torch.isfinite(new).all(), new, self.log_q)

    def objective(self) -> torch.Tensor:
        """The largest domain weight q_d (1 / D when the domains weigh the same)."""
        return self.log_q.exp().max()

    def domain_weights(self) -> torch.Tensor:
        return self.log_q.exp()

    def state_dict(self) -> dict:
        return {"kind": self.kind, "log_q": self.log_q.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.log_q = torch.tensor(state["log_q"], dtype=torch.float64, device=self.device)


# --- evaluation by domain ------------------------------------------------------------------------

def group_by_domain(domains: Sequence[str | None]) -> dict[str, list[int]]:
    """Indices of each domain, domains in sorted order (a missing domain is "(none)")."""
    out: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        out.setdefault("(none)" if d is None else str(d), []).append(i)
    return dict(sorted(out.items()))


def per_domain(domains: Sequence[str | None], estimate: Callable[..., object], *columns,
               higher_is_better: bool = True) -> dict:
    """`estimate(*columns restricted to a domain's items)` (an object with a `.mean`, e.g.
    estimate.Estimate) for each domain.

    Returns {"domains": {name: estimate}, "worst": name of the domain with the lowest mean
    (highest when not higher_is_better), "domain_mean": the unweighted mean of the domains'
    means (every domain counts the same, whatever its share of the items)}.
    """
    results = {name: estimate(*([col[i] for i in idx] for col in columns))
               for name, idx in group_by_domain(domains).items()}
    pick = min if higher_is_better else max
    worst = pick(results, key=lambda name: results[name].mean)
    return {"domains": results, "worst": worst,
            "domain_mean": sum(r.mean for r in results.values()) / len(results)}


def domains_of(examples) -> list[str] | None:
    """Each example's `domain` when every one has a domain, else None."""
    domains = [ex.domain for ex in examples]
    return domains if domains and None not in domains else None


def describe_domains(report: dict, what: str) -> str:
    """One line: the worst domain's estimate beside the mean over domains."""
    worst = report["worst"]
    return (f"{what} by domain ({len(report['domains'])} domains): worst {worst!r} "
            f"{report['domains'][worst]}, mean over domains {report['domain_mean']:.3f}; "
            + ", ".join(f"{d} {e.mean:.3f}" for d, e in report["domains"].items()))
