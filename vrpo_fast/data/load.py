"""Reading preference data: JSONL, Parquet, a `datasets` folder saved with save_to_disk, a folder
of Parquet shards (what `vrpo-fast sample` / `score` write), or a hub name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vrpo_fast.data.schema import PreferenceExample, ValidationReport
from vrpo_fast.data.validate import RowValidator
from vrpo_fast.errors import UserError


class UnparsableRow(Exception):
    pass


def _source_kind(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file() or \
                (p / "dataset_dict.json").is_file():
            return "saved"
        if any(p.glob("*.parquet")):
            return "parquet_dir"
        raise UserError(f"data.path: {path} is a folder with neither a saved data set nor "
                        f"Parquet shards")
    if p.is_file():
        name = p.name.lower()
        if name.endswith((".jsonl", ".json", ".jsonl.gz")):
            return "jsonl"
        if name.endswith(".parquet"):
            return "parquet"
        raise UserError(f"data.path: {path}: unknown format (expected .jsonl, .jsonl.gz, "
                        f".parquet, a saved datasets folder, or a hub name)")
    if path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".parquet", ".json")) \
            or path.count("/") > 1:
        raise UserError(f"data.path: no such file or folder {path!r}")
    return "hub"


def load_rows(path: str, *, split: str = "train") -> tuple[str, Iterator[tuple[int, object]]]:
    """(unit, rows): unit is "line" (JSONL, 1-based numbers) or "row" (0-based index); each row
    is a dict, or an UnparsableRow exception for a JSONL line that is not a JSON object."""
    kind = _source_kind(str(path))
    if kind == "jsonl":
        return "line", _jsonl_rows(Path(path))
    if kind == "parquet":
        return "row", _table_rows(_read_parquet([Path(path)]))
    if kind == "parquet_dir":
        return "row", _table_rows(_read_parquet(sorted(Path(path).glob("*.parquet"))))
    if kind == "saved":
        return "row", _datasets_rows(_load_saved(path, split))
    return "row", _datasets_rows(_load_hub(path, split))


def _jsonl_rows(path: Path):
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, UnparsableRow(f"not valid JSON ({err.msg}, column {err.colno})")
                    continue
                if not isinstance(row, dict):
                    yield number, UnparsableRow(f"expected a JSON object, got "
                                                f"{type(row).__name__}")
                    continue
                yield number, row
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise UserError(f"data.path: cannot read {path}: {err}") from None


def _read_parquet(paths):
    import pyarrow.parquet as pq

    try:
        return [pq.read_table(p) for p in paths]
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"data.path: cannot read Parquet: {err}") from None


def _table_rows(tables):
    index = 0
    for table in tables:
        for row in table.to_pylist():
            yield index, row
            index += 1


def _load_saved(path, split):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"data.path: cannot load the saved data set {path}: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"data.split: {split!r} not in {path} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def _load_hub(name, split):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"data.path: cannot load {name!r} from the Hugging Face hub (not a "
                        f"local file; is the hub reachable?): {first}") from None


def _datasets_rows(ds):
    yield from enumerate(ds)


def validate_file(path: str, *, tokenizer=None, max_length: int | None = None,
                  split: str = "train", prompts_only: bool = False
                  ) -> tuple[list[PreferenceExample], ValidationReport]:
    """Every row checked; returns the valid examples and a report of every problem."""
    unit, rows = load_rows(path, split=split)
    validator = RowValidator(unit=unit, tokenizer=tokenizer, max_length=max_length,
                             prompts_only=prompts_only)
    report = ValidationReport(source=str(path))
    examples = []
    for number, raw in rows:
        report.rows += 1
        example, problems = validator.check(raw, number)
        if problems:
            report.bad_rows += 1
            report.problems.extend(problems)
        else:
            examples.append(example)
    return examples, report


def load_preference_data(path: str, *, on_bad_row: str = "error", tokenizer=None,
                         max_length: int | None = None, split: str = "train",
                         prompts_only: bool = False):
    """Load and validate; bad rows stop with the same lines `check-data` prints (error) or are
    dropped and counted in the report (skip). `prompts_only`: rows may hold a prompt alone."""
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"data.on_bad_row: {on_bad_row!r} is not 'error' or 'skip'")
    examples, report = validate_file(path, tokenizer=tokenizer, max_length=max_length,
                                     split=split, prompts_only=prompts_only)
    if report.bad_rows:
        if on_bad_row == "error":
            shown = "; ".join(str(p) for p in report.problems[:5])
            more = len(report.problems) - 5
            raise UserError(f"data.path: {report.summary()}: {shown}"
                            + (f"; and {more} more (run `vrpo-fast check-data {path}`)"
                               if more > 0 else "")
                            + "; set data.on_bad_row=skip to drop bad rows")
        report.skipped = report.bad_rows
    return examples, report
