"""vrpo_fast.stats against independent computations: printed t-table values, the closed-form
t distributions of 1 and 2 degrees of freedom, brute-force enumeration of sign patterns for the
sign test, and the defining equation of the Wilson interval."""

import itertools
import math
import statistics

import pytest

from vrpo_fast.stats import compare, paired, sign_test, t_cdf, t_quantile, wilson

# Two-sided 95% quantiles t_{0.975, df}, as printed in standard tables.
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 15: 2.131, 31: 2.040, 60: 2.000,
           120: 1.980}


@pytest.mark.parametrize("df,value", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=6e-4)


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.96, 12.706])
def test_t_cdf_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_quantile_inverts_the_closed_form():
    # df = 1: the quantile is tan(pi (p - 1/2)).
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(0.025, 7) == pytest.approx(-t_quantile(0.975, 7), rel=1e-12)


def _sign_test_by_enumeration(wins, losses):
    """Every equally likely sign pattern of n untied pairs; count those at least as uneven."""
    n = wins + losses
    observed = abs(wins - losses)
    patterns = list(itertools.product((1, -1), repeat=n))
    extreme = sum(abs(sum(p)) >= observed for p in patterns)
    return extreme / len(patterns)


@pytest.mark.parametrize("wins,losses", [(8, 0), (3, 5), (11, 5), (6, 6), (0, 1), (9, 3)])
def test_sign_test_matches_enumeration(wins, losses):
    assert sign_test(wins, losses) == pytest.approx(_sign_test_by_enumeration(wins, losses),
                                                    abs=1e-15)


def test_sign_test_known_values():
    assert sign_test(8, 0) == 2 / 256
    assert sign_test(0, 0) == 1.0


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 32), (1, 40)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    # The Wilson bounds are the p with |k/n - p| = z sqrt(p (1 - p) / n).
    z = 1.959963984540054
    lo, hi = wilson(k, n)
    for p in (lo, hi):
        if 0.0 < p < 1.0:
            assert abs(k / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), rel=1e-9)
    assert lo <= k / n <= hi
    assert lo == 0.0 if k == 0 else lo > 0
    assert hi == 1.0 if k == n else hi < 1


def test_wilson_known_value():
    # 0 of 10: upper bound z^2 / (n + z^2).
    z2 = 1.959963984540054 ** 2
    assert wilson(0, 10)[1] == pytest.approx(z2 / (10 + z2), rel=1e-12)


def test_paired_interval_is_the_t_interval_of_the_differences():
    a = [0.52, 0.41, 0.66, 0.38, 0.49, 0.57, 0.61, 0.45]
    b = [0.40, 0.43, 0.50, 0.35, 0.52, 0.44, 0.48, 0.47]
    d = [x - y for x, y in zip(a, b)]
    half = 2.365 * statistics.stdev(d) / math.sqrt(len(d))   # t_{0.975, 7} from the table
    got = paired(a, b)
    assert got.mean == pytest.approx(statistics.fmean(d), abs=1e-12)
    assert got.lo == pytest.approx(statistics.fmean(d) - half, abs=2e-4)
    assert got.hi == pytest.approx(statistics.fmean(d) + half, abs=2e-4)
    assert (got.wins, got.losses) == (5, 3)
    assert got.p_sign == pytest.approx(_sign_test_by_enumeration(5, 3))
    assert got.verdict == "neither"
    assert paired([1.0, 1.6, 2.2], [0.0, 0.5, 1.0]).verdict == "a"
    assert paired([0.0, 0.5, 1.0], [1.0, 1.6, 2.2]).verdict == "b"


def test_paired_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="length"):
        paired([1.0, 2.0], [1.0])


def test_compare_counts_drift_apart_from_reward():
    # seed -> (reward, KL); threshold 4: b drifts in seeds 1 and 3, a in seed 3.
    a = {0: (0.5, 1.0), 1: (0.6, 2.0), 2: (0.4, 1.5), 3: (0.2, 6.0), 4: (0.5, 0.5)}
    b = {0: (0.4, 1.0), 1: (0.1, 7.0), 2: (0.45, 1.0), 3: (0.3, 5.0), 4: (0.3, 0.4), 9: (0, 0)}
    c = compare(a, b, "A", "B", threshold=4.0)
    assert c.n == 5 and (c.drift_a, c.drift_b) == (1, 2)
    assert c.reward.n == 5 and c.reward_no_drift.n == 3
    assert c.reward_no_drift.mean == pytest.approx(((0.1) + (-0.05) + 0.2) / 3)
    text = "\n".join(c.lines())
    assert "1/5" in text and "2/5" in text


def test_run_comparisons_pairs_the_demo_rows_by_seed():
    from vrpo_fast.stats import run_comparisons

    def row(seed, name, reward, kl):
        return {"seed": seed, "name": name, "true_reward": {"mean": reward}, "kl": {"mean": kl}}

    runs = [row(0, "DPO", 0.3, 1.0), row(0, "VRPO", 0.5, 1.0), row(1, "DPO", 0.4, 9.0),
            row(1, "VRPO", 0.45, 2.0), row(2, "VRPO", 0.9, 0.1)]
    lines = run_comparisons(runs, "DPO", threshold=4.0)
    # seeds 0 and 1 are paired (seed 2 has no DPO run): differences +0.2 and +0.05.
    assert lines[0].startswith("VRPO - DPO, true reward, all seeds: +0.125 ")
    assert "(n=2;" in lines[0] and "(n=1;" in lines[1]
    assert "VRPO 0/2" in lines[3] and "DPO 1/2" in lines[3]


def test_correlation_matches_statistics_and_fisher_interval():
    from vrpo_fast.stats import correlation

    x = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.9, 0.5]
    y = [1.0, 1.3, 0.9, 2.1, 1.5, 1.1, 1.8, 1.6]
    r, lo, hi = correlation(x, y)
    assert r == pytest.approx(statistics.correlation(x, y), abs=1e-12)
    half = 1.959963984540054 / math.sqrt(len(x) - 3)
    assert lo == pytest.approx(math.tanh(math.atanh(r) - half), abs=1e-12)
    assert hi == pytest.approx(math.tanh(math.atanh(r) + half), abs=1e-12)
    assert lo < r < hi
    assert all(math.isnan(v) for v in correlation([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 0.0, 3.0]))


def test_regime_summary_recomputes_from_the_committed_per_seed_files():
    """The documented headline of studies/study_regime.py, recomputed from its JSON with the
    standard library and the printed t value for 31 degrees of freedom."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "studies"
    spec = importlib.util.spec_from_file_location("study_regime", root / "study_regime.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rows = [json.loads((root / "results" / f"regime_seed{s}.json").read_text())
            for s in study.SEEDS]
    d = [r["runs"]["VRPO M=4"]["true_reward"] - r["runs"]["DPO"]["true_reward"] for r in rows]
    half = T_TABLE[31] * statistics.stdev(d) / math.sqrt(len(d))
    mean = statistics.fmean(d)
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    text = study.summarise()
    assert f"| VRPO M=4 - DPO | 32 | {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" in text
    assert f"(n=32; {wins} above 0, {losses} below;" in text
