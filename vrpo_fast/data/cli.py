"""`vrpo-fast check-data PATH [--tokenizer NAME_OR_PATH] [--max-length N]`.

Prints one line per problem (row and field), then a summary; exit 1 if any row is bad.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("path", help="JSONL, Parquet, a saved datasets folder, or a hub name")
    parser.add_argument("--tokenizer", help="also check lengths after tokenization "
                                            "('byte' = the built-in byte tokenizer)")
    parser.add_argument("--max-length", type=int, help="maximum prompt + response tokens")
    parser.add_argument("--split", default="train", help="split of a saved or hub data set")


def run(args) -> int:
    from vrpo_fast.data.load import validate_file
    from vrpo_fast.errors import UserError

    if args.max_length is not None and args.tokenizer is None:
        raise UserError("--max-length: needs --tokenizer to count tokens")
    if args.max_length is not None and args.max_length < 1:
        raise UserError(f"--max-length: must be >= 1, got {args.max_length}")
    tokenizer = None
    if args.tokenizer:
        from vrpo_fast.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    _, report = validate_file(args.path, tokenizer=tokenizer, max_length=args.max_length,
                              split=args.split)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 1 if report.bad_rows else 0
