"""Row validation: every problem of a row, each naming the row and the field.

Accepted columns (TRL's preference format plus VRPO's):
  prompt, chosen, rejected             strings, or conversational message lists
  (implicit prompt: chosen and rejected only, as full transcripts. Strings: the shared prefix up
   to the last "\\n\\nAssistant:" is the prompt, as in HH-RLHF; message lists: the shared
   leading messages are the prompt, stopping before the last shared assistant turn when one
   transcript contains the other)
  samples: [2M responses]              list form of the Monte Carlo responses
  a_1, a_2, ..., a_2M                  the reference implementation's form of the same
  aux_prefs: [1 + M]                   g(chosen > rejected), g(a_1 > a_2), g(a_3 > a_4), ...
  chosen_preference, rejected_preference, a_k_preference
                                       the reference form of g; each pair sums to 1
  ref_logps: [2 + 2M] (2M unlabelled)  reference log-probs (written by `vrpo-fast score`)
  sample_ids: [[ids], ...] (2M)        the exact sampled token ids (written by `vrpo-fast sample`)
  pair_ids: [[ids], [ids]]             the exact token ids of chosen and rejected when the pair
                                       was sampled (written by the on-policy rounds)
  domain: a string or an integer       the prompt's domain (group DRO, per-domain evaluation)
A row without chosen and rejected but with samples is an unlabelled prompt; its g keeps a 0.5
placeholder in the first slot. Other columns are ignored; a null value counts as absent.
"""

from __future__ import annotations

import math
import re

from vrpo_fast.data.schema import PreferenceExample, Problem
from vrpo_fast.data.tokenize import tokenize_example
from vrpo_fast.errors import UserError

__all__ = ["Problem", "split_implicit_prompt", "validate_row"]

_A_COLUMN = re.compile(r"^a_(\d+)$")
_A_PREF_COLUMN = re.compile(r"^a_(\d+)_preference$")
ASSISTANT = "\n\nAssistant:"
TOLERANCE = 1e-6


def split_implicit_prompt(chosen, rejected) -> tuple | None:
    """Full transcripts -> (prompt, chosen response, rejected response), or None if they share
    no prompt. Strings split after the last "\\n\\nAssistant:" of their common prefix (HH-RLHF);
    message lists after their common leading messages, or before the last assistant message
    they share when one contains the other."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == min(len(chosen), len(rejected)):
            # One transcript contains the other (identical ones too): as for strings, the
            # prompt stops before the last assistant turn they share.
            n = max((i for i in range(n) if chosen[i].get("role") == "assistant"), default=0)
        return (chosen[:n], chosen[n:], rejected[n:]) if n else None
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
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in value)


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


def _probability_problem(value) -> str | None:
    msg = _number_problem(value)
    if msg is None and not 0 <= value <= 1:
        msg = f"{value} is outside [0, 1]"
    return msg


def validate_row(raw, row: int, *, expected_samples: int | None = None, tokenizer=None,
                 max_length: int | None = None, unit: str = "line", prompts_only: bool = False,
                 max_prompt_length: int | None = None, max_response_length: int | None = None
                 ) -> tuple[PreferenceExample | None, list[Problem]]:
    """Normalise one raw row and find all its problems.

    raw: a dict, or an Exception for a row that could not be parsed (its message is reported).
    row: its 1-based line number (unit "line", JSONL) or 0-based index (unit "row").
    expected_samples: the number of samples (2M) every row must have; None skips that check.
    tokenizer: when given, every row is tokenized too (a chat template that refuses the messages,
        or sample_ids outside the vocabulary, are problems); with max_length, so is a prompt +
        response over max_length tokens after the max_prompt_length / max_response_length
        truncation, if any.
    prompts_only: rows may hold a prompt alone (the sampling stage's input).
    Returns (example, []) for a good row, (None, problems) for a bad one.
    """
    example, problems, _ = check_row(
        raw, row, expected_samples=expected_samples, tokenizer=tokenizer, max_length=max_length,
        unit=unit, prompts_only=prompts_only, max_prompt_length=max_prompt_length,
        max_response_length=max_response_length)
    return example, problems


def check_row(raw, row: int, *, expected_samples: int | None = None, tokenizer=None,
              max_length: int | None = None, unit: str = "line", prompts_only: bool = False,
              max_prompt_length: int | None = None, max_response_length: int | None = None
              ) -> tuple[PreferenceExample | None, list[Problem], int | None]:
    """validate_row, plus the row's number of samples (None when unreadable), which
    `load.validate_file` compares across the file even for rows that are bad otherwise."""
    problems: list[Problem] = []

    def bad(field: str, message: str) -> None:
        problems.append(Problem(row, field, message, unit))

    if isinstance(raw, Exception):
        bad("", str(raw))
        return None, problems, None
    raw = {k: v for k, v in raw.items() if v is not None}
    prompt, chosen, rejected = raw.get("prompt"), raw.get("chosen"), raw.get("rejected")
    implicit = prompt is None and chosen is not None and rejected is not None
    prompt_problem = None
    if implicit:
        prompt, chosen, rejected, prompt_problem = _implicit_prompt(chosen, rejected)

    samples = _samples(raw, bad)
    domain = raw.get("domain")
    if isinstance(domain, bool) or not isinstance(domain, (str, int, type(None))) \
            or domain == "":
        bad("domain", f"expected a non-empty string or an integer, got {domain!r:.40}")
    labelled = chosen is not None or rejected is not None
    if (msg := prompt_problem or _text_problem(prompt)) is not None:
        bad("prompt", msg)
    sample_names = [f"samples[{i}]" if "samples" in raw else f"a_{i + 1}"
                    for i in range(len(samples or []))]
    texts = list(zip(sample_names, samples or []))
    if labelled or not (samples or prompts_only):
        texts = [("chosen", chosen), ("rejected", rejected)] + texts
    for name, value in texts:
        if implicit and name in ("chosen", "rejected") and value in ("", []):
            bad(name, "nothing left once the prompt shared with the other response is taken "
                      "off")
        elif (msg := _text_problem(value)) is not None:
            bad(name, msg)
        elif isinstance(prompt, (str, list)) and isinstance(value, str) != isinstance(prompt, str):
            bad(name, f"{'a string' if isinstance(value, str) else 'a message list'}, but the "
                      f"prompt is {'a string' if isinstance(prompt, str) else 'a message list'}: "
                      f"a row is all text or all messages")
    if samples is not None and expected_samples is not None and len(samples) != expected_samples:
        bad("samples", f"{len(samples)} samples, but the file's other rows have "
                       f"{expected_samples}")
    if samples is None:   # M unknown: the lengths of the per-pair columns cannot be checked
        return None, problems, None
    M = len(samples) // 2
    aux = _aux_prefs(raw, M, labelled, bad)
    ref = _ref_logps(raw, M, labelled, bad)
    sample_ids = _sample_ids(raw, len(samples), tokenizer, bad)
    pair_ids = _sample_ids(raw, 2, tokenizer, bad, key="pair_ids") if labelled else None
    if problems:
        return None, problems, len(samples)
    example = PreferenceExample(prompt=prompt, chosen=chosen if labelled else None,
                                rejected=rejected if labelled else None, samples=list(samples),
                                aux_prefs=aux, ref_logps=ref, sample_ids=sample_ids,
                                pair_ids=pair_ids, row=row,
                                domain=None if domain is None else str(domain))
    if tokenizer is not None:
        names = (["chosen", "rejected"] if labelled else []) + sample_names
        _check_tokenized(example, names, tokenizer, max_length, max_prompt_length,
                         max_response_length, bad)
    return (None if problems else example), problems, len(samples)


def _implicit_prompt(chosen, rejected):
    """No prompt column: take it from the shared start of two full transcripts.
    Returns (prompt, chosen, rejected, why the prompt is missing or None)."""
    both_text = isinstance(chosen, str) and isinstance(rejected, str)
    both_messages = _is_messages(chosen) and _is_messages(rejected)
    if not (both_text or both_messages):
        return None, chosen, rejected, None     # plain "missing", plus what is wrong with them
    split = split_implicit_prompt(chosen, rejected)
    if split is None:
        shared = "prefix ending with '\\n\\nAssistant:'" if both_text else "leading message"
        return None, chosen, rejected, (f"missing, and chosen and rejected share no {shared} "
                                        f"to take it from")
    return (*split, None)


def _samples(raw, bad) -> list | None:
    """The 2M Monte Carlo responses, from `samples` or a_1 .. a_2M; None if malformed."""
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
            return None
        return samples
    if not a_cols:
        return []
    numbers = {n for n, _ in a_cols}
    ok = True
    for n in sorted(numbers):
        partner = n + 1 if n % 2 else n - 1
        if n == 0:
            bad("a_0", "sample columns start at a_1")
            ok = False
        elif partner not in numbers:
            bad(f"a_{n}", f"a_{n} present without its pair a_{partner}")
            ok = False
    top = max(numbers)
    gaps = [n for n in range(1, top + 1) if n not in numbers and (n + 1 if n % 2 else n - 1)
            not in numbers]
    if ok and gaps:
        bad(f"a_{top}", f"a_{top} present but a_{gaps[0]} is missing: samples are numbered "
                        f"1 .. 2M without gaps")
        ok = False
    return [raw[f"a_{n}"] for n in range(1, top + 1)] if ok else None


def _aux_prefs(raw, M: int, labelled: bool, bad) -> list[float] | None:
    ref_form = [k for k in raw if k in ("chosen_preference", "rejected_preference")
                or _A_PREF_COLUMN.match(k)]
    if "aux_prefs" in raw:
        if ref_form:
            bad("aux_prefs", f"give either aux_prefs or {ref_form[0]}-style columns, not both")
            return None
        values = raw["aux_prefs"]
        if not isinstance(values, list) or len(values) != 1 + M:
            bad("aux_prefs", f"expected a list of 1 + M = {1 + M} probabilities, got "
                             f"{values!r:.60}")
            return None
        ok = True
        for i, v in enumerate(values):
            if (msg := _probability_problem(v)) is not None:
                bad(f"aux_prefs[{i}]", msg)
                ok = False
        return [float(v) for v in values] if ok else None
    if not ref_form:
        return None
    names = [("chosen_preference", "rejected_preference")] + [
        (f"a_{2 * m - 1}_preference", f"a_{2 * m}_preference") for m in range(1, M + 1)]
    known = {n for pair in names for n in pair}
    ok = True
    for k in ref_form:
        if k not in known:
            bad(k, f"{k} without its sample {k[:-len('_preference')]}")
            ok = False
    values = []
    for first, second in names:
        if first not in raw and second not in raw:
            if first == "chosen_preference" and not labelled:
                values.append(0.5)  # unlabelled rows have no labelled pair to weigh
                continue
            bad(first, f"missing: {first} and {second} give g for this pair")
            ok = False
            continue
        if first not in raw or second not in raw:
            bad(second if first in raw else first, "missing: preferences come in pairs")
            ok = False
            continue
        p, q = raw[first], raw[second]
        pair_ok = True
        for name, v in ((first, p), (second, q)):
            if (msg := _probability_problem(v)) is not None:
                bad(name, msg)
                pair_ok = False
        if pair_ok and abs(p + q - 1) > TOLERANCE:
            bad(second, f"{first} + {second} = {p + q:.8g}, not 1")
            pair_ok = False
        ok = ok and pair_ok
        values.append(float(p))
    return values if ok else None


def _ref_logps(raw, M: int, labelled: bool, bad) -> list[float] | None:
    if "ref_logps" not in raw:
        return None
    values = raw["ref_logps"]
    n = (2 if labelled else 0) + 2 * M
    if not isinstance(values, list) or len(values) != n:
        what = "2 + 2M" if labelled else "2M (unlabelled row)"
        bad("ref_logps", f"expected a list of {what} = {n} log-probs, got {values!r:.60}")
        return None
    ok = True
    for i, v in enumerate(values):
        if (msg := _number_problem(v)) is not None:
            bad(f"ref_logps[{i}]", msg)
            ok = False
        elif v > 1e-4:  # a little slack for float32 sums of log-probs that round above 0
            bad(f"ref_logps[{i}]", f"{v} > 0 is not a log-probability")
            ok = False
    return [float(v) for v in values] if ok else None


def _sample_ids(raw, n_samples: int, tokenizer, bad, key: str = "sample_ids"
                ) -> list[list[int]] | None:
    """The token-id lists of column `key` (sample_ids: one per sample; pair_ids: chosen's and
    rejected's)."""
    if raw.get(key) is None:
        return None
    ids = raw[key]
    if not isinstance(ids, list) or len(ids) != n_samples:
        bad(key, f"expected one token-id list per {'sample' if key == 'sample_ids' else 'response'}"
                 f" ({n_samples}), got {ids!r:.60}")
        return None
    vocab = len(tokenizer) if tokenizer is not None else None
    for i, seq in enumerate(ids):
        if not isinstance(seq, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in seq):
            bad(f"{key}[{i}]", f"expected a list of token ids, got {seq!r:.60}")
            return None
        if not seq:
            bad(f"{key}[{i}]", "no token ids (a sampled response has at least its stop token)")
            return None
        if vocab is not None and max(seq) >= vocab:
            bad(f"{key}[{i}]", f"token id {max(seq)} is outside the tokenizer's vocabulary "
                               f"({vocab})")
            return None
    return [list(seq) for seq in ids]


def _check_tokenized(example, names, tokenizer, max_length, max_prompt_length,
                     max_response_length, bad) -> None:
    if isinstance(example.prompt, list) and getattr(tokenizer, "chat_template", None) is None:
        bad("prompt", "a message list, but the tokenizer has no chat template to render it")
        return
    try:
        tok = tokenize_example(example, tokenizer, max_prompt_length=max_prompt_length,
                               max_response_length=max_response_length)
    except UserError as err:  # the chat template refuses the messages
        bad("prompt", str(err))
        return
    if max_length is None:
        return
    for name, resp in zip(names, tok.response_ids):
        total = len(tok.prompt_ids) + len(resp)
        if total > max_length:
            bad(name, f"prompt + response is {total} tokens, over the maximum length "
                      f"{max_length}")
