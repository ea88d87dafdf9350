"""The normalised forms of a preference row, before and after tokenization."""

from __future__ import annotations

from dataclasses import dataclass, field

Text = str | list  # a string, or conversational messages [{"role": ..., "content": ...}, ...]


@dataclass
class PreferenceExample:
    """One validated row. Columns: chosen, rejected, then samples a_1 .. a_2M (pair m is
    (a_{2m-1}, a_{2m})); aux_prefs (1 + M) and ref_logps (2 + 2M) in that order."""

    prompt: Text
    chosen: Text | None            # None for an unlabelled prompt (Monte Carlo pairs only)
    rejected: Text | None
    samples: list = field(default_factory=list)
    aux_prefs: list[float] | None = None
    ref_logps: list[float] | None = None
    sample_ids: list[list[int]] | None = None   # exact sampled token ids, when known
    row: int = 0

    @property
    def labelled(self) -> bool:
        return self.chosen is not None

    @property
    def responses(self) -> list:
        return ([self.chosen, self.rejected] if self.labelled else []) + list(self.samples)


@dataclass
class TokenizedExample:
    """Token ids as the model sees them: response_ids holds chosen, rejected (labelled rows
    only), then a_1 .. a_2M; each response ends with EOS exactly once (unless truncated)."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    aux_prefs: list[float] | None
    ref_logps: list[float] | None
    labelled: bool
    row: int
    truncated: bool = False


@dataclass
class Problem:
    row: int
    field: str
    message: str
    unit: str = "line"            # "line" for JSONL (1-based), "row" otherwise (0-based)

    def __str__(self) -> str:
        where = f"field '{self.field}': " if self.field else ""
        return f"{self.unit} {self.row}: {where}{self.message}"


@dataclass
class ValidationReport:
    source: str
    rows: int = 0
    bad_rows: int = 0
    skipped: int = 0
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        if not self.bad_rows:
            return f"{self.source}: {self.rows} rows, all valid"
        return (f"{self.source}: {self.rows} rows, {self.bad_rows} bad "
                f"({len(self.problems)} problems)")
