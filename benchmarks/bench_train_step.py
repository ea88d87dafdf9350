"""One optimizer step at HH-like lengths, each forward + backward +
AdamW on a small Llama-style model: (a) the reference implementation's layout, (b) plain DPO in
the same naive layout, TRL's DPOTrainer (when installed), (c) vrpo_fast with cached reference
log-probs (its LM head and loss in two passes, and in one sweep), and the trainer's step with
an online reference, through the cascade attention and through the dense mask
(vrpo_fast.bench.step says what each does; `vrpo-fast bench step` measures a model and lengths
of one's choosing the same way). Before timing, (a) and (c) are checked to compute the same
policy and reference log-probs and the same loss (the one-sweep step the same loss), and TRL's
loss against (b)'s. Lengths: "hh" draws prompt / response lengths from the HH-RLHF length table
shipped with the package (vrpo_fast/bench/hh_lengths.json); "long" is prompt 160 tokens,
responses 60-120.

Beside each time the row holds the step's arithmetic lower bound: the useful FLOPs
(`bound_flops`) over the matmul rate in the model's dtype measured in the same run
(`matmul_flops_per_s`: on the CPU the median of half-second probes taken between the timed
steps, under the load they ran under; on a GPU one probe after them), and the ratio time /
bound (`bound_ratio`); `-s` prints them.

    python -m pytest benchmarks/bench_train_step.py -q -s [--smoke]
    python -m pytest benchmarks/bench_train_step.py -q -s -k "G2-"    # the two-prompt shapes
"""

import statistics

import pytest
import torch
from _suite import peak_memory, timed

from vrpo_fast.bench import step as train_step
from vrpo_fast.bench.env import Unavailable

SHAPES = {
    "smoke": [dict(G=2, M=1, lengths="hh", cap=(24, 12), hidden=32, layers=1, vocab=500,
                   budget=None)],
    "cpu": [dict(G=4, M=M, lengths=lengths, cap=(256, 128), hidden=256, layers=4, vocab=32000,
                 budget=None) for lengths, Ms in (("hh", (1, 2, 4)), ("long", (1, 2)))
            for M in Ms]
    # Two prompts per step with many responses each (the shared prefix at its most useful).
    + [dict(G=2, M=M, lengths="long", cap=(256, 128), hidden=256, layers=4, vocab=32000,
            budget=None) for M in (2, 8)],
    "gpu": [dict(G=8, M=M, lengths=lengths, cap=(512, 256), hidden=1024, layers=8,
                 vocab=128256, budget=None) for lengths in ("hh", "long") for M in (1, 2, 4)],
}


@pytest.mark.parametrize("variant", train_step.VARIANTS)
def bench_train_step(benchmark, record, mode, variant, shape):
    try:
        if variant == "trl_dpo":
            check = train_step.check_trl_loss(shape)
            assert check["ok"], f"TRL's DPO loss against (b): {check}"
        if variant in train_step.CACHED_REF:
            check = train_step.check_same_maths(shape)
            assert check["ok"], f"(c) against (a): {check}"
        step, state = train_step.make_step(shape, variant)
    except Unavailable as why:
        pytest.skip(str(why))
    benchmark.group = f"train_step {shape}"
    try:
        # On the CPU the matmul rate of the bound is probed between the timed steps.
        probe = train_step.rate_probe(state)
        seconds = timed(benchmark, step, rounds=1 if mode == "smoke" else 3,
                        warmup=0 if mode == "smoke" else 1, rep_ms=3000, setup=probe)
        mem = {} if mode == "smoke" else peak_memory("vrpo_fast.bench.step:probe",
                                                     variant=variant, **shape)
    except torch.cuda.OutOfMemoryError:
        record("train_step", variant, shape, None, error="out of memory")
        pytest.skip("out of memory")
    loss = step()
    assert torch.isfinite(loss), f"{variant}: loss {loss.item()} after the timed steps"
    bound = train_step.bound(variant, state, statistics.median(seconds),
                             probe.rate() if probe else None)
    print(f"\n{variant} {shape}: {statistics.median(seconds) * 1e3:.1f} ms, bound "
          f"{bound['bound_s'] * 1e3:.1f} ms ({bound['bound_flops'] / 1e9:.2f} GFLOP at "
          f"{bound['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s), {bound['bound_ratio']:.2f}x"
          + (f", MFU {bound['mfu']:.1%}" if "mfu" in bound else ""))
    record("train_step", variant, shape, seconds, **train_step.token_counts(variant, state),
           **bound, **mem)
