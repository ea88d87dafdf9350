"""Data validation: every problem class, in both column forms (the reference
implementation's a_k / *_preference and the list form samples / aux_prefs / ref_logps), in
standard and conversational text, read from JSONL, Parquet and a saved datasets folder; the
lines `vrpo-fast check-data` prints (row number and field) and its exit status; the skip policy.

Each bad file is [good, bad, good] (the bad row is line 2 in JSONL, row index 1 elsewhere), or
the bad row alone where Parquet's schema cannot hold it beside the good rows (row index 0).
"""

import copy
import json
import math

import pytest

from vrpo_fast.cli import main as cli_main
from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.validate import validate_row
from vrpo_fast.errors import UserError

DROP = object()   # marks a column to remove


def msgs(role, content):
    return [{"role": role, "content": content}]


# The four good rows: {list, reference} form x {standard, conversational} text, M = 2.
def good_row(form: str, text: str) -> dict:
    t = (lambda s: s) if text == "std" else (lambda s: msgs("assistant", s))
    prompt = "Q: 2+2?" if text == "std" else msgs("user", "2+2?")
    row = {"prompt": prompt, "chosen": t(" 4"), "rejected": t(" 5")}
    samples = [t(" four"), t(" 22"), t(" 4!"), t(" five")]
    if form == "list":
        row.update(samples=samples, aux_prefs=[0.9, 0.5, 0.25],
                   ref_logps=[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    else:
        row.update({f"a_{k + 1}": s for k, s in enumerate(samples)})
        row.update(chosen_preference=0.8, rejected_preference=0.2, a_1_preference=0.4,
                   a_2_preference=0.6, a_3_preference=0.75, a_4_preference=0.25)
    return row


def edit(row: dict, **changes) -> dict:
    row = copy.deepcopy(row)
    for key, value in changes.items():
        if value is DROP:
            row.pop(key, None)
        else:
            row[key] = value
    return row


FORMS = [(f, t) for f in ("list", "ref") for t in ("std", "conv")]


def cases():
    """(id, form, text, bad row, [(field, message start)], jsonl_only)."""
    out = []
    for form, text in FORMS:
        g = good_row(form, text)
        conv = text == "conv"
        empty = [] if conv else ""
        empty_msg = "empty message list" if conv else "empty string"
        sample = (lambda k: f"samples[{k - 1}]") if form == "list" else (lambda k: f"a_{k}")

        def add(name, bad, expected, jsonl_only=False, form=form, text=text):
            out.append((f"{form}-{text}-{name}", form, text, bad, expected, jsonl_only))

        # missing / empty prompt, chosen, rejected
        shared = "leading message" if conv else "prefix ending with '\\n\\nAssistant:'"
        add("missing-prompt", edit(g, prompt=DROP),
            [("prompt", f"missing, and chosen and rejected share no {shared}")])
        for col in ("chosen", "rejected"):
            add(f"missing-{col}", edit(g, **{col: DROP}), [(col, "missing")])
        for col in ("prompt", "chosen", "rejected"):
            add(f"empty-{col}", edit(g, **{col: empty}), [(col, empty_msg)])
        add("empty-sample", edit(g, **({"samples": [empty] + g["samples"][1:]} if form == "list"
                                       else {"a_2": empty})),
            [(sample(1 if form == "list" else 2), empty_msg)])
        # non-text where text belongs
        add("number-chosen", edit(g, chosen=42), [("chosen", "expected text, got int")])
        add("dict-prompt", edit(g, prompt={"text": "hi"}), [("prompt", "expected text, got dict")])
        if conv:
            add("message-without-content", edit(g, rejected=[{"role": "assistant"}]),
                [("rejected", "expected a string or a list of {role, content} messages")])
            add("string-among-messages", edit(g, chosen=" 4"),
                [("chosen", "a string, but the prompt is a message list")])
            add("messages-with-empty-content", edit(g, chosen=msgs("assistant", "")),
                [("chosen", "messages with empty content")])
        else:
            add("message-list-among-strings", edit(g, rejected=msgs("assistant", "5")),
                [("rejected", "a message list, but the prompt is a string")])
        # sample pairs and counts
        if form == "ref":
            add("a_k-without-pair", edit(g, a_4=DROP),
                [("a_3", "a_3 present without its pair a_4")])
            add("a_k-without-pair-2", edit(g, a_1=DROP),
                [("a_2", "a_2 present without its pair a_1")])
            add("preference-without-sample",
                edit(g, a_3=DROP, a_4=DROP, a_4_preference=DROP),
                [("a_3_preference", "a_3_preference without its sample a_3"),
                 ("samples", "2 samples, but 2 of the file's 3 rows have 4")])
            add("fewer-samples",
                edit(g, a_3=DROP, a_4=DROP, a_3_preference=DROP, a_4_preference=DROP),
                [("samples", "2 samples, but 2 of the file's 3 rows have 4")])
            add("number-sample", edit(g, a_1=7), [("a_1", "expected text, got int")])
        else:
            add("odd-samples", edit(g, samples=g["samples"][:3]),
                [("samples", "3 samples: Monte Carlo responses come in pairs")])
            add("fewer-samples", edit(g, samples=g["samples"][:2], aux_prefs=[0.9, 0.5],
                                      ref_logps=[-1.0, -2.0, -3.0, -4.0]),
                [("samples", "2 samples, but 2 of the file's 3 rows have 4")])
            add("number-sample", edit(g, samples=[g["samples"][0], 3] + g["samples"][2:]),
                [("samples[1]", "expected text, got int")], jsonl_only=True)
            add("samples-not-a-list", edit(g, samples="abcd"),
                [("samples", "expected a list of responses, got str")])
        # preferences: finite, in [0, 1], pairs summing to 1
        if form == "ref":
            add("nan-preference", edit(g, a_1_preference=math.nan),
                [("a_1_preference", "not a finite number")])
            add("inf-preference", edit(g, rejected_preference=math.inf),
                [("rejected_preference", "not a finite number")])
            add("text-preference", edit(g, a_2_preference="0.6"),
                [("a_2_preference", "expected a number")])
            add("outside-0-1", edit(g, a_3_preference=1.5, a_4_preference=-0.5),
                [("a_3_preference", "1.5 is outside [0, 1]"),
                 ("a_4_preference", "-0.5 is outside [0, 1]")])
            add("not-summing-to-1", edit(g, rejected_preference=0.3),
                [("rejected_preference",
                  "chosen_preference + rejected_preference = 1.1, not 1")])
            add("pair-half-missing", edit(g, a_2_preference=DROP),
                [("a_2_preference", "missing: preferences come in pairs")])
            add("both-g-forms", edit(g, aux_prefs=[0.8, 0.4, 0.75]),
                [("aux_prefs", "give either aux_prefs or")])
        else:
            add("nan-preference", edit(g, aux_prefs=[0.9, math.nan, 0.25]),
                [("aux_prefs[1]", "not a finite number")])
            add("inf-preference", edit(g, aux_prefs=[math.inf, 0.5, 0.25]),
                [("aux_prefs[0]", "not a finite number")])
            add("outside-0-1", edit(g, aux_prefs=[0.9, 1.5, -0.25]),
                [("aux_prefs[1]", "1.5 is outside [0, 1]"),
                 ("aux_prefs[2]", "-0.25 is outside [0, 1]")])
            add("text-preference", edit(g, aux_prefs=[0.9, "x", 0.25]),
                [("aux_prefs[1]", "expected a number")], jsonl_only=True)
            add("wrong-number-of-prefs", edit(g, aux_prefs=[0.9, 0.5]),
                [("aux_prefs", "expected a list of 1 + M = 3 probabilities")])
            add("wrong-number-of-logps", edit(g, ref_logps=[-1.0] * 5),
                [("ref_logps", "expected a list of 2 + 2M = 6 log-probs")])
            add("positive-logp", edit(g, ref_logps=[-1.0, 0.5, -3.0, -4.0, -5.0, -6.0]),
                [("ref_logps[1]", "0.5 > 0 is not a log-probability")])
            add("nan-logp", edit(g, ref_logps=[-1.0, -2.0, math.nan, -4.0, -5.0, -6.0]),
                [("ref_logps[2]", "not a finite number")])
            add("sample-ids-count", edit(g, sample_ids=[[5, 6]]),
                [("sample_ids", "expected one token-id list per sample (4)")])
            add("sample-ids-empty", edit(g, sample_ids=[[5, 1], [], [6, 1], [7, 1]]),
                [("sample_ids[1]", "no token ids")])
            add("sample-ids-not-ids", edit(g, sample_ids=[[5, 1], [-3], [6, 1], [7, 1]]),
                [("sample_ids[1]", "expected a list of token ids")])
    # An unparsable line exists only in JSONL.
    out.append(("jsonl-unparsable", "list", "std", "{not json", [("", "not valid JSON")], True))
    out.append(("jsonl-not-an-object", "list", "std", "[1, 2]",
                [("", "expected a JSON object, got list")], True))
    return out


CASES = cases()


def union_rows(rows):
    """Every row with every column (None where absent): Arrow takes the columns of the first
    row only, and a null reads back as absent."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def write(fmt, rows, tmp_path):
    """Write rows; returns the path. JSON text rows (str) are written verbatim."""
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows)
                        + "\n")
        return path
    import datasets
    import pyarrow as pa

    table = pa.Table.from_pylist(union_rows(rows))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(table, path)
        return path
    path = tmp_path / "saved"
    datasets.Dataset(table).save_to_disk(str(path))
    return path


def layout(fmt, good, bad):
    """(rows, the bad row's number) for a format."""
    if fmt == "jsonl":
        return [good, bad, good], 2
    import pyarrow as pa

    try:
        pa.Table.from_pylist(union_rows([good, bad, good]))
        return [good, bad, good], 1
    except (pa.ArrowInvalid, pa.ArrowTypeError):   # e.g. an int where the others hold text
        return [bad], 0


def run_check(capsys, *args):
    rc = cli_main(["check-data", *map(str, args)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return rc, out.out.splitlines(), out.err


PARAMS = [pytest.param(fmt, c, id=f"{fmt}-{c[0]}") for c in CASES
          for fmt in ("jsonl", "parquet", "saved") if fmt == "jsonl" or not c[5]]


@pytest.mark.parametrize("fmt, case", PARAMS)
def test_check_data_reports_the_row_and_field_of_every_problem(tmp_path, capsys, fmt, case):
    _, form, text, bad, expected, _ = case
    rows, number = layout(fmt, good_row(form, text), bad)
    if len(rows) == 1 and any(f == "samples" and "of the file's" in m for f, m in expected):
        pytest.fail("a sample-count case needs the good rows beside it")
    path = write(fmt, rows, tmp_path)
    rc, lines, _ = run_check(capsys, path)
    unit = "line" if fmt == "jsonl" else "row"
    problems, summary = lines[:-1], lines[-1]
    assert rc == 1
    assert len(problems) == len(expected), lines
    for line, (field, message) in zip(sorted(problems), sorted(expected)):
        where = f"{unit} {number}: " + (f"field '{field}': " if field else "")
        assert line.startswith(where + message), (line, where + message)
    assert summary == f"{path}: {len(rows)} rows, 1 bad ({len(expected)} problems)"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
@pytest.mark.parametrize("form, text", FORMS)
def test_good_rows_pass_with_exit_status_0(tmp_path, capsys, fmt, form, text):
    good = good_row(form, text)
    # Within the 1e-6 tolerance a pair of preferences still sums to 1.
    nearly = edit(good, chosen_preference=0.8 + 5e-7) if form == "ref" else good
    path = write(fmt, [good, nearly, good], tmp_path)
    rc, lines, _ = run_check(capsys, path)
    assert (rc, lines) == (0, [f"{path}: 3 rows, all valid"])


@pytest.mark.parametrize("form, text", FORMS)
def test_both_forms_normalise_to_the_same_example(tmp_path, form, text):
    path = write("jsonl", [good_row(form, text)], tmp_path)
    (ex,), report = load_preference_data(str(path))
    g = good_row("list", text)
    assert (ex.prompt, ex.chosen, ex.rejected, ex.samples) == \
        (g["prompt"], g["chosen"], g["rejected"], g["samples"])
    # reference form: g(chosen > rejected) = chosen_preference, g(a_1 > a_2) = a_1_preference
    assert ex.aux_prefs == ([0.9, 0.5, 0.25] if form == "list" else [0.8, 0.4, 0.75])
    assert ex.row == 1 and report.rows == 1 and report.bad_rows == 0


def test_the_sample_count_most_rows_have_is_the_norm(tmp_path, capsys):
    # The odd row is the FIRST one: it is reported, not the three rows that agree.
    g = good_row("list", "std")
    odd = edit(g, samples=g["samples"][:2], aux_prefs=[0.9, 0.5], ref_logps=[-1.0] * 4)
    rc, lines, _ = run_check(capsys, write("jsonl", [odd, g, g, g], tmp_path))
    assert rc == 1
    assert lines[:-1] == ["line 1: field 'samples': 2 samples, but 3 of the file's 4 rows "
                          "have 4: every row needs the same number"]


def test_over_the_maximum_length_after_tokenization(tmp_path, capsys):
    g = good_row("list", "std")
    long = edit(g, rejected="x" * 50)
    path = write("jsonl", [g, long], tmp_path)
    # byte tokenizer: BOS + 7 prompt bytes ("Q: 2+2?") + 50 bytes + EOS
    rc, lines, _ = run_check(capsys, path, "--tokenizer", "byte", "--max-length", 30)
    assert rc == 1
    assert lines[:-1] == ["line 2: field 'rejected': prompt + response is 59 tokens, over the "
                          "maximum length 30"]
    # The limit is inclusive: 59 tokens fit in 59.
    assert run_check(capsys, path, "--tokenizer", "byte", "--max-length", 59)[0] == 0
    # Truncation first, as training applies it: responses cut to 20 tokens fit in 30.
    assert run_check(capsys, path, "--tokenizer", "byte", "--max-length", 30,
                     "--max-response-length", 20)[0] == 0


def test_over_the_maximum_length_conversational_and_reference_form(tmp_path, capsys):
    g = good_row("ref", "conv")
    long = edit(g, a_3=msgs("assistant", "y" * 40))
    path = write("parquet", [g, long], tmp_path)
    # Rendered by the byte tokenizer's template:
    #   prompt   <s> "<|user|>2+2?" </s> "<|assistant|>"  = 1 + 12 + 1 + 13 = 27 tokens
    #   response 40 bytes + </s>                           = 41 tokens
    rc, lines, _ = run_check(capsys, path, "--tokenizer", "byte", "--max-length", 60)
    assert rc == 1
    assert lines[:-1] == ["row 1: field 'a_3': prompt + response is 68 tokens, over the maximum "
                          "length 60"]


def test_messages_need_a_chat_template(tmp_path, capsys, tokenizer):
    from vrpo_fast.models import byte_tokenizer

    plain = byte_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "tok")
    path = write("jsonl", [good_row("list", "conv")], tmp_path)
    rc, lines, _ = run_check(capsys, path, "--tokenizer", tmp_path / "tok")
    assert rc == 1
    assert lines[0] == "line 1: field 'prompt': a message list, but the tokenizer has no chat " \
                       "template to render it"


def test_check_data_flag_errors_are_one_line(tmp_path, capsys):
    path = write("jsonl", [good_row("list", "std")], tmp_path)
    rc, out, err = run_check(capsys, path, "--max-length", 10)
    assert rc == 1 and out == [] and err == "vrpo-fast check-data: error: --max-length: needs " \
                                            "--tokenizer to count tokens\n"
    rc, _, err = run_check(capsys, path, "--tokenizer", "byte", "--max-length", 1)
    assert rc == 1 and "--max-length: must be >= 2" in err and err.count("\n") == 1


def test_an_empty_file_is_not_valid_data(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    rc, lines, _ = run_check(capsys, path)
    assert (rc, lines) == (1, [f"{path}: no rows"])


def test_skip_policy_drops_and_counts_bad_rows(tmp_path):
    g = good_row("list", "std")
    path = write("jsonl", [g, "{oops", edit(g, chosen=""), g, edit(g, aux_prefs=[2, 0.5, 0.5])],
                 tmp_path)
    examples, report = load_preference_data(str(path), on_bad_row="skip")
    assert [ex.row for ex in examples] == [1, 4]
    assert (report.rows, report.bad_rows, report.skipped) == (5, 3, 3)
    assert [str(p) for p in report.problems] == [
        "line 2: not valid JSON (Expecting property name enclosed in double quotes, column 2)",
        "line 3: field 'chosen': empty string",
        "line 5: field 'aux_prefs[0]': 2 is outside [0, 1]"]


def test_error_policy_raises_with_the_lines_check_data_prints(tmp_path, capsys):
    g = good_row("ref", "std")
    rows = [g] + [edit(g, a_1_preference=0.1 * k, a_2_preference=0.5) for k in range(25)]
    path = write("jsonl", rows, tmp_path)
    rc, lines, _ = run_check(capsys, path)
    assert rc == 1
    with pytest.raises(UserError) as caught:
        load_preference_data(str(path))
    message = str(caught.value).splitlines()
    # The summary, the first 20 problem lines exactly as check-data prints them, how many more.
    # (k = 5 sums to exactly 1.0 and is a good row: 24 bad rows.)
    assert message[0] == f"data.path: {lines[-1]}"
    assert lines[-1].endswith("26 rows, 24 bad (24 problems)")
    assert message[1:21] == [f"  {line}" for line in lines[:20]]
    assert message[21] == "  ... and 4 more problems"
    assert "data.on_bad_row=skip" in message[22]


def test_trainer_stops_on_bad_rows_with_the_same_messages(tmp_path, capsys):
    from pathlib import Path

    g = good_row("list", "std")
    path = write("jsonl", [g, edit(g, chosen="")], tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    rc = cli_main(["train", "--config", str(config), f"--data.path={path}",
                   f"--train.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 1 and "  line 2: field 'chosen': empty string" in err
    assert "Traceback" not in err


def test_unlabelled_rows_carry_monte_carlo_pairs_only(tmp_path, capsys):
    rows = [{"prompt": "Q", "samples": ["a", "b"], "aux_prefs": [0.5, 0.3],
             "ref_logps": [-1.0, -2.0]},
            {"prompt": "R", "a_1": "c", "a_2": "d", "a_1_preference": 0.7,
             "a_2_preference": 0.3},
            {"prompt": "S", "samples": ["e", "f"], "ref_logps": [-1.0, -2.0, -3.0, -4.0]}]
    path = write("jsonl", rows, tmp_path)
    rc, lines, _ = run_check(capsys, path)
    # ref_logps of an unlabelled row: one per sample (2M), no chosen/rejected slots.
    assert rc == 1 and lines[:-1] == [
        "line 3: field 'ref_logps': expected a list of 2M (unlabelled row) = 2 log-probs, got "
        "[-1.0, -2.0, -3.0, -4.0]"]
    examples, _ = load_preference_data(str(path), on_bad_row="skip")
    assert [(ex.labelled, ex.responses, ex.aux_prefs) for ex in examples] == [
        (False, ["a", "b"], [0.5, 0.3]), (False, ["c", "d"], [0.5, 0.7])]  # 0.5: placeholder


def test_prompts_only_rows(tmp_path, capsys):
    rows = [{"prompt": "Q"}, {"prompt": "R", "chosen": "a", "rejected": "b"}, {"prompt": ""}]
    path = write("jsonl", rows, tmp_path)
    rc, lines, _ = run_check(capsys, path, "--prompts-only")
    assert rc == 1 and lines[:-1] == ["line 3: field 'prompt': empty string"]
    rc, lines, _ = run_check(capsys, path)   # training data needs the labelled pair
    assert rc == 1 and lines[:2] == ["line 1: field 'chosen': missing",
                                     "line 1: field 'rejected': missing"]


@pytest.mark.parametrize("text", ["std", "conv"])
def test_implicit_prompt_form(tmp_path, text):
    if text == "std":
        turns = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
        chosen, rejected = turns + " more", turns + " go away"
        expected = (turns, " more", " go away")
        # identical transcripts: the prompt stops at the last "Assistant:"
        same = (turns, " more", " more")
    else:
        turns = msgs("user", "hi") + msgs("assistant", "hello") + msgs("user", "and?")
        chosen, rejected = turns + msgs("assistant", "more"), turns + msgs("assistant", "no")
        expected = (turns, msgs("assistant", "more"), msgs("assistant", "no"))
        same = (turns, msgs("assistant", "more"), msgs("assistant", "more"))
    path = write("jsonl", [{"chosen": chosen, "rejected": rejected},
                           {"chosen": chosen, "rejected": chosen}], tmp_path)
    examples, report = load_preference_data(str(path))
    assert [(ex.prompt, ex.chosen, ex.rejected) for ex in examples] == [expected, same]


def test_implicit_prompt_that_leaves_a_response_empty(tmp_path):
    turns = "\n\nHuman: hi\n\nAssistant:"
    path = write("jsonl", [{"chosen": turns, "rejected": turns + " no"}], tmp_path)
    _, report = load_preference_data(str(path), on_bad_row="skip")
    assert [str(p) for p in report.problems] == [
        "line 1: field 'chosen': nothing left once the prompt shared with the other response is "
        "taken off"]


def test_validate_row_api():
    g = good_row("list", "std")
    ex, problems = validate_row(g, 7, expected_samples=4)
    assert problems == [] and ex.row == 7 and ex.ref_logps == g["ref_logps"]
    ex, problems = validate_row(g, 7, expected_samples=2, unit="row")
    assert ex is None and [str(p) for p in problems] == [
        "row 7: field 'samples': 4 samples, but the file's other rows have 2"]


def test_bad_settings_are_user_errors(tmp_path):
    path = write("jsonl", [good_row("list", "std")], tmp_path)
    with pytest.raises(UserError, match="data.on_bad_row: 'drop' is not 'error' or 'skip'"):
        load_preference_data(str(path), on_bad_row="drop")
    with pytest.raises(UserError, match="data.max_prompt_length: must be an integer >= 1"):
        load_preference_data(str(path), max_prompt_length=0)


def test_sample_ids_outside_the_vocabulary(tmp_path, capsys):
    g = edit(good_row("list", "std"), sample_ids=[[5, 1], [258, 1], [6, 259], [7, 1]])
    rc, lines, _ = run_check(capsys, write("jsonl", [g], tmp_path), "--tokenizer", "byte")
    # the byte tokenizer has 259 ids: 0 .. 258
    assert rc == 1 and lines[:-1] == ["line 1: field 'sample_ids[2]': token id 259 is outside "
                                      "the tokenizer's vocabulary (259)"]
