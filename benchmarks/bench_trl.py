"""One TRL training step: TRL's DPOTrainer against VRPOTrainer (vrpo_fast.integrations.trl) on
the same model and data:

  trl_dpo    DPOTrainer: chosen and rejected each padded in their own row behind a copy of the
             prompt, TRL's chunked fused LM head, a reference forward every step
  vrpo_dpo   VRPOTrainer, estimator="dpo": the prompt once with its two responses (packing),
             LM head on response positions only, a reference forward every step
  vrpo_M2    VRPOTrainer, estimator="vrpo" with M = 2 Monte Carlo pairs (K = 6 responses)
  vrpo_M8    the same with M = 8 (K = 18)

A step is what the Trainer does per batch: collate (padding or packing), `training_step` (policy
and reference forwards, loss, backward), AdamW step. The models are the Llama-style ones of the
other model benchmarks; text is the HH-RLHF slice in data/hh-rlhf, tokenized by the byte-level
tokenizer of vrpo_fast.models (one token per byte: prompts keep their last `cap[0]` characters,
responses their first `cap[1]`), the Monte Carlo samples are other rows' responses and g is
uniform noise (timing only). Before timing, vrpo_dpo's loss is checked against trl_dpo's on the
same batch.

    python -m pytest benchmarks/bench_trl.py -q [--smoke]
"""

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from _suite import timed

from vrpo_fast.bench.env import device
from vrpo_fast.bench.layouts import build_model

# The HH-RLHF slice shipped in the repository (MIT licence beside it).
HH = Path(__file__).resolve().parents[1] / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

pytest.importorskip("trl")

SHAPES = {
    "smoke": [dict(G=2, cap=(48, 24), hidden=32, layers=1, vocab=300)],
    "cpu": [dict(G=4, cap=(256, 128), hidden=256, layers=4, vocab=32000)],
    "gpu": [dict(G=8, cap=(1024, 512), hidden=1024, layers=8, vocab=128256)],
}
VARIANTS = {"trl_dpo": None, "vrpo_dpo": 0, "vrpo_M2": 2, "vrpo_M8": 8}
BETA = 0.1


def hh_rows(n: int, cap: tuple[int, int], M: int) -> list[dict]:
    """n preference rows from the HH-RLHF slice; 2M samples and g per row when M > 0."""
    rows = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            row = json.loads(line)
            c, r = row["chosen"], row["rejected"]
            cut = c.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            if c[cut:].strip() and r[cut:].strip() and c[:cut] == r[:cut]:
                rows.append({"prompt": c[:cut][-cap[0]:], "chosen": c[cut:][:cap[1]],
                             "rejected": r[cut:][:cap[1]]})
            if len(rows) == n + 2 * M:
                break
    pool = [x[k] for x in rows for k in ("chosen", "rejected")]
    rng = random.Random(0)
    out = rows[:n]
    if M:
        for i, row in enumerate(out):
            row["samples"] = [pool[(2 * i + 2 + j) % len(pool)] for j in range(2 * M)]
            row["aux_prefs"] = [rng.random() for _ in range(1 + M)]
    return out


def build(shape, variant, tmp_path):
    """The trainer of a variant and the rows of its one batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from vrpo_fast.integrations.trl import VRPOConfig, VRPOTrainer
    from vrpo_fast.models import byte_tokenizer

    M = VARIANTS[variant]
    model = build_model(shape["hidden"], shape["layers"], shape["vocab"], seed=0)
    ref = build_model(shape["hidden"], shape["layers"], shape["vocab"], seed=1)
    data = Dataset.from_list(hh_rows(shape["G"], tuple(shape["cap"]), M or 0))
    common = dict(output_dir=str(tmp_path / variant), per_device_train_batch_size=shape["G"],
                  beta=BETA, bf16=torch.cuda.is_available(), max_length=None, report_to=[],
                  gradient_checkpointing=False, save_strategy="no", learning_rate=1e-6,
                  use_cpu=device() == "cpu")
    if M is None:
        cls, args = DPOTrainer, DPOConfig(**common)
    else:
        cls, args = VRPOTrainer, VRPOConfig(**common, estimator="dpo" if M == 0 else "vrpo",
                                            num_mc_pairs=M)
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=data,
                  processing_class=byte_tokenizer())
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1        # set by train() otherwise
    return trainer, [trainer.train_dataset[i] for i in range(shape["G"])]


def make_step(trainer, rows):
    def step():
        inputs = trainer.data_collator(rows)
        loss = trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def first_loss(trainer, rows):
    with torch.no_grad():
        inputs = trainer._prepare_inputs(trainer.data_collator(rows))
        return trainer.compute_loss(trainer.model, inputs)


def check_same_loss(shape, tmp_path):
    """VRPOTrainer with estimator="dpo" computes DPOTrainer's loss on the same batch."""
    theirs = first_loss(*build(shape, "trl_dpo", tmp_path))
    ours = first_loss(*build(shape, "vrpo_dpo", tmp_path))
    tol = 1e-4 if not torch.cuda.is_available() else 2e-2
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", list(VARIANTS))
def bench_trl_step(benchmark, record, mode, variant, shape, tmp_path):
    if variant == "vrpo_dpo":
        check_same_loss(shape, tmp_path)
    trainer, rows = build(shape, variant, tmp_path)
    step = make_step(trainer, rows)
    benchmark.group = f"trl_step {shape}"
    seconds = timed(benchmark, step, rounds=1 if mode == "smoke" else 3,
                    warmup=0 if mode == "smoke" else 1, rep_ms=3000)
    loss = step()
    assert torch.isfinite(loss), f"{variant}: loss {loss.item()} after the timed steps"
    inputs = trainer.data_collator(rows)
    if "vrpo_batch" in inputs:
        rows_, width = inputs["vrpo_batch"].shape
        K = inputs["vrpo_batch"].group_size
    else:
        rows_, width = inputs["input_ids"].shape
        K = 2
    record("trl_step", variant, shape, seconds, groups=shape["G"], responses_per_group=K,
           model_tokens=2 * rows_ * width)          # policy and reference forwards
