"""`vrpo-fast check-data PATH [--model PATH] [--tokenizer NAME_OR_PATH] [--max-length N]`.

Validates every row the way training and the pipeline stages do at start-up, prints one line per
problem (`line 12: field 'chosen': empty string`; `row 12: ...` for Parquet, saved and hub data,
0-based), then a summary. With --model, a prompt + response longer than the model's context
(max_position_embeddings) is a bad row, as `vrpo-fast train` finds it. Exit status 1 if any row
is bad (or there are none), 0 otherwise.
"""

from __future__ import annotations

from vrpo_fast.data.load import validate_file
from vrpo_fast.errors import UserError
from vrpo_fast.models import load_tokenizer, model_context


def add_arguments(parser) -> None:
    parser.add_argument("path", help="JSONL (.jsonl, .jsonl.gz, .json), Parquet (a file or a "
                                     "folder of shards), a saved datasets folder, or a hub name")
    parser.add_argument("--model", help="the model the data is for (a path or hub name; only "
                                        "its config is read): rows longer than its context are "
                                        "bad rows; its tokenizer unless --tokenizer says "
                                        "otherwise")
    parser.add_argument("--tokenizer", help="also tokenize every row with this tokenizer (a "
                                            "path or hub name; 'byte' = the built-in one)")
    parser.add_argument("--max-length", type=int,
                        help="maximum prompt + response tokens (needs --tokenizer)")
    parser.add_argument("--max-prompt-length", type=int,
                        help="prompts are cut to this (keeping their end) before "
                             "--max-length is checked (data.max_prompt_length)")
    parser.add_argument("--max-response-length", type=int,
                        help="responses are cut to this (keeping their start) first "
                             "(data.max_response_length)")
    parser.add_argument("--split", default="train", help="split of a saved or hub data set")
    parser.add_argument("--prompts-only", action="store_true",
                        help="rows may hold a prompt alone (the input of `vrpo-fast sample`)")


def run(args) -> int:
    tokenizer_name = args.tokenizer or args.model
    for flag, value, least in (("--max-length", args.max_length, 2),
                               ("--max-prompt-length", args.max_prompt_length, 1),
                               ("--max-response-length", args.max_response_length, 1)):
        if value is not None and tokenizer_name is None:
            raise UserError(f"{flag}: needs --tokenizer to count tokens")
        if value is not None and value < least:
            raise UserError(f"{flag}: must be >= {least}, got {value}")
    max_length = args.max_length
    tokenizer = None
    if args.model:
        context = model_context(args.model, "--model")
        max_length = min((n for n in (max_length, context) if n is not None), default=None)
    if tokenizer_name:
        tokenizer = load_tokenizer(tokenizer_name, "--tokenizer" if args.tokenizer else "--model")
    _, report = validate_file(args.path, tokenizer=tokenizer, max_length=max_length,
                              max_prompt_length=args.max_prompt_length,
                              max_response_length=args.max_response_length, split=args.split,
                              prompts_only=args.prompts_only)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 1 if report.bad_rows or not report.rows else 0
