"""Sequence log-probs of K responses per prompt: packed (prompt once, LM head on response
tokens only) vs naive (one padded forward per (prompt, response), full logits), forward and
backward, on a small Llama-style model at HH-like lengths. The expected time ratio is at least
the token ratio (P + K R) / (K (P + R))."""

import random

import pytest
import torch
from conftest import timed

SHAPES = {
    "smoke": [dict(G=2, K=4, P=12, R=(4, 8), hidden=32, layers=1, vocab=500)],
    "cpu": [dict(G=4, K=K, P=160, R=(60, 120), hidden=256, layers=4, vocab=32000)
            for K in (4, 6)],
    "gpu": [dict(G=16, K=K, P=160, R=(60, 120), hidden=1024, layers=8, vocab=128256)
            for K in (4, 6)],
}


def setup(G, K, P, R, hidden, layers, vocab):
    from vrpo_fast.models import build_tiny_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_tiny_causal_lm(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                                 num_heads=max(2, hidden // 64), num_kv_heads=max(1, hidden // 128),
                                 intermediate_size=hidden * 3).to(device)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(P)] for _ in range(G)]
    responses = [[[rng.randrange(3, vocab) for _ in range(rng.randint(*R))] for _ in range(K)]
                 for _ in range(G)]
    return model, prompts, responses


@pytest.mark.parametrize("provider", ["naive", "packed"])
def bench_sequence_logps(benchmark, record, mode, provider, shape):
    from vrpo_fast.logprobs import sequence_logps

    model, prompts, responses = setup(**shape)
    with torch.no_grad():
        want = sequence_logps(model, prompts, responses, impl="naive")
        got = sequence_logps(model, prompts, responses, impl=provider)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-4)

    def op():
        sequence_logps(model, prompts, responses, impl=provider).sum().backward()
        model.zero_grad(set_to_none=True)
    benchmark.group = f"sequence_logps {shape}"
    seconds = timed(benchmark, op, rounds=1 if mode == "smoke" else 5)
    resp_tokens = sum(len(r) for rs in responses for r in rs)
    P, K, G = shape["P"], shape["K"], shape["G"]
    tokens = G * P + resp_tokens if provider == "packed" else K * G * P + resp_tokens
    record("sequence_logps", provider, shape, seconds, tokens=tokens,
           token_ratio_packed_over_naive=(G * P + resp_tokens) / (K * G * P + resp_tokens))
