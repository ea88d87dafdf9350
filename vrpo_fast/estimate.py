"""A mean with its 95% confidence interval: what evaluation reports (win rates, rewards, KL,
reward-model accuracies), here below the stages so the evaluation and the reward trainer share
it without importing each other."""

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
