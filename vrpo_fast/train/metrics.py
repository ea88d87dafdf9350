"""Metrics: a console progress bar, <output_dir>/metrics.jsonl (one object per optimizer step),
and optional TensorBoard / Weights & Biases (imported only when enabled)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
