"""Where the trainer's step goes beyond the step's model work: `Trainer.train_step` at the
training-step benchmark's CPU shape (bench_train_step.py "G2-M8": a Llama of hidden 256 x 4
layers, GQA 4/2 heads, vocab 32k, float32; 2 prompts of 160 tokens per step, 2 + 2M responses
of 60-120 tokens, an online reference, g given), one process.

Each step's wall time is split, by timers around the calls themselves, into

    reference   the no-grad packed pass of pi_ref            (Trainer.ref's forward)
    policy      the body and the one-sweep LM head + loss   (Trainer.policy's forward)
    backward    loss.backward()
    optimizer   clip_grad_norm_ and AdamW's step
    the rest    everything else of train_step: sampling the step's groups, packing, g, the
                statistics, the step's host syncs and its record (the bookkeeping)

and the rest's share of the step is printed per step, with the median over `--steps` steps
after one warm-up step. Nothing is written.

    python benchmarks/trainer_overhead.py [--M 8] [--steps 5] [--smoke]

(--smoke: a tiny model and two short steps, to check that the script runs.)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vrpo_fast.config import load_config
from vrpo_fast.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("reference", "policy", "backward", "optimizer")


def write_data(path: Path, M: int, groups: int = 8, seed: int = 0,
               lengths=(160, 60, 120)) -> None:
    """`groups` rows in the trainer's format: prompts of 160 byte tokens, chosen, rejected and
    2M samples of 60-120 (`lengths`: prompt, shortest and longest response), g uniform."""
    rng = random.Random(seed)
    P, lo, hi = lengths

    def text(n):
        return "".join(rng.choice("abcdefghij ") for _ in range(n))

    with path.open("w") as f:
        for _ in range(groups):
            row = {"prompt": text(P), "chosen": text(rng.randint(lo, hi)),
                   "rejected": text(rng.randint(lo, hi)),
                   "samples": [text(rng.randint(lo, hi)) for _ in range(2 * M)],
                   "aux_prefs": [rng.random() for _ in range(1 + M)]}
            f.write(json.dumps(row) + "\n")


def timed(clock: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] += time.perf_counter() - start
    return wrapper


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--M", type=int, default=8, help="Monte Carlo pairs per prompt")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, M = 1, 2 steps")
    args = ap.parse_args(argv)
    model = ("{hidden_size: 256, num_layers: 4, num_heads: 4, num_kv_heads: 2, "
             "intermediate_size: 768, vocab_size: 32000, max_position_embeddings: 4096}")
    if args.smoke:
        args.M, args.steps = 1, 2
        model = "{hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1}"
    with tempfile.TemporaryDirectory(prefix="vrpo-overhead-") as tmp:
        data = Path(tmp) / "data.jsonl"
        write_data(data, args.M, lengths=(8, 2, 6) if args.smoke else (160, 60, 120))
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [
            f"--model.tiny={model}",
            f"--data.path={data}", f"--train.output_dir={Path(tmp) / 'run'}",
            "--train.batch_groups=2", "--train.micro_batch_groups=2", "--train.lr=1e-6",
            f"--train.max_steps={args.steps + 1}", "--train.warmup_steps=0",
            "--train.save_every=0", "--aux.mode=given", "--ref.source=online"])
        trainer = Trainer(cfg, quiet=True)
        clock = dict.fromkeys(PARTS, 0.0)
        trainer.ref.forward = timed(clock, "reference", trainer.ref.forward)
        trainer.policy.forward = timed(clock, "policy", trainer.policy.forward)
        trainer.optimizer.step = timed(clock, "optimizer", trainer.optimizer.step)
        backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
        torch.Tensor.backward = timed(clock, "backward", backward)
        torch.nn.utils.clip_grad_norm_ = timed(clock, "optimizer", clip)
        try:
            trainer.train_step()                                    # warm-up
            shares = []
            for step in range(args.steps):
                clock.update(dict.fromkeys(PARTS, 0.0))
                start = time.perf_counter()
                trainer.train_step()
                total = time.perf_counter() - start
                rest = total - sum(clock.values())
                shares.append(rest / total)
                print(f"step {step + 1}: {total * 1e3:7.1f} ms  " + "  ".join(
                    f"{k} {v / total:5.1%}" for k, v in clock.items()) +
                    f"  the rest {rest * 1e3:6.1f} ms = {rest / total:.2%}")
        finally:
            torch.Tensor.backward, torch.nn.utils.clip_grad_norm_ = backward, clip
            trainer._release_lock()
    print(f"the rest (bookkeeping), median over {args.steps} steps: "
          f"{statistics.median(shares):.2%} of the step (max {max(shares):.2%})")
    return shares


if __name__ == "__main__":
    main()
