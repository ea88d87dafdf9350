"""The `vrpo-fast` command line: one sub-command per pipeline stage.

Each sub-command lives in its own module, which defines `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so `vrpo-fast --help`
stays fast. Errors a user can cause are raised as `UserError` and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vrpo_fast.errors import UserError

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "check-data": ("vrpo_fast.data.cli", "validate a preference data set, one line per problem"),
}


def build_parser() -> argparse.ArgumentParser:
    from vrpo_fast import __version__

    parser = argparse.ArgumentParser(
        prog="vrpo-fast",
        description="Variance-Reduced Preference Optimization, fast.",
    )
    parser.add_argument("--version", action="version", version=f"vrpo-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily (see main) so --help does not import torch.
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    top = parser.parse_args(argv)
    if top.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(top._module)
    sub = argparse.ArgumentParser(
        prog=f"vrpo-fast {top.command}", description=COMMANDS[top.command][1]
    )
    module.add_arguments(sub)
    args = sub.parse_args(top.rest)
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"vrpo-fast {top.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vrpo-fast {top.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
