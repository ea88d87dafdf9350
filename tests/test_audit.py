"""Before training: the audit of g (agreement, calibration, the VRPO / DPO gradient variance
ratio at pi_ref against exact enumeration on the synthetic task), and the control variate's
centring (cv_gap) in train and in the audit: an interval that covers zero when the labelled
pairs come from pi_ref and excludes it when they come from another policy."""

from __future__ import annotations

import itertools
import json
import math
import random

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
    return [RESPONSES[i] for i in torch.multinomial(probs, n, replacement=True,
                                                    generator=rng).tolist()]


# -- cv_gap ----------------------------------------------------------------------------------

def step_gaps(label_policy, steps, rng, batch=16, M=2, beta=1.0):
    """term_label - term_mc of `steps` batches at a policy pi != pi_ref, labelled pairs drawn
    from `label_policy`, Monte Carlo pairs from pi_ref (uniform), g the task's truth."""
    from vrpo_fast.objective import vrpo_loss

    ref = tabular(lambda y: 0.0)
    pol = tabular(lambda y: 1.5 * y.count("a") - 0.5 * len(y))
    index = {y: i for i, y in enumerate(RESPONSES)}
    gaps = []
    for _ in range(steps):
        prompts = random.Random(int(torch.randint(1 << 30, (1,), generator=rng))).choices(
            TASK.prompts(), k=batch)
        cols, g = [], []
        for prompt in prompts:
            y1, y2 = draw(label_policy, 2, rng)
            mc = draw(ref, 2 * M, rng)
            pairs = [(y1, y2)] + list(zip(mc[0::2], mc[1::2]))
            cols.append([index[y] for pair in pairs for y in pair])
            g.append([TASK.preference(prompt, a, b) for a, b in pairs])
        cols = torch.tensor(cols)
        _, stats = vrpo_loss(pol.log()[cols], ref.log()[cols], torch.tensor(g), beta=beta)
        gaps.append((stats["term_label"] - stats["term_mc"]).item())
    return gaps


def test_cv_gap_interval_covers_zero_on_policy_and_detects_off_policy_labels():
    from vrpo_fast.train.loop import CV_GAP_WINDOW, cv_gap_interval

    rng = torch.Generator().manual_seed(0)
    on = [cv_gap_interval(step_gaps(tabular(lambda y: 0.0), CV_GAP_WINDOW, rng))
          for _ in range(40)]
    covered = sum(lo <= 0 <= hi for _, lo, hi in on) / len(on)
    assert covered >= 0.85, on                      # nominal 95 %
    other = tabular(lambda y: 2.0 * y.count("d"))  # labelled pairs from another policy
    off = [cv_gap_interval(step_gaps(other, CV_GAP_WINDOW, rng)) for _ in range(10)]
    detected = sum(hi < 0 or lo > 0 for _, lo, hi in off) / len(off)
    assert detected >= 0.9, off


def test_train_logs_cv_gap_from_its_terms(tmp_path):
    from vrpo_fast.config import load_config
    from vrpo_fast.train import loop
    from vrpo_fast.train.metrics import read_metrics

    cfg = load_config(loop.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [
        f"--train.output_dir={tmp_path}", "--train.max_steps=4", "--train.save_every=0",
        "--train.batch_groups=4", "--train.micro_batch_groups=4", "--train.lr=3e-2",
        "--train.warmup_steps=0", "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, "
        "num_kv_heads: 1, intermediate_size: 64}"])
    loop.Trainer(cfg, quiet=True).fit()
    records = read_metrics(tmp_path)
    gaps = [r["term_label"] - r["term_mc"] for r in records]
    for n, r in enumerate(records, 1):
        window = gaps[:n]
        mean = sum(window) / n
        assert r["cv_gap"] == pytest.approx(mean, abs=1e-9)
        if n > 1:
            se = math.sqrt(sum((v - mean) ** 2 for v in window) / (n - 1) / n)
            assert r["cv_gap_hi"] - r["cv_gap_lo"] == pytest.approx(2 * 1.96 * se, abs=1e-9)
    assert json.dumps(records)          # plain numbers


def test_cv_gap_warns_once_when_its_interval_excludes_zero():
    import warnings
    from types import SimpleNamespace

    from vrpo_fast.train.loop import CV_GAP_MIN_STEPS, Trainer

    def run(gaps):
        fake = SimpleNamespace(cfg=SimpleNamespace(loss=SimpleNamespace(estimator="vrpo")), M=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step, gap in enumerate(gaps, 1):
                Trainer._track_cv_gap(fake, {"step": step, "term_label": 1.0 + gap,
                                             "term_mc": 1.0})
        return [str(w.message) for w in caught]

    n = 3 * CV_GAP_MIN_STEPS
    assert run([(-1) ** i * 0.1 for i in range(n)]) == []                 # centred
    said = run([0.05 + (-1) ** i * 0.1 for i in range(n)])
    assert len(said) == 1 and "cv_gap" in said[0] and "on-policy" in said[0]
