"""cv_gap: are the labelled pairs drawn like the Monte Carlo pairs? A test whose chance of a
false warning over a whole training run is at most train.cv_gap_alpha (docs/judge.md, "cv_gap").

Per labelled prompt i, at the step that sees it,

    d_i = term_label_i - term_mc_i
        = [g l(u) + (1 - g) l(-u)] of the labelled pair  -  the mean of the same over its M
          Monte Carlo pairs.

g l(u) + (1 - g) l(-u) is symmetric in the pair's order, so d_i depends on the labelled pair
only as an unordered pair, whatever its label. When that pair was drawn like the Monte Carlo
pairs (from pi_ref), E[d_i | x_i, policy] = 0 at ANY policy that does not depend on prompt i's
own samples: the VRPO correction is then mean-zero. A gap says it is not.

Which values count: the first pass over the data. At a step of the first pass the policy has
been trained on other rows only, so given everything before, d_i has mean zero and the values,
in the order the steps see them, are martingale differences with a t interval for their mean.
From the second pass on, the policy has been fitted to the very pairs it is scored on (the Monte
Carlo term is minimised on the Monte Carlo pairs, the labelled pair's expected loss is not), so
d_i has a non-zero mean given the data set even for on-policy labels, and a test over per-step
means of a fixed data set finds it once it has enough steps: those values are not counted.
Each labelled prompt of the first pass counts once; a step that reaches into the second pass
is left out whole.

Looks: `looks` evenly spaced steps over the counted steps of the run (`look_steps`), each an
interval over all values so far at level 1 - alpha / L (Bonferroni over the L looks), so that
P(any look excludes zero) <= alpha for on-policy labels. A look with fewer than MIN_PROMPTS
values is skipped (its share of alpha unspent). The first look whose interval excludes zero
warns; there is no second warning.

A step's sufficient statistics are the objective's `cv_gap_step` (the mean of d_i over the
step's labelled prompts) and `cv_gap_step_sq` (the mean of d_i^2), which the trainer reduces
over micro-batches and ranks as sums and counts like every labelled statistic, with the step's
count of labelled prompts known from the data order: micro-batching and the number of ranks
change the verdict by float rounding at most.
"""

from __future__ import annotations

import math

from vrpo_fast.stats import t_quantile

MIN_PROMPTS = 20        # values a look needs (fewer: the look is skipped)


def look_steps(steps: int, looks: int) -> list[int]:
    """The steps (1-based, ascending, distinct) of `looks` evenly spaced looks over `steps`
    counted steps, the last at the last one; none when no step counts."""
    if steps < 1:
        return []
    return sorted({math.ceil(k * steps / looks) for k in range(1, looks + 1)})


def t_interval(n: int, total: float, total_sq: float, level: float) -> tuple[float, float, float]:
    """Mean and t interval at `level` of n values from their sum and sum of squares (NaN
    bounds below two values)."""
    if n < 1:
        return math.nan, math.nan, math.nan
    mean = total / n
    if n < 2:
        return mean, math.nan, math.nan
    var = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * math.sqrt(var / n)
    return mean, mean - half, mean + half


def interval_of(values, level: float) -> dict:
    """{mean, lo, hi, n} of independent values: the t interval at `level`."""
    values = [float(v) for v in values]
    mean, lo, hi = t_interval(len(values), math.fsum(values), math.fsum(v * v for v in values),
                              level)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}


def excludes_zero(lo: float, hi: float) -> bool:
    return lo > 0 or hi < 0          # False for NaN bounds


class GapCheck:
    """The run's test: fed each step's (labelled prompts, mean d, mean d^2) in step order by
    `add`, which returns the fields for the step's record and, at the first look that excludes
    zero, the warning."""

    def __init__(self, steps: int, looks: int, alpha: float):
        self.steps = steps                      # counted steps: the first pass's, in the run
        self.alpha = alpha
        self.looks = look_steps(steps, looks)
        self.level = 1 - alpha / len(self.looks) if self.looks else math.nan
        self.n, self.total, self.total_sq = 0, 0.0, 0.0
        self.warned = False

    def add(self, step: int, n: int, mean: float | None, mean_sq: float | None):
        """Step `step` (1-based) with n labelled prompts whose d has mean `mean` and mean
        square `mean_sq` (None with n = 0) -> (record fields, warning or None).

        Fields on a counted step: cv_gap (the mean of d over the values so far) and cv_gap_n
        (their number); on a look with at least MIN_PROMPTS values also cv_gap_lo, cv_gap_hi
        (its interval) and cv_gap_level (the interval's level)."""
        if step > self.steps:
            return {}, None
        if n:
            self.n += n
            self.total += n * mean
            self.total_sq += n * mean_sq
        if not self.n:
            return {}, None
        fields = {"cv_gap": self.total / self.n, "cv_gap_n": self.n}
        if step not in self.looks or self.n < MIN_PROMPTS:
            return fields, None
        mean, lo, hi = t_interval(self.n, self.total, self.total_sq, self.level)
        fields.update(cv_gap_lo=lo, cv_gap_hi=hi, cv_gap_level=self.level)
        if self.warned or not excludes_zero(lo, hi):
            return fields, None
        self.warned = True
        look = self.looks.index(step) + 1
        return fields, (
            f"step {step}: cv_gap = {mean:.3g} [{lo:.3g}, {hi:.3g}] over the first pass's "
            f"{self.n} labelled prompts so far excludes zero (look {look} of "
            f"{len(self.looks)}, each at level {self.level:.4g}: on-policy labels warn in at "
            f"most {self.alpha:g} of runs): the labelled pairs do "
            f"not look drawn like the Monte Carlo pairs (from pi_ref), so VRPO's correction is "
            f"not mean-zero (it trades bias for variance); see docs/rounds.md for the on-policy "
            f"recipe (run.rounds)")
