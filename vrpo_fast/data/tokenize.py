"""Tokenization that reproduces what the model saw when the responses were sampled.

- prompt: the tokenizer's own special tokens once (BOS for Llama-style tokenizers); a
  conversational prompt goes through the chat template with the generation prompt, whose text
  already holds BOS, so it is tokenized without adding another;
- response: tokenized without special tokens, then EOS appended once (not if already there);
  sampled responses with recorded `sample_ids` use those ids exactly;
- truncation is explicit: prompts keep their END, responses keep their START; counted.
Tokenized data is cached under a fingerprint of the data, the tokenizer and the settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vrpo_fast.data.schema import PreferenceExample, TokenizedExample


def prompt_text(prompt, tokenizer) -> tuple[str, bool]:
    """(text, is_templated): a conversational prompt rendered with the generation prompt."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False,
                                             add_generation_prompt=True), True
    return prompt, False


def tokenize_prompt(prompt, tokenizer) -> list[int]:
    text, templated = prompt_text(prompt, tokenizer)
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    eos = tokenizer.eos_token_id
    if not templated and eos is not None and ids and ids[-1] == eos and \
            not text.endswith(tokenizer.eos_token or "\0"):
        ids = ids[:-1]  # tokenizers that append EOS to every input: a prompt must not end there
    return ids


def response_text(prompt, response, tokenizer) -> str:
    """The text that follows the prompt; for messages, the template's rendering of them."""
    if not isinstance(response, list):
        return response
    rendered_prompt, _ = prompt_text(prompt, tokenizer)
    full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
    if not full.startswith(rendered_prompt):
        # The template renders turns differently once the conversation goes on: fall back to
        # the assistant contents.
        return "".join(m["content"] for m in response)
    return full[len(rendered_prompt):]


def tokenize_response(prompt, response, tokenizer) -> list[int]:
    text = response_text(prompt, response, tokenizer)
    eos_text = tokenizer.eos_token
    if eos_text and text.endswith(eos_text):
        text = text[: -len(eos_text)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _with_eos(ids, tokenizer.eos_token_id)


def _with_eos(ids, eos):
    ids = list(ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def tokenize_example(ex: PreferenceExample, tokenizer, *, max_prompt_length: int | None = None,
                     max_response_length: int | None = None) -> TokenizedExample:
    prompt_ids = tokenize_prompt(ex.prompt, tokenizer)
    responses = []
    labelled_part = [ex.chosen, ex.rejected] if ex.labelled else []
    for r in labelled_part:
        responses.append(tokenize_response(ex.prompt, r, tokenizer))
    for i, s in enumerate(ex.samples):
        if ex.sample_ids is not None:
            responses.append(_with_eos(ex.sample_ids[i], tokenizer.eos_token_id))
        else:
            responses.append(tokenize_response(ex.prompt, s, tokenizer))
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        bos = tokenizer.bos_token_id
        keep_bos = bos is not None and prompt_ids[0] == bos
        tail = prompt_ids[-(max_prompt_length - keep_bos):] if max_prompt_length > keep_bos \
            else []
        prompt_ids = ([bos] if keep_bos else []) + tail
        truncated = True
    if max_response_length is not None:
        for i, r in enumerate(responses):
            if len(r) > max_response_length:
                responses[i] = r[:max_response_length]
                truncated = True
    return TokenizedExample(prompt_ids=prompt_ids, response_ids=responses,
                            aux_prefs=ex.aux_prefs, ref_logps=ex.ref_logps,
                            labelled=ex.labelled, row=ex.row, truncated=truncated)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def _fingerprint(examples, tokenizer, settings) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt, ex.chosen, ex.rejected, ex.samples, ex.aux_prefs,
                             ex.ref_logps, ex.sample_ids, ex.row]).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def tokenize_dataset(examples: list[PreferenceExample], tokenizer, *, cache_dir=None,
                     max_prompt_length: int | None = None,
                     max_response_length: int | None = None):
    """Tokenize every example (cached under a fingerprint); returns (examples, stats)."""
    settings = {"max_prompt_length": max_prompt_length,
                "max_response_length": max_response_length, "version": 1}
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"tokenized-{_fingerprint(examples, tokenizer, settings)}.json"
        if cache.is_file():
            rows = json.loads(cache.read_text())
            out = [TokenizedExample(**r) for r in rows]
            return out, {"truncated": sum(t.truncated for t in out), "cached": True}
    out = [tokenize_example(ex, tokenizer, max_prompt_length=max_prompt_length,
                            max_response_length=max_response_length) for ex in examples]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps([vars(t) for t in out]))
        tmp.replace(cache)
    return out, {"truncated": sum(t.truncated for t in out), "cached": False}


def preference_examples_to_rows(examples: list[PreferenceExample]) -> list[dict]:
    """The list form, which every loader here reads back (JSONL or Parquet)."""
    rows = []
    for ex in examples:
        row = {"prompt": ex.prompt}
        if ex.labelled:
            row["chosen"], row["rejected"] = ex.chosen, ex.rejected
        row["samples"] = list(ex.samples)
        if ex.sample_ids is not None:
            row["sample_ids"] = ex.sample_ids
        if ex.aux_prefs is not None:
            row["aux_prefs"] = ex.aux_prefs
        if ex.ref_logps is not None:
            row["ref_logps"] = ex.ref_logps
        rows.append(row)
    return rows
