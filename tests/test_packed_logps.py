"""Shared-prefix packing and sequence log-probs against the naive unpacked forward."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vrpo_fast.chunked import chunked_linear_logprobs
from vrpo_fast.logprobs import sequence_logps
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.packing import pack_groups

ARCHS = [
    dict(arch="llama", tie_word_embeddings=False),
    dict(arch="qwen2", tie_word_embeddings=True),        # GQA (2 kv heads of 4) + qkv bias
]


def random_groups(G, K, rng, vocab=259, prompt=(1, 12), resp=(1, 7)):
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))] for _ in range(G)]
    responses = [[[rng.randrange(3, vocab) for _ in range(rng.randint(*resp))] for _ in range(K)]
                 for _ in range(G)]
    return prompts, responses


def grads(model, out):
    model.zero_grad()
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", ARCHS, ids=lambda c: c["arch"])
@pytest.mark.parametrize("K, max_tokens", [(2, None), (4, 64), (6, 80)])
def test_packed_equals_naive_values_and_gradients(cfg, K, max_tokens):
    rng = random.Random(K)
    model = build_tiny_causal_lm(seed=1, **cfg)
    prompts, responses = random_groups(5, K, rng)
    responses[0][0] = [7]                       # a one-token response
    prompts[1] = [rng.randrange(3, 259) for _ in range(30)]   # a long prompt
    if max_tokens is not None:
        batch = pack_groups(prompts, responses, max_tokens=max_tokens)
        assert batch.shape[0] > 1               # the budget forces several rows
    packed = sequence_logps(model, prompts, responses, max_tokens=max_tokens)
    g_packed = grads(model, packed)
    naive = sequence_logps(model, prompts, responses, impl="naive")
    g_naive = grads(model, naive)
    assert packed.shape == (5, K) and packed.dtype == torch.float32
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-4)
    for name in g_naive:
        torch.testing.assert_close(g_packed[name], g_naive[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_several_groups_share_a_row_and_match():
    rng = random.Random(3)
    model = build_tiny_causal_lm(seed=2)
    prompts, responses = random_groups(6, 3, rng)
    batch = pack_groups(prompts, responses, max_tokens=200)
    assert batch.shape[0] == 1                  # all six groups in one row
    torch.testing.assert_close(sequence_logps(model, prompts, responses, max_tokens=200),
                               sequence_logps(model, prompts, responses, impl="naive"),
                               rtol=0, atol=1e-4)


def test_bfloat16_model_close_to_float32():
    rng = random.Random(4)
    model = build_tiny_causal_lm(seed=3)
    prompts, responses = random_groups(3, 4, rng)
    ref = sequence_logps(model, prompts, responses, impl="naive")
    model_bf16 = build_tiny_causal_lm(seed=3, dtype=torch.bfloat16)
    got = sequence_logps(model_bf16, prompts, responses)
    assert got.dtype == torch.float32
    naive_bf16 = sequence_logps(model_bf16, prompts, responses, impl="naive")
    # Packed bf16 is as close to the fp32 oracle as the naive bf16 forward is (2x + slack).
    err_packed = (got - ref).abs().max().item()
    err_naive = (naive_bf16 - ref).abs().max().item()
    assert err_packed <= 2 * err_naive + 0.05, (err_packed, err_naive)


def test_mask_positions_and_targets_match_an_independent_construction():
    prompts = [[10, 11, 12], [20]]
    responses = [[[30, 31], [40]], [[50], [60, 61, 62]]]
    b = pack_groups(prompts, responses)
    assert b.input_ids.tolist() == [[10, 11, 12, 30, 31, 40, 20, 50, 60, 61, 62]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1, 2, 3]]
    # Targets and the positions predicting them, written out by hand.
    assert b.targets.tolist() == [30, 31, 40, 50, 60, 61, 62]
    assert b.pred_index.tolist() == [2, 3, 2, 6, 6, 8, 9]
    assert b.segment_ids.tolist() == [0, 0, 1, 2, 3, 3, 3]
    assert b.last_index.tolist() == [4, 5, 7, 10]
    # Who may attend to whom, by hand: (query, key) pairs for a few tokens.
    m = b.dense_mask()[0, 0]
    visible = {q: [k for k in range(11) if m[q, k]] for q in range(11)}
    assert visible[4] == [0, 1, 2, 3, 4]        # c1 sees prompt + c0 + itself
    assert visible[5] == [0, 1, 2, 5]           # r0 sees prompt + itself, not c*
    assert visible[7] == [6, 7]                 # group 2's response sees only its prompt
    assert visible[10] == [6, 8, 9, 10]


def test_block_mask_equals_dense_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    rng = random.Random(5)
    prompts, responses = random_groups(3, 3, rng)
    b = pack_groups(prompts, responses, pad_to_multiple=8)
    try:
        bm = b.block_mask()
    except Exception as err:  # FlexAttention's CPU compile path is not available everywhere
        pytest.skip(f"create_block_mask unavailable on this machine: {err}")
    R, T = b.shape
    q = torch.arange(T)[:, None].expand(T, T)
    kv = torch.arange(T)[None, :].expand(T, T)
    from_mod = bm.mask_mod(torch.zeros_like(q), torch.zeros_like(q), q, kv)
    assert torch.equal(from_mod, b.dense_mask()[0, 0])
    assert bm.shape[-2:] == (T, T)


def test_budget_and_input_errors():
    with pytest.raises(ValueError, match=r"group 1: 9 tokens .* max_tokens = 8"):
        pack_groups([[1], [1, 2, 3]], [[[4], [5]], [[4, 4, 4], [5, 5, 5]]], max_tokens=8)
    with pytest.raises(ValueError, match=r"response_ids\[1\]\[0\]: empty"):
        pack_groups([[1], [2]], [[[3], [4]], [[], [4]]])
    with pytest.raises(ValueError, match=r"response_ids\[1\]: 1 responses, but group 0 has 2"):
        pack_groups([[1], [2]], [[[3], [4]], [[5]]])
    model = build_tiny_causal_lm()
    with pytest.raises(ValueError, match=r"response_ids\[0\]\[1\]: token id 999 outside"):
        sequence_logps(model, [[1]], [[[3], [999]]])


# --- the chunked LM-head log-prob (the PyTorch reference of the fused kernel) ---------------

def oracle(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Full float64 logits."""
    logits = hidden.double() @ weight.double().T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    out = logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("segments", [False, True])
def test_chunked_logprobs_match_float64_oracle(temperature, segments):
    N, D, V = 37, 24, 1007
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[[3, 17]] = -100                                   # ignored positions
    seg = torch.sort(torch.randint(0, 6, (N,))).values if segments else None
    seg_kwargs = dict(segment_ids=seg, num_segments=7) if segments else {}  # segment 6 empty
    out = chunked_linear_logprobs(hidden, weight, targets, temperature=temperature,
                                  chunk_size=128, **seg_kwargs)
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref_tok = oracle(h64, w64, targets, temperature)
    ref = torch.zeros(7, dtype=torch.float64).index_add(0, seg, ref_tok) if segments else ref_tok
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    up = torch.randn_like(ref)
    (out * up.float()).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    # Ignored positions get exactly no gradient; the others do.
    assert hidden.grad[3].abs().sum() == 0 and hidden.grad[0].abs().sum() > 0


def test_chunked_logprobs_large_logits_do_not_overflow():
    hidden = torch.randn(8, 16) * 100
    weight = torch.randn(300, 16) * 100                       # logits ~1e4
    targets = torch.randint(0, 300, (8,))
    out = chunked_linear_logprobs(hidden, weight, targets, chunk_size=64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), oracle(hidden, weight, targets), rtol=1e-5,
                               atol=1e-2)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_packed_path_never_allocates_tokens_by_vocab_logits():
    V = 32_000
    model = build_tiny_causal_lm(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2,
                                 num_kv_heads=1, intermediate_size=64)
    rng = random.Random(0)
    prompts, responses = random_groups(4, 4, rng, vocab=V, resp=(20, 30))
    n_resp = sum(len(r) for rs in responses for r in rs)
    full_logits = n_resp * V * 4
    with LargestAllocation() as mode:
        out = sequence_logps(model, prompts, responses)
        out.sum().backward()
    # The largest temporaries are (N, chunk) logits and the (V, D) weight gradient.
    assert mode.largest < full_logits / 4, (mode.largest, full_logits)
    with LargestAllocation() as naive_mode:
        sequence_logps(model, prompts, responses, impl="naive").sum().backward()
    assert naive_mode.largest >= full_logits                 # the probe does see full logits
