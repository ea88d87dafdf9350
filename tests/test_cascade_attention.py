"""The cascade attention (vrpo_fast/attention.py) inside transformers models, in float64:
hidden states and every parameter gradient against the dense-mask path (SDPA over the packed
(R, 1, T, T) mask) and against the naive unpacked forward (each prompt + response alone, no
padding, no mask), for K in {2, 6, 18}, one-token prompts and responses, GQA, q/k/v biases,
sliding windows, activation checkpointing; a model left on the cascade implementation still
runs plain padded forwards as SDPA does."""

import random

import pytest
import torch

from vrpo_fast.logprobs import packed_body
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.packing import pack_groups

MODELS = {
    "llama": dict(arch="llama"),                       # GQA 4 query / 2 key-value heads
    "qwen2": dict(arch="qwen2", num_kv_heads=1),       # GQA 4 / 1, q/k/v biases
}


def groups(G, K, seed):
    """Random groups with a one-token prompt, a one-token response and a long prompt."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(2, 12))] for _ in range(G)]
    responses = [[[rng.randrange(3, 259) for _ in range(rng.randint(1, 7))] for _ in range(K)]
                 for _ in range(G)]
    prompts[0] = [rng.randrange(3, 259)]
    responses[1][K - 1] = [rng.randrange(3, 259)]
    prompts[-1] = [rng.randrange(3, 259) for _ in range(20)]
    return prompts, responses


def model64(name, seed=3, **extra):
    model = build_tiny_causal_lm(seed=seed, dtype=torch.float64, **MODELS[name], **extra)
    with torch.no_grad():        # biases are zero at initialisation: make them count
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def body_and_grads(model, batch, attention, weights):
    """Hidden states at real positions and the parameter gradients of sum(weights * hidden)."""
    model.zero_grad()
    hidden = packed_body(model, batch, attention=attention)
    real = batch.group >= 0
    (hidden[real] * weights[real]).sum().backward()
    return hidden[real].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


def assert_close_grads(got, want, tol=1e-10):
    """Every gradient within `tol` x its largest entry."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        scale = w.abs().max().item()
        assert scale > 0, f"{name}: zero gradient, the test would be vacuous"
        torch.testing.assert_close(got[name], w, rtol=0, atol=tol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def weights_for(batch, hidden_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*batch.shape, hidden_size, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("K, max_tokens", [(2, 40), (6, 90), (18, None)])
def test_cascade_equals_dense_mask_values_and_every_gradient(name, K, max_tokens):
    model = model64(name)
    prompts, responses = groups(4, K, seed=K)
    batch = pack_groups(prompts, responses, max_tokens=max_tokens)
    if max_tokens is not None:       # several groups in a row, and tail padding
        assert any(sum(not s.pad and s.prompt < 0 for s in row) > 1
                   for row in batch.row_segments())
        assert any(row[-1].pad for row in batch.row_segments())
    w = weights_for(batch, model.config.hidden_size)
    dense, g_dense = body_and_grads(model, batch, "sdpa", w)
    cascade, g_cascade = body_and_grads(model, batch, "cascade", w)
    assert model.config._attn_implementation == "vrpo_cascade"
    torch.testing.assert_close(cascade, dense, rtol=1e-10, atol=1e-10)
    assert_close_grads(g_cascade, g_dense)


def naive_body_and_grads(model, prompts, responses, batch, weights):
    """The oracle: each prompt + response through the model alone (no padding, no mask), its
    hidden states weighted by `weights` at the packed positions they correspond to; a prompt's
    positions are weighted in its first response's sequence only, as the packed row holds the
    prompt once. -> (hidden states in the packed row order of real positions, gradients)."""
    model.set_attn_implementation("sdpa")
    model.zero_grad()
    R, T = batch.shape
    out = torch.zeros(R, T, model.config.hidden_size, dtype=torch.float64)
    total = 0
    for s in batch.spans:
        p = batch.prompt_spans[s.group]
        ids = prompts[s.group] + responses[s.group][s.response]
        hidden = model.model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
        P = len(prompts[s.group])
        total = total + (hidden[P:] * weights[s.row, s.start:s.end]).sum()
        out[s.row, s.start:s.end] = hidden[P:].detach()
        if s.response == 0:
            total = total + (hidden[:P] * weights[p.row, p.start:p.end]).sum()
            out[p.row, p.start:p.end] = hidden[:P].detach()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out[batch.group >= 0], grads


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("K, max_tokens", [(2, 40), (6, None), (18, None)])
def test_cascade_equals_naive_unpacked_forward(name, K, max_tokens):
    model = model64(name, seed=5)
    prompts, responses = groups(3, K, seed=10 + K)
    batch = pack_groups(prompts, responses, max_tokens=max_tokens)
    w = weights_for(batch, model.config.hidden_size, seed=1)
    cascade, g_cascade = body_and_grads(model, batch, "cascade", w)
    naive, g_naive = naive_body_and_grads(model, prompts, responses, batch, w)
    torch.testing.assert_close(cascade, naive, rtol=1e-10, atol=1e-10)
    # transformers' RMSNorm computes in float32 even in a float64 model, and the oracle sums
    # the gradients of a prompt's K copies after their norms' backward, the packed row before:
    # float32 rounding (~1e-7 of the largest entry), where the dense-mask path agrees to 1e-15.
    assert_close_grads(g_cascade, g_naive, tol=1e-6)


def test_activation_checkpointing_recomputes_the_cascade():
    """The recomputed forward of a checkpointed layer gets the layout again (transformers keeps
    the layer's keywords for it): gradients equal the dense-mask path's."""
    model = model64("qwen2", seed=6)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prompts, responses = groups(3, 4, seed=2)
    batch = pack_groups(prompts, responses, max_tokens=50)
    w = weights_for(batch, model.config.hidden_size, seed=2)
    dense, g_dense = body_and_grads(model, batch, "sdpa", w)
    cascade, g_cascade = body_and_grads(model, batch, "cascade", w)
    torch.testing.assert_close(cascade, dense, rtol=1e-10, atol=1e-10)
    assert_close_grads(g_cascade, g_dense)


def mistral64(sliding_window):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           sliding_window=sliding_window, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    torch.manual_seed(7)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()


@pytest.mark.parametrize("which", ["mistral", "qwen2-mixed"])
def test_sliding_windows_equal_dense_mask(which):
    """Windows shorter than prompts (the prompt's own attention is banded) and than prompt +
    response: Mistral (every layer) and Qwen2 with a full layer then a windowed one."""
    if which == "mistral":
        model = mistral64(sliding_window=5)
    else:
        model = model64("qwen2", seed=8, use_sliding_window=True, sliding_window=5,
                        max_window_layers=1)
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    prompts, responses = groups(4, 3, seed=4)
    batch = pack_groups(prompts, responses, max_tokens=60)
    assert max(map(len, prompts)) > 5
    w = weights_for(batch, model.config.hidden_size, seed=3)
    dense, g_dense = body_and_grads(model, batch, "sdpa", w)
    cascade, g_cascade = body_and_grads(model, batch, "cascade", w)
    torch.testing.assert_close(cascade, dense, rtol=1e-10, atol=1e-10)
    assert_close_grads(g_cascade, g_dense)
    # And the windowed dense path itself against the unpacked forward (transformers' own
    # window), so that both cannot share a mistake.
    naive, _ = naive_body_and_grads(model, prompts, responses, batch, w)
    torch.testing.assert_close(cascade, naive, rtol=1e-10, atol=1e-10)


def test_plain_forward_on_a_cascade_model_is_sdpa():
    """Without the packed layout (generate, a plain forward), a model left on the cascade
    implementation attends as SDPA does, left padding included."""
    model = model64("llama")
    prompts, responses = groups(2, 2, seed=1)
    packed_body(model, pack_groups(prompts, responses), attention="cascade")
    assert model.config._attn_implementation == "vrpo_cascade"
    ids = torch.tensor([[5, 6, 7, 8, 9], [2, 2, 2, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, 3:]).logits
    torch.testing.assert_close(got[1:, 3:], alone, rtol=1e-6, atol=1e-6)   # float32 norms
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_logit_softcapping_is_refused():
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                          head_dim=8, attn_logit_softcapping=50.0, bos_token_id=0,
                          eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="softcaps its attention logits"):
        packed_body(model, pack_groups([[3, 4]], [[[5], [6, 7]]]), attention="cascade")
