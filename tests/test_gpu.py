"""The CUDA paths end to end (skipped without a GPU): the packed forward with a FlexAttention
BlockMask and the Triton log-prob kernel against the naive padded forward with full logits, in
float32 and bfloat16. The kernels alone are tested by test_kernel_*.py and test_ops.py, the
trainer by test_train.py: they run on CUDA too when it is there."""

import random

import pytest
import torch
from helpers import random_groups

from vrpo_fast import sequence_logps
from vrpo_fast.models import build_tiny_causal_lm

pytestmark = pytest.mark.gpu


def groups(G, K, seed, vocab=259):
    prompts, responses = random_groups(G, K, random.Random(seed), vocab, prompt=(1, 40),
                                       resp=(1, 12))
    responses[0][0] = [5]                                     # a one-token response
    return prompts, responses


def grads(model, out):
    model.zero_grad()
    (out.float() * torch.linspace(0.5, 1.5, out.numel(), device=out.device).view_as(out)
     ).sum().backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("arch, tie", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("max_tokens", [None, 96])
def test_flex_packed_equals_naive_float32(arch, tie, max_tokens):
    model = build_tiny_causal_lm(seed=1, arch=arch, tie_word_embeddings=tie).cuda()
    prompts, responses = groups(6, 4, seed=2)
    packed = sequence_logps(model, prompts, responses, max_tokens=max_tokens)
    assert packed.is_cuda and packed.dtype == torch.float32
    assert model.config._attn_implementation == "flex_attention"
    g_packed = grads(model, packed)
    naive = sequence_logps(model, prompts, responses, impl="naive")
    g_naive = grads(model, naive)
    torch.testing.assert_close(packed, naive, rtol=0, atol=2e-4)
    assert g_packed.keys() == g_naive.keys()
    for name in g_naive:
        assert g_naive[name].abs().sum() > 0, name
        assert rel(g_packed[name], g_naive[name]) < 1e-3, name


def test_flex_packed_bfloat16_as_close_as_naive_bfloat16():
    """In bf16 both paths round; packed must be no further from the float32 truth than naive."""
    model = build_tiny_causal_lm(seed=3, arch="llama").cuda()
    prompts, responses = groups(6, 4, seed=4)
    truth = sequence_logps(model, prompts, responses, impl="naive").detach()
    model = model.to(torch.bfloat16)
    packed = sequence_logps(model, prompts, responses).detach()
    naive = sequence_logps(model, prompts, responses, impl="naive").detach()
    assert rel(packed, truth) <= 2 * rel(naive, truth) + 1e-3, (rel(packed, truth),
                                                                 rel(naive, truth))



def test_flash_varlen_bfloat16_matches_flex_and_naive():
    """attention="flash" (flash-attn's varlen kernel, bf16 only): log-probs as close to the
    float32 truth as naive bf16's, and every gradient as close to the float32 naive
    gradients as FlexAttention's bf16 ones (twice the distance, for rounding)."""
    pytest.importorskip("flash_attn")
    from vrpo_fast.logprobs import packed_logps
    from vrpo_fast.packing import pack_groups, row_padding

    model = build_tiny_causal_lm(seed=5, arch="qwen2").cuda()
    prompts, responses = groups(6, 6, seed=6)
    truth = sequence_logps(model, prompts, responses, impl="naive")
    g_truth = grads(model, truth)
    model = model.to(torch.bfloat16)
    # FlexAttention's rows (whole 128-token blocks): the varlen path leaves their pads out.
    batch = pack_groups(prompts, responses, max_tokens=128, **row_padding("cuda")).to("cuda")
    assert bool((batch.group < 0).any())
    got = {}
    for attention in ("flash", "flex"):
        logps = packed_logps(model, batch, attention=attention)
        got[attention] = logps.detach(), grads(model, logps)
    naive = sequence_logps(model, prompts, responses, impl="naive").detach()
    flash, g_flash = got["flash"]
    assert rel(flash, truth) <= 2 * rel(naive, truth.detach()) + 1e-3
    for name, want in g_truth.items():
        assert rel(g_flash[name], want) <= 2 * rel(got["flex"][1][name], want) + 1e-3, name
