"""A pairwise LLM judge as the auxiliary preference g (aux.mode = judge), shared by `score`,
`train` and `eval`.

An instruction-tuned causal LM reads a judging prompt holding the user's prompt and two
responses labelled A and B (`aux.judge_template`, wrapped in the judge's chat template when it
has one); its next-token probabilities of the two label tokens give

    p_AB = p(A) / (p(A) + p(B)) = sigmoid(z_A - z_B)          (z: the label tokens' logits)

Every pair is judged in both orders and combined,

    g(y, y') = (p(A | y shown as A) + p(B | y shown as B)) / 2,

so a judge that prefers a position gains nothing from it, and g(y, y') + g(y', y) = 1 exactly
(`_symmetric`). Unlike every other source of g this is not a Bradley-Terry model: the judge sees
both answers at once.

Speed: the 2 (1 + M) judging contexts of a prompt group share a prefix (the instructions and
the user's prompt, often the chat template's head too). They go through the existing packing
as ONE group (the longest common token prefix once, each context's remainder as a "response"),
batched by token budget, no grad; only the hidden state at each context's last token meets the
two label rows of the LM head. A context's value equals one unpacked forward of it.

Multi-token labels: the first token of each label (tokenized on its own) is the one scored; two
labels that share their first token are refused (aux.judge_labels).
"""

from __future__ import annotations

import hashlib
import json

import torch

from vrpo_fast.config import JUDGE_TEMPLATE as DEFAULT_TEMPLATE
from vrpo_fast.errors import UserError
from vrpo_fast.logprobs import lm_head_weight, packed_body
from vrpo_fast.models import load_causal_lm, load_tokenizer
from vrpo_fast.packing import pack_groups, row_padding, trainer_budget
from vrpo_fast.passes import packed_scores

DEFAULT_LABELS = ("A", "B")
FIELDS = ("{prompt}", "{response_a}", "{response_b}")


def as_text(x) -> str:
    """A prompt or response as the judge reads it: a string as is, conversational messages as
    role-tagged lines."""
    if isinstance(x, str):
        return x
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in x)


def _symmetric(q: float, flip: bool) -> float:
    """q = g(first, second) of a canonically ordered pair -> g of the pair as asked, in float64
    with g(y, y') + g(y', y) = 1 bit for bit: the value >= 1/2 is kept, the other is 1 minus it
    (exact for a value >= 1/2), and their sum is exactly 1."""
    hi = max(q, 1.0 - q)
    first = hi if q >= 0.5 else 1.0 - hi
    return 1.0 - first if flip else first


class PairJudge:
    """A causal LM as a pairwise judge.

    model: a transformers causal LM (any device, any dtype); tokenizer: its tokenizer;
    template: a string holding {prompt}, {response_a} and {response_b} (filled by plain
    replacement, so other braces are literal); labels: the two answer strings; chat: wrap the
    filled template as one user message in the tokenizer's chat template with the generation
    prompt (None: when the tokenizer has one). `what` names the config key in errors, `source`
    where the judge came from (default `what`.path).
    """

    def __init__(self, model, tokenizer, *, template: str = DEFAULT_TEMPLATE,
                 labels=DEFAULT_LABELS, chat: bool | None = None, what: str = "aux",
                 source: str | None = None):
        missing = [f for f in FIELDS if f not in template]
        if missing:
            raise UserError(f"{what}.judge_template: must hold {', '.join(FIELDS)}; "
                            f"{', '.join(missing)} missing")
        if len(labels) != 2 or not all(isinstance(s, str) and s for s in labels):
            raise UserError(f"{what}.judge_labels: expected two non-empty strings, got "
                            f"{labels!r}")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_chat:
            raise UserError(f"{what}.judge_chat: the judge's tokenizer has no chat template")
        self.model, self.tokenizer = model, tokenizer
        self.source = source or f"{what}.path"
        # The longest context the judge takes (None when its config does not say).
        n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_context = n if isinstance(n, int) and n > 0 else None
        self.attention = "auto"       # the packed passes' attention (`packed_body`'s)
        self.template, self.labels = template, tuple(labels)
        self.chat = has_chat if chat is None else bool(chat)
        ids = []
        for label in self.labels:
            tok = tokenizer(label, add_special_tokens=False)["input_ids"]
            if not tok:
                raise UserError(f"{what}.judge_labels: {label!r} tokenizes to nothing")
            ids.append(int(tok[0]))
        if ids[0] == ids[1]:
            raise UserError(f"{what}.judge_labels: {self.labels[0]!r} and {self.labels[1]!r} "
                            f"share their first token (id {ids[0]}), the one the judge scores; "
                            f"choose labels that differ in it")
        self.label_ids = ids

    def identity(self) -> dict:
        """What decides the judge's g besides its weights: recorded in a scored set's
        provenance, so that a set judged with another template or labels is refused."""
        chat = getattr(self.tokenizer, "chat_template", None) if self.chat else None
        return {"template_sha256": hashlib.sha256(self.template.encode()).hexdigest(),
                "template": self.template, "labels": list(self.labels),
                "label_ids": self.label_ids, "chat": self.chat,
                "chat_template_sha256": hashlib.sha256(json.dumps(chat).encode()).hexdigest()}

    def text(self, prompt, a, b) -> str:
        """The judging context of (prompt, A = a, B = b) as text, chat template applied."""
        filled = (self.template.replace("{prompt}", as_text(prompt))
                  .replace("{response_a}", as_text(a)).replace("{response_b}", as_text(b)))
        if not self.chat:
            return filled
        return self.tokenizer.apply_chat_template([{"role": "user", "content": filled}],
                                                  tokenize=False, add_generation_prompt=True)

    def context_ids(self, prompt, a, b) -> list[int]:
        """Token ids of the judging context; the label is the next token."""
        text = self.text(prompt, a, b)
        # A chat template writes its own special tokens (BOS); plain text gets the tokenizer's.
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def jobs(self, prompt, pairs) -> tuple[list, list[tuple[int, bool]]]:
        """The packed work of one prompt's pairs and how to read it back.

        Returns (groups, where): groups [(prefix ids, [remainder ids, ...])], the distinct
        contexts of the unordered pairs in both orders sharing their longest common prefix
        (each context its own group when they share no token); where[i] = (index of pair i's
        canonical pair, flip) with index -1 for a pair of two equal responses (g = 1/2)."""
        canon: dict[tuple[str, str], int] = {}
        where = []
        for y, y2 in pairs:
            a, b = as_text(y), as_text(y2)
            if a == b:
                where.append((-1, False))
                continue
            key = (a, b) if a < b else (b, a)
            where.append((canon.setdefault(key, len(canon)), key[0] != a))
        contexts = []
        for a, b in canon:
            contexts += [self.context_ids(prompt, a, b), self.context_ids(prompt, b, a)]
        if not contexts:
            return [], where
        shortest = min(map(len, contexts))
        common = 0
        while common < shortest - 1 and all(c[common] == contexts[0][common] for c in contexts):
            common += 1
        if common == 0:
            return [(c[:1], [c[1:]]) for c in contexts], where
        return [(contexts[0][:common], [c[common:] for c in contexts])], where

    def _check_context(self, jobs, prompt) -> None:
        """Refuse a judging context longer than the judge's max_position_embeddings: past it
        the judge's positions are out of its training range (or out of its table), and its g
        would be noise that nothing reports."""
        if self.max_context is None or not jobs:
            return
        longest = max(len(prefix) + len(rest) for prefix, rests in jobs for rest in rests)
        if longest > self.max_context:
            start = as_text(prompt)[:60]
            raise UserError(f"{self.source}: a judging context of {longest} tokens (template, "
                            f"prompt and two responses) is longer than the judge's "
                            f"max_position_embeddings = {self.max_context}, for the prompt "
                            f"starting {start!r}: shorten that prompt or its responses, or use "
                            f"a judge with a longer context")

    def label_margins(self, groups, max_tokens: int) -> list[list[float]]:
        """z_A - z_B at the end of every context of `groups` (see `label_margins`)."""
        try:
            return label_margins(self.model, self.label_ids, groups, max_tokens,
                                 attention=self.attention)
        except ValueError as err:     # e.g. a token id outside the judge's vocabulary
            raise UserError(f"aux.path: the judge cannot read these contexts: {err}") from None

    def preferences(self, items, max_tokens: int = 8192) -> list[list[float]]:
        """g for every pair: items [(prompt, [(y, y'), ...])] -> [[g(y, y'), ...]] (float64
        values in Python floats), each pair judged in both orders."""
        plans, groups = [], []
        for prompt, pairs in items:
            jobs, where = self.jobs(prompt, pairs)
            self._check_context(jobs, prompt)
            plans.append((len(groups), len(jobs), where))
            groups += jobs
        flat = self.label_margins(groups, max_tokens) if groups else []
        out = []
        for start, count, where in plans:
            d = torch.tensor([v for row in flat[start:start + count] for v in row],
                             dtype=torch.float64)
            p_first = torch.sigmoid(d).tolist()          # p(A) of each context, in order
            values = []
            for index, flip in where:
                if index < 0:
                    values.append(0.5)
                    continue
                # Context 2i shows (first, second) as (A, B), context 2i + 1 as (B, A).
                q = (p_first[2 * index] + 1.0 - p_first[2 * index + 1]) / 2
                values.append(_symmetric(q, flip))
            out.append(values)
        return out


@torch.no_grad()
def label_margins(model, label_ids: list[int], groups, max_tokens: int, *,
                  attention: str = "auto") -> list[list[float]]:
    """z_A - z_B (the two label tokens' logits) after every context of `groups` [(prefix ids,
    [remainder ids, ...])], in order: packed no-grad passes of at most `max_tokens` tokens (a
    larger group alone), each context's prefix once; the LM head meets only the two label rows
    at each context's last token. attention: `vrpo_fast.logprobs.packed_body`'s."""
    device = next(model.parameters()).device
    rows = lm_head_weight(model)[label_ids]                                    # (2, D)

    def margins(prompt_ids, response_ids, budget):
        if attention == "sdpa":     # a dense mask scores every pair of its row
            budget = trainer_budget(None, device, prompt_ids, response_ids, attention)
        batch = pack_groups(prompt_ids, response_ids, max_tokens=budget,
                            **row_padding(device, attention)).to(device)
        last = packed_body(model, batch, attention=attention).flatten(0, 1)[batch.last_index]
        z = (last @ rows.T).float()                                            # (G * K, 2)
        return (z[:, 0] - z[:, 1]).reshape(batch.num_groups, batch.group_size)

    return packed_scores(margins, groups, max_tokens)


def load_judge(aux, device=None, *, what: str = "aux.path") -> PairJudge:
    """The judge of an AuxConfig (path, tokenizer, judge_template, judge_labels, judge_chat) on
    `device`, bf16 on a GPU, float32 elsewhere, in eval mode."""
    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(aux.path, dtype=dtype, what=what).to(device).eval()
    model.requires_grad_(False)
    tokenizer = load_tokenizer(aux.judge_tokenizer or aux.path, "aux.judge_tokenizer")
    return PairJudge(model, tokenizer, template=aux.judge_template, labels=aux.judge_labels,
                     chat=aux.judge_chat, source=what)


def pairs_of(responses: list) -> list[tuple]:
    """Consecutive pairs (r0, r1), (r2, r3), ... of a group's responses in the column order of
    the objective: the labelled pair, then the Monte Carlo pairs."""
    return list(zip(responses[0::2], responses[1::2]))
