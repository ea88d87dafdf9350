"""Sequence log-probs: the packed path against the naive unpadded-per-pair forward (values and
every parameter gradient), the naive oracle against float64 single-sequence forwards, the
chunked LM-head log-prob against float64 full logits, and a proof that no (N, V) tensor exists."""

import random

import pytest
import torch
from helpers import oracle_logprobs, random_groups
from torch.utils._python_dispatch import TorchDispatchMode

from vrpo_fast import chunked_linear_logprobs, sequence_logps
from vrpo_fast.logprobs import naive_sequence_logps, packed_body, packed_logps
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.packing import pack_groups, row_padding


def irregular_groups(G, K, seed):
    """Random groups with a one-token response and a long prompt in them."""
    rng = random.Random(seed)
    prompts, responses = random_groups(G, K, rng)
    responses[0][0] = [7]
    responses[2][K - 1] = [8]
    prompts[1] = [rng.randrange(3, 259) for _ in range(40)]
    return prompts, responses


def weighted_grads(model, out):
    """Gradients of a weighted sum, so that every (g, k) entry's gradient counts differently."""
    model.zero_grad()
    (out * torch.linspace(0.5, 1.5, out.numel()).view_as(out)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got, want, rtol=1e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        assert want[name].abs().sum() > 0, f"{name}: zero gradient, the test would be vacuous"
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


MODELS = {
    "llama-untied": dict(arch="llama", tie_word_embeddings=False),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),      # GQA 4/2 + qkv bias
    "qwen2-untied": dict(arch="qwen2", tie_word_embeddings=False),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("K, max_tokens", [(2, None), (4, 70), (6, 100)])
def test_packed_equals_naive_values_and_every_gradient(name, K, max_tokens):
    model = build_tiny_causal_lm(seed=1, **MODELS[name])
    prompts, responses = irregular_groups(5, K, seed=K)
    if max_tokens is not None:
        b = pack_groups(prompts, responses, max_tokens=max_tokens)
        per_row = [len({s.group for s in b.spans if s.row == r}) for r in range(b.shape[0])]
        assert len(per_row) > 1 and max(per_row) > 1     # several rows, several groups in one
    packed = sequence_logps(model, prompts, responses, max_tokens=max_tokens)
    g_packed = weighted_grads(model, packed)
    naive = sequence_logps(model, prompts, responses, impl="naive")
    g_naive = weighted_grads(model, naive)
    assert packed.shape == (5, K) and packed.dtype == torch.float32
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-4)
    assert_same_gradients(g_packed, g_naive)


def test_padded_bucketed_rows_match_naive_values_and_gradients():
    """Rows padded to a bucket width (the GPU layout: the pads outnumber some rows' tokens)."""
    model = build_tiny_causal_lm(seed=4)
    prompts, responses = irregular_groups(5, 4, seed=9)
    batch = pack_groups(prompts, responses, max_tokens=90, pad_to_multiple=16, bucket_widths=True)
    assert int((batch.group < 0).sum()) > batch.num_tokens // 4          # real padding
    packed = packed_logps(model, batch)
    g_packed = weighted_grads(model, packed)
    naive = naive_sequence_logps(model, prompts, responses)
    assert_same_gradients(g_packed, weighted_grads(model, naive))
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-4)


def test_several_groups_share_a_row_and_match():
    rng = random.Random(3)
    model = build_tiny_causal_lm(seed=2)
    prompts, responses = random_groups(6, 3, rng)
    assert pack_groups(prompts, responses, max_tokens=200).shape[0] == 1   # six groups, one row
    torch.testing.assert_close(sequence_logps(model, prompts, responses, max_tokens=200),
                               sequence_logps(model, prompts, responses, impl="naive"),
                               rtol=0, atol=1e-4)


def test_naive_oracle_equals_float64_single_sequence_forwards():
    """The oracle itself: right padding and the response slice are right."""
    model = build_tiny_causal_lm(seed=4, arch="qwen2")
    prompts, responses = irregular_groups(3, 2, seed=1)
    naive = sequence_logps(model, prompts, responses, impl="naive")
    model64 = model.double()
    with torch.no_grad():
        for g, (prompt, group) in enumerate(zip(prompts, responses)):
            for k, resp in enumerate(group):
                ids = torch.tensor([prompt + resp])
                logp = torch.log_softmax(model64(input_ids=ids).logits[0], dim=-1)
                want = sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(resp))
                assert abs(naive[g, k].item() - want.item()) < 1e-4, (g, k)


def test_packed_body_equals_separate_forwards_token_for_token():
    """What a reward model reads at last_index: each token's hidden state equals the one of a
    separate forward of its own prompt + response."""
    model = build_tiny_causal_lm(seed=5, arch="qwen2", tie_word_embeddings=True)
    prompts, responses = irregular_groups(4, 3, seed=2)
    b = pack_groups(prompts, responses, max_tokens=60)
    with torch.no_grad():
        hidden = packed_body(model, b)                                   # (R, T, D)
        for s in b.spans:
            prompt, resp = prompts[s.group], responses[s.group][s.response]
            alone = model.model(input_ids=torch.tensor([prompt + resp])).last_hidden_state[0]
            torch.testing.assert_close(hidden[s.row, s.start:s.end], alone[len(prompt):],
                                       rtol=0, atol=1e-5)
            torch.testing.assert_close(hidden.flatten(0, 1)[b.last_index[s.group * 3 +
                                                                         s.response]],
                                       alone[-1], rtol=0, atol=1e-5)


def test_temperature_matches_naive():
    model = build_tiny_causal_lm(seed=6)
    prompts, responses = irregular_groups(3, 2, seed=3)
    torch.testing.assert_close(sequence_logps(model, prompts, responses, temperature=0.7),
                               sequence_logps(model, prompts, responses, impl="naive",
                                              temperature=0.7), rtol=0, atol=1e-4)


def mistral(sliding_window):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           sliding_window=sliding_window, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    torch.manual_seed(7)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


@pytest.mark.parametrize("which", ["mistral", "qwen2-mixed"])
def test_sliding_window_models_match_naive(which):
    """A custom 4-D mask replaces transformers' own, so the window must be in it: Mistral
    (every layer windowed) and Qwen2 with a full layer then a windowed one (a mask per kind)."""
    if which == "mistral":
        model = mistral(sliding_window=4)
    else:
        model = build_tiny_causal_lm(seed=8, arch="qwen2", use_sliding_window=True,
                                     sliding_window=4, max_window_layers=1)
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    prompts, responses = irregular_groups(4, 2, seed=4)
    packed = sequence_logps(model, prompts, responses, max_tokens=60)
    g_packed = weighted_grads(model, packed)
    naive = sequence_logps(model, prompts, responses, impl="naive")
    g_naive = weighted_grads(model, naive)
    torch.testing.assert_close(packed, naive, rtol=0, atol=1e-4)
    assert_same_gradients(g_packed, g_naive)


def test_model_loaded_with_eager_attention_is_switched_and_matches():
    from transformers import AutoModelForCausalLM

    from vrpo_fast.models import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="eager")
    prompts, responses = irregular_groups(3, 2, seed=5)
    want = sequence_logps(model, prompts, responses, impl="naive")
    torch.testing.assert_close(sequence_logps(model, prompts, responses), want, rtol=0,
                               atol=1e-4)
    assert model.config._attn_implementation == "vrpo_cascade"    # the CPU default


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bfloat16_model_values_and_gradients_as_close_as_naive_bfloat16():
    prompts, responses = irregular_groups(3, 4, seed=6)
    model32 = build_tiny_causal_lm(seed=3)
    ref = sequence_logps(model32, prompts, responses, impl="naive")
    g_ref = weighted_grads(model32, ref)
    model16 = build_tiny_causal_lm(seed=3, dtype=torch.bfloat16)
    packed = sequence_logps(model16, prompts, responses)
    g_packed = weighted_grads(model16, packed)
    naive = sequence_logps(model16, prompts, responses, impl="naive")
    g_naive = weighted_grads(model16, naive)
    assert packed.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in g_packed.values())
    # Against the float32 oracle, packed bf16 is within 2x (+ slack) of naive bf16's error.
    err_packed = (packed - ref).abs().max().item()
    err_naive = (naive - ref).abs().max().item()
    assert err_packed <= 2 * err_naive + 0.02, (err_packed, err_naive)
    for name in g_ref:
        e_packed = relative_error(g_packed[name], g_ref[name])
        e_naive = relative_error(g_naive[name], g_ref[name])
        assert e_packed <= 2 * e_naive + 0.01, (name, e_packed, e_naive)


class LargestAllocation(TorchDispatchMode):
    """Records the size of the largest tensor any op produces."""

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
    V, D = 32_000, 32
    model = build_tiny_causal_lm(vocab_size=V, hidden_size=D, num_layers=1, num_heads=2,
                                 num_kv_heads=1, intermediate_size=64)
    prompts, responses = random_groups(4, 4, random.Random(0), vocab=V, resp=(20, 30))
    batch = pack_groups(prompts, responses)
    full_logits = batch.targets.numel() * V * 4                       # (N, V) float32
    with LargestAllocation() as forward:
        out = packed_logps(model, batch)
    with LargestAllocation() as backward:
        out.sum().backward()
    assert forward.largest < full_logits / 4, (forward.largest, full_logits)
    assert backward.largest < full_logits / 4, (backward.largest, full_logits)
    # The probes do see what they should: the (V, D) weight gradient in backward, and the full
    # logits of the naive path.
    assert backward.largest >= V * D * 4
    with LargestAllocation() as naive:
        naive_sequence_logps(model, prompts, responses)
    assert naive.largest >= full_logits


def test_errors_name_what_is_wrong():
    model = build_tiny_causal_lm()
    with pytest.raises(ValueError, match=r"response_ids\[0\]\[1\]: token id 999 outside"):
        sequence_logps(model, [[1]], [[[3], [999]]])
    with pytest.raises(ValueError, match=r"response_ids\[0\]\[1\]: token id 999 outside"):
        sequence_logps(model, [[1]], [[[3], [999]]], impl="naive")
    with pytest.raises(ValueError, match=r"response_ids\[1\]\[0\]: empty"):
        sequence_logps(model, [[1], [2]], [[[3], [4]], [[], [4]]])
    with pytest.raises(ValueError, match=r"response_ids\[1\]: 1 responses, but group 0 has 2"):
        sequence_logps(model, [[1], [2]], [[[3], [4]], [[5]]], impl="naive")
    with pytest.raises(ValueError, match=r"group 0: 4 tokens .* max_tokens = 3"):
        sequence_logps(model, [[1, 2]], [[[3], [4]]], max_tokens=3)
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        sequence_logps(model, [[1]], [[[3]]], impl="fast")
    with pytest.raises(ValueError, match=r"temperature: must be > 0"):
        sequence_logps(model, [[1]], [[[3]]], temperature=0)
    with pytest.raises(ValueError, match=r"attention: expected one of"):
        packed_logps(model, pack_groups([[1]], [[[3]]]), attention="xformers")
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(259))
    with pytest.raises(ValueError, match=r"LM head with a bias"):
        sequence_logps(model, [[1]], [[[3]]])


@pytest.mark.slow
def test_flex_attention_forward_equals_dense_sdpa_on_cpu():
    """The GPU form of the mask (BlockMask + FlexAttention), run forward-only on the CPU (it
    compiles, tens of seconds), against the dense 4-D mask + SDPA, on rows laid out as on a GPU
    (128-token blocks, pads included)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = build_tiny_causal_lm(seed=9, arch="qwen2")
    prompts, responses = irregular_groups(4, 3, seed=7)
    b = pack_groups(prompts, responses, max_tokens=70, **row_padding("cuda"))
    assert b.shape[1] == 128 and b.shape[0] > 1
    with torch.no_grad():
        dense = packed_body(model, b, attention="sdpa")
        # A compilation failure fails the test: the GPU path would meet it too.
        flex = packed_body(model, b, attention="flex")
    real = b.group >= 0
    torch.testing.assert_close(flex[real], dense[real], rtol=0, atol=1e-5)


# --- the chunked LM-head log-prob (the PyTorch reference of the fused kernel) ---------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("chunk_size", [128, 1007, 4096])
def test_chunked_logprobs_values_and_gradients_match_float64(temperature, segments, chunk_size):
    N, D, V, S = 37, 24, 1007, 7
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[[3, 17]] = -100                                   # ignored positions
    seg = torch.randint(0, S - 1, (N,))                       # unsorted; segment S - 1 empty
    kwargs = dict(segment_ids=seg, num_segments=S) if segments else {}
    out = chunked_linear_logprobs(hidden, weight, targets, temperature=temperature,
                                  chunk_size=chunk_size, **kwargs)
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref = oracle_logprobs(h64, w64, targets, temperature)
    if segments:
        ref = torch.zeros(S, dtype=torch.float64).index_add(0, seg, ref)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    up = torch.randn(ref.shape, dtype=torch.float64)
    (out * up.float()).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)
    assert (hidden.grad[[3, 17]] == 0).all() and (hidden.grad[0] != 0).any()
    if not segments:
        assert (out[[3, 17]] == 0).all()


def test_chunked_logprobs_large_magnitude_logits():
    hidden = torch.randn(8, 16, dtype=torch.float64) * 100
    weight = torch.randn(300, 16, dtype=torch.float64) * 100          # logits ~ 1e4
    targets = torch.randint(0, 300, (8,))
    h = hidden.float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    out = chunked_linear_logprobs(h, w, targets, chunk_size=64)
    out.sum().backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = oracle_logprobs(h64, w64, targets)
    ref.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(h.grad).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=5e-2)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-3, atol=1e-2)


def test_chunked_logprobs_bfloat16_inputs_accumulate_in_float32():
    N, D, V = 29, 32, 500
    hidden = torch.randn(N, D).bfloat16().requires_grad_(True)
    weight = (torch.randn(V, D) / 4).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (N,))
    out = chunked_linear_logprobs(hidden, weight, targets, chunk_size=128)
    out.sum().backward()
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    ref = oracle_logprobs(h64, w64, targets)
    ref.sum().backward()
    assert out.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # The logits of the bf16 inputs are exact in float32; only the final gradients are rounded.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-2, atol=1e-2)
