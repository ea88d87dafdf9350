"""A mean with its 95% confidence interval: what evaluation reports (win rates, rewards, KL,
reward-model accuracies), and the reliability plot of predicted preferences; here below the
stages so the evaluation, the reward trainer and the g audit share them without importing each
other."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Estimate:
    """The mean of n independent values and its normal-approximation 95% interval,
    mean +- 1.96 standard errors (NaN for no values)."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Estimate:
        n = len(values)
        if n == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / max(1, n - 1)
        half = 1.96 * math.sqrt(var / n)
        return cls(mean, mean - half, mean + half, n)

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def reliability_plot(report: dict, path, what: str = "") -> None:
    """A PNG of a reliability table (report["reliability"]: bins with the mean "predicted"
    P(y beats y') and the "observed" frequency; report["ece"]) against the diagonal.
    `what` names the predictor in the labels (e.g. "g")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.plot([t["predicted"] for t in report["reliability"]],
            [t["observed"] for t in report["reliability"]], "o-")
    ax.set_xlabel(f"{what + ': ' if what else ''}predicted P(y beats y')")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"reliability{' of ' + what if what else ''} (ECE {report['ece']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
