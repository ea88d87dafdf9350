"""Labellers: who says which of two responses is better, for the on-policy rounds
(`vrpo_fast.rounds`).

A labeller plays the annotator. It is asked about pairs of responses that pi_ref drew for a
prompt and answers, for each pair (y, y'), either

    a probability  p = P(y preferred to y') in [0, 1]   (a judge's or a reward model's belief), or
    a hard label   1 / True: y is preferred, 0 / False: y' is

Anything else (a string, None, NaN, a number outside [0, 1]) is refused in one line naming the
labeller, the prompt and the value, before any of the round's labels is written (its samples,
finished, stay for the next run).

From p the label is ONE Bernoulli draw per pair: y is chosen when u < p, with u uniform from a
generator seeded by (label.seed, round, prompt id) (`draw_seed`), so a resumed round draws the
very labels an uninterrupted one would, whatever ran before. A hard label is p in {0, 1}, a
draw whose outcome is fixed. Ties: p = 1/2 exactly is a fair coin (the same draw); two equal
responses are not shown to the labeller at all (p = 1/2, g = 1/2): the pair's margin is zero
whichever way it is labelled, so it moves no weight.

Modes (`label.mode`):

    truth        the synthetic task's true preference (vrpo_fast.synthetic): a mixture of two
                 annotator populations, what a human panel would be
    python       label.function = "module:function", called as function(prompt, y, y') -> p or
                 a hard label (e.g. a rule, an API client)
    judge        label.path: an instruction-tuned LM judging each pair in both orders
                 (vrpo_fast.judge; template and answer labels from aux.judge_*)
    reward       label.path: a sequence-classification reward model, p = sigmoid(r(y) - r(y'))

A labeller is not g. g (aux.mode) is a model of the preference that the loss uses on EVERY pair,
labelled or not, as a control variate; the labeller is the source of the labels, the only
information VRPO is corrected towards. When both are the same model (label.mode = judge and
aux.mode = judge with the same path, or aux.mode = given in the rounds, where g is the
labeller's own p), VRPO's fixed point is that model's preference: a distillation of the judge
(docs/rounds.md).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import random

from vrpo_fast.errors import UserError


def draw_seed(seed: int, round_index: int, prompt_id: int) -> int:
    """The seed of one prompt's label draw: hashed so neighbouring prompts and rounds get
    unrelated streams."""
    digest = hashlib.sha256(f"label:{seed}:{round_index}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def as_probability(value, who: str, prompt) -> float:
    """A labeller's answer as P(first preferred): a probability as it is, a hard label as 0 or
    1; anything else is one UserError naming `who` and the prompt."""
    item = getattr(value, "item", None)       # a numpy scalar, a one-element tensor
    if callable(item) and not isinstance(value, (int, float)):
        try:
            value = item()
        except (ValueError, RuntimeError):    # more than one element: refused below
            pass
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    start = str(prompt)[:40]
    raise UserError(f"{who}: returned {value!r:.60} for a pair of the prompt {start!r}, not a "
                    f"probability in [0, 1] that the first response is preferred nor a label "
                    f"(1 / True: the first, 0 / False: the second)")


class Labeller:
    """A labeller implements probabilities(items) -> [P(y preferred to y') or a hard label,
    for (prompt, y, y') in items] and identity() (recorded with the round's labels); callers
    use ask(), which checks every answer. `key` names the config key errors point at."""

    key = "label.mode"

    def probabilities(self, items: list[tuple]) -> list[float]:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError

    def ask(self, items: list[tuple]) -> list[float]:
        """probabilities() of the pairs of distinct responses, each answer checked; equal
        responses get 1/2 without asking."""
        ask = [i for i, (_, y, y2) in enumerate(items) if y != y2]
        got = self.probabilities([items[i] for i in ask]) if ask else []
        if len(got) != len(ask):
            raise UserError(f"{self.key}: the labeller answered {len(got)} of {len(ask)} pairs")
        out = [0.5] * len(items)
        for i, value in zip(ask, got):
            out[i] = as_probability(value, self.key, items[i][0])
        return out


class TruthLabeller(Labeller):
    """The synthetic task's true (non-Bradley-Terry) preference."""

    def __init__(self, task=None):
        from vrpo_fast.synthetic import SyntheticTask

        self.task = task or SyntheticTask()

    def probabilities(self, items):
        out = []
        for prompt, y, y2 in items:
            if not isinstance(prompt, str) or not isinstance(y, str):
                raise UserError("label.mode: truth labels the synthetic task, whose prompts and "
                                "responses are strings, not conversations")
            out.append(self.task.preference(prompt, y, y2))
        return out

    def identity(self):
        return {"mode": "truth", "task": vars(self.task)}


class FunctionLabeller(Labeller):
    """function(prompt, y, y2) -> p or a hard label; `key` names it in errors (label.function,
    or label.g_function for a g of the same contract)."""

    def __init__(self, spec: str, key: str = "label.function"):
        self.key = key
        module, _, name = spec.rpartition(":")
        if not module or not name:
            raise UserError(f"{key}: expected module:function, got {spec!r}")
        try:
            self.fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise UserError(f"{key}: cannot import {spec!r}: {err}") from None
        if not callable(self.fn):
            raise UserError(f"{key}: {spec} is not a function")
        self.spec = spec

    def probabilities(self, items):
        return [self.fn(prompt, y, y2) for prompt, y, y2 in items]

    def identity(self):
        try:   # the function's source: an edited labeller is another labeller
            source = hashlib.sha256(inspect.getsource(self.fn).encode()).hexdigest()
        except (OSError, TypeError):
            source = None
        return {"mode": "python", "function": self.spec, "source_sha256": source}


class JudgeLabeller(Labeller):
    """A pairwise LLM judge (vrpo_fast.judge), both orders, aux.judge_* settings."""

    key = "label.path"

    def __init__(self, path: str, aux, max_tokens: int):
        import dataclasses

        from vrpo_fast.judge import load_judge
        from vrpo_fast.provenance import weights_fingerprint
        from vrpo_fast.samplers import device_of_rank

        judge_aux = dataclasses.replace(aux, path=path)
        self.judge = load_judge(judge_aux, device_of_rank(), what="label.path")
        self.max_tokens, self.path = max_tokens, path
        self._identity = {"mode": "judge", "path": path,
                          "weights_sha256": weights_fingerprint(self.judge.model),
                          "judge": self.judge.identity()}

    def probabilities(self, items):
        got = self.judge.preferences([(p, [(y, y2)]) for p, y, y2 in items], self.max_tokens)
        return [v[0] for v in got]

    def identity(self):
        return self._identity


class RewardLabeller(Labeller):
    """A sequence-classification reward model: p = sigmoid(r(y) - r(y'))."""

    key = "label.path"

    def __init__(self, path: str):
        from vrpo_fast.evaluate import RewardModelJudge
        from vrpo_fast.provenance import weights_fingerprint

        try:
            self.rm = RewardModelJudge(path)
        except UserError as err:
            raise UserError(f"label.path: {str(err).split(': ', 1)[-1]}") from None
        self._identity = {"mode": "reward", "path": path,
                          "weights_sha256": weights_fingerprint(self.rm.model)}

    def probabilities(self, items):
        return [self.rm.preference(p, y, y2) for p, y, y2 in items]

    def identity(self):
        return self._identity


def make_labeller(cfg) -> Labeller:
    """The labeller of cfg.label."""
    lab = cfg.label
    if lab.mode == "truth":
        return TruthLabeller()
    if lab.mode == "python":
        return FunctionLabeller(lab.function)
    if lab.mode == "judge":
        return JudgeLabeller(lab.path, cfg.aux, cfg.aux.judge_max_tokens)
    return RewardLabeller(lab.path)


def draw_label(p: float, seed: int) -> bool:
    """One Bernoulli(p) draw from `seed`: True when the first response is chosen."""
    return random.Random(seed).random() < p
