"""The normalised forms of a preference row, before and after tokenization, and the problems
validation finds.

Text is a string (standard form) or a list of {"role", "content"} messages (conversational form,
rendered with the tokenizer's chat template), as in TRL's preference format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Text = str | list  # a string, or conversational messages [{"role": ..., "content": ...}, ...]


@dataclass
class PreferenceExample:
    """One validated row.

    Responses, in order: chosen, rejected (labelled rows only), then the 2M samples a_1 .. a_2M
    drawn from pi_ref; Monte Carlo pair m is (a_{2m-1}, a_{2m}).
    aux_prefs: (1 + M,) g(chosen > rejected), g(a_1 > a_2), g(a_3 > a_4), ...; an unlabelled row
        keeps the first slot as a 0.5 placeholder so every row has 1 + M entries.
    ref_logps: (len(responses),) log pi_ref of each response: 2 + 2M labelled, 2M unlabelled.
    sample_ids: (2M,) the exact token ids that were sampled, when the sampling stage recorded them.
    pair_ids: (2,) the exact token ids of chosen and rejected, when the pair was itself sampled
        (the on-policy rounds, vrpo_fast.rounds, record them): scored and trained as sampled,
        like sample_ids, so a labelled response cut at max_new_tokens gets no EOS either.
    row: the 1-based line number (JSONL) or the 0-based row index (other formats).
    domain: the prompt's domain (a string; an integer column is read as its text), when the
        data has a `domain` column: group DRO weighs domains, evaluation reports each one.
    """

    prompt: Text
    chosen: Text | None            # None for an unlabelled prompt (Monte Carlo pairs only)
    rejected: Text | None
    samples: list = field(default_factory=list)
    aux_prefs: list[float] | None = None
    ref_logps: list[float] | None = None
    sample_ids: list[list[int]] | None = None
    row: int = 0
    domain: str | None = None
    pair_ids: list[list[int]] | None = None

    @property
    def labelled(self) -> bool:
        return self.chosen is not None

    @property
    def responses(self) -> list:
        """chosen, rejected (labelled rows only), a_1 .. a_2M."""
        return ([self.chosen, self.rejected] if self.labelled else []) + list(self.samples)


@dataclass
class TokenizedExample:
    """Token ids as the model sees them.

    prompt_ids: (P,) with the tokenizer's BOS once (or the chat template's rendering).
    response_ids: (K,) lists: chosen, rejected, a_1 .. a_2M for a labelled row (K = 2 + 2M); an
        unlabelled row omits chosen and rejected (K = 2M). A text response ends with EOS exactly
        once unless it was truncated (responses keep their start, so a cut response loses its
        EOS); a sample with recorded sample_ids is those ids exactly.
    aux_prefs, ref_logps: as in PreferenceExample.
    truncated: the prompt or any response was cut; prompt_truncated / responses_truncated say
        which (the prompt keeps its end; responses_truncated counts cut responses).
    """

    prompt_ids: list[int]
    response_ids: list[list[int]]
    aux_prefs: list[float] | None
    ref_logps: list[float] | None
    labelled: bool
    row: int
    truncated: bool = False
    prompt_truncated: bool = False
    responses_truncated: int = 0


@dataclass
class Problem:
    """One thing wrong with one row: `line 12: field 'chosen': empty string`."""

    row: int
    field: str                    # "" when the row as a whole is at fault (unparsable line)
    message: str
    unit: str = "line"            # "line" for JSONL (1-based), "row" otherwise (0-based index)

    def __str__(self) -> str:
        where = f"field '{self.field}': " if self.field else ""
        return f"{self.unit} {self.row}: {where}{self.message}"


@dataclass
class ValidationReport:
    """What validating a whole source found. `skipped`: bad rows dropped (on_bad_row="skip")."""

    source: str
    rows: int = 0
    bad_rows: int = 0
    skipped: int = 0
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        if not self.rows:
            return f"{self.source}: no rows"
        if not self.bad_rows:
            return f"{self.source}: {self.rows} rows, all valid"
        return (f"{self.source}: {self.rows} rows, {self.bad_rows} bad "
                f"({len(self.problems)} problems)")

    def describe(self, limit: int = 20) -> str:
        """The summary, then the first `limit` problem lines (indented) and how many more."""
        lines = [self.summary()] + [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)
