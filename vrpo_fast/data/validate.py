"""Row validation: every problem of a row, each naming the row and the field.

Accepted columns (TRL's preference format plus VRPO's):
  prompt, chosen, rejected             strings, or conversational message lists
  (implicit prompt: only chosen and rejected, full transcripts sharing a prefix that ends with
   the last "\\n\\nAssistant:", as in HH-RLHF)
  samples: [2M responses]              list form of the Monte Carlo responses
  a_1, a_2, ..., a_2M                  the reference implementation's form of the same
  aux_prefs: [1 + M]                   g(chosen > rejected), g(a_1 > a_2), g(a_3 > a_4), ...
  chosen_preference, rejected_preference, a_k_preference   the reference form of g (pairs sum to 1)
  ref_logps: [2 + 2M]                  reference log-probs (written by `vrpo-fast score`)
  sample_ids: [[ids], ...]             the exact sampled token ids (written by `vrpo-fast sample`)
A row without chosen and rejected but with samples is an unlabelled prompt.
"""

from __future__ import annotations

import math
import re

from vrpo_fast.data.schema import PreferenceExample, Problem

_A_COLUMN = re.compile(r"^a_(\d+)$")
ASSISTANT = "\n\nAssistant:"
TOLERANCE = 1e-6


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """HH-style transcripts -> (prompt, chosen response, rejected response), or None."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"),
                                                                               str)
        for m in value)


def _text_problem(value) -> str | None:
    if value is None:
        return "missing"
    if isinstance(value, str):
        # Whitespace is text (a model can answer with a newline); only "" is empty.
        return "empty string" if value == "" else None
    if isinstance(value, list):
        if not value:
            return "empty message list"
        if not _is_messages(value):
            return "expected a string or a list of {role, content} messages"
        if not any(m["content"] for m in value):
            return "messages with empty content"
        return None
    return f"expected text, got {type(value).__name__} {value!r:.40}"


def _number_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"expected a number, got {value!r:.40}"
    if not math.isfinite(value):
        return f"not a finite number ({value})"
    return None


class RowValidator:
    """Checks rows one by one; remembers the sample count of the first good row so that a row
    with a different number of samples is caught."""

    def __init__(self, *, unit: str = "line", tokenizer=None, max_length: int | None = None,
                 prompts_only: bool = False):
        self.unit, self.tokenizer, self.max_length = unit, tokenizer, max_length
        # The sampling stage reads prompts: rows without any response are fine there.
        self.prompts_only = prompts_only
        self.expected_samples: int | None = None

    def check(self, raw, row: int) -> tuple[PreferenceExample | None, list[Problem]]:
        problems: list[Problem] = []

        def bad(field, message):
            problems.append(Problem(row, field, message, self.unit))

        if isinstance(raw, Exception):
            bad("", str(raw))
            return None, problems
        raw = {k: v for k, v in raw.items() if v is not None}
        prompt, chosen, rejected = raw.get("prompt"), raw.get("chosen"), raw.get("rejected")
        if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
            split = split_implicit_prompt(chosen, rejected)
            if split is None:
                bad("prompt", "missing, and chosen/rejected share no prefix ending with "
                              "'\\n\\nAssistant:' to take it from")
                return None, problems
            prompt, chosen, rejected = split

        samples = self._samples(raw, bad)
        labelled = chosen is not None or rejected is not None
        if (msg := _text_problem(prompt)) is not None:
            bad("prompt", msg)
        if labelled or not (samples or self.prompts_only):
            for name, value in (("chosen", chosen), ("rejected", rejected)):
                if (msg := _text_problem(value)) is not None:
                    bad(name, msg)
        for i, s in enumerate(samples or []):
            if (msg := _text_problem(s)) is not None:
                bad(f"samples[{i}]" if "samples" in raw else f"a_{i + 1}", msg)
        if samples is not None and self.expected_samples is not None and \
                len(samples) != self.expected_samples:
            bad("samples", f"{len(samples)} samples, but the file's other rows have "
                           f"{self.expected_samples}")
        M = len(samples or []) // 2
        aux = self._aux_prefs(raw, M, labelled, bad)
        ref = self._ref_logps(raw, M, labelled, bad)
        sample_ids = raw.get("sample_ids")
        if problems:
            return None, problems
        example = PreferenceExample(prompt=prompt, chosen=chosen if labelled else None,
                                    rejected=rejected if labelled else None,
                                    samples=list(samples or []), aux_prefs=aux, ref_logps=ref,
                                    sample_ids=sample_ids, row=row)
        if self.tokenizer is not None and self.max_length is not None:
            self._check_length(example, bad)
        if problems:
            return None, problems
        if self.expected_samples is None:
            self.expected_samples = len(example.samples)
        return example, problems

    def _samples(self, raw, bad):
        a_cols = sorted((int(m.group(1)), k) for k in raw if (m := _A_COLUMN.match(k)))
        if "samples" in raw:
            samples = raw["samples"]
            if not isinstance(samples, list):
                bad("samples", f"expected a list of responses, got {type(samples).__name__}")
                return None
            if len(samples) % 2:
                bad("samples", f"{len(samples)} samples: Monte Carlo responses come in pairs")
                return None
            if a_cols:
                bad("samples", "give either a samples list or a_1, a_2, ... columns, not both")
            return samples
        if not a_cols:
            return []
        numbers = [n for n, _ in a_cols]
        top = max(numbers)
        if top % 2:
            bad(f"a_{top}", f"a_{top} present without its pair a_{top + 1}")
            return None
        missing = [n for n in range(1, top + 1) if n not in numbers]
        if missing:
            n = missing[0]
            partner = n + 1 if n % 2 else n - 1
            bad(f"a_{partner}", f"a_{partner} present without its pair a_{n}")
            return None
        return [raw[f"a_{n}"] for n in range(1, top + 1)]

    def _aux_prefs(self, raw, M, labelled, bad):
        if "aux_prefs" in raw:
            values = raw["aux_prefs"]
            if not isinstance(values, list) or len(values) != 1 + M:
                bad("aux_prefs", f"expected a list of 1 + M = {1 + M} probabilities, got "
                                 f"{values!r:.60}")
                return None
            ok = True
            for i, v in enumerate(values):
                if (msg := _number_problem(v)) is not None or not 0 <= v <= 1:
                    bad(f"aux_prefs[{i}]", msg or f"{v} is outside [0, 1]")
                    ok = False
            return list(map(float, values)) if ok else None
        names = [("chosen_preference", "rejected_preference")] + [
            (f"a_{2 * m - 1}_preference", f"a_{2 * m}_preference") for m in range(1, M + 1)]
        if not any(a in raw or b in raw for a, b in names):
            return None
        values = []
        for first, second in names:
            if first not in raw or second not in raw:
                missing = second if first in raw else first
                if first == "chosen_preference" and not labelled:
                    values.append(0.5)  # unlabelled rows have no labelled pair to weigh
                    continue
                bad(missing, "missing: preferences come in pairs")
                continue
            p, q = raw[first], raw[second]
            pair_ok = True
            for name, v in ((first, p), (second, q)):
                if (msg := _number_problem(v)) is not None:
                    bad(name, msg)
                    pair_ok = False
                elif not 0 <= v <= 1:
                    bad(name, f"{v} is outside [0, 1]")
                    pair_ok = False
            if pair_ok and abs(p + q - 1) > TOLERANCE:
                bad(second, f"{first} + {second} = {p + q:.8g}, not 1")
                pair_ok = False
            values.append(float(p) if pair_ok else None)
        return None if any(v is None for v in values) else values

    def _ref_logps(self, raw, M, labelled, bad):
        if "ref_logps" not in raw:
            return None
        values = raw["ref_logps"]
        n = (2 if labelled else 0) + 2 * M
        if not isinstance(values, list) or len(values) != n:
            bad("ref_logps", f"expected a list of {n} log-probs, got {values!r:.60}")
            return None
        for i, v in enumerate(values):
            if (msg := _number_problem(v)) is not None:
                bad(f"ref_logps[{i}]", msg)
                return None
            if v > 1e-4:
                bad(f"ref_logps[{i}]", f"{v} > 0 is not a log-probability")
                return None
        return list(map(float, values))

    def _check_length(self, example, bad):
        from vrpo_fast.data.tokenize import tokenize_example

        tok = tokenize_example(example, self.tokenizer)
        names = (["chosen", "rejected"] if example.labelled else []) + [
            f"samples[{i}]" for i in range(len(example.samples))]
        for name, resp in zip(names, tok.response_ids):
            total = len(tok.prompt_ids) + len(resp)
            if total > self.max_length:
                bad(name, f"prompt + response is {total} tokens, over the maximum length "
                          f"{self.max_length}")
