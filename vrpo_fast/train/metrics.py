"""Metrics: a console progress bar, <output_dir>/metrics.jsonl (one object per optimizer step),
and optional TensorBoard / Weights & Biases (imported only when enabled); a step's statistics
reduced over micro-batches and ranks (`StepStats`), and the watchers that read each step's record
(`MarginWatch`, `CvGapWatch`)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from vrpo_fast.cv_gap import GapCheck
from vrpo_fast.objective import LABELLED_STATS
from vrpo_fast.train.distributed import all_reduce_

# Dense bf16 peak FLOP/s by device name, for MFU (GPU only).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
              "A10G": 125e12, "4090": 165e12}


def check_loggers(train) -> None:
    """The optional loggers train.tensorboard / train.wandb_project ask for are installed:
    checked before a run writes anything, not when its first step is logged."""
    from importlib.util import find_spec

    from vrpo_fast.errors import UserError

    for key, on, module in [("train.tensorboard", train.tensorboard, "tensorboard"),
                            ("train.wandb_project", train.wandb_project, "wandb")]:
        if on and find_spec(module) is None:
            raise UserError(f"{key}: needs the {module} package (pip install {module}), "
                            f"which is not installed")


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS.items():
        if key in device_name:
            return flops
    return None


class MetricsLogger:
    def __init__(self, out: Path, cfg, *, is_main: bool, quiet: bool = False):
        self.out, self.cfg, self.is_main, self.quiet = Path(out), cfg, is_main, quiet
        self.path = self.out / "metrics.jsonl"
        self.bar = self.tb = self.wandb = None

    def start(self, step: int, max_steps: int, summary: str) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        resolved = self.cfg.to_yaml()
        (self.out / "config.yaml").write_text(resolved)
        if not self.quiet:
            print("resolved config:\n" + "\n".join("  " + line for line in resolved.splitlines()))
            print(summary)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max_steps, initial=step, desc="train", unit="step",
                        dynamic_ncols=True)
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tb"))
        if self.cfg.train.wandb_project:
            import wandb

            self.wandb = wandb.init(project=self.cfg.train.wandb_project,
                                    config=self.cfg.to_dict(), resume="allow")

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}",
                                 acc=f"{record.get('accuracy', float('nan')):.2f}")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps the restored checkpoint has not seen (they rerun);
        step 0 (no checkpoint) empties the file."""
        if not self.is_main or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a crash
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class StepStats:
    """A step's statistics as means over its global batch: each micro-batch's means weighed by
    its prompts, or by its labelled prompts for `LABELLED_STATS` (left out of a step without
    labelled prompts), summed over micro-batches and ranks in one collective, with the step's
    packed tokens."""

    def __init__(self, device: torch.device):
        self.device = device
        # Each statistic as (sum of micro-batch means x their weights, sum of the weights).
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}
        self.tokens = 0

    def add(self, stats: dict, tokens: int, prompts: int, labelled: int) -> None:
        """One micro-batch's statistics (its means), tokens, prompts and labelled prompts."""
        for k, v in stats.items():
            w = labelled if k in LABELLED_STATS else prompts
            self.sums[k] = self.sums.get(k, 0) + v.detach().double() * w
            self.weights[k] = self.weights.get(k, 0) + w
        self.tokens += tokens

    def put(self, key: str, value: torch.Tensor) -> None:
        """A value that is the same on every rank (weight 1 each: the ranks' mean is it)."""
        self.sums[key] = value.double()
        self.weights[key] = 1

    def reduce(self) -> tuple[float, dict[str, float]]:
        """(tokens over all ranks, each statistic's mean over the global batch). One
        collective (on the step's device: NCCL has no CPU tensors) and one host copy."""
        stat_sums, stat_weights, tokens = self.sums, self.weights, self.tokens
        keys = list(stat_sums)
        counts = torch.tensor([tokens, *(stat_weights[k] for k in keys)], dtype=torch.float64,
                              device=self.device)                 # one host-to-device copy
        totals = all_reduce_(torch.cat([counts, *(stat_sums[k].reshape(1) for k in keys)]))
        total_tokens, *rest = totals.tolist()
        weights, stat_values = rest[:len(keys)], rest[len(keys):]
        return total_tokens, {k: v / w for k, v, w in zip(keys, stat_values, weights) if w > 0}


class MarginWatch:
    """With the sigmoid loss the VRPO objective is bounded below only through the Monte Carlo
    term; a long run on little data can drive margins off to infinity: warns once."""

    def __init__(self):
        self.warned = False

    def observe(self, record: dict) -> None:
        if not self.warned and abs(record.get("margin", 0.0)) > 50:
            self.warned = True
            warnings.warn(f"step {record['step']}: mean chosen-rejected margin "
                          f"{record['margin']:.1f} is exploding; the sigmoid VRPO objective is "
                          f"unbounded below on small data: consider loss.loss_type=ramp, a "
                          f"smaller train.lr or fewer steps", stacklevel=1)


class CvGapWatch:
    """cv_gap's test (vrpo_fast.cv_gap): the step's labelled prompts' d = term_label -
    term_mc (their mean and mean square, reduced like every labelled statistic) go into a
    test over the first pass's labelled prompts, each once, at train.cv_gap_looks fixed
    steps with train.cv_gap_alpha spread over them; its fields join the record and it warns
    once. A resumed run replays the steps already in metrics.jsonl, so resuming changes
    neither the values nor the verdict.

    groups: the run's prompt groups (train.data.Groups); stream: its
    GroupStream (which groups each step sees); M: Monte Carlo pairs per prompt."""

    def __init__(self, cfg, groups, stream, M: int, out: Path, *, is_main: bool):
        self.cfg, self.groups, self.stream, self.out, self.is_main = cfg, groups, stream, out, \
            is_main
        self.enabled = cfg.loss.estimator == "vrpo" and M != 0
        self.check: GapCheck | None = None      # built at the first step observed (resume)

    def observe(self, record: dict) -> None:
        if not self.enabled or "term_mc" not in record:
            return
        if self.check is None:
            self.check = self._new_check(record["step"])
        fields, message = self._add(self.check, record)
        record.update(fields)
        if message and self.is_main:
            warnings.warn(message, stacklevel=1)

    def _new_check(self, step: int) -> GapCheck:
        """The run's GapCheck, with the steps before `step` (a resumed run's) replayed from
        metrics.jsonl; their warning, if any, was given then."""
        t = self.cfg.train
        check = GapCheck(min(t.max_steps, len(self.groups) // t.batch_groups), t.cv_gap_looks,
                         t.cv_gap_alpha)
        for r in read_metrics(self.out) if step > 1 else []:
            if r.get("step", 0) < step and "term_mc" in r:
                self._add(check, r)
        return check

    def _add(self, check: GapCheck, record: dict):
        """Feed step record["step"] to `check`: its count of labelled prompts from the data
        order, the mean and mean square of their d from the record."""
        step = record["step"]
        batch = self.stream.global_indices(step - 1)
        n = self.groups.labelled_count(batch)
        if "cv_gap_step" not in record:          # no labelled prompt in the step
            n = 0
        return check.add(step, n, record.get("cv_gap_step"), record.get("cv_gap_step_sq"))
