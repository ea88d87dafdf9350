"""Sequence log-probs of K responses per prompt, packed vs naive:

  naive   every (prompt, response) in its own right-padded row, full logits, log_softmax,
          gather (the layout of `sequence_logps(impl="naive")` and of DPO trainers)
  packed  `vrpo_fast.sequence_logps(impl="packed")`: each prompt once with its responses behind
          it, the LM head only on response positions, vocabulary in chunks

on a small Llama-style model, "score" (no grad, what `vrpo-fast score` does) and "train"
(forward + backward). The packed path should take at most the token ratio
(P + K R) / (K (P + R)) of the naive time, less where the naive rows carry padding.

    python -m pytest benchmarks/bench_packing.py -q [--smoke]
"""

import pytest
import torch
from _suite import peak_memory, timed

from vrpo_fast.bench.env import device
from vrpo_fast.bench.layouts import build_model, make_groups, padded_logps, padded_tokens
from vrpo_fast.bench.memory import measure, tensor_bytes
from vrpo_fast.packing import trainer_budget

SHAPES = {
    "smoke": [dict(G=2, K=4, lengths="hh", cap=(12, 8), hidden=32, layers=1, vocab=500,
                   budget=None)],
    "cpu": [dict(G=4, K=K, lengths="long", cap=(160, 120), hidden=256, layers=4, vocab=32000,
                 budget=None) for K in (4, 6)],
    "gpu": [dict(G=16, K=K, lengths="long", cap=(160, 120), hidden=1024, layers=8,
                 vocab=128256, budget=None) for K in (4, 6)],
}


def setup(G, K, lengths, cap, hidden, layers, vocab, budget):
    model = build_model(hidden, layers, vocab)
    prompts, responses = make_groups(G, K, lengths, vocab, tuple(cap))
    # The trainer's packing budget: on the CPU the packed mask is a dense (T, T) SDPA mask, so
    # rows no longer than the longest group keep attention from growing with G^2.
    budget = trainer_budget(budget, device(), prompts, responses)
    return model, prompts, responses, budget


def make_fn(provider, model, prompts, responses, budget):
    from vrpo_fast.logprobs import sequence_logps

    if provider == "naive":
        return lambda: padded_logps(model, prompts, responses)
    return lambda: sequence_logps(model, prompts, responses, impl="packed", max_tokens=budget)


def make_op(fn, model, direction):
    if direction == "score":
        def score():
            with torch.no_grad():
                fn()
        return score

    def train():
        fn().sum().backward()
        model.zero_grad(set_to_none=True)
    return train


def probe(provider, direction, **shape):
    model, prompts, responses, budget = setup(**shape)
    op = make_op(make_fn(provider, model, prompts, responses, budget), model, direction)
    op()
    return measure(op, tensor_bytes(model))


@pytest.mark.parametrize("direction", ["score", "train"])
@pytest.mark.parametrize("provider", ["naive", "packed"])
def bench_sequence_logps(benchmark, record, mode, provider, direction, shape):
    from vrpo_fast.logprobs import sequence_logps

    model, prompts, responses, budget = setup(**shape)
    fn = make_fn(provider, model, prompts, responses, budget)
    with torch.no_grad():            # correctness: against the library's naive oracle
        want = sequence_logps(model, prompts, responses, impl="naive")
        got = fn()
    tol = 1e-4 if want.dtype == torch.float32 and model.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)
    benchmark.group = f"sequence_logps {shape} {direction}"
    seconds = timed(benchmark, make_op(fn, model, direction),
                    rounds=1 if mode == "smoke" else 5, warmup=0 if mode == "smoke" else 1,
                    rep_ms=2000)
    mem = {} if mode == "smoke" else peak_memory("bench_packing:probe", provider=provider,
                                                 direction=direction, **shape)
    G, K = shape["G"], shape["K"]
    P = sum(map(len, prompts))
    R = sum(len(r) for rs in responses for r in rs)
    model_tokens = P + R if provider == "packed" else padded_tokens(prompts, responses)
    record("sequence_logps", provider, shape, seconds, direction=direction, groups=G,
           prompt_mean=P / G, response_mean=R / (G * K), model_tokens=model_tokens,
           lm_head_tokens=R if provider == "packed" else model_tokens,
           token_ratio=(P + R) / (K * P + R), **mem)
