"""Data: every format, every problem class with its line and field, the skip policy, and
tokenization that matches what the model saw."""

import json
from pathlib import Path

import pytest

from vrpo_fast.cli import main as cli_main
from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.schema import PreferenceExample
from vrpo_fast.data.tokenize import (
    preference_examples_to_rows,
    tokenize_dataset,
    tokenize_example,
)
from vrpo_fast.errors import UserError

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "hh-rlhf-harmless-base-test.jsonl.gz"

GOOD_LIST = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "samples": ["a", "b", "c", "d"],
             "aux_prefs": [0.9, 0.5, 0.25], "ref_logps": [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]}
GOOD_REF_FORM = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "a_1": "a", "a_2": "b",
                 "chosen_preference": 0.8, "rejected_preference": 0.2,
                 "a_1_preference": 0.4, "a_2_preference": 0.6}
CONV = {"prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
        "samples": [[{"role": "assistant", "content": "hey"}],
                    [{"role": "assistant", "content": "yo"}]],
        "aux_prefs": [0.7, 0.5]}


def write_jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def check(path, capsys, *extra):
    rc = cli_main(["check-data", str(path), *extra])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return rc, out.out.strip().splitlines()


def with_(base, **changes):
    row = dict(base)
    for k, v in changes.items():
        if v is ...:
            row.pop(k, None)
        else:
            row[k] = v
    return row


# (row, expected line fragment) for every problem class, in both column forms.
BAD_ROWS = [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (with_(GOOD_LIST, prompt=...), "line 2: field 'prompt': missing"),
    (with_(GOOD_LIST, chosen=""), "line 2: field 'chosen': empty string"),
    (with_(GOOD_LIST, prompt=""), "line 2: field 'prompt': empty string"),
    (with_(GOOD_LIST, rejected=...), "line 2: field 'rejected': missing"),
    (with_(GOOD_LIST, chosen=42), "line 2: field 'chosen': expected text, got int"),
    (with_(GOOD_LIST, prompt={"a": 1}), "line 2: field 'prompt': expected text, got dict"),
    (with_(GOOD_LIST, samples=["a", 3, "c", "d"]), "line 2: field 'samples[1]': expected text"),
    (with_(GOOD_LIST, samples=["a", "b", "c"], aux_prefs=[0.5, 0.5]),
     "line 2: field 'samples': 3 samples: Monte Carlo responses come in pairs"),
    (with_(GOOD_LIST, samples=["a", "b"], aux_prefs=[0.5, 0.5], ref_logps=[-1.0] * 4),
     "line 2: field 'samples': 2 samples, but the file's other rows have 4"),
    (with_(GOOD_LIST, aux_prefs=[0.9, float("nan"), 0.2]), "field 'aux_prefs[1]': not a finite"),
    (with_(GOOD_LIST, aux_prefs=[0.9, 1.5, 0.2]), "field 'aux_prefs[1]': 1.5 is outside [0, 1]"),
    (with_(GOOD_LIST, aux_prefs=[0.9, "x", 0.2]), "field 'aux_prefs[1]': expected a number"),
    (with_(GOOD_LIST, aux_prefs=[0.9]), "field 'aux_prefs': expected a list of 1 + M = 3"),
    (with_(GOOD_LIST, ref_logps=[-1.0] * 5), "field 'ref_logps': expected a list of 6"),
    # the reference implementation's form
    (with_(GOOD_REF_FORM, a_2=...), "line 2: field 'a_1': a_1 present without its pair a_2"),
    (with_(GOOD_REF_FORM, a_1=...), "line 2: field 'a_2': a_2 present without its pair a_1"),
    (with_(GOOD_REF_FORM, a_2=""), "line 2: field 'a_2': empty string"),
    (with_(GOOD_REF_FORM, rejected_preference=0.3),
     "field 'rejected_preference': chosen_preference + rejected_preference = 1.1, not 1"),
    (with_(GOOD_REF_FORM, a_1_preference=-0.1, a_2_preference=1.1),
     "field 'a_1_preference': -0.1 is outside [0, 1]"),
    (with_(GOOD_REF_FORM, a_2_preference=float("inf")),
     "field 'a_2_preference': not a finite number"),
    (with_(GOOD_REF_FORM, a_2_preference=...), "field 'a_2_preference': missing"),
    # conversational
    (with_(CONV, chosen=[{"role": "assistant"}]),
     "field 'chosen': expected a string or a list of {role, content} messages"),
    (with_(CONV, chosen=[]), "field 'chosen': empty message list"),
]


def _good_neighbour(bad):
    """A valid row of the same form, so the bad row's only problem is the intended one."""
    if isinstance(bad, dict) and any(k.endswith("_preference") for k in bad):
        return GOOD_REF_FORM
    if isinstance(bad, dict) and isinstance(bad.get("prompt"), list):
        return CONV
    return GOOD_LIST


@pytest.mark.parametrize("bad, expected", BAD_ROWS, ids=[b for _, b in BAD_ROWS])
def test_check_data_reports_each_problem_with_line_and_field(tmp_path, capsys, bad, expected):
    good = _good_neighbour(bad)
    path = write_jsonl(tmp_path, [good, bad, good])
    rc, lines = check(path, capsys)
    assert rc == 1
    assert any(expected in line for line in lines), lines
    assert lines[-1].endswith(f"3 rows, 1 bad ({len(lines) - 1} problems)")


def test_good_files_pass_in_every_form(tmp_path, capsys):
    for rows in ([GOOD_LIST] * 3, [GOOD_REF_FORM] * 2, [CONV] * 2):
        rc, lines = check(write_jsonl(tmp_path, rows), capsys)
        assert rc == 0 and lines[-1].endswith("all valid"), lines


def test_reference_form_maps_to_list_form(tmp_path):
    examples, _ = load_preference_data(str(write_jsonl(tmp_path, [GOOD_REF_FORM])))
    (ex,) = examples
    assert ex.samples == ["a", "b"] and ex.aux_prefs == [0.8, 0.4]


def test_parquet_and_saved_dataset_use_row_indices(tmp_path, capsys):
    import datasets

    rows = [GOOD_LIST, with_(GOOD_LIST, chosen=""), GOOD_LIST]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved"):
        rc, lines = check(path, capsys)
        assert rc == 1 and lines[0] == "row 1: field 'chosen': empty string", lines


def test_unreadable_inputs_are_one_line_errors(tmp_path, capsys):
    rc = cli_main(["check-data", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and "no such file" in err and err.count("\n") == 1
    (tmp_path / "d.csv").write_text("a,b\n")
    rc = cli_main(["check-data", str(tmp_path / "d.csv")])
    assert rc == 1 and "unknown format" in capsys.readouterr().err


def test_hub_name_unreachable_is_a_clear_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline mode makes the lookup fail at once instead of waiting on the network; the flags
    # are read at import time, so set the module constants too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError, match=r"data.path: cannot load 'someone/no-such-set' from "
                                        r"the Hugging Face hub"):
        load_preference_data("someone/no-such-set")


def test_max_length_after_tokenization(tmp_path, capsys):
    long = with_(GOOD_LIST, rejected="x" * 50)   # BOS + 7 prompt bytes + 50 + EOS = 59
    rc, lines = check(write_jsonl(tmp_path, [GOOD_LIST, long]), capsys, "--tokenizer", "byte",
                      "--max-length", "30")
    assert rc == 1
    assert lines[0].startswith("line 2: field 'rejected': prompt + response is 59 tokens, over "
                               "the maximum length 30"), lines


def test_skip_policy_drops_and_counts_bad_rows(tmp_path):
    path = write_jsonl(tmp_path, [GOOD_LIST, "{oops", with_(GOOD_LIST, chosen=""), GOOD_LIST])
    with pytest.raises(UserError, match=r"line 2: not valid JSON.*line 3: field 'chosen'.*"
                                        r"data.on_bad_row=skip"):
        load_preference_data(str(path))
    examples, report = load_preference_data(str(path), on_bad_row="skip")
    assert [ex.row for ex in examples] == [1, 4]
    assert report.skipped == 2 and report.rows == 4


def test_trainer_stops_on_bad_rows_with_the_same_messages(tmp_path, capsys):
    path = write_jsonl(tmp_path, [GOOD_LIST, with_(GOOD_LIST, chosen="")])
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    rc = cli_main(["train", "--config", str(config), f"--data.path={path}",
                   f"--train.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "line 2: field 'chosen': empty string" in err


def test_implicit_prompt_form_and_real_hh_data():
    from vrpo_fast.data.validate import split_implicit_prompt

    p, c, r = split_implicit_prompt("\n\nHuman: hi\n\nAssistant: hello",
                                    "\n\nHuman: hi\n\nAssistant: go")
    assert (p, c, r) == ("\n\nHuman: hi\n\nAssistant:", " hello", " go")
    if not HH.is_file():
        pytest.skip(f"{HH} not present")
    examples, report = load_preference_data(str(HH), on_bad_row="skip")
    assert report.rows == 2312 and len(examples) > 2200
    ex = examples[0]
    assert ex.prompt.endswith("\n\nAssistant:") and ex.chosen and ex.rejected
    assert not ex.chosen.startswith("\n\nAssistant:")


def test_unlabelled_rows(tmp_path):
    row = {"prompt": "Q", "samples": ["a", "b"], "aux_prefs": [0.5, 0.3]}
    (ex,), _ = load_preference_data(str(write_jsonl(tmp_path, [row])))
    assert not ex.labelled and ex.responses == ["a", "b"]


# --- tokenization --------------------------------------------------------------------------

def test_prompt_and_response_ids_concatenate_to_the_full_text(tokenizer):
    ex = PreferenceExample(prompt="Hello, world", chosen=" good", rejected=" bad",
                           samples=[" x", " yz"])
    tok = tokenize_example(ex, tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tok.prompt_ids.count(bos) == 1 and tok.prompt_ids[0] == bos     # BOS once
    for text, ids in zip([" good", " bad", " x", " yz"], tok.response_ids):
        assert ids[-1] == eos and ids.count(eos) == 1                        # EOS once
        full = tokenizer("Hello, world" + text)["input_ids"] + [eos]
        assert tok.prompt_ids + ids == full                                   # exact round trip


def test_eos_not_doubled_and_chat_template(tokenizer):
    ex = PreferenceExample(prompt=CONV["prompt"], chosen=CONV["chosen"],
                           rejected=CONV["rejected"], samples=[])
    tok = tokenize_example(ex, tokenizer)
    rendered = tokenizer.apply_chat_template(CONV["prompt"] + CONV["chosen"], tokenize=False)
    assert tokenizer.decode(tok.prompt_ids + tok.response_ids[0]) == rendered
    assert tok.prompt_ids.count(tokenizer.bos_token_id) == 1     # template's BOS, not two
    assert tokenizer.decode(tok.prompt_ids).endswith("<|assistant|>")  # generation prompt
    ex2 = PreferenceExample(prompt="p", chosen="a</s>", rejected="b", samples=[])
    assert tokenize_example(ex2, tokenizer).response_ids[0].count(tokenizer.eos_token_id) == 1


def test_round_trip_with_a_bpe_tokenizer_that_has_merges():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(["the cat sat on the mat", "the hat is flat", "that cat"] * 20,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    ex = PreferenceExample(prompt="the cat", chosen=" sat on the mat", rejected=" is flat",
                           samples=[])
    t = tokenize_example(ex, fast)
    for text, ids in zip([" sat on the mat", " is flat"], t.response_ids):
        # Whitespace pre-tokenization splits at the boundary, so no merge crosses it.
        assert t.prompt_ids + ids == fast("the cat" + text)["input_ids"] + [fast.eos_token_id]
    # Where a merge WOULD cross the boundary ("th" + "at"), the pieces differ from the joint
    # tokenization: that is why samples keep their exact sampled ids (sample_ids).
    joint = fast("that")["input_ids"]
    split = fast("th")["input_ids"] + fast("at", add_special_tokens=False)["input_ids"]
    assert joint != split


def test_truncation_is_explicit_and_counted(tokenizer, tmp_path):
    ex = PreferenceExample(prompt="abcdefghij", chosen="0123456789", rejected="xy", samples=[])
    t = tokenize_example(ex, tokenizer, max_prompt_length=4, max_response_length=3)
    assert t.truncated
    assert t.prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(t.prompt_ids[1:]) == "hij"           # prompts keep their end
    assert tokenizer.decode(t.response_ids[0]) == "012"          # responses keep their start
    out, stats = tokenize_dataset([ex], tokenizer, cache_dir=tmp_path, max_prompt_length=4)
    again, stats2 = tokenize_dataset([ex], tokenizer, cache_dir=tmp_path, max_prompt_length=4)
    assert stats["truncated"] == 1 and not stats["cached"] and stats2["cached"]
    assert again[0] == out[0]
    _, stats3 = tokenize_dataset([ex], tokenizer, cache_dir=tmp_path, max_prompt_length=5)
    assert not stats3["cached"]                                  # settings are in the key


def test_sample_ids_are_used_exactly(tokenizer):
    ex = PreferenceExample(prompt="p", chosen="a", rejected="b", samples=["zz", "q"],
                           sample_ids=[[100, 101], [102, tokenizer.eos_token_id]])
    t = tokenize_example(ex, tokenizer)
    assert t.response_ids[2:] == [[100, 101, tokenizer.eos_token_id],
                                  [102, tokenizer.eos_token_id]]


def test_rows_writer_round_trips(tmp_path):
    examples, _ = load_preference_data(str(write_jsonl(tmp_path, [GOOD_LIST, GOOD_REF_FORM])),
                                       on_bad_row="skip")
    rows = preference_examples_to_rows(examples)
    again, report = load_preference_data(str(write_jsonl(tmp_path, rows, "again.jsonl")))
    assert report.bad_rows == 0
    assert [(e.prompt, e.chosen, e.samples, e.aux_prefs, e.ref_logps) for e in again] == \
        [(e.prompt, e.chosen, e.samples, e.aux_prefs, e.ref_logps) for e in examples]
