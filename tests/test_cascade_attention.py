"""The cascade attention (vrpo_fast/attention.py) inside transformers models, in float64:
hidden states and every parameter gradient against the dense-mask path (SDPA over the packed
(R, 1, T, T) mask) and against the naive unpacked forward (each prompt + response alone, no
padding, no mask), for K in {2, 6, 18}, one-token prompts and responses, GQA, q/k/v biases,
sliding windows, activation checkpointing; a model left on the cascade implementation still
runs plain padded forwards as SDPA does.

The flash-attn varlen form of the same decomposition (attention="flash") runs the same tests
on the CPU against a stand-in for `flash_attn.flash_attn_varlen_func` written from flash-attn's
documented contract (sequences by cu_seqlens, causal aligned at the bottom right, window_size
(left, right) around that diagonal, grouped-query heads), naively per sequence in float64:
what is checked is the layout and the gathering around the kernel, not flash-attn's CUDA
kernel itself (a GPU benchmark runs that)."""

import random
import sys

import pytest
import torch

import vrpo_fast.attention
from vrpo_fast.logprobs import packed_body
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.packing import pack_groups

MODELS = {
    "llama": dict(arch="llama"),                       # GQA 4 query / 2 key-value heads
    "qwen2": dict(arch="qwen2", num_kv_heads=1),       # GQA 4 / 1, q/k/v biases
}


def standin_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         dropout_p=0.0, softmax_scale=None, causal=False,
                         window_size=(-1, -1), **unused):
    """flash-attn's varlen contract, naively: q (total_q, H, d), k / v (total_k, H_kv, d);
    query i of a sequence of Lq queries and Lk keys sees keys j with j <= i + Lk - Lq (causal)
    and i + Lk - Lq - left <= j <= i + Lk - Lq + right (a window side of -1: unbounded)."""
    assert dropout_p == 0.0 and not unused, unused
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    H, H_kv, d = q.shape[1], k.shape[1], q.shape[2]
    assert H % H_kv == 0
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cq[-1] == q.shape[0] and ck[-1] == k.shape[0] and len(cq) == len(ck)
    outs = []
    for s in range(len(cq) - 1):
        qs, ks, vs = q[cq[s]:cq[s + 1]], k[ck[s]:ck[s + 1]], v[ck[s]:ck[s + 1]]
        Lq, Lk = len(qs), len(ks)
        assert 0 < Lq <= max_seqlen_q and 0 < Lk <= max_seqlen_k
        i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
        diag = i + (Lk - Lq)
        seen = torch.ones(Lq, Lk, dtype=torch.bool)
        if causal:
            seen &= j <= diag
        left, right = window_size
        if left >= 0:
            seen &= j >= diag - left
        if right >= 0:
            seen &= j <= diag + right
        ks, vs = (x.repeat_interleave(H // H_kv, dim=1) for x in (ks, vs))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hqk,khd->qhd", probs, vs))
    standin_flash_varlen.calls += 1
    return torch.cat(outs)


@pytest.fixture
def flash_standin(monkeypatch):
    """flash-attn's varlen function replaced by the stand-in for the test (where the varlen
    attention looks it up); yields the stand-in, whose `calls` counts its calls."""
    monkeypatch.setattr(vrpo_fast.attention, "flash_varlen_func", lambda: standin_flash_varlen)
    standin_flash_varlen.calls = 0
    yield standin_flash_varlen


ATTENTIONS = ["cascade", "flash"]
IMPL_NAMES = {"cascade": "vrpo_cascade", "flash": "vrpo_varlen"}


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


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("K, max_tokens", [(2, 40), (6, 90), (18, None)])
def test_cascade_equals_dense_mask_values_and_every_gradient(name, K, max_tokens, attention,
                                                              flash_standin):
    model = model64(name)
    prompts, responses = groups(4, K, seed=K)
    batch = pack_groups(prompts, responses, max_tokens=max_tokens)
    if max_tokens is not None:       # several groups in a row, and tail padding
        assert any(sum(not s.pad and s.prompt < 0 for s in row) > 1
                   for row in batch.row_segments())
        assert any(row[-1].pad for row in batch.row_segments())
    w = weights_for(batch, model.config.hidden_size)
    dense, g_dense = body_and_grads(model, batch, "sdpa", w)
    cascade, g_cascade = body_and_grads(model, batch, attention, w)
    assert model.config._attn_implementation == IMPL_NAMES[attention]
    # One kernel call per layer, forward only (autograd differentiates the stand-in).
    want_calls = model.config.num_hidden_layers if attention == "flash" else 0
    assert flash_standin.calls == want_calls
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


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("K, max_tokens", [(2, 40), (6, None), (18, None)])
def test_cascade_equals_naive_unpacked_forward(name, K, max_tokens, attention, flash_standin):
    model = model64(name, seed=5)
    prompts, responses = groups(3, K, seed=10 + K)
    batch = pack_groups(prompts, responses, max_tokens=max_tokens)
    w = weights_for(batch, model.config.hidden_size, seed=1)
    cascade, g_cascade = body_and_grads(model, batch, attention, w)
    naive, g_naive = naive_body_and_grads(model, prompts, responses, batch, w)
    torch.testing.assert_close(cascade, naive, rtol=1e-10, atol=1e-10)
    # transformers' RMSNorm computes in float32 even in a float64 model, and the oracle sums
    # the gradients of a prompt's K copies after their norms' backward, the packed row before:
    # float32 rounding (~1e-7 of the largest entry), where the dense-mask path agrees to 1e-15.
    assert_close_grads(g_cascade, g_naive, tol=1e-6)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_activation_checkpointing_recomputes_the_cascade(attention, flash_standin):
    """The recomputed forward of a checkpointed layer gets the layout again (transformers keeps
    the layer's keywords for it): gradients equal the dense-mask path's."""
    model = model64("qwen2", seed=6)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prompts, responses = groups(3, 4, seed=2)
    batch = pack_groups(prompts, responses, max_tokens=50)
    w = weights_for(batch, model.config.hidden_size, seed=2)
    dense, g_dense = body_and_grads(model, batch, "sdpa", w)
    cascade, g_cascade = body_and_grads(model, batch, attention, w)
    torch.testing.assert_close(cascade, dense, rtol=1e-10, atol=1e-10)
    assert_close_grads(g_cascade, g_dense)
    if attention == "flash":       # each layer's forward twice: once more in backward
        assert flash_standin.calls == 2 * model.config.num_hidden_layers


def mistral64(sliding_window):
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           sliding_window=sliding_window, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)
    torch.manual_seed(7)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("which", ["mistral", "qwen2-mixed"])
def test_sliding_windows_equal_dense_mask(which, attention, flash_standin):
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
    cascade, g_cascade = body_and_grads(model, batch, attention, w)
    torch.testing.assert_close(cascade, dense, rtol=1e-10, atol=1e-10)
    assert_close_grads(g_cascade, g_dense)
    # And the windowed dense path itself against the unpacked forward (transformers' own
    # window), so that both cannot share a mistake.
    naive, _ = naive_body_and_grads(model, prompts, responses, batch, w)
    torch.testing.assert_close(cascade, naive, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_plain_forward_on_a_cascade_model_is_sdpa(attention, flash_standin):
    """Without the packed layout (generate, a plain forward), a model left on the cascade (or
    varlen) implementation attends as SDPA does, left padding included."""
    model = model64("llama")
    prompts, responses = groups(2, 2, seed=1)
    packed_body(model, pack_groups(prompts, responses), attention=attention)
    assert model.config._attn_implementation == IMPL_NAMES[attention]
    flash_standin.calls = 0
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
    assert flash_standin.calls == 0


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_attention_logit_softcapping_is_refused(attention, flash_standin):
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                          head_dim=8, attn_logit_softcapping=50.0, bos_token_id=0,
                          eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="softcaps its attention logits"):
        packed_body(model, pack_groups([[3, 4]], [[[5], [6, 7]]]), attention=attention)


def test_flash_without_flash_attn_says_what_to_install(monkeypatch):
    model = model64("llama")
    monkeypatch.setitem(sys.modules, "flash_attn", None)      # import flash_attn fails
    with pytest.raises(ImportError, match=r"attention='flash' needs flash-attn.*\[flash\]"):
        packed_body(model, pack_groups([[3, 4]], [[[5], [6, 7]]]), attention="flash")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_attention_sinks_are_refused(attention, flash_standin):
    """GPT-OSS hands its sinks to the attention function as `s_aux`: ignoring them would give
    wrong log-probs without a word."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    config = GptOssConfig(vocab_size=259, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          intermediate_size=32, num_local_experts=2, num_experts_per_tok=1,
                          sliding_window=8, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"GptOssAttention has attention sinks \(s_aux\)"):
        packed_body(model, pack_groups([[3, 4]], [[[5], [6, 7]]]), attention=attention)
