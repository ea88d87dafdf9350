"""Two-stage VRPO, stage 1: `vrpo-fast train-reward --config X.yaml`.

A reward model r = a causal LM body with a scalar head (transformers' sequence-classification
models, num_labels = 1) scores every response at its last token; all 2 + 2M responses of a
prompt go through ONE packed shared-prefix forward. The loss is `vrpo_reward_loss` (margins
u = r(y) - r(y')), with g from the data (given), a lagged copy of the reward model
(g = sigmoid(r_lag(y) - r_lag(y'))) or an auxiliary LM (lm). The loop, checkpoints, resume,
metrics and faults are the policy trainer's. <output_dir>/final/ is a Hugging Face
sequence-classification model that other RLHF tools load as a reward model.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vrpo_fast.data.tokenize import tokenize_example
from vrpo_fast.dro import domains_of, per_domain
from vrpo_fast.errors import UserError
from vrpo_fast.estimate import Estimate, reliability_plot  # noqa: F401 (public here too)
from vrpo_fast.models import load_reward_model, tiny_llama_config
from vrpo_fast.objective import reward_preference, vrpo_reward_loss
from vrpo_fast.passes import SequenceRewards, packed_scores
from vrpo_fast.passes import reward_scores as packed_reward_scores
from vrpo_fast.samplers import draw
from vrpo_fast.train.loop import Trainer


def build_reward_model(cfg, tokenizer):
    """The reward model stage 1 starts from: model.path with a fresh one-output head (or the
    reward model it already is), or a tiny model from model.tiny."""
    if cfg.model.path:
        model = load_reward_model(cfg.model.path, what="model.path", new_head=True)
    else:
        from transformers import AutoModelForSequenceClassification


        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.model.seed)
            model = AutoModelForSequenceClassification.from_config(
                tiny_llama_config(num_labels=1, **(cfg.model.tiny or {})),
                attn_implementation="sdpa")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


class RewardTrainer(Trainer):
    """Stage 1: the policy trainer with a reward model in the policy's place. Overrides
    build_model and wrap (a sequence-classification model, (B, K) rewards), preferences (a
    lagged g from the lagged reward model) and compute_loss (`vrpo_reward_loss`)."""

    export_class = "AutoModelForSequenceClassification"
    supports_one_sweep = False      # its own compute_loss (and rewards, not log-probs)

    def __init__(self, cfg, *args, **kwargs):
        if cfg.loss.loss_type == "ipo":
            raise UserError("loss.loss_type: 'ipo' is a policy loss; a reward model uses "
                            "sigmoid, ramp or hinge")
        if cfg.aux.mode != "lm" and cfg.ref.source != "none":
            # Only an auxiliary LM's implicit preference needs pi_ref's log-probs.
            cfg = dataclasses.replace(cfg, ref=dataclasses.replace(cfg.ref, source="none"))
        super().__init__(cfg, *args, **kwargs)

    def build_model(self):
        return build_reward_model(self.cfg, self.tokenizer)

    def wrap(self, model):
        return SequenceRewards(model, attention=self.cfg.train.attention)

    def preferences(self, batch, groups, ref_logps):
        if self.cfg.aux.mode == "lagged":
            with torch.no_grad():
                return reward_preference(self.aux(batch))
        return super().preferences(batch, groups, ref_logps)

    def compute_loss(self, rewards, ref_logps, g, labelled, groups):
        cfg = self.cfg
        per_prompt, stats = vrpo_reward_loss(rewards, g, loss_type=cfg.loss.loss_type,
                                             estimator=cfg.loss.estimator, labelled=labelled,
                                             label_scale=self._label_scale, reduction="none",
                                             check_inputs=False)
        # DRO (loss.dro_tau / loss.group_dro_eta) weighs prompts as in the policy trainer.
        return self.prompt_share(per_prompt, groups, stats), stats


def train_reward(cfg, *, quiet: bool = False):
    return RewardTrainer(cfg, quiet=quiet).fit()


@torch.no_grad()
def reward_scores(model, tokenizer, examples, *, max_tokens: int = 4096) -> torch.Tensor:
    """(B, K) scores of every response of each example (one packed pass per batch)."""
    tok = [tokenize_example(ex, tokenizer) for ex in examples]
    groups = [(t.prompt_ids, t.response_ids) for t in tok]
    return torch.tensor(packed_scores(
        lambda p, r, b: packed_reward_scores(model, p, r, b), groups, max_tokens))


def evaluate_reward_model(model, tokenizer, examples, *, true_preference=None,
                          bins: int = 10) -> dict:
    """Pairwise accuracy on held-out labelled pairs, a reliability table (predicted
    P(chosen > rejected) against the observed frequency), and, when the true preference is
    known, accuracy against it: how often sign(r(y) - r(y')) agrees with P*(y, y') > 1/2.
    When every pair has a domain, report["by_domain"] holds each of these accuracies per domain
    (vrpo_fast.dro.per_domain: the worst domain and the mean over domains)."""
    labelled = [ex for ex in examples if ex.labelled]
    if not labelled:
        raise UserError("reward evaluation needs labelled pairs (chosen, rejected)")
    scores = reward_scores(model.eval(), tokenizer, labelled)
    p = torch.sigmoid(scores[:, 0] - scores[:, 1])
    report = {"pairs": len(labelled), "accuracy": (p > 0.5).float().mean().item()}
    # Reliability: in each bin of predicted probability, how often the chosen one won.
    table = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        # Predictions are symmetric: a pair predicted q for chosen is 1 - q for rejected.
        preds = torch.cat([p, 1 - p])
        outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
        inside = (preds >= lo) & ((preds < hi) if b < bins - 1 else (preds <= hi))
        if inside.any():
            table.append({"bin": [lo, hi], "predicted": preds[inside].mean().item(),
                          "observed": outcome[inside].mean().item(),
                          "count": int(inside.sum())})
    report["reliability"] = table
    report["ece"] = sum(abs(t["predicted"] - t["observed"]) * t["count"] for t in table) / (
        2 * len(labelled))
    domains = domains_of(labelled)
    if domains is not None:
        report["by_domain"] = {"accuracy": per_domain(domains, Estimate.of,
                                                      (p > 0.5).float().tolist())}
    if true_preference is not None:
        agree, agree_domains = [], []
        for ex, s in zip(labelled, scores):
            truth = true_preference(ex.prompt, ex.chosen, ex.rejected)
            if not math.isclose(truth, 0.5):
                agree.append(float((s[0] > s[1]).item() == (truth > 0.5)))
                agree_domains.append(ex.domain)
        report["accuracy_vs_truth"] = sum(agree) / max(1, len(agree))
        if domains is not None and agree:
            report["by_domain"]["accuracy_vs_truth"] = per_domain(agree_domains, Estimate.of,
                                                                  agree)
    return report


@torch.no_grad()
def best_of_n(policy, reward_model, tokenizer, prompts: list[str], n: int, *, seed: int = 0,
              max_new_tokens: int = 64) -> list[str]:
    """For each prompt, n samples from `policy`, returning the one the reward model scores
    highest (all n scored in one packed pass per prompt batch)."""
    texts, prompt_ids, ids = draw(policy, tokenizer, prompts, n, seed=seed,
                                  max_new_tokens=max_new_tokens)
    eos = tokenizer.eos_token_id
    groups = [(p, [r if r else [eos] for r in per]) for p, per in zip(prompt_ids, ids)]
    scores = torch.tensor(packed_scores(
        lambda p, r, b: packed_reward_scores(reward_model.eval(), p, r, b), groups, 4096))
    return [per[i] for per, i in zip(texts, scores.argmax(dim=1).tolist())]


# `vrpo-fast <command> --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = train_reward
