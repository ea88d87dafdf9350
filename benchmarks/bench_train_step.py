"""One optimizer step at HH-like lengths (BENCHMARKS.md item 3), three ways:

  (a) reference layout: every one of the 2 + 2M responses padded in its own row with its own
      copy of the prompt, full logits, eager loss, a reference forward every step;
  (b) plain DPO in the same naive layout (2 responses, reference forward every step);
  (c) vrpo_fast: shared-prefix packing, LM head on response tokens only (fused log-prob),
      reference log-probs from the cache (`vrpo-fast score`), the VRPO loss.
Each is forward + backward + AdamW on a small Llama-style model; lengths are drawn from the
HH-RLHF slice in ../shared/data (characters / 4) when present, else from a matching log-normal.
"""

import gzip
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import peak_memory, timed

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / \
    "hh-rlhf-harmless-base-test.jsonl.gz"

SHAPES = {
    "smoke": [dict(G=2, M=1, lengths="hh", hidden=32, layers=1, vocab=500, cap=24)],
    "cpu": [dict(G=4, M=M, lengths=lengths, hidden=256, layers=4, vocab=32000, cap=256)
            for lengths in ("hh", "long") for M in (1, 2, 4)],
    "gpu": [dict(G=16, M=M, lengths=lengths, hidden=1024, layers=8, vocab=128256, cap=1024)
            for lengths in ("hh", "long") for M in (1, 2, 4)],
}
VARIANTS = ["reference_layout", "dpo_naive", "vrpo_fast"]


def hh_lengths(n: int, rng: random.Random, cap: int):
    """(prompt, response) token lengths like HH-RLHF's (prompt mean ~120, responses ~45-55)."""
    pairs = []
    if HH.is_file():
        with gzip.open(HH, "rt") as f:
            for line in f:
                row = json.loads(line)
                cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
                pairs.append((max(4, cut // 4), max(2, (len(row["chosen"]) - cut) // 4)))
    else:
        pairs = [(int(rng.lognormvariate(4.5, 0.8)), int(rng.lognormvariate(3.6, 0.8)))
                 for _ in range(1000)]
    return [(min(p, cap), min(r, cap // 2)) for p, r in rng.sample(pairs, n)]


def make_batch(G, M, lengths, vocab, cap, seed=0):
    rng = random.Random(seed)
    K = 2 + 2 * M
    if lengths == "hh":
        prompt_lens = [p for p, _ in hh_lengths(G, rng, cap)]
        resp_lens = [[r for _, r in hh_lengths(K, rng, cap)] for _ in range(G)]
    else:  # the longer setting: prompt ~160 tokens, responses 60-120
        prompt_lens = [min(cap, 160)] * G
        resp_lens = [[min(cap, rng.randint(60, 120)) for _ in range(K)] for _ in range(G)]
    prompts = [[rng.randrange(3, vocab) for _ in range(P)] for P in prompt_lens]
    responses = [[[rng.randrange(3, vocab) for _ in range(L)] for L in ls] for ls in resp_lens]
    return prompts, responses


def build(shape, variant):
    from vrpo_fast.models import build_tiny_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kw = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
              num_layers=shape["layers"], num_heads=max(2, shape["hidden"] // 64),
              num_kv_heads=max(1, shape["hidden"] // 128),
              intermediate_size=3 * shape["hidden"])
    policy = build_tiny_causal_lm(seed=0, dtype=dtype, **kw).to(device)
    ref = build_tiny_causal_lm(seed=1, dtype=dtype, **kw).to(device).eval()
    prompts, responses = make_batch(shape["G"], shape["M"], shape["lengths"], shape["vocab"],
                                    shape["cap"])
    M = shape["M"]
    if variant == "dpo_naive":
        responses = [rs[:2] for rs in responses]
        M = 0
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    g = torch.full((shape["G"], 1 + M), 0.5, device=device)
    return policy, ref, opt, prompts, responses, g, M


def naive_logps(model, prompts, responses):
    """Full logits of every (prompt, response) row, padded: the reference implementation."""
    from vrpo_fast.logprobs import sequence_logps

    return sequence_logps(model, prompts, responses, impl="naive")


def make_step(shape, variant):
    from vrpo_fast.logprobs import sequence_logps
    from vrpo_fast.objective import vrpo_loss

    policy, ref, opt, prompts, responses, g, M = build(shape, variant)
    cached_ref = None
    if variant == "vrpo_fast":
        with torch.no_grad():
            cached_ref = sequence_logps(ref, prompts, responses)   # what `score` writes

    def step():
        if variant == "vrpo_fast":
            logps = sequence_logps(policy, prompts, responses)
            ref_logps = cached_ref
        else:
            logps = naive_logps(policy, prompts, responses)
            with torch.no_grad():
                ref_logps = naive_logps(ref, prompts, responses)
        loss, _ = vrpo_loss(logps, ref_logps, g, beta=0.1,
                            estimator="vrpo" if M else "dpo", check_inputs=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    K = len(responses[0])
    resp = sum(len(r) for rs in responses for r in rs)
    if variant == "vrpo_fast":
        tokens = sum(map(len, prompts)) + resp
    else:
        width = max(len(p) + len(r) for p, rs in zip(prompts, responses) for r in rs)
        tokens = len(prompts) * K * width * 2        # padded rows, policy + reference forward
    return step, tokens


def probe(variant, **shape):
    from _peak import measure

    step, _ = make_step(shape, variant)
    return measure(step)


@pytest.mark.parametrize("variant", VARIANTS)
def bench_train_step(benchmark, record, mode, variant, shape):
    step, tokens = make_step(shape, variant)
    loss = step()
    assert torch.isfinite(loss)
    benchmark.group = f"train_step {shape}"
    seconds = timed(benchmark, step, rounds=1 if mode == "smoke" else 5)
    peak = None if mode == "smoke" else peak_memory("bench_train_step:probe", variant=variant,
                                                    **shape)
    record("train_step", variant, shape, seconds, tokens_processed=tokens,
           groups=shape["G"], peak_bytes=peak)
