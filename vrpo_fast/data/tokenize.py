"""Tokenization that reproduces what the model saw when the responses were sampled.

Responses are packed behind ONE copy of their prompt, so prompt ids + response ids must be the
sequence the model conditions on:
- prompt: a string is tokenized with the tokenizer's own special tokens (BOS once, even when the
  text already starts with the BOS text; a trailing EOS some tokenizers add is dropped);
  messages go through the chat template with the generation prompt and are tokenized without
  adding special tokens, exactly as `apply_chat_template(..., tokenize=True)` and vLLM's chat
  entry point do (a template that wants BOS writes it itself);
- response: tokenized without special tokens, then EOS appended once (not if the text already
  ends with it); a message response is the template's rendering of prompt + response after the
  rendered prompt, cut after its last EOS (generation stops there); sampled responses with
  recorded `sample_ids` use those ids exactly, stop token included, nothing appended
  (re-tokenizing text can merge differently);
- truncation is explicit and counted: a prompt keeps its END (and its BOS), a response its
  START (so a cut response has no EOS). With max_length, a prompt gives up its start only as far
  as needed to leave min(longest response, max_length // 2) tokens for the responses, and the
  responses are then cut to the room left.
A tokenizer that merges across the prompt/response boundary can give prompt + response ids that
differ from tokenizing the joined text; a byte-level tokenizer never does (see the tests).
Tokenized data is cached (Parquet) under a fingerprint of the data, the tokenizer and the limits.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from vrpo_fast.data.schema import PreferenceExample, TokenizedExample
from vrpo_fast.errors import UserError

CACHE_VERSION = 3   # bump when the tokenization rules change: old caches are then ignored


def _render_messages(messages, tokenizer, *, add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("prompt: conversational (message list) data, but the tokenizer has no "
                        "chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises for messages a template refuses (role order, ...)
        raise UserError(f"the tokenizer's chat template refuses these messages: "
                        f"{type(err).__name__}: {err}") from None


def prompt_text(prompt, tokenizer) -> tuple[str, bool]:
    """(text, is_templated): a conversational prompt rendered with the generation prompt."""
    if isinstance(prompt, list):
        return _render_messages(prompt, tokenizer, add_generation_prompt=True), True
    return prompt, False


def tokenize_prompt(prompt, tokenizer) -> list[int]:
    """prompt: a string or messages -> (P,) ids, BOS at most once, never ending with an added
    EOS."""
    text, templated = prompt_text(prompt, tokenizer)
    ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if not templated:
        if bos is not None and ids[:2] == [bos, bos] and text.startswith(tokenizer.bos_token):
            ids = ids[1:]    # the text held BOS already and the tokenizer added its own
        if eos is not None and ids and ids[-1] == eos and not text.endswith(tokenizer.eos_token):
            ids = ids[:-1]   # tokenizers that append EOS to every input: a prompt goes on
    return ids


def response_text(prompt, response, tokenizer) -> str:
    """The text that follows the prompt; for messages, the template's rendering of them."""
    if not isinstance(response, list):
        return response
    rendered_prompt, _ = prompt_text(prompt, tokenizer)
    full = _render_messages(list(prompt) + list(response), tokenizer,
                            add_generation_prompt=False)
    if not full.startswith(rendered_prompt):
        # Templates that render earlier turns differently once the conversation goes on (e.g.
        # dropping reasoning): the assistant contents are the best available approximation.
        return "".join(m["content"] for m in response)
    text = full[len(rendered_prompt):]
    eos_text = tokenizer.eos_token
    if eos_text and eos_text in text:
        # What a template writes after the turn's EOS (a newline) is never generated.
        text = text[:text.rindex(eos_text) + len(eos_text)]
    return text


def tokenize_response(prompt, response, tokenizer) -> list[int]:
    """(R,) ids of a response (string or messages) behind its prompt, ending with one EOS."""
    text = response_text(prompt, response, tokenizer)
    eos_text = tokenizer.eos_token
    if eos_text and text.endswith(eos_text):
        text = text[: -len(eos_text)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return _with_eos(ids, tokenizer.eos_token_id)


def _with_eos(ids, eos) -> list[int]:
    ids = list(ids)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def _keep_end(prompt_ids: list[int], limit: int, bos) -> list[int]:
    """The last `limit` tokens of a prompt, its leading BOS kept (it counts toward the limit)."""
    keep_bos = bos is not None and bool(prompt_ids) and prompt_ids[0] == bos
    tail = limit - keep_bos
    return ([bos] if keep_bos else []) + (prompt_ids[-tail:] if tail > 0 else [])


def check_limits(*, max_prompt_length=None, max_response_length=None, max_length=None) -> None:
    """Token limits are positive integers; max_length >= 2 leaves room for a prompt token and
    a response token."""
    for name, value, least in (("max_prompt_length", max_prompt_length, 1),
                               ("max_response_length", max_response_length, 1),
                               ("max_length", max_length, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < least):
            raise UserError(f"data.{name}: must be an integer >= {least}, got {value!r}")


def tokenize_example(ex: PreferenceExample, tokenizer, *, max_prompt_length: int | None = None,
                     max_response_length: int | None = None, max_length: int | None = None
                     ) -> TokenizedExample:
    """Token ids of one example: prompt_ids (P,), response_ids (K,) lists in the order of
    ex.responses (chosen, rejected for labelled rows, then a_1 .. a_2M), truncated as the module
    docstring says."""
    check_limits(max_prompt_length=max_prompt_length, max_response_length=max_response_length,
                 max_length=max_length)
    prompt_ids = tokenize_prompt(ex.prompt, tokenizer)
    responses = []
    if ex.labelled and ex.pair_ids is not None:     # a sampled pair: exactly as sampled
        responses += [list(ids) for ids in ex.pair_ids]
    elif ex.labelled:
        responses += [tokenize_response(ex.prompt, r, tokenizer)
                      for r in (ex.chosen, ex.rejected)]
    for i, s in enumerate(ex.samples):
        if ex.sample_ids is not None:
            # Exactly as sampled: a response stopped by another stop id (an end-of-turn token)
            # or cut at max_new_tokens gets no EOS the model never produced.
            responses.append(list(ex.sample_ids[i]))
        else:
            responses.append(tokenize_response(ex.prompt, s, tokenizer))
    P = len(prompt_ids)
    bos = tokenizer.bos_token_id
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = _keep_end(prompt_ids, max_prompt_length, bos)
    limits = [max_response_length] if max_response_length is not None else []
    if max_length is not None and responses:
        longest = min([max(map(len, responses))] + limits)
        wanted = min(longest, max(1, max_length // 2))
        if len(prompt_ids) > max_length - wanted:
            prompt_ids = _keep_end(prompt_ids, max_length - wanted, bos)
        limits.append(max_length - len(prompt_ids))
    cut = 0
    if limits:
        room = min(limits)
        cut = sum(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
    prompt_cut = len(prompt_ids) < P
    return TokenizedExample(prompt_ids=prompt_ids, response_ids=responses,
                            aux_prefs=ex.aux_prefs, ref_logps=ex.ref_logps,
                            labelled=ex.labelled, row=ex.row, truncated=prompt_cut or cut > 0,
                            prompt_truncated=prompt_cut, responses_truncated=cut)


# A text whose ids show what a tokenizer without a serialisable pipeline does.
PROBE = "Hello, world! 1234 \u00e9\u00e8 \u4f60\u597d \n\n  tabs\tand   spaces"


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides the token ids: the vocabulary, chat template and BOS/EOS ids,
    plus the full pipeline of a fast tokenizer (merges, normaliser, the post-processor that adds
    BOS) or, for a slow one, the ids of a probe text. Provenance records it (samples are refused
    under another tokenizer) and the tokenization cache is keyed by it."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    vocab = h.hexdigest()
    h = hashlib.sha256(vocab.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer(PROBE)["input_ids"]).encode())
    return h.hexdigest()


def dataset_fingerprint(examples, tokenizer, settings: dict) -> str:
    """Hex digest of the examples (every field), the tokenizer and the tokenization settings."""
    h = hashlib.sha256()
    for ex in examples:
        pair = [ex.pair_ids] if ex.pair_ids is not None else []   # older caches keep their key
        h.update(json.dumps([ex.prompt, ex.chosen, ex.rejected, ex.samples, ex.aux_prefs,
                             ex.ref_logps, ex.sample_ids, ex.row, *pair],
                            sort_keys=True).encode())
        h.update(b"\n")
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps({**settings, "version": CACHE_VERSION}, sort_keys=True).encode())
    return h.hexdigest()[:24]


def _cache_schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([("prompt_ids", ids), ("response_ids", pa.list_(ids)),
                      ("aux_prefs", pa.list_(pa.float64())), ("ref_logps", pa.list_(pa.float64())),
                      ("labelled", pa.bool_()), ("row", pa.int64()), ("truncated", pa.bool_()),
                      ("prompt_truncated", pa.bool_()), ("responses_truncated", pa.int32())])


def _read_cache(path: Path) -> list[TokenizedExample] | None:
    import pyarrow.parquet as pq

    try:
        return [TokenizedExample(**r) for r in pq.read_table(path).to_pylist()]
    except (OSError, ValueError, TypeError):   # damaged or from another layout: rebuild it
        return None


def _write_cache(path: Path, examples: list[TokenizedExample]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name per process: under torchrun every rank may write the same cache.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.Table.from_pylist([vars(t) for t in examples], schema=_cache_schema()), tmp)
    tmp.replace(path)


def _stats(out: list[TokenizedExample], cached: bool, fingerprint: str) -> dict:
    return {"rows": len(out), "truncated": sum(t.truncated for t in out),
            "prompts_truncated": sum(t.prompt_truncated for t in out),
            "responses_truncated": sum(t.responses_truncated for t in out),
            "cached": cached, "fingerprint": fingerprint}


def tokenize_dataset(examples: list[PreferenceExample], tokenizer, *, cache_dir=None,
                     max_prompt_length: int | None = None,
                     max_response_length: int | None = None, max_length: int | None = None
                     ) -> tuple[list[TokenizedExample], dict]:
    """Tokenize every example, reusing `cache_dir/tokenized-<fingerprint>.parquet` when the
    data, the tokenizer and the limits are unchanged.

    Returns (tokenized, stats): stats holds rows, truncated (rows with any cut),
    prompts_truncated, responses_truncated (responses cut), cached (read from the cache) and the
    fingerprint.
    """
    settings = {"max_prompt_length": max_prompt_length,
                "max_response_length": max_response_length, "max_length": max_length}
    fingerprint = dataset_fingerprint(examples, tokenizer, settings)
    cache = None if cache_dir is None else \
        Path(cache_dir) / f"tokenized-{fingerprint}.parquet"
    if cache is not None and cache.is_file():
        out = _read_cache(cache)
        if out is not None and len(out) == len(examples):
            return out, _stats(out, True, fingerprint)
    out = [tokenize_example(ex, tokenizer, **settings) for ex in examples]
    if cache is not None:
        _write_cache(cache, out)
    return out, _stats(out, False, fingerprint)


def preference_examples_to_rows(examples: list[PreferenceExample]) -> list[dict]:
    """The inverse of loading: rows in the list form (prompt, chosen, rejected, samples,
    sample_ids, aux_prefs, ref_logps, domain), which every loader here reads back. Unlabelled
    rows have no chosen/rejected; absent optional columns are left out.
    load.write_preference_data writes them to JSONL or Parquet."""
    rows = []
    for ex in examples:
        row = {"prompt": ex.prompt}
        if ex.labelled:
            row["chosen"], row["rejected"] = ex.chosen, ex.rejected
        row["samples"] = list(ex.samples)
        if ex.sample_ids is not None:
            row["sample_ids"] = ex.sample_ids
        if ex.pair_ids is not None:
            row["pair_ids"] = ex.pair_ids
        if ex.aux_prefs is not None:
            row["aux_prefs"] = ex.aux_prefs
        if ex.ref_logps is not None:
            row["ref_logps"] = ex.ref_logps
        if ex.domain is not None:
            row["domain"] = ex.domain
        rows.append(row)
    return rows
