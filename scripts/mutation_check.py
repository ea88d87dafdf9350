#!/usr/bin/env python
"""Mutation check: does the test suite catch the bugs that matter?

Each mutant below is one deliberate bug, written as an exact source edit (a string that must
occur exactly once in its file, and its replacement), with the tests expected to catch it. The
script copies the working tree (tracked and untracked files git does not ignore) into a
temporary folder, checks that those tests pass there unmodified, then, one mutant at a time,
applies the edit, runs the tests (`python -m pytest -x -q <tests>`) and restores the file.
A mutant is "caught" when a test fails, "MISSED" when all pass; "stale" when its string is no
longer in the source (update the mutant after a refactor); "error" when pytest could not run.

    .venv/bin/python scripts/mutation_check.py                 # every mutant (minutes)
    .venv/bin/python scripts/mutation_check.py --list          # names and targets only
    .venv/bin/python scripts/mutation_check.py g_flip_lm final_not_trained
    .venv/bin/python scripts/mutation_check.py --markdown out.md   # the table docs/testing.md holds

Exit status: 0 when every mutant run is caught, 1 otherwise. Not part of CI (it runs the
targeted tests once per mutant); run it after changing tests or the code they guard, and put
its table in docs/testing.md. A test subset per mutant keeps it short: it asks "do the tests
meant to guard this catch it", not "does anything in the suite".
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str           # the bug, in words
    path: str           # file, relative to the repository root
    old: str            # exact text, once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k / -m expressions


TRAIN = "tests/test_train.py"

MUTANTS = [
    # -- the bugs the suite used to miss ---------------------------------------------------
    Mutant("g_flip_lm", "aux.mode lm / lagged: the trainer uses 1 - g",
           "vrpo_fast/train/loop.py",
           "return implicit_preference(self.aux(batch), ref_logps, self.cfg.aux.beta)",
           "return 1 - implicit_preference(self.aux(batch), ref_logps, self.cfg.aux.beta)",
           (TRAIN, "-k", "wired")),
    Mutant("final_not_trained", "final/ written without the trained weights",
           "vrpo_fast/train/checkpoint.py",
           "                plain.load_state_dict(state)\n",
           "                pass\n",
           (TRAIN, "-k", "final_is_the_trained_model")),
    Mutant("loss_over_micro_groups",
           "the loss divided by the micro-batch's groups instead of the step's (one-sweep head)",
           "vrpo_fast/train/loop.py",
           "return total / self.local_groups, stats",
           "return total / batch.num_groups, stats",
           (TRAIN, "-k", "micro_batches")),
    Mutant("loss_over_micro_groups_two_pass",
           "the same in the two-pass path (DRO runs take it)",
           "vrpo_fast/train/loop.py",
           "return per_prompt.sum() / self.local_groups",
           "return per_prompt.sum() / len(groups)",
           ("tests/test_dro.py", "-k", "micro_batching")),
    # -- the bugs the suite already caught ---------------------------------------------------
    Mutant("objective_g_flip", "the objective weighs l(u) by 1 - g and l(-u) by g",
           "vrpo_fast/objective.py",
           "expected = g * l_fwd + (1 - g) * l_rev",
           "expected = (1 - g) * l_fwd + g * l_rev",
           ("tests/test_objective.py",)),
    Mutant("objective_no_label_term", "the objective drops the label correction term",
           "vrpo_fast/objective.py",
           "per_prompt = term_dpo - term_label + term_mc",
           "per_prompt = term_dpo + term_mc",
           ("tests/test_objective.py",)),
    Mutant("packing_shift", "every response token predicted from its own position",
           "vrpo_fast/packing.py",
           "pred_index = torch.where(within == 0, last_prompt, flat - 1)[is_resp]",
           "pred_index = torch.where(within == 0, last_prompt, flat)[is_resp]",
           ("tests/test_packing.py", "-m", "not slow")),
    Mutant("chunked_no_temperature", "the chunked LM-head log-prob ignores the temperature",
           "vrpo_fast/chunked.py",
           "hs = h / temperature if temperature != 1.0 else h",
           "hs = h",
           ("tests/test_logprobs.py", "-m", "not slow", "-k", "chunked")),
    Mutant("sweep_no_temperature", "the one sweep's PyTorch steps ignore the temperature",
           "vrpo_fast/chunked.py",
           "return z if self.temperature == 1.0 else z.div_(self.temperature)",
           "return z",
           ("tests/test_ops.py", "-k", "no_grad")),
    Mutant("sweep_underflow_kept", "the PyTorch sweep keeps log(softmax_t) where it underflows",
           "vrpo_fast/chunked.py",
           "low = (valid & (p < self.TINY)).nonzero().squeeze(1)",
           "low = (valid & (p < 0)).nonzero().squeeze(1)",
           ("tests/test_fused_vrpo_loss.py", "-k", "far_below")),
    Mutant("sweep_onehot_dropped", "the PyTorch sweep's dW misses the one-hot term",
           "vrpo_fast/chunked.py",
           "dw.addmm_(z.T, ch, alpha=-1.0).index_add_(0, index, ch)",
           "dw.addmm_(z.T, ch, alpha=-1.0)",
           ("tests/test_fused_vrpo_loss.py", "-k", "float64 and torch")),
    Mutant("g_not_checked_in_0_1", "data validation accepts g outside [0, 1]",
           "vrpo_fast/data/validate.py",
           "if msg is None and not 0 <= value <= 1:",
           "if False:",
           ("tests/test_data_validate.py",)),
    # -- the small promises --------------------------------------------------------------------
    Mutant("g_flip_reward_model", "aux.mode reward_model: g from the second response's view",
           "vrpo_fast/objective.py",
           "return torch.sigmoid(r[:, 0::2] - r[:, 1::2])",
           "return torch.sigmoid(r[:, 1::2] - r[:, 0::2])",
           (TRAIN, "-k", "wired and reward_model")),
    Mutant("rng_not_restored", "resume does not restore the saved random states",
           "vrpo_fast/train/checkpoint.py",
           "set_rng_state(state[\"rng\"])",
           "pass",
           (TRAIN, "-k", "random_streams")),
    Mutant("keep_last_ignored", "old checkpoints are never pruned",
           "vrpo_fast/train/checkpoint.py",
           "        if complete >= keep_last:\n            shutil.rmtree(path, ignore_errors=True)",
           "        if False:\n            shutil.rmtree(path, ignore_errors=True)",
           (TRAIN, "-k", "random_streams")),
    Mutant("shuffle_change_resumes", "a changed train.shuffle is accepted on resume",
           "vrpo_fast/train/checkpoint.py",
           "\"train.batch_groups\", \"train.shuffle\", \"model.tiny\",",
           "\"train.batch_groups\", \"model.tiny\",",
           (TRAIN, "-k", "refuses_settings")),
    Mutant("margin_warning_silent", "the exploding-margin warning never fires",
           "vrpo_fast/train/metrics.py",
           "abs(record.get(\"margin\", 0.0)) > 50",
           "abs(record.get(\"margin\", 0.0)) > 5e9",
           (TRAIN, "-k", "exploding")),
    Mutant("labelled_stats_per_micro_batch",
           "the logged labelled statistics averaged over micro-batches, not labelled prompts",
           "vrpo_fast/train/metrics.py",
           "w = labelled if k in LABELLED_STATS else prompts",
           "w = prompts",
           (TRAIN, "-k", "micro_batches")),
    Mutant("stats_mean_of_rank_means",
           "the logged statistics a mean of the ranks' means, not over the global batch",
           "vrpo_fast/train/metrics.py",
           "counts = torch.tensor([tokens, *(stat_weights[k] for k in keys)], "
           "dtype=torch.float64,\n",
           "stat_sums = {k: v / max(stat_weights[k], 1) for k, v in stat_sums.items()}\n"
           "        counts = torch.tensor([tokens, *(1 for k in keys)], dtype=torch.float64,\n",
           (TRAIN, "-k", "another_number_of_processes")),
    Mutant("cv_gap_every_pass",
           "cv_gap counts every step, later passes over the data too (the false alarms of #38)",
           "vrpo_fast/train/metrics.py",
           "GapCheck(min(t.max_steps, len(self.groups) // t.batch_groups)",
           "GapCheck(t.max_steps",
           ("tests/test_cv_gap.py", "-k", "train_tests")),
    Mutant("cv_gap_counts_unlabelled",
           "cv_gap counts a step's groups, not its labelled prompts",
           "vrpo_fast/train/metrics.py",
           "n = self.groups.labelled_count(batch)",
           "n = len(batch)",
           ("tests/test_cv_gap.py", "-k", "train_tests")),
    Mutant("cv_gap_no_bonferroni",
           "each of cv_gap's looks spends the whole error budget",
           "vrpo_fast/cv_gap.py",
           "self.level = 1 - alpha / len(self.looks) if self.looks else math.nan",
           "self.level = 1 - alpha if self.looks else math.nan",
           ("tests/test_cv_gap.py", "-m", "not slow")),
    Mutant("varlen_window_off_by_one", "the flash-attn path's window one key too wide",
           "vrpo_fast/attention.py",
           "window_size=(-1, -1) if window is None else (window - 1, 0))",
           "window_size=(-1, -1) if window is None else (window, 0))",
           ("tests/test_cascade_attention.py", "-k", "flash")),
    Mutant("varlen_response_without_prompt",
           "the flash-attn path's responses miss their prompt's keys",
           "vrpo_fast/attention.py",
           "            if seg.prompt >= 0:\n                kv_parts.append(",
           "            if False:\n                kv_parts.append(",
           ("tests/test_cascade_attention.py", "-k", "flash")),
    Mutant("cascade_mask_not_causal", "the cascade's responses see their own later tokens",
           "vrpo_fast/attention.py",
           "self._additive[key] = mask.masked_fill_(~self.seen[window], float(\"-inf\"))",
           "self._additive[key] = mask.masked_fill_(~self.seen[window], 0.0)",
           ("tests/test_cascade_attention.py", "-k", "cascade and dense_mask")),
    Mutant("sinks_ignored", "the packed attention ignores attention sinks (s_aux)",
           "vrpo_fast/attention.py",
           "if kwargs.get(\"s_aux\") is not None:",
           "if False:",
           ("tests/test_cascade_attention.py", "-k", "sinks")),
    Mutant("ref_attends_by_default", "pi_ref and g's model ignore train.attention",
           "vrpo_fast/train/loop.py",
           "        wrapper.attention = self.cfg.train.attention",
           "        pass",
           ("tests/test_train_attention.py", "-k", "same_steps")),
]


def working_tree_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def copy_tree(root: Path, dest: Path) -> None:
    for rel in working_tree_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """(pytest exit status, seconds, last lines of output); status -1 on timeout."""
    env = dict(os.environ, PYTHONPATH=str(copy))
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", *tests], cwd=copy, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, "timeout"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return done.returncode, time.monotonic() - start, tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--markdown", type=Path, help="also write the result table here")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {sorted(unknown)} (see --list)")
    if args.list:
        for m in chosen:
            print(f"{m.name:26} {m.path:32} {shlex.join(m.tests)}\n{'':26} {m.what}")
        return 0

    rows, baseline = [], {}
    with tempfile.TemporaryDirectory(prefix="vrpo-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_tree(ROOT, copy)
        for m in chosen:
            path = copy / m.path
            source = path.read_text()
            if source.count(m.old) != 1:
                rows.append((m, "stale", 0.0, f"{source.count(m.old)} matches of the edit"))
                print(f"{m.name}: stale", flush=True)
                continue
            # The targeted tests must pass on the unmodified copy, or a failure means nothing.
            if m.tests not in baseline:
                baseline[m.tests] = run_tests(copy, m.tests, args.timeout)
            rc, secs, tail = baseline[m.tests]
            if rc != 0:
                rows.append((m, "error", secs, f"fails unmutated: {tail}"))
                print(f"{m.name}: error (tests fail without the bug)\n{tail}", flush=True)
                continue
            path.write_text(source.replace(m.old, m.new))
            try:
                rc, secs, tail = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(source)
            verdict = {0: "MISSED", 1: "caught"}.get(rc, "error")
            rows.append((m, verdict, secs, tail.splitlines()[-1] if tail else ""))
            print(f"{m.name}: {verdict} ({secs:.0f} s)", flush=True)

    table = ["| mutant | deliberate bug | tests run | result |", "|---|---|---|---|"]
    for m, verdict, _, _ in rows:
        table.append(f"| `{m.name}` | {m.what} (`{m.path}`) | `{shlex.join(m.tests)}` | "
                     f"{verdict} |")
    print("\n".join(["", *table]))
    if args.markdown:
        args.markdown.write_text("\n".join(table) + "\n")
    return 0 if all(verdict == "caught" for _, verdict, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
