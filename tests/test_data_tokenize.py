"""Tokenization: prompt ids + response ids are what the model saw (BOS once, EOS once, the chat
template's generation prompt), checked against tokenizing the joined text with the byte
tokenizer (exact everywhere) and a small BPE tokenizer trained here (exact at word boundaries,
different where a merge crosses the boundary); explicit, counted truncation; the cache."""

import random

import pytest

from vrpo_fast.data.schema import PreferenceExample
from vrpo_fast.data.tokenize import tokenize_dataset, tokenize_example, tokenize_prompt

CORPUS = ["the cat sat on the mat", "the hat is flat", "that cat is fat",
          "a rat sat on that hat", "is the mat flat"]


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenizer, BOS added like Llama 3's) trained
    on CORPUS, so that merges exist."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def joint(tokenizer, prompt, response):
    """The reference: the joined text tokenized in one go, then EOS."""
    return tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]


def pair(prompt, response):
    return PreferenceExample(prompt=prompt, chosen=response, rejected=response + "!")


def test_byte_tokenizer_round_trips_exactly_at_any_boundary(tokenizer):
    rng = random.Random(0)
    alphabet = "ab c,.\n\tÅé中😀-"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 30)))
        cut = rng.randint(1, len(text) - 1)
        prompt, response = text[:cut], text[cut:]
        t = tokenize_example(pair(prompt, response), tokenizer)
        ids = t.prompt_ids + t.response_ids[0]
        assert ids == joint(tokenizer, prompt, response)
        # Independent of the tokenizer's own call: BOS, one id per UTF-8 byte, EOS.
        assert len(ids) == 1 + len(text.encode("utf-8")) + 1
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.eos_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_bpe_round_trips_where_no_merge_crosses_the_boundary(bpe):
    merged = 0
    for sentence in CORPUS:
        words = sentence.split(" ")
        for k in range(1, len(words)):
            # The response starts with its space: the pre-tokenizer splits there, so no merge
            # can cross the boundary.
            prompt, response = " ".join(words[:k]), " " + " ".join(words[k:])
            t = tokenize_example(pair(prompt, response), bpe)
            assert t.prompt_ids + t.response_ids[0] == joint(bpe, prompt, response)
            merged += len(sentence.encode()) + 2 - len(t.prompt_ids + t.response_ids[0])
    assert merged > 50   # the tokenizer really merges (fewer ids than bytes)


def test_bpe_boundary_inside_a_merge_differs_and_byte_tokenizer_does_not(bpe, tokenizer):
    prompt, response = "th", "at cat"      # "that" is one BPE token
    t = tokenize_example(pair(prompt, response), bpe)
    split = t.prompt_ids + t.response_ids[0]
    whole = joint(bpe, prompt, response)
    assert bpe.convert_ids_to_tokens(whole)[1] == "that"
    assert split != whole and len(split) > len(whole)
    # Same text, different pieces: why sampled responses keep their exact ids (sample_ids).
    assert bpe.decode(split) == bpe.decode(whole)
    b = tokenize_example(pair(prompt, response), tokenizer)
    assert b.prompt_ids + b.response_ids[0] == joint(tokenizer, prompt, response)


def test_bos_is_never_doubled_and_eos_is_appended_once(tokenizer):
    from vrpo_fast.models import byte_tokenizer

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # A prompt whose text already holds the BOS text.
    ids = tokenize_prompt("<s>hello", tokenizer)
    assert ids.count(bos) == 1 and tokenizer.decode(ids) == "<s>hello"
    # A response already ending with EOS text gets no second EOS; an empty one is just EOS.
    t = tokenize_example(PreferenceExample(prompt="p", chosen="a</s>", rejected="</s>"),
                         tokenizer)
    assert t.response_ids == [tokenizer("a", add_special_tokens=False)["input_ids"] + [eos],
                              [eos]]
    # A tokenizer without BOS adds none.
    assert tokenize_prompt("hi", byte_tokenizer(add_bos=False)) == \
        tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_tokenizer_that_appends_eos_to_every_input(tokenizer):
    from tokenizers import processors

    from vrpo_fast.models import byte_tokenizer

    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    assert tok("hi")["input_ids"][-1] == tok.eos_token_id
    t = tokenize_example(pair("hi", " yo"), tok)
    assert t.prompt_ids == tokenizer("hi")["input_ids"]          # the prompt goes on: no EOS
    assert t.response_ids[0] == tokenizer(" yo", add_special_tokens=False)["input_ids"] + [1]


def test_chat_template_prompt_and_response_are_the_templated_conversation(tokenizer):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chosen = [{"role": "assistant", "content": "hello"}]
    rejected = [{"role": "assistant", "content": "go away"}]
    t = tokenize_example(PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected),
                         tokenizer)
    # The generation prompt opens the assistant turn, exactly as when sampling.
    assert t.prompt_ids == tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tokenizer.decode(t.prompt_ids).endswith("<|assistant|>")
    for response, ids in zip((chosen, rejected), t.response_ids):
        full = tokenizer.apply_chat_template(prompt + response, tokenize=True)["input_ids"]
        assert t.prompt_ids + ids == full
        assert (t.prompt_ids + ids).count(tokenizer.bos_token_id) == 1
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_template_text_after_the_turns_eos_is_not_part_of_the_response():
    from vrpo_fast.models import byte_tokenizer

    tok = byte_tokenizer(add_bos=False)
    # Qwen-style: each turn ends with EOS and a newline; no BOS.
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "{{ eos_token }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    prompt = [{"role": "user", "content": "hi"}]
    chosen = [{"role": "assistant", "content": "hello"}]
    t = tokenize_example(PreferenceExample(prompt=prompt, chosen=chosen, rejected=chosen), tok)
    full = tok.apply_chat_template(prompt + chosen, tokenize=True)["input_ids"]
    assert full[-2:] == [tok.eos_token_id, tok("\n", add_special_tokens=False)["input_ids"][0]]
    # Generation stops at EOS: the response is the conversation up to and including it.
    assert t.prompt_ids + t.response_ids[0] == full[:-1]


def test_truncation_keeps_the_prompts_end_and_the_responses_start(tokenizer):
    ex = PreferenceExample(prompt="abcdefghij", chosen="0123456789", rejected="xy",
                           samples=["klmnop", "q"])
    t = tokenize_example(ex, tokenizer, max_prompt_length=4, max_response_length=3)
    assert t.prompt_ids[0] == tokenizer.bos_token_id and len(t.prompt_ids) == 4
    assert tokenizer.decode(t.prompt_ids[1:]) == "hij"              # BOS + the last 3 bytes
    decoded = [tokenizer.decode(r) for r in t.response_ids]
    assert decoded == ["012", "xy</s>", "klm", "q</s>"]              # cut ones lose their EOS
    assert (t.truncated, t.prompt_truncated, t.responses_truncated) == (True, True, 2)
    untouched = tokenize_example(ex, tokenizer, max_prompt_length=11, max_response_length=11)
    assert not untouched.truncated and untouched.responses_truncated == 0


def test_max_length_cuts_the_prompt_only_as_far_as_needed(tokenizer):
    long_prompt = "p" * 40                  # 41 ids with BOS
    ex = PreferenceExample(prompt=long_prompt, chosen="c" * 29, rejected="r" * 4)   # 30, 5 ids
    t = tokenize_example(ex, tokenizer, max_length=24)
    # The responses are owed min(longest = 30, 24 // 2 = 12) tokens: the prompt keeps 12.
    assert len(t.prompt_ids) == 12 and t.prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(t.prompt_ids[1:]) == "p" * 11
    assert [tokenizer.decode(r) for r in t.response_ids] == ["c" * 12, "rrrr</s>"]
    assert all(len(t.prompt_ids) + len(r) <= 24 for r in t.response_ids)
    # A short prompt is never cut; responses take the room it leaves.
    short = PreferenceExample(prompt="hey", chosen="c" * 100, rejected="r")
    t = tokenize_example(short, tokenizer, max_length=30)
    assert tokenizer.decode(t.prompt_ids) == "<s>hey" and not t.prompt_truncated
    assert [len(r) for r in t.response_ids] == [26, 2] and t.responses_truncated == 1


def test_unlabelled_rows_have_only_their_samples(tokenizer):
    ex = PreferenceExample(prompt="Q", chosen=None, rejected=None, samples=[" a", " bc"])
    t = tokenize_example(ex, tokenizer)
    assert not t.labelled
    assert [tokenizer.decode(r) for r in t.response_ids] == [" a</s>", " bc</s>"]


def test_recorded_sample_ids_are_used_exactly(tokenizer):
    eos = tokenizer.eos_token_id
    # Stopped at EOS; cut at max_new_tokens; stopped by another stop id (an end-of-turn token).
    sampled = [[100, 101, eos], [102, 103], [104, 2]]
    ex = PreferenceExample(prompt="p", chosen="a", rejected="b",
                           samples=["zz", "q", "r", "s"], sample_ids=sampled + [[eos]])
    t = tokenize_example(ex, tokenizer)
    assert t.response_ids[2:] == sampled + [[eos]]      # nothing appended, nothing re-tokenized


def test_tokenized_data_is_cached_under_a_fingerprint(tokenizer, tmp_path, monkeypatch):
    import vrpo_fast.data.tokenize as tokenize_module
    from vrpo_fast.models import byte_tokenizer

    data = [pair("hello", " world"),
            PreferenceExample(prompt="x" * 20, chosen="y", rejected="z", aux_prefs=[0.5],
                              ref_logps=[-1.0, -2.0], row=2)]
    first, stats = tokenize_dataset(data, tokenizer, cache_dir=tmp_path, max_prompt_length=8)
    expected = [tokenize_example(ex, tokenizer, max_prompt_length=8) for ex in data]
    assert first == expected
    assert {k: stats[k] for k in ("rows", "truncated", "prompts_truncated", "cached")} == \
        {"rows": 2, "truncated": 1, "prompts_truncated": 1, "cached": False}

    # A hit reads the cache and tokenizes nothing.
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    with monkeypatch.context() as m:
        m.setattr(tokenize_module, "tokenize_example", refuse)
        again, stats = tokenize_dataset(data, tokenizer, cache_dir=tmp_path, max_prompt_length=8)
    assert again == expected and stats["cached"] and stats["truncated"] == 1

    # The key holds the data, the tokenizer (here: same vocabulary, no BOS) and the limits.
    changed = [pair("hello", " world!"), data[1]]
    for args, kwargs in [((changed, tokenizer), {"max_prompt_length": 8}),
                         ((data, byte_tokenizer(add_bos=False)), {"max_prompt_length": 8}),
                         ((data, tokenizer), {"max_prompt_length": 9}),
                         ((data, tokenizer), {"max_prompt_length": 8, "max_length": 40})]:
        out, stats = tokenize_dataset(*args, cache_dir=tmp_path, **kwargs)
        assert not stats["cached"]
        assert out == [tokenize_example(ex, args[1], **kwargs) for ex in args[0]]

    # A damaged cache file is rebuilt, not trusted.
    (cache,) = tmp_path.glob(f"tokenized-{stats['fingerprint']}.parquet")
    cache.write_bytes(b"garbage")
    out, stats = tokenize_dataset(data, tokenizer, cache_dir=tmp_path, max_prompt_length=8,
                                  max_length=40)
    assert not stats["cached"] and out == [
        tokenize_example(ex, tokenizer, max_prompt_length=8, max_length=40) for ex in data]
