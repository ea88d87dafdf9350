"""The pairwise LLM judge of aux.mode = judge: judging contexts per
second, packed vs padded.

A prompt group costs 2 (1 + M) judging contexts (every pair in both orders), all sharing the
prefix of instructions and user prompt:

  padded  every context in its own left-padded row, one forward of the batch, the LM head on
          the last position only (`logits_to_keep=1`): a careful unpacked judge
  packed  `vrpo_fast.judge.label_margins`: each group's prefix once with its contexts' remainders
          behind it, the LM head's two label rows on each context's last token

on a random Llama-style model in no-grad, bf16 on a GPU. The packed path should take about the
token ratio (P + C R) / (C (P + R)) of the padded time (C contexts of R tokens after a prefix of
P), less where the padded rows carry padding. Both give the same label margins (checked first).

    python -m pytest benchmarks/bench_judge.py -q [--smoke]
"""

import random

import pytest
import torch
from _suite import timed

from vrpo_fast.bench.env import device
from vrpo_fast.bench.layouts import build_model

SHAPES = {
    "smoke": [dict(G=2, M=1, prefix=16, response=8, hidden=32, layers=1, vocab=500)],
    "cpu": [dict(G=4, M=M, prefix=300, response=100, hidden=256, layers=4, vocab=32000)
            for M in (2, 4)],
    "gpu": [dict(G=16, M=M, prefix=400, response=200, hidden=1024, layers=8, vocab=128256)
            for M in (2, 4)],
}
QUESTION = 20          # tokens of the question after the two responses
LABELS = [3, 4]


def make_contexts(G, M, prefix, response, vocab, seed=0):
    """G groups [(prefix ids, [2 (1 + M) remainders])]: a remainder is response A, response B
    (60-100 % of `response` tokens each) and the question."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(5, vocab) for _ in range(n)]

    groups = []
    for _ in range(G):
        responses = [ids(rng.randint(response * 6 // 10, response)) for _ in range(2 + 2 * M)]
        question = ids(QUESTION)
        rest = []
        for a, b in zip(responses[0::2], responses[1::2]):
            rest += [a + b + question, b + a + question]
        groups.append((ids(prefix), rest))
    return groups


def padded_margins(model, groups):
    """(contexts,) z_A - z_B of every context from one left-padded forward."""
    seqs = [p + r for p, rest in groups for r in rest]
    width = max(map(len, seqs))
    dev = next(model.parameters()).device
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                   position_ids=positions.to(dev), use_cache=False,
                   logits_to_keep=1).logits[:, -1].float()
    return logits[:, LABELS[0]] - logits[:, LABELS[1]]


def packed_margins(model, groups):
    from vrpo_fast.judge import label_margins

    budget = max(len(p) + sum(map(len, rest)) for p, rest in groups)
    return torch.tensor([v for row in label_margins(model, LABELS, groups, budget) for v in row])


@pytest.mark.parametrize("provider", ["padded", "packed"])
def bench_judge(benchmark, record, mode, provider, shape):
    G, M = shape["G"], shape["M"]
    model = build_model(shape["hidden"], shape["layers"], shape["vocab"]).eval()
    groups = make_contexts(G, M, shape["prefix"], shape["response"], shape["vocab"])
    fn = {"padded": padded_margins, "packed": packed_margins}[provider]
    with torch.no_grad():
        want = padded_margins(model, groups).cpu()
        got = fn(model, groups).cpu()
    tol = 1e-3 if model.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)

    def op():
        with torch.no_grad():
            fn(model, groups)

    benchmark.group = f"judge {shape}"
    seconds = timed(benchmark, op, rounds=1 if mode == "smoke" else 3,
                    warmup=0 if mode == "smoke" else 1, rep_ms=2000)
    contexts = sum(len(rest) for _, rest in groups)
    packed_tokens = sum(len(p) + sum(map(len, rest)) for p, rest in groups)
    padded_tokens = contexts * max(len(p) + len(r) for p, rest in groups for r in rest)
    median = sorted(seconds)[len(seconds) // 2]
    record("judge", provider, shape, seconds, contexts=contexts,
           contexts_per_s=contexts / median, device_kind=device(),
           model_tokens=packed_tokens if provider == "packed" else padded_tokens,
           token_ratio=packed_tokens / padded_tokens)
