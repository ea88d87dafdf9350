"""Evaluation: win rate of a policy against a baseline under a judge, expected true reward, and a
KL(pi || pi_ref) estimate, each with a 95% confidence interval.

    vrpo-fast eval --model runs/vrpo/final --baseline runs/ref --prompts heldout.jsonl \
        --judge synthetic                       # the synthetic task's true preference
        --judge reward_model:PATH               # a Hugging Face sequence-classification model
        --judge python:my_module:my_judge       # judge(prompt, y, y2) -> P(y beats y2) in [0, 1]

Judges return probabilities, not draws: the win rate is the expected preference, which has the
same mean as counting sampled verdicts and less variance.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

from vrpo_fast.errors import UserError


@dataclass
class Estimate:
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


class Judge:
    """preference(prompt, y, y2) -> P(y beats y2); reward(prompt, y) -> float or None."""

    name = "judge"

    def preference(self, prompt: str, y: str, y2: str) -> float:
        raise NotImplementedError

    def reward(self, prompt: str, y: str) -> float | None:
        return None


class SyntheticJudge(Judge):
    name = "synthetic truth"

    def __init__(self, task=None):
        from vrpo_fast.synthetic import SyntheticTask

        self.task = task or SyntheticTask()

    def preference(self, prompt, y, y2):
        return self.task.preference(prompt, y, y2)

    def reward(self, prompt, y):
        return self.task.true_reward(prompt, y)


class CallableJudge(Judge):
    def __init__(self, fn, name="python"):
        self.fn, self.name = fn, name

    def preference(self, prompt, y, y2):
        p = float(self.fn(prompt, y, y2))
        if not 0 <= p <= 1:
            raise UserError(f"--judge {self.name}: returned {p}, not a probability in [0, 1]")
        return p


class RewardModelJudge(Judge):
    """A sequence-classification reward model r; P(y beats y2) = sigmoid(r(y) - r(y2))."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise UserError(f"--judge reward_model:{path}: cannot load it: "
                            f"{str(err).splitlines()[0]}") from None
        self.name = f"reward model {path}"
        self._torch = torch
        self._cache: dict[tuple[str, str], float] = {}

    def reward(self, prompt, y):
        key = (prompt, y)
        if key not in self._cache:
            ids = self.tokenizer(prompt + y, return_tensors="pt")
            with self._torch.no_grad():
                self._cache[key] = self.model(**ids).logits[0, 0].float().item()
        return self._cache[key]

    def preference(self, prompt, y, y2):
        d = self.reward(prompt, y) - self.reward(prompt, y2)
        return 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))


def make_judge(spec: str, task=None) -> Judge:
    """'synthetic' | 'reward_model:PATH' | 'python:module:function'."""
    if spec == "synthetic":
        return SyntheticJudge(task)
    if spec.startswith("reward_model:"):
        return RewardModelJudge(spec.split(":", 1)[1])
    if spec.startswith("python:"):
        target = spec.split(":", 1)[1]
        module, _, fn = target.rpartition(":")
        try:
            return CallableJudge(getattr(importlib.import_module(module), fn), name=spec)
        except (ImportError, AttributeError, ValueError) as err:
            raise UserError(f"--judge {spec}: cannot import {target!r}: {err}") from None
    raise UserError(f"--judge: unknown judge {spec!r}; expected synthetic, reward_model:PATH "
                    f"or python:module:function")


def win_rate(prompts: list[str], policy: list[list[str]], baseline: list[list[str]],
             judge: Judge) -> Estimate:
    """Mean P(policy's i-th response beats baseline's i-th) over prompts and samples.

    The CI treats prompts as the independent units (samples of one prompt are averaged first).
    """
    per_prompt = []
    for prompt, ys, bs in zip(prompts, policy, baseline):
        pairs = list(zip(ys, bs))
        per_prompt.append(sum(judge.preference(prompt, y, b) for y, b in pairs) / len(pairs))
    return Estimate.of(per_prompt)


def expected_reward(prompts: list[str], responses: list[list[str]], judge: Judge):
    values = []
    for prompt, ys in zip(prompts, responses):
        rs = [judge.reward(prompt, y) for y in ys]
        if any(r is None for r in rs):
            return None
        values.append(sum(rs) / len(rs))
    return Estimate.of(values)


def kl_estimate(policy_logps, ref_logps) -> Estimate:
    """KL(pi || pi_ref) from (G, n) log-probs of responses SAMPLED FROM pi: mean log-ratio."""
    diff = (policy_logps.double() - ref_logps.double())
    return Estimate.of(diff.mean(dim=1).tolist())


@dataclass
class PolicyReport:
    name: str
    win_rate_vs_baseline: Estimate
    true_reward: Estimate | None
    kl: Estimate | None
    by_domain: dict | None = None     # metric -> vrpo_fast.dro.per_domain report


def draw(model, tokenizer, prompts: list[str], n: int, *, seed: int, max_new_tokens: int,
         temperature: float = 1.0):
    """n samples per prompt from `model` -> (texts (P, n), prompt ids (P,), response ids (P, n))."""
    from vrpo_fast.data.tokenize import tokenize_prompt
    from vrpo_fast.samplers import TransformersSampler

    prompt_ids = [tokenize_prompt(p, tokenizer) for p in prompts]
    sampler = TransformersSampler(model, tokenizer, temperature=temperature,
                                  max_new_tokens=max_new_tokens, batch_size=8)
    ids = sampler.sample(prompt_ids, n, seed=seed)
    eos = tokenizer.eos_token_id
    texts = [[tokenizer.decode([t for t in r if t != eos]) for r in per] for per in ids]
    return texts, prompt_ids, ids


def evaluate_policy(model, baseline, tokenizer, prompts: list[str], judge: Judge, *,
                    ref=None, n: int = 16, seed: int = 0, max_new_tokens: int = 32,
                    name: str = "policy", domains: list | None = None) -> PolicyReport:
    """Win rate against `baseline`, expected true reward and KL(model || ref) on `prompts`;
    with `domains` (one per prompt) the win rate and reward of each domain, and the worst."""
    import torch

    from vrpo_fast.logprobs import sequence_logps

    ys, prompt_ids, y_ids = draw(model, tokenizer, prompts, n, seed=seed,
                                 max_new_tokens=max_new_tokens)
    bs, _, _ = draw(baseline, tokenizer, prompts, n, seed=seed + 1,
                    max_new_tokens=max_new_tokens)
    kl = None
    if ref is not None:
        # Empty continuations cannot be scored; an immediate EOS is a one-token response.
        y_ids = [[r if r else [tokenizer.eos_token_id] for r in per] for per in y_ids]
        with torch.no_grad():
            kl = kl_estimate(sequence_logps(model, prompt_ids, y_ids),
                             sequence_logps(ref, prompt_ids, y_ids))
    report = PolicyReport(name, win_rate(prompts, ys, bs, judge),
                          expected_reward(prompts, ys, judge), kl)
    if domains is not None:
        from vrpo_fast.dro import per_domain

        report.by_domain = {"win_rate": per_domain(
            domains, lambda p, y, b: win_rate(p, y, b, judge), prompts, ys, bs)}
        if report.true_reward is not None:
            report.by_domain["true_reward"] = per_domain(
                domains, lambda p, y: expected_reward(p, y, judge), prompts, ys)
    return report


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="the policy to evaluate (HF folder)")
    parser.add_argument("--baseline", required=True, help="the policy it plays against")
    parser.add_argument("--ref", help="pi_ref for the KL estimate (default: the baseline)")
    parser.add_argument("--prompts", required=True, help="held-out prompts (any data format "
                                                         "with a prompt column)")
    parser.add_argument("--judge", default="synthetic",
                        help="synthetic | reward_model:PATH | python:module:function")
    parser.add_argument("--num-samples", type=int, default=16, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.dro import describe_domains, domains_of
    from vrpo_fast.models import load_causal_lm, load_tokenizer

    if args.num_samples < 1:
        raise UserError(f"--num-samples: must be >= 1, got {args.num_samples}")
    examples, _ = load_preference_data(args.prompts, prompts_only=True)
    prompts = [ex.prompt for ex in examples]
    if any(not isinstance(p, str) for p in prompts):
        raise UserError("--prompts: conversational prompts are not supported by eval yet")
    model = load_causal_lm(args.model, what="--model").eval()
    baseline = load_causal_lm(args.baseline, what="--baseline").eval()
    ref = load_causal_lm(args.ref, what="--ref").eval() if args.ref else baseline
    tokenizer = load_tokenizer(args.model, "--model")
    judge = make_judge(args.judge)
    rep = evaluate_policy(model, baseline, tokenizer, prompts, judge, ref=ref,
                          n=args.num_samples, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, name=args.model,
                          domains=domains_of(examples))
    print(f"judge: {judge.name}; {len(prompts)} prompts x {args.num_samples} samples; "
          f"95% confidence intervals")
    print(f"win rate of {args.model} vs {args.baseline}: {rep.win_rate_vs_baseline}")
    if rep.true_reward is not None:
        print(f"expected reward: {rep.true_reward}")
    print(f"KL(policy || ref): {rep.kl}")
    for metric, by in (rep.by_domain or {}).items():
        print(describe_domains(by, metric.replace("_", " ")))
    return 0
