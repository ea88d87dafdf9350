"""Reading preference data: JSONL (optionally gzipped), a JSON array, Parquet, a folder of
Parquet shards (what `vrpo-fast sample` / `score` write), a `datasets` folder saved with
save_to_disk, or a hub name.

Rows are numbered by their 1-based line (JSONL) or their 0-based index (everything else, the
index `dataset[i]` takes), and every message about a row uses that number.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from vrpo_fast.data.schema import PreferenceExample, Problem, ValidationReport
from vrpo_fast.data.tokenize import check_limits, preference_examples_to_rows
from vrpo_fast.data.validate import check_row
from vrpo_fast.errors import UserError

_JSONL = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
# How long to wait for the hub before saying it is unreachable (its own retries take ~30 s).
HUB_PROBE_TIMEOUT_S = 5.0


class UnparsableRow(Exception):
    """A JSONL line that is not a JSON object; load_rows yields it in the row's place."""


class Rows(Iterator):
    """Iterator of (number, row): row is a dict, or an UnparsableRow for a bad JSONL line.
    `unit` is "line" (1-based JSONL line numbers) or "row" (0-based indices)."""

    def __init__(self, unit: str, rows: Iterator):
        self.unit, self._rows = unit, rows

    def __next__(self) -> tuple[int, dict | Exception]:
        return next(self._rows)


def _source_kind(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        if any((p / name).is_file() for name in ("dataset_info.json", "state.json",
                                                  "dataset_dict.json")):
            return "saved"
        if any(p.glob("*.parquet")):
            return "parquet_dir"
        raise UserError(f"data.path: {path} is a folder with neither a saved data set "
                        f"(save_to_disk) nor Parquet files")
    if p.is_file():
        name = p.name.lower()
        if name.endswith(_JSONL):
            return "jsonl"
        if name.endswith(".parquet"):
            return "parquet"
        raise UserError(f"data.path: {path}: unknown format (expected .jsonl, .jsonl.gz, .json, "
                        f".parquet, a saved datasets folder, or a hub name)")
    # Not on disk: a hub name looks like "name" or "owner/name"; anything path-like is a typo.
    if path.startswith((".", "/", "~")) or path.lower().endswith(_JSONL + (".parquet",)) \
            or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        raise UserError(f"data.path: no such file or folder {path!r}")
    return "hub"


def load_rows(path_or_name: str, *, split: str = "train") -> Rows:
    """The raw rows of a source, lazily. Unreadable sources raise UserError naming the path;
    a bad JSONL line does not stop the iteration: it is yielded as an UnparsableRow."""
    path = str(path_or_name)
    kind = _source_kind(path)
    if kind == "jsonl":
        p = Path(path).expanduser()
        if p.name.lower().endswith((".json", ".json.gz")) and _starts_with_array(p):
            return Rows("row", enumerate(_json_array(p)))
        return Rows("line", _jsonl_rows(p))
    if kind == "parquet":
        return Rows("row", enumerate(_parquet_rows([Path(path).expanduser()])))
    if kind == "parquet_dir":
        files = sorted(Path(path).expanduser().glob("*.parquet"))
        return Rows("row", enumerate(_parquet_rows(files)))
    if kind == "saved":
        return Rows("row", enumerate(_load_saved(path, split)))
    return Rows("row", enumerate(_load_hub(path, split)))


def _open_text(path: Path):
    import gzip

    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") \
        else open(path, encoding="utf-8")


def _starts_with_array(path: Path) -> bool:
    """A .json file holding one JSON array (rather than one object per line)."""
    try:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise UserError(f"data.path: cannot read {path}: {err}") from None
    return head.startswith("[")


def _json_array(path: Path) -> Iterator:
    try:
        with _open_text(path) as f:
            rows = json.load(f)
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise UserError(f"data.path: cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"data.path: {path} is not valid JSON ({err.msg}, line {err.lineno} "
                        f"column {err.colno})") from None
    for row in rows:
        yield row if isinstance(row, dict) else UnparsableRow(
            f"expected a JSON object, got {type(row).__name__}")


def _jsonl_rows(path: Path) -> Iterator:
    import gzip

    seen = False
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else
              open(path, "rb")) as f:
            # Lines decoded one by one: a stray byte in one row is that row's problem.
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    if not seen:     # from its first line on: not a text file at all
                        raise UserError(f"data.path: cannot read {path}: not UTF-8 text (line "
                                        f"{number}, byte {err.start})") from None
                    yield number, UnparsableRow(f"not UTF-8 text (byte {err.start})")
                    continue
                if not line.strip():
                    continue
                seen = True
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
        # A truncated gzip or a binary file: the whole source is unreadable, not one row.
        raise UserError(f"data.path: cannot read {path}: {err}") from None


def _parquet_rows(paths) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for p in paths:
        try:
            batches = pq.ParquetFile(p).iter_batches(batch_size=1024)
            for batch in batches:
                yield from batch.to_pylist()
        except (OSError, ValueError) as err:  # pyarrow.ArrowException subclasses both
            raise UserError(f"data.path: cannot read Parquet file {p}: {err}") from None


def _load_saved(path, split):
    import datasets

    try:
        ds = datasets.load_from_disk(str(Path(path).expanduser()))
    except Exception as err:  # datasets raises many unrelated types for a damaged folder
        raise UserError(f"data.path: cannot load the saved data set {path}: "
                        f"{_first_line(err)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"data.split: {split!r} not in {path} (splits: {', '.join(ds)})")
        ds = ds[split]
    return ds


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None. Offline mode is left to `datasets` (it reads the
    local cache); otherwise one short request, because `datasets` retries for ~30 s."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"),
                               timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None           # an answer of any kind: reachable
    except (OSError, ValueError) as err:
        return f"{constants.ENDPOINT} is not reachable ({getattr(err, 'reason', err)})"
    return None


def _load_hub(name, split):
    import datasets

    why = _hub_unreachable()
    if why is not None:
        raise UserError(f"data.path: {name!r} is not a local file or folder, and the Hugging "
                        f"Face hub cannot be reached: {why}; set HF_HUB_OFFLINE=1 to read a "
                        f"cached copy")
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # network, auth, missing repo or split: all one message
        raise UserError(f"data.path: cannot load {name!r} from the Hugging Face hub (not a "
                        f"local file; is the hub reachable?): {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def validate_file(path: str, *, tokenizer=None, max_length: int | None = None,
                  max_prompt_length: int | None = None, max_response_length: int | None = None,
                  split: str = "train", prompts_only: bool = False
                  ) -> tuple[list[PreferenceExample], ValidationReport]:
    """Check every row; returns the good examples and a report of every problem, in row order.

    Every row must have the same number of samples; the count most rows have (the first row's
    on a tie) is the norm and the rows that differ are bad. `prompts_only` (the sampling stage's
    input) accepts rows with a prompt alone and does not compare sample counts.
    """
    check_limits(max_prompt_length=max_prompt_length, max_response_length=max_response_length,
                 max_length=max_length)
    rows = load_rows(path, split=split)
    report = ValidationReport(source=str(path))
    checked = []   # (number, example, problems, number of samples)
    for number, raw in rows:
        example, problems, n = check_row(
            raw, number, tokenizer=tokenizer, max_length=max_length, unit=rows.unit,
            prompts_only=prompts_only, max_prompt_length=max_prompt_length,
            max_response_length=max_response_length)
        checked.append((number, example, problems, n))
    counts = Counter(n for _, _, _, n in checked if n is not None)
    norm = max(counts, key=counts.__getitem__) if counts else None  # first seen wins ties
    examples = []
    for number, example, problems, n in checked:
        if not prompts_only and n is not None and n != norm:
            problems = problems + [Problem(
                number, "samples", f"{n} samples, but {counts[norm]} of the file's "
                                   f"{len(checked)} rows have {norm}: every row needs the "
                                   f"same number", rows.unit)]
        report.rows += 1
        if problems:
            report.bad_rows += 1
            report.problems.extend(problems)
        else:
            examples.append(example)
    return examples, report


def load_preference_data(path_or_name: str, *, on_bad_row: str = "error", tokenizer=None,
                         max_length: int | None = None, max_prompt_length: int | None = None,
                         max_response_length: int | None = None, split: str = "train",
                         prompts_only: bool = False
                         ) -> tuple[list[PreferenceExample], ValidationReport]:
    """Load and validate a source (see validate_file for the arguments).

    on_bad_row="error": any bad row raises UserError with the summary and the first 20 problem
    lines `vrpo-fast check-data` prints; "skip": bad rows are dropped and report.skipped says
    how many.
    """
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"data.on_bad_row: {on_bad_row!r} is not 'error' or 'skip'")
    examples, report = validate_file(
        path_or_name, tokenizer=tokenizer, max_length=max_length,
        max_prompt_length=max_prompt_length, max_response_length=max_response_length,
        split=split, prompts_only=prompts_only)
    if report.bad_rows:
        if on_bad_row == "error":
            raise UserError(f"data.path: {report.describe(limit=20)}\n"
                            f"  (`vrpo-fast check-data {path_or_name}` lists every problem; "
                            f"data.on_bad_row=skip drops the bad rows)")
        report.skipped = report.bad_rows
    return examples, report


def write_preference_data(examples: list[PreferenceExample], path: str) -> Path:
    """Write examples in the list form to JSONL (.jsonl, .jsonl.gz) or Parquet (.parquet);
    load_preference_data reads them back. Parquet needs every row in the same text form
    (all strings or all messages)."""
    out = Path(path)
    rows = preference_examples_to_rows(examples)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    name = out.name.lower()
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise UserError(f"{path}: these rows do not fit one Parquet schema (mixed string "
                            f"and message rows?): {err}") from None
        pq.write_table(table, tmp)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        with (_gzip_writer(tmp) if name.endswith(".gz") else open(tmp, "w",
                                                                 encoding="utf-8")) as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise UserError(f"{path}: write .jsonl, .jsonl.gz or .parquet")
    tmp.replace(out)   # a reader never sees a half-written file
    return out


def _gzip_writer(path: Path):
    import gzip

    return gzip.open(path, "wt", encoding="utf-8")
