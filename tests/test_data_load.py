"""Data loading: every source kind reads the same rows, unreadable sources are one clear line
naming the path, an unreachable hub fails fast, real HH-RLHF text in the implicit-prompt form,
and written data reads back."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vrpo_fast.cli import main as cli_main
from vrpo_fast.data.load import load_preference_data, load_rows, write_preference_data
from vrpo_fast.data.schema import PreferenceExample
from vrpo_fast.errors import UserError

HH = Path(__file__).resolve().parents[1] / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

ROWS = [
    {"prompt": "Q1", "chosen": " a", "rejected": " b", "samples": [" c", " d"],
     "aux_prefs": [0.75, 0.5]},
    {"prompt": "Q2", "chosen": " e", "rejected": " f", "samples": [" g", " h"],
     "aux_prefs": [0.25, 1.0]},
    {"prompt": "Q3", "chosen": " i", "rejected": " j", "samples": [" k", " l"],
     "aux_prefs": [0.5, 0.0]},
]


def as_tuples(examples):
    return [(e.prompt, e.chosen, e.rejected, e.samples, e.aux_prefs) for e in examples]


EXPECTED = [(r["prompt"], r["chosen"], r["rejected"], r["samples"], r["aux_prefs"])
            for r in ROWS]


def write_source(kind, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind in ("jsonl", "jsonl.gz"):
        path = tmp_path / f"d.{kind}"
        text = "\n".join(json.dumps(r) for r in ROWS) + "\n"
        if kind == "jsonl.gz":
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
    elif kind == "json-array":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS, indent=1))
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif kind == "parquet-shards":
        path = tmp_path / "shards"
        path.mkdir()
        pq.write_table(pa.Table.from_pylist(ROWS[:2]), path / "shard_00000.parquet")
        pq.write_table(pa.Table.from_pylist(ROWS[2:]), path / "shard_00001.parquet")
    elif kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    elif kind == "saved-dict":
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                              "test": datasets.Dataset.from_list(ROWS[:1])}
                             ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind, unit, numbers", [
    ("jsonl", "line", [1, 2, 3]), ("jsonl.gz", "line", [1, 2, 3]),
    ("json-array", "row", [0, 1, 2]), ("parquet", "row", [0, 1, 2]),
    ("parquet-shards", "row", [0, 1, 2]), ("saved", "row", [0, 1, 2]),
    ("saved-dict", "row", [0, 1, 2])])
def test_every_source_kind_reads_the_same_rows(tmp_path, kind, unit, numbers):
    path = write_source(kind, tmp_path)
    rows = load_rows(str(path))
    assert rows.unit == unit
    assert [n for n, _ in rows] == numbers
    examples, report = load_preference_data(str(path))
    assert as_tuples(examples) == EXPECTED
    assert [e.row for e in examples] == numbers and report.rows == 3


def test_saved_dataset_dict_splits(tmp_path, capsys):
    path = write_source("saved-dict", tmp_path)
    examples, _ = load_preference_data(str(path), split="test")
    assert as_tuples(examples) == EXPECTED[:1]
    capsys.readouterr()   # save_to_disk's progress bars
    rc = cli_main(["check-data", str(path), "--split", "validation"])
    err = capsys.readouterr().err
    assert rc == 1 and err == (f"vrpo-fast check-data: error: data.split: 'validation' not in "
                               f"{path} (splits: train, test)\n")


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    assert [n for n, _ in load_rows(str(path))] == [1, 4]


def damaged_sources(tmp_path):
    """(path, what the one error line must say) for sources that cannot be read at all."""
    missing = tmp_path / "missing.jsonl"
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,chosen\n")
    not_parquet = tmp_path / "d.parquet"
    not_parquet.write_text("this is not parquet")
    cut_gzip = tmp_path / "d.jsonl.gz"
    cut_gzip.write_bytes(gzip.compress(b'{"prompt": "Q"}\n' * 100)[:40])
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage\n")
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    bad_array = tmp_path / "a.json"
    bad_array.write_text('[{"prompt": "Q"},')
    broken_saved = tmp_path / "broken_saved"
    broken_saved.mkdir()
    (broken_saved / "state.json").write_text("{}")
    return [
        (missing, f"data.path: no such file or folder '{missing}'"),
        (csv, f"data.path: {csv}: unknown format"),
        (not_parquet, f"data.path: cannot read Parquet file {not_parquet}"),
        (cut_gzip, f"data.path: cannot read {cut_gzip}"),
        (binary, f"data.path: cannot read {binary}"),
        (empty_dir, f"data.path: {empty_dir} is a folder with neither a saved data set"),
        (bad_array, f"data.path: {bad_array} is not valid JSON"),
        (broken_saved, f"data.path: cannot load the saved data set {broken_saved}"),
    ]


def test_unreadable_sources_are_one_line_naming_the_path(tmp_path, capsys):
    for path, expected in damaged_sources(tmp_path):
        rc = cli_main(["check-data", str(path)])
        out = capsys.readouterr()
        assert rc == 1, path
        assert out.err.startswith(f"vrpo-fast check-data: error: {expected}"), out.err
        assert out.err.count("\n") == 1 and "Traceback" not in out.err


def _offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # The flags are read when the libraries are imported: set the module constants too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def test_hub_name_in_offline_mode_is_a_clear_error(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(UserError, match=r"^data.path: cannot load 'someone/no-such-set' from "
                                        r"the Hugging Face hub \(not a local file; is the hub "
                                        r"reachable\?\): .+") as caught:
        load_preference_data("someone/no-such-set")
    assert "\n" not in str(caught.value)


def test_unreachable_hub_fails_at_once(monkeypatch):
    import huggingface_hub.constants

    # Port 9 (discard) on this machine refuses the connection at once: the hub "is down".
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match=r"^data.path: 'someone/no-such-set' is not a local file "
                                        r"or folder, and the Hugging Face hub cannot be reached: "
                                        r"http://127.0.0.1:9 is not reachable .*HF_HUB_OFFLINE"):
        load_preference_data("someone/no-such-set")


def test_check_data_on_a_hub_name_cannot_hang(tmp_path):
    # A separate process under a hard time limit: whatever the network does, this test ends.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "vrpo_fast.cli", "check-data",
                           "someone/no-such-set"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "vrpo-fast check-data: error: data.path: cannot load 'someone/no-such-set' from the "
        "Hugging Face hub"), done.stderr


def test_real_hh_rlhf_rows_split_into_prompt_and_responses(tokenizer):
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    examples, report = load_preference_data(str(HH))
    assert report.rows == len(raw) == 2312 and len(examples) == len(raw)
    for ex, r in zip(examples, raw):
        # The prompt is shared, ends an "Assistant:" turn, and the responses are what follows.
        assert ex.prompt + ex.chosen == r["chosen"] and ex.prompt + ex.rejected == r["rejected"]
        assert ex.prompt.endswith("\n\nAssistant:")
        # ... and it is the LONGEST such prefix: after it, the two transcripts share no
        # further text up to another "\n\nAssistant:".
        common = os.path.commonprefix([ex.chosen, ex.rejected])
        assert "\n\nAssistant:" not in common
    # Real text through the byte tokenizer: exact bytes, BOS once, EOS once.
    from vrpo_fast.data.tokenize import tokenize_example

    for ex in examples[:200]:
        t = tokenize_example(ex, tokenizer)
        assert tokenizer.decode(t.prompt_ids, skip_special_tokens=True) == ex.prompt
        assert t.prompt_ids[0] == tokenizer.bos_token_id
        assert len(t.prompt_ids) == 1 + len(ex.prompt.encode("utf-8"))
        for text, ids in zip((ex.chosen, ex.rejected), t.response_ids):
            assert ids[-1] == tokenizer.eos_token_id and len(ids) == len(text.encode()) + 1


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz", "out.parquet"])
def test_written_examples_read_back(tmp_path, name):
    examples = [
        PreferenceExample(prompt="Q", chosen=" a", rejected=" b", samples=[" c", " d"],
                          aux_prefs=[0.75, 0.5], ref_logps=[-1.0, -2.0, -3.0, -4.5],
                          sample_ids=[[5, 6], [7]]),
        PreferenceExample(prompt="R", chosen=None, rejected=None, samples=[" e", " f"],
                          aux_prefs=[0.5, 0.125], ref_logps=[-1.0, -2.0],
                          sample_ids=[[8], [9, 10]]),
    ]
    path = write_preference_data(examples, str(tmp_path / name))
    again, report = load_preference_data(str(path))
    fields = ("prompt", "chosen", "rejected", "samples", "aux_prefs", "ref_logps", "sample_ids",
              "labelled")
    assert [[getattr(e, f) for f in fields] for e in again] == \
        [[getattr(e, f) for f in fields] for e in examples]
    assert report.bad_rows == 0 and sorted(os.listdir(tmp_path)) == [name]   # no temp left


def test_writer_refuses_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="write .jsonl, .jsonl.gz or .parquet"):
        write_preference_data([], str(tmp_path / "out.csv"))


def test_a_jsonl_file_is_read_line_by_line_even_if_a_line_is_an_array(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[1, 2]\n" + json.dumps(ROWS[0]) + "\n")
    examples, report = load_preference_data(str(path), on_bad_row="skip")
    assert [str(p) for p in report.problems] == ["line 1: expected a JSON object, got list"]
    assert [e.row for e in examples] == [2]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_stray_byte_in_one_line_is_that_rows_problem(tmp_path, suffix):
    """A byte that is not UTF-8 inside line 3 makes line 3 a bad row (skippable, named by its
    line), not the whole file unreadable; the rows around it read as before."""
    lines = [json.dumps(r).encode() for r in (ROWS[0], ROWS[1], ROWS[0], ROWS[1])]
    lines[2] = lines[2].replace(b'"prompt": "', b'"prompt": "\xff', 1)
    data = b"\n".join(lines) + b"\n"
    path = tmp_path / f"d{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    examples, report = load_preference_data(str(path), on_bad_row="skip")
    assert [str(p) for p in report.problems] == ["line 3: not UTF-8 text (byte 12)"]
    assert [e.row for e in examples] == [1, 2, 4]
    with pytest.raises(UserError, match="line 3: not UTF-8 text"):
        load_preference_data(str(path))
