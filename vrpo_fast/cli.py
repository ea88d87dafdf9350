"""The `vrpo-fast` command line: one sub-command per pipeline stage.

Each sub-command lives in its own module, imported only when the command runs (so
`vrpo-fast --help` stays fast). A pipeline stage defines `STAGE(cfg) -> output path` and takes
`--config FILE` plus `--section.key=value` overrides; any other command defines
`add_arguments(parser)` and `run(args) -> int`. Errors a user can cause are raised as
`UserError` and printed as one line, with exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vrpo_fast.environment import check_environment
from vrpo_fast.errors import UserError

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "config-doc": ("vrpo_fast.config", "every config key with its doc and default (as YAML)"),
    "run": ("vrpo_fast.pipeline", "run a config's stages in order (run.stages: sample, score, "
                                  "train, eval, ...), each resuming or skipping what is done"),
    "check-data": ("vrpo_fast.data.cli", "validate a preference data set, one line per problem"),
    "sample": ("vrpo_fast.sample", "draw 2M responses per prompt from pi_ref (vLLM or "
                                   "transformers)"),
    "score": ("vrpo_fast.score", "reference log-probs and g for every response, one packed pass "
                                 "per group"),
    "train": ("vrpo_fast.train.loop", "train a policy with VRPO (or DPO), resuming automatically"),
    "demo": ("vrpo_fast.demo", "VRPO beside DPO on a synthetic non-Bradley-Terry task (CPU, "
                               "minutes)"),
    "bench": ("vrpo_fast.bench", "benchmark the kernels and a training step at any shape, "
                                 "providers side by side"),
    "train-reward": ("vrpo_fast.train.reward", "two-stage VRPO, stage 1: a variance-reduced "
                                               "reward model"),
    "train-rl": ("vrpo_fast.train.rloo", "two-stage VRPO, stage 2: RLOO against the reward "
                                         "model, KL to pi_ref"),
    "plan": ("vrpo_fast.plan", "per-GPU memory of a training config by component, and the "
                               "largest packing budget that fits"),
    "audit-g": ("vrpo_fast.audit", "before training: g's agreement and calibration on held-out "
                                   "labelled pairs, and VRPO's gradient variance against DPO's "
                                   "at pi_ref for M = 1, 2, 4, 8"),
    "eval": ("vrpo_fast.evaluate", "win rates against pi_ref, a baseline and the data's chosen "
                                   "responses under a judge, per temperature; reward and KL"),
}


def build_parser() -> argparse.ArgumentParser:
    from vrpo_fast import __version__

    parser = argparse.ArgumentParser(
        prog="vrpo-fast",
        description="Variance-Reduced Preference Optimization, fast.",
    )
    parser.add_argument("--version", action="version", version=f"vrpo-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        # Listed for --help only: main() hands a command's own arguments to its module, so
        # `vrpo-fast --help` imports nothing heavy.
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        parser.parse_args(argv)  # --help, --version, or an "invalid choice" error (exit 2)
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        check_environment()
    except UserError as err:
        print(f"vrpo-fast {name}: error: {err}", file=sys.stderr)
        return 1
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"vrpo-fast {name}", description=help_text)
    stage = getattr(module, "STAGE", None)
    if stage is not None:
        from vrpo_fast.config import add_config_arguments

        add_config_arguments(sub)
    else:
        module.add_arguments(sub)
    args, extra = sub.parse_known_args(rest)
    if extra:
        # Commands built on a config take --section.key=value overrides; others reject extras.
        if not hasattr(args, "overrides"):
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        if stage is not None:
            from vrpo_fast.config import config_from_args

            print(f"{name}: wrote {stage(config_from_args(args))}")
            return 0
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"vrpo-fast {name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vrpo-fast {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun rank whose work is done: run the exit handlers (the output lock), flush, and
        # leave without the interpreter's teardown, where a thread torch leaves behind has
        # aborted finished ranks ("terminate called without an active exception").
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
