"""A synthetic preference task with a known, deliberately non-Bradley-Terry true preference.

Prompts are two letters and a marker, e.g. "ac>"; responses are short strings over the letters
"abcd". Two annotator populations judge a pair:
  - population 1 (weight 0.7) likes responses with many copies of the prompt's FIRST letter;
  - population 2 (weight 0.3) likes the prompt's SECOND letter and dislikes length.
The true preference
    P*(y beats y') = 0.7 sigmoid(s (r1(y) - r1(y'))) + 0.3 sigmoid(s (r2(y) - r2(y')))
is a mixture of two Bradley-Terry models, which is not Bradley-Terry itself: the primary model of
DPO is misspecified, as in the paper's controlled study. Everything is computable exactly, so the
evaluator can judge with the truth.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

LETTERS = "abcd"


@dataclass(frozen=True)
class SyntheticTask:
    weight: float = 0.7          # share of population 1
    sharpness: float = 1.5       # s: how deterministic each population is
    length_cost: float = 0.5     # population 2's dislike of length
    max_len: int = 6             # responses have 1..max_len letters

    def prompts(self) -> list[str]:
        return [f"{a}{b}>" for a in LETTERS for b in LETTERS if a != b]

    def rewards(self, prompt: str, response: str) -> tuple[float, float]:
        r1 = float(response.count(prompt[0]))
        r2 = response.count(prompt[1]) - self.length_cost * len(response)
        return r1, r2

    def preference(self, prompt: str, y: str, y2: str) -> float:
        """P*(y beats y2 | prompt): the mixture of the two populations."""
        a1, a2 = self.rewards(prompt, y)
        b1, b2 = self.rewards(prompt, y2)
        s = self.sharpness
        return self.weight * _sigmoid(s * (a1 - b1)) + (1 - self.weight) * _sigmoid(s * (a2 - b2))

    def true_reward(self, prompt: str, response: str) -> float:
        """Expected reward over the annotator populations (the reward the evaluator reports)."""
        r1, r2 = self.rewards(prompt, response)
        return self.weight * r1 + (1 - self.weight) * r2

    def best_response(self, prompt: str) -> str:
        return prompt[0] * self.max_len

    def label(self, prompt: str, y: str, y2: str, rng: random.Random) -> tuple[str, str]:
        """Draw one annotator's verdict: (chosen, rejected)."""
        return (y, y2) if rng.random() < self.preference(prompt, y, y2) else (y2, y)

    def random_response(self, rng: random.Random) -> str:
        return "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, self.max_len)))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path
