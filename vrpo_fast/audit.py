"""`vrpo-fast audit-g --config FILE`: before training, does VRPO pay with this g on this data?

On held-out labelled pairs with Monte Carlo samples (audit.data, default data.path: rows with
prompt, chosen, rejected, samples and g in aux_prefs, e.g. what `score` writes; with aux.mode =
judge the judge scores them here) it reports

    agreement      the share of labelled pairs where g prefers the chosen response (ties: 1/2)
    calibration    ECE over 10 bins of g as a probability (each pair in both orientations) and a
                   reliability plot (reliability.png)
    variance_ratio Var(grad L_vrpo) / Var(grad L_dpo) at pi_ref for M = 1, 2, 4, 8, with 95 %
                   bootstrap intervals over prompts: below 1, VRPO removes that share of DPO's
                   gradient variance; the M where it flattens is the one worth buying
    on-policy      whether the labelled pairs look drawn from pi_ref (the control variate is
                   mean-zero only then): logp_gap, the labelled responses' mean log pi_ref minus
                   the samples' (needs ref_logps), and g_gap, the labelled pairs' mean |2g - 1|
                   minus the Monte Carlo pairs'; both have mean zero for on-policy labels
and the same per domain when every row has one. The on-policy gaps are t intervals over the
rows' values (each labelled row once) at level 1 - audit.gap_alpha / k, k the number of gap
intervals of the report (gaps x slices, Bonferroni): on-policy labels make any of them exclude
zero with probability at most audit.gap_alpha; `on_policy` in audit.json says which do, and a
warning names them. Output: audit.json, report.md, reliability.png in audit.output (default
<train.output_dir>/audit).

The variance ratio. At pi = pi_ref every margin is 0, so for any loss l the per-prompt gradients
are l'(0) beta times (h_p: pair p's log-ratio margin, grad h_p = grad log pi(y) - grad log pi(y'))

    DPO:   D = grad h_0                                  (pair 0 = (chosen, rejected))
    VRPO:  A + (1/M) sum_m B_m,   A = 2 (1 - g_0) grad h_0,   B_m = (2 g_m - 1) grad h_m,

the same mean mu for both (unbiasedness). The gradients are taken in the space of the
responses' log-probabilities, grad log pi(y) = e_y, one coordinate per distinct response of a
prompt: exactly the gradient of a tabular softmax policy (its normaliser cancels in h), and for
a neural policy the assumption that distinct responses' score functions are orthogonal. Then,
per prompt, with independent pairs,

    Var_dpo  = E|D|^2 - |mu|^2
    Var_vrpo = E|A|^2 + 2 <E A, E B> + E|B|^2 / M + (1 - 1/M) |E B|^2 - |mu|^2,

each moment estimated from the rows of the prompt (|mu|^2 and |E B|^2 by U-statistics over
independent draws; zero with one draw, as for real data where a response is rarely drawn twice).
The ratio is sum over prompts of Var_vrpo over the same sum of Var_dpo (the gradient of a batch
is a mean over prompts).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from vrpo_fast.cv_gap import excludes_zero, interval_of
from vrpo_fast.data.load import load_preference_data
from vrpo_fast.errors import UserError, check_output, renamed
from vrpo_fast.estimate import reliability_plot
from vrpo_fast.judge import load_judge, pairs_of

MS = (1, 2, 4, 8)
BINS = 10


def _text(x) -> str:
    return x if isinstance(x, str) else json.dumps(x, sort_keys=True)


def _interval(values) -> dict:
    """Mean and normal 95 % interval of independent values."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def _prompt_arrays(rows):
    """Per-row vectors of ONE prompt's rows [(chosen, rejected, samples, g)] in its response
    coordinates: D (n, S), A (n, S), the sum of each row's B_m (n, S), and per row |D|^2,
    |A|^2, mean_m <A, B_m>, mean_m |B_m|^2, sum_m |B_m|^2; and M_data."""
    index: dict[str, int] = {}
    for c, r, samples, _ in rows:
        for y in (c, r, *samples):
            index.setdefault(y, len(index))
    S = len(index)

    def e(y, x):
        v = np.zeros(S)
        v[index[y]] += 1.0
        v[index[x]] -= 1.0
        return v

    D = np.stack([e(c, r) for c, r, _, _ in rows])
    A = np.stack([2 * (1 - g[0]) * e(c, r) for c, r, _, g in rows])
    Bs = [np.stack([(2 * g[m + 1] - 1) * e(s[2 * m], s[2 * m + 1]) for m in range(len(s) // 2)])
          for _, _, s, g in rows]
    per_row = np.array([[(d ** 2).sum(), (a ** 2).sum(), (B @ a).mean(), (B ** 2).sum(1).mean(),
                         (B ** 2).sum()] for d, a, B in zip(D, A, Bs)])
    return D, np.stack([B.sum(0) for B in Bs]), per_row, len(Bs[0])


def _moments(D, Bsum, per_row, M_data, counts) -> np.ndarray:
    """The prompt's moment sums [n, n Var_dpo, n E|A|^2, n <E A, E B>, n E|B|^2, n |E B|^2,
    n |mu|^2] for row weights `counts` (R, n) (ones: the data itself; multinomial: a bootstrap
    resample) -> (R, 7). |mu|^2 and |E B|^2 are U-statistics over distinct draws (0 with one)."""
    n = counts.sum(1)
    mean = counts @ per_row / n[:, None]                                     # (R, 5)
    d2, a2, ab, b2, b2_row = mean.T
    mu2 = np.where(n > 1, (((counts @ D) ** 2).sum(1) - n * d2) / (n * (n - 1)).clip(1), 0.0)
    N = n * M_data
    eb2 = np.where(N > 1, (((counts @ Bsum) ** 2).sum(1) - n * b2_row) / (N * (N - 1)).clip(1),
                   0.0)
    return n[:, None] * np.stack([np.ones_like(n), d2 - mu2, a2, ab, b2, eb2, mu2], 1)


def variance_ratio(examples, g_rows, ms=MS, *, bootstrap: int = 1000, seed: int = 0) -> dict:
    """Var(grad L_vrpo) / Var(grad L_dpo) at pi_ref for each M in `ms` (see the module doc),
    with a 95 % bootstrap interval: rows are resampled within each prompt that has several
    (its moments are U-statistics over them), and prompts with one row are resampled among
    themselves. examples: labelled PreferenceExamples with Monte Carlo samples; g_rows: their
    1 + M values of g."""
    by_prompt: dict[str, list] = {}
    for ex, g in zip(examples, g_rows):
        samples = [_text(s) for s in ex.samples]
        if len(samples) < 2:
            raise UserError(f"audit.data: row {ex.row} has no Monte Carlo pair; the variance "
                            f"ratio needs samples from pi_ref (vrpo-fast sample, then score)")
        by_prompt.setdefault(_text(ex.prompt), []).append(
            (_text(ex.chosen), _text(ex.rejected), samples, list(g)))
    rng = np.random.default_rng(seed)
    point, boot, singles = np.zeros(7), np.zeros((bootstrap, 7)), []
    for rows in by_prompt.values():
        arrays = _prompt_arrays(rows)
        ones = np.ones((1, len(rows)))
        if len(rows) == 1:
            singles.append(_moments(*arrays, ones)[0])
            continue
        point += _moments(*arrays, ones)[0]
        counts = rng.multinomial(len(rows), np.full(len(rows), 1 / len(rows)), size=bootstrap)
        boot += _moments(*arrays, counts.astype(np.float64))
    if singles:
        units = np.stack(singles)
        U = len(units)
        point += units.sum(0)
        # Resampled sums as (resamples x prompts) counts @ moments, 100 resamples at a time.
        boot += np.concatenate([rng.multinomial(U, np.full(U, 1 / U),
                                                size=min(100, bootstrap - i)) @ units
                                for i in range(0, bootstrap, 100)])

    def ratios(sums):                                                # sums (..., 7)
        n, vd, a2, ab, b2, eb2, mu2 = np.moveaxis(sums, -1, 0)
        return {M: (a2 + 2 * ab + b2 / M + (1 - 1 / M) * eb2 - mu2) / vd for M in ms}

    est, resampled = ratios(point), ratios(boot)
    return {str(M): {"ratio": float(est[M]),
                     "lo": float(np.nanpercentile(resampled[M], 2.5)),
                     "hi": float(np.nanpercentile(resampled[M], 97.5))} for M in ms} | {
        "prompts": len(by_prompt)}


def calibration(g0) -> dict:
    """ECE and the reliability table of g as P(chosen beats rejected); each pair counts in both
    orientations (g for the chosen, 1 - g for the rejected), so the table is symmetric."""
    g0 = np.asarray(g0, dtype=np.float64)
    preds = np.concatenate([g0, 1 - g0])
    outcome = np.concatenate([np.ones_like(g0), np.zeros_like(g0)])
    table = []
    for b in range(BINS):
        lo, hi = b / BINS, (b + 1) / BINS
        inside = (preds >= lo) & ((preds < hi) if b < BINS - 1 else (preds <= hi))
        if inside.any():
            table.append({"bin": [lo, hi], "predicted": float(preds[inside].mean()),
                          "observed": float(outcome[inside].mean()), "count": int(inside.sum())})
    ece = sum(abs(t["predicted"] - t["observed"]) * t["count"] for t in table) / len(preds)
    return {"ece": float(ece), "reliability": table}


def audit_pairs(examples, g_rows, *, ms=MS, bootstrap: int = 1000, seed: int = 0,
                gap_level: float = 0.95) -> dict:
    """The audit of one set of labelled rows (see the module doc); the on-policy gaps' t
    intervals at `gap_level`."""
    g0 = [g[0] for g in g_rows]
    report = {"pairs": len(examples),
              "agreement": _interval([1.0 if v > 0.5 else 0.5 if v == 0.5 else 0.0 for v in g0]),
              **calibration(g0),
              "variance_ratio": variance_ratio(examples, g_rows, ms, bootstrap=bootstrap,
                                               seed=seed)}
    report["g_gap"] = interval_of([abs(2 * g[0] - 1) - np.mean([abs(2 * v - 1) for v in g[1:]])
                                   for g in g_rows], gap_level)
    if all(ex.ref_logps is not None for ex in examples):
        report["logp_gap"] = interval_of([np.mean(ex.ref_logps[:2]) - np.mean(ex.ref_logps[2:])
                                          for ex in examples], gap_level)
    return report


GAPS = ("g_gap", "logp_gap")


def gap_intervals(examples, domains) -> int:
    """k: the on-policy gap intervals a report of these rows holds (its gaps x its slices)."""
    gaps = 1 + all(ex.ref_logps is not None for ex in examples)
    split = None not in domains and len(set(domains)) > 1
    return gaps * (1 + (len(set(domains)) if split else 0))


def on_policy_verdict(report: dict, alpha: float, k: int) -> dict:
    """Which of the report's k gap intervals (each at level 1 - alpha / k) exclude zero."""
    slices = [("", report)] + [(f"{name}/", r) for name, r in report.get("by_domain", {}).items()]
    excluded = [f"{prefix}{gap}" for prefix, r in slices for gap in GAPS
                if gap in r and excludes_zero(r[gap]["lo"], r[gap]["hi"])]
    return {"alpha": alpha, "intervals": k, "level": 1 - alpha / k, "excludes_zero": excluded}


def _markdown(report: dict) -> str:
    def line(name, r):
        vr = r["variance_ratio"]
        ratios = ", ".join(f"M={M}: {vr[str(M)]['ratio']:.3f} [{vr[str(M)]['lo']:.3f}, "
                           f"{vr[str(M)]['hi']:.3f}]" for M in MS if str(M) in vr)
        gaps = "; ".join(f"{k} {r[k]['mean']:.3g} [{r[k]['lo']:.3g}, {r[k]['hi']:.3g}]"
                         for k in ("g_gap", "logp_gap") if k in r)
        return (f"| {name} | {r['pairs']} | {r['agreement']['mean']:.3f} | {r['ece']:.3f} | "
                f"{ratios} | {gaps} |")

    rows = [line("all", report)] + [line(k, v) for k, v in report.get("by_domain", {}).items()]
    text = ("# Audit of g\n\n"
            "Variance ratio: Var(grad VRPO) / Var(grad DPO) at pi_ref (below 1: VRPO pays). "
            "On-policy gaps: mean zero when the labelled pairs were drawn from pi_ref.\n\n"
            "| slice | pairs | agreement | ECE | variance ratio | on-policy gaps |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if "on_policy" in report:
        text += f"\n{_verdict_line(report['on_policy'])}\n"
    return text


def _verdict_line(v: dict) -> str:
    intervals = (f"{v['intervals']} gap intervals, each at level {v['level']:.4g} "
                 f"(audit.gap_alpha = {v['alpha']:g} spread over them)")
    if not v["excludes_zero"]:
        return f"On-policy: no gap excludes zero ({intervals})."
    return (f"On-policy: {', '.join(v['excludes_zero'])} excludes zero ({intervals}): the "
            f"labelled pairs do not look drawn from pi_ref like the Monte Carlo pairs, so VRPO's "
            f"correction is not mean-zero on this data (docs/judge.md, the on-policy recipe).")


def audit_stage(cfg, *, progress: bool = True) -> Path:
    """Run the audit of `cfg` (see the module doc); returns its output folder."""
    source = cfg.audit.data or cfg.data.path
    if not source:
        raise UserError("audit.data: no held-out labelled pairs given (set audit.data or "
                        "data.path)")
    out = Path(cfg.audit.output or Path(cfg.train.output_dir) / "audit")
    check_output(out, "audit.output" if cfg.audit.output else "train.output_dir")
    try:
        examples, _ = load_preference_data(str(source), on_bad_row=cfg.data.on_bad_row,
                                           split=cfg.data.split)
    except UserError as err:
        raise renamed(err, "audit.data") from None
    examples = [ex for ex in examples if ex.labelled][:cfg.audit.max_pairs]
    if not examples:
        raise UserError(f"audit.data: {source} holds no labelled pairs")
    if cfg.aux.mode == "judge":
        device = "cuda" if _cuda() else "cpu"
        g_rows = load_judge(cfg.aux, device).preferences(
            [(ex.prompt, pairs_of(ex.responses)) for ex in examples], cfg.aux.judge_max_tokens)
    else:
        missing = next((ex for ex in examples if ex.aux_prefs is None), None)
        if missing is not None:
            raise UserError(f"audit.data: row {missing.row} of {source} has no aux_prefs; score "
                            f"the set first (vrpo-fast score) or set aux.mode=judge")
        g_rows = [ex.aux_prefs for ex in examples]
    audit = cfg.audit
    domains = [ex.domain for ex in examples]
    k = gap_intervals(examples, domains)
    level = 1 - audit.gap_alpha / k
    report = audit_pairs(examples, g_rows, bootstrap=audit.bootstrap, seed=audit.seed,
                         gap_level=level)
    if None not in domains and len(set(domains)) > 1:
        report["by_domain"] = {
            name: audit_pairs([e for e in examples if e.domain == name],
                              [g for e, g in zip(examples, g_rows) if e.domain == name],
                              bootstrap=audit.bootstrap, seed=audit.seed, gap_level=level)
            for name in sorted(set(domains))}
    report["on_policy"] = on_policy_verdict(report, audit.gap_alpha, k)
    report["source"] = str(source)
    report["aux_mode"] = cfg.aux.mode
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    reliability_plot(report, out / "reliability.png", what="g")
    if progress:
        print(_markdown(report))
    if report["on_policy"]["excludes_zero"]:
        warnings.warn(_verdict_line(report["on_policy"]), stacklevel=1)
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# `vrpo-fast audit-g --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = audit_stage
