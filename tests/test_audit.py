"""Before training: the audit of g (agreement, calibration, the VRPO / DPO gradient variance
ratio at pi_ref against exact enumeration on the synthetic task), and the audit's on-policy
gaps: an interval that covers zero when the labelled pairs come from pi_ref and excludes it
when they come from another policy (their error rate over seeds, and train's cv_gap, in
test_cv_gap.py)."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from vrpo_fast.synthetic import LETTERS, SyntheticTask

TASK = SyntheticTask(max_len=2)                     # 20 responses: everything enumerable
RESPONSES = ["".join(p) for n in (1, 2) for p in itertools.product(LETTERS, repeat=n)]


def tabular(weights):
    """A policy over RESPONSES: probabilities proportional to exp(weights(y))."""
    logits = torch.tensor([weights(y) for y in RESPONSES], dtype=torch.float64)
    return torch.softmax(logits, 0)


def draw(probs, n, rng):
    """n responses drawn from `probs`; rng: a random.Random."""
    return rng.choices(RESPONSES, weights=probs.tolist(), k=n)


# -- the variance ratio against exact enumeration ----------------------------------------------

def bt_g(prompt, y, y2):
    """An imperfect g: the Bradley-Terry model of the majority population only."""
    a, b = TASK.rewards(prompt, y)[0], TASK.rewards(prompt, y2)[0]
    return 1 / (1 + math.exp(-1.5 * (a - b)))


REF = tabular(lambda y: 0.4 * len(y) + 0.3 * (y[0] == "b"))


def exact_variances(prompt, g, ms, beta=0.1):
    """Var of the DPO and, for each M in `ms`, the VRPO per-prompt loss gradient at pi_ref, by
    exact enumeration of ordered pairs and labels, gradients by autograd with respect to the logits
    of a tabular policy (pi_ref's at the evaluation point)."""
    from helpers import pair_loss

    theta_ref = REF.log()
    S = len(RESPONSES)
    a, b = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    a, b = a.flatten(), b.flatten()
    pairs = [(RESPONSES[i], RESPONSES[j]) for i, j in zip(a.tolist(), b.tolist())]
    G = torch.tensor([g(prompt, y, y2) for y, y2 in pairs], dtype=torch.float64)
    P = torch.tensor([TASK.preference(prompt, y, y2) for y, y2 in pairs], dtype=torch.float64)
    w = REF[a] * REF[b]

    def margins(theta):                                     # theta (S*S, S): a copy per pair
        logp = torch.log_softmax(theta, 1) - theta_ref
        rows = torch.arange(len(a))
        return beta * (logp[rows, a] - logp[rows, b])

    def jac(fn):
        """(S*S, S): row k the gradient of fn's k-th output, which reads only copy k."""
        theta = theta_ref.expand(len(a), S).clone().requires_grad_(True)
        fn(theta).sum().backward()
        return theta.grad

    def lsig(u):
        return pair_loss(u, "sigmoid", beta)

    J_d = jac(lambda t: lsig(margins(t)))                                   # first chosen
    J_a = jac(lambda t: lsig(margins(t)) - G * lsig(margins(t)) - (1 - G) * lsig(-margins(t)))
    J_b = jac(lambda t: G * lsig(margins(t)) + (1 - G) * lsig(-margins(t)))
    swap = b * S + a                                                        # (b, a)'s row

    def label_moments(J):             # E|X|^2 and E X, chosen = first w.p. P*, else second
        sq = (J ** 2).sum(1)
        m2 = (w * (P * sq + (1 - P) * sq[swap])).sum()
        m1 = ((w * P)[:, None] * J + (w * (1 - P))[:, None] * J[swap]).sum(0)
        return m2, m1

    d2, mu = label_moments(J_d)
    a2, ea = label_moments(J_a)
    b2, eb = (w * (J_b ** 2).sum(1)).sum(), (w[:, None] * J_b).sum(0)
    torch.testing.assert_close(ea + eb, mu)             # unbiased: the same mean
    var_d = d2 - mu @ mu
    return var_d.item(), {M: (a2 + 2 * ea @ eb + b2 / M + (1 - 1 / M) * eb @ eb
                              - mu @ mu).item() for M in ms}


def synthetic_examples(n_per_prompt, M, seed, label_policy=REF):
    from vrpo_fast.data.schema import PreferenceExample

    rng = coin = random.Random(seed)
    out = []
    for prompt in TASK.prompts():
        for _ in range(n_per_prompt):
            y1, y2 = draw(label_policy, 2, rng)
            samples = draw(REF, 2 * M, rng)
            chosen, rejected = TASK.label(prompt, y1, y2, coin)
            pairs = [(chosen, rejected)] + list(zip(samples[0::2], samples[1::2]))
            out.append(PreferenceExample(prompt, chosen, rejected, samples,
                                         aux_prefs=[bt_g(prompt, x, y) for x, y in pairs]))
    return out


def test_variance_ratio_matches_exact_enumeration_on_the_synthetic_task():
    """Five independent data sets: the intervals cover the exact ratio (nominal 95 %) and the
    estimates average to it, for every M."""
    from vrpo_fast.audit import variance_ratio

    parts = [exact_variances(p, bt_g, (1, 2, 4, 8)) for p in TASK.prompts()]
    exact = {M: sum(v[M] for _, v in parts) / sum(d for d, _ in parts) for M in (1, 2, 4, 8)}
    runs = []
    for seed in range(5):
        examples = synthetic_examples(200, M=2, seed=seed)
        runs.append(variance_ratio(examples, [ex.aux_prefs for ex in examples], bootstrap=300))
    covered = [r[str(M)]["lo"] <= exact[M] <= r[str(M)]["hi"] for r in runs for M in exact]
    assert sum(covered) >= 0.8 * len(covered), (exact, runs)
    for M in exact:
        mean = sum(r[str(M)]["ratio"] for r in runs) / len(runs)
        assert mean == pytest.approx(exact[M], abs=0.02), (M, exact[M], runs)
        assert all(r[str(M)]["hi"] - r[str(M)]["lo"] < 0.15 for r in runs)
    # Power: VRPO pays more with more pairs, far beyond the intervals (g here is imperfect:
    # with M = 1 it costs variance, with M = 8 it saves some).
    assert exact[1] > 1.1 and exact[8] < exact[1] - 0.2


def test_audit_g_command_reports_agreement_calibration_and_slices(tmp_path, capsys):
    from vrpo_fast.cli import main

    examples = synthetic_examples(5, M=2, seed=3)
    rows = [{"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected,
             "samples": ex.samples, "aux_prefs": ex.aux_prefs,
             "domain": "first" if ex.prompt < "c" else "second"} for ex in examples]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main(["audit-g", "--config", str(tiny), f"--audit.data={data}",
                 f"--audit.output={tmp_path / 'audit'}", "--audit.bootstrap=50"]) == 0
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert (tmp_path / "audit" / "reliability.png").stat().st_size > 0
    assert "variance ratio" in (tmp_path / "audit" / "report.md").read_text()
    g0 = [r["aux_prefs"][0] for r in rows]
    assert report["pairs"] == len(rows)
    assert report["agreement"]["mean"] == pytest.approx(
        sum(1.0 if v > 0.5 else 0.5 if v == 0.5 else 0.0 for v in g0) / len(g0))
    # ECE from its definition: |mean prediction - frequency| per bin, weighted by the bin.
    preds = [(v, 1.0) for v in g0] + [(1 - v, 0.0) for v in g0]
    ece = 0.0
    for k in range(10):
        inside = [(p, o) for p, o in preds if k / 10 <= p < (k + 1) / 10 or (k == 9 and p == 1)]
        if inside:
            ece += abs(sum(p for p, _ in inside) - sum(o for _, o in inside)) / len(preds)
    assert report["ece"] == pytest.approx(ece)
    assert set(report["by_domain"]) == {"first", "second"}
    assert report["by_domain"]["first"]["pairs"] + report["by_domain"]["second"]["pairs"] == \
        len(rows)
    for M in ("1", "2", "4", "8"):
        r = report["variance_ratio"][M]
        assert r["lo"] <= r["ratio"] <= r["hi"]


def test_audit_on_policy_gaps_detect_labels_from_another_policy():
    from vrpo_fast.audit import audit_pairs

    on = synthetic_examples(100, M=2, seed=4)
    off = synthetic_examples(100, M=2, seed=4, label_policy=tabular(lambda y: 3.0 * y.count("d")))
    for examples, centred in ((on, True), (off, False)):
        gap = audit_pairs(examples, [ex.aux_prefs for ex in examples], bootstrap=20)["g_gap"]
        assert (gap["lo"] <= 0 <= gap["hi"]) == centred, gap


def test_audit_g_with_a_judge_scores_the_pairs_with_it(tmp_path):
    """aux.mode = judge: the audit's g is the judge's (tested against float64 forwards in
    test_judge.py) of the labelled pair and the Monte Carlo pairs of every row."""
    from vrpo_fast.audit import audit_pairs
    from vrpo_fast.cli import main
    from vrpo_fast.judge import PairJudge
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer

    model = build_tiny_causal_lm(seed=2, initializer_range=0.3, hidden_size=32, num_layers=1,
                                 num_heads=2, num_kv_heads=1, intermediate_size=64)
    model.save_pretrained(tmp_path / "judge")
    byte_tokenizer().save_pretrained(tmp_path / "judge")
    examples = synthetic_examples(2, M=1, seed=5)[:8]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"prompt": ex.prompt, "chosen": ex.chosen,
                                        "rejected": ex.rejected, "samples": ex.samples}) + "\n"
                            for ex in examples))
    template = "Q: {prompt}\nA) {response_a}\nB) {response_b}\nBest:"
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main(["audit-g", "--config", str(tiny), f"--audit.data={data}",
                 f"--audit.output={tmp_path / 'audit'}", "--audit.bootstrap=20",
                 "--aux.mode=judge", f"--aux.path={tmp_path / 'judge'}",
                 f"--aux.judge_template={template}", "--aux.judge_chat=false"]) == 0
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    judge = PairJudge(model, byte_tokenizer(), template=template, chat=False)
    g = judge.preferences([(ex.prompt, [(ex.chosen, ex.rejected),
                                        (ex.samples[0], ex.samples[1])]) for ex in examples])
    want = audit_pairs(examples, g, bootstrap=20)
    assert report["ece"] == pytest.approx(want["ece"], abs=1e-5)
    assert report["g_gap"]["mean"] == pytest.approx(want["g_gap"]["mean"], abs=1e-5)
    assert report["variance_ratio"]["4"]["ratio"] == pytest.approx(
        want["variance_ratio"]["4"]["ratio"], abs=1e-5)
