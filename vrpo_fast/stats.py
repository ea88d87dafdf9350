"""Statistics for comparing two estimators over seeds: paired differences with a 95% t-interval,
an exact sign test, Wilson intervals for drift rates, and the summaries the studies print.

The unit of evidence is a seed: one pi_ref, one data set, and every estimator trained on it with
the same settings. Differences are taken within a seed (paired), which removes the seed-to-seed
spread of pi_ref and data from the comparison. A run that *drifts* (KL(pi || pi_ref) above a
threshold stated with the result) is counted as such, and the reward comparison is repeated on
the seeds where neither run drifted, so an average is not decided by a few runaway runs.

Only the standard library: the t quantile comes from the regularized incomplete beta function
(a continued fraction, float64) and the binomial tail from exact integer arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z975 = 1.959963984540054          # the standard normal's 97.5% quantile


# --- distributions ------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on t_cdf to float64 resolution)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of P(win) = 1/2 on the untied pairs: the probability,
    under a fair coin, of a split at least as uneven as the one observed."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def wilson(k: int, n: int, z: float = Z975) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion of k successes in n trials:
    sensible at 0 of n and n of n, where the normal interval collapses to a point."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 of n (n of n) the lower (upper) bound is exactly 0 (1); rounding would miss it.
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


# --- paired comparison --------------------------------------------------------------------------

@dataclass
class Paired:
    """Paired differences a - b over seeds: mean with its 95% t-interval and the sign test."""
    n: int
    mean: float
    lo: float
    hi: float
    wins: int           # seeds where a > b
    losses: int         # seeds where a < b
    p_sign: float       # two-sided exact sign test on the untied seeds

    @property
    def verdict(self) -> str:
        """'a' or 'b' when the interval excludes zero on that side, else 'neither'."""
        if self.n < 2 or math.isnan(self.lo):
            return "neither"
        return "a" if self.lo > 0 else "b" if self.hi < 0 else "neither"

    def __str__(self) -> str:
        if self.n == 0:
            return "no seeds"
        interval = "" if self.n < 2 else f" [{self.lo:+.3f}, {self.hi:+.3f}]"
        return (f"{self.mean:+.3f}{interval} (n={self.n}; {self.wins} above 0, {self.losses} "
                f"below; sign test p={self.p_sign:.3g})")


def paired(a: list[float], b: list[float], level: float = 0.95) -> Paired:
    """Compare a[i] with b[i] (the same seed i)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, 0, 0, 1.0)
    mean = sum(d) / n
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, wins, losses, sign_test(wins, losses))
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half, wins, losses, sign_test(wins, losses))


@dataclass
class Comparison:
    """Estimator a against b on the same seeds, with drift counted apart from reward."""
    name_a: str
    name_b: str
    threshold: float                 # a run drifts when its KL exceeds this (nats)
    reward: Paired                   # every seed
    reward_no_drift: Paired          # seeds where neither run drifted
    kl: Paired                       # every seed
    drift_a: int
    drift_b: int
    n: int

    def lines(self) -> list[str]:
        lo_a, hi_a = wilson(self.drift_a, self.n)
        lo_b, hi_b = wilson(self.drift_b, self.n)
        return [
            f"{self.name_a} - {self.name_b}, true reward, all seeds: {self.reward}",
            f"  seeds where neither drifts (KL <= {self.threshold:g}): {self.reward_no_drift}",
            f"  KL: {self.kl}",
            f"  drift rate: {self.name_a} {self.drift_a}/{self.n} [{lo_a:.2f}, {hi_a:.2f}], "
            f"{self.name_b} {self.drift_b}/{self.n} [{lo_b:.2f}, {hi_b:.2f}] (Wilson 95%)"]


def compare(a: dict, b: dict, name_a: str, name_b: str, threshold: float) -> Comparison:
    """a, b: seed -> (true reward, KL). Uses the seeds both have."""
    seeds = sorted(set(a) & set(b))
    keep = [s for s in seeds if a[s][1] <= threshold and b[s][1] <= threshold]
    return Comparison(
        name_a, name_b, threshold,
        reward=paired([a[s][0] for s in seeds], [b[s][0] for s in seeds]),
        reward_no_drift=paired([a[s][0] for s in keep], [b[s][0] for s in keep]),
        kl=paired([a[s][1] for s in seeds], [b[s][1] for s in seeds]),
        drift_a=sum(a[s][1] > threshold for s in seeds),
        drift_b=sum(b[s][1] > threshold for s in seeds), n=len(seeds))


DRIFT_KL = 4.0      # nats: the studies' default threshold above which a run has drifted


def run_comparisons(runs: list[dict], baseline: str = "DPO",
                    threshold: float = DRIFT_KL) -> list[str]:
    """Every run name against `baseline` on the seeds both have, from the demo's per-run rows
    (keys seed, name, true_reward["mean"], kl["mean"]): the summary lines of `compare`."""
    by_name: dict[str, dict] = {}
    for r in runs:
        by_name.setdefault(r["name"], {})[r["seed"]] = (r["true_reward"]["mean"],
                                                       r["kl"]["mean"])
    lines = []
    for name, values in by_name.items():
        if name != baseline and baseline in by_name:
            lines += compare(values, by_name[baseline], name, baseline, threshold).lines()
    return lines


def correlation(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Pearson correlation with its approximate 95% interval (Fisher's z, n >= 4); NaN when
    either series is constant."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0.0 or syy == 0.0:          # a constant series has no correlation
        return math.nan, math.nan, math.nan
    r = sxy / math.sqrt(sxx * syy)
    if n < 4 or abs(r) >= 1.0:
        return r, math.nan, math.nan
    z, half = math.atanh(r), Z975 / math.sqrt(n - 3)
    return r, math.tanh(z - half), math.tanh(z + half)
