"""One optimizer step of preference training, three ways, each forward + backward + AdamW:

  reference_layout (a)  the reference implementation: every one of the 2 + 2M responses padded
                        in its own row with its own copy of the prompt, full logits, eager VRPO
                        loss, and a reference-model forward (no grad) every step
  dpo_naive        (b)  plain DPO (2 responses) in the same naive layout, reference forward
                        every step: what users run today
  vrpo_fast        (c)  pack_groups -> packed_hidden_states -> linear_logprobs (the Triton
                        kernel on CUDA, the chunked reference on the CPU) -> the VRPO loss (the
                        fused kernel on CUDA), reference log-probs from the cache that
                        `vrpo-fast score` writes (no reference forward)

Packing and padding happen inside the timed step for every variant, as in a trainer. Before
timing, (a) and (c) are checked to compute the same policy and reference log-probs and the
same loss.

A shape is a JSON-able dict: G groups, M Monte Carlo pairs, lengths ("hh", "long" or "P,R"),
cap (prompt, response) for "hh", budget (train.max_tokens; None: the trainer's default), and
the model: `preset` (a name in presets.PRESETS, `layers` optionally fewer) or `path` (a local
model, loaded with its weights) or hidden / layers / vocab (a Llama-style model).
"""

from __future__ import annotations

import torch

from vrpo_fast.bench.env import device
from vrpo_fast.bench.layouts import (
    build_model,
    make_groups,
    padded_logps,
    padded_tokens,
    parse_lengths,
)
from vrpo_fast.bench.memory import measure, tensor_bytes
from vrpo_fast.bench.presets import preset
from vrpo_fast.logprobs import packed_hidden_states, sequence_logps
from vrpo_fast.objective import vrpo_loss
from vrpo_fast.ops import linear_logprobs, per_prompt_vrpo_loss
from vrpo_fast.packing import pack_groups, row_padding, trainer_budget

VARIANTS = ("reference_layout", "dpo_naive", "vrpo_fast")
BETA = 0.1


def build_lm(shape: dict, seed: int):
    """The shape's model on the benchmark device (bf16 on a GPU); `seed` picks the random
    initialisation (a loaded model ignores it: policy and reference start from its weights)."""
    if shape.get("path"):
        from vrpo_fast.models import load_causal_lm

        dtype = torch.bfloat16 if device() == "cuda" else torch.float32
        return load_causal_lm(shape["path"], dtype=dtype, what="--model").to(device())
    if shape.get("preset"):
        p = preset(shape["preset"], "--model")
        return build_model(p.hidden, shape.get("layers") or p.layers, p.vocab, seed,
                           heads=p.heads, kv_heads=p.kv_heads, intermediate=p.intermediate,
                           arch=p.arch, tie=p.tie)
    return build_model(shape["hidden"], shape["layers"], shape["vocab"], seed)


def build(shape: dict, variant: str):
    """The variant's models, optimizer and data; (b) keeps the first two responses of each
    group, the labelled pair, so (a), (b) and (c) see the same prompts and pairs."""
    M = shape["M"]
    policy = build_lm(shape, seed=0)
    ref = build_lm(shape, seed=1).eval()
    ref.requires_grad_(False)
    prompts, responses = make_groups(shape["G"], 2 + 2 * M, parse_lengths(shape["lengths"]),
                                     policy.config.vocab_size, tuple(shape["cap"]))
    if variant == "dpo_naive":
        responses, M = [rs[:2] for rs in responses], 0
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(shape["G"], 1 + M, generator=gen).to(device())
    # Fused AdamW on both devices (the CPU has a fused kernel too): the optimizer is the same
    # fixed cost in every variant, kept as small as it can be.
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    # The trainer's packing budget (shape["budget"] plays train.max_tokens): unset, one row on
    # CUDA and rows no longer than the longest group on the CPU (dense mask).
    budget = trainer_budget(shape["budget"], device(), prompts, responses)
    return policy, ref, opt, prompts, responses, g, M, budget


def cached_ref_logps(ref, prompts, responses, budget):
    """What `vrpo-fast score` caches: packed no-grad reference log-probs, (G, K)."""
    with torch.no_grad():
        return sequence_logps(ref, prompts, responses, impl="packed", max_tokens=budget)


def naive_loss(policy, ref, prompts, responses, g, M):
    """(a) and (b): padded rows, full logits, a reference forward, the eager loss."""
    logps = padded_logps(policy, prompts, responses)
    with torch.no_grad():
        ref_logps = padded_logps(ref, prompts, responses)
    return vrpo_loss(logps, ref_logps, g, beta=BETA, estimator="vrpo" if M else "dpo",
                     check_inputs=False)[0]


def fast_loss(policy, ref_logps, prompts, responses, g, budget):
    """(c): shared-prefix packing, LM head on response positions only, cached reference."""
    batch = pack_groups(prompts, responses, max_tokens=budget,
                        **row_padding(device())).to(device())
    hidden, weight = packed_hidden_states(policy, batch)
    logps = linear_logprobs(hidden, weight, batch.targets, segment_ids=batch.segment_ids,
                            num_segments=batch.num_groups * batch.group_size)
    logps = logps.float().view(batch.num_groups, batch.group_size)
    per_prompt = per_prompt_vrpo_loss(logps, ref_logps, g, beta=BETA, loss_type="sigmoid",
                                      estimator="vrpo")
    return per_prompt.mean()


def make_step(shape: dict, variant: str):
    """-> (step, state): `step()` is one optimizer step; state holds what it keeps alive."""
    policy, ref, opt, prompts, responses, g, M, budget = build(shape, variant)
    if variant == "vrpo_fast":
        ref_logps = cached_ref_logps(ref, prompts, responses, budget)
        del ref                      # the cache replaces the reference model in training

        def loss_fn():
            return fast_loss(policy, ref_logps, prompts, responses, g, budget)
        keep = [policy, opt, ref_logps, g]
    else:
        def loss_fn():
            return naive_loss(policy, ref, prompts, responses, g, M)
        keep = [policy, ref, opt, g]

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, dict(keep=keep, prompts=prompts, responses=responses, budget=budget)


def check_same_maths(shape: dict) -> dict:
    """(a) and (c) on the same model and data: the packed policy log-probs, the cached
    reference log-probs and the loss against the naive layout's, each as the largest
    |got - want| / (atol + |want|) (atol: the largest |log p|, or 1 for the loss), within
    1e-4 in fp32 and 2e-2 in bf16 (10x that for the loss)."""
    policy, ref, _, prompts, responses, g, M, budget = build(shape, "reference_layout")
    with torch.no_grad():
        naive = padded_logps(policy, prompts, responses)
        naive_ref = padded_logps(ref, prompts, responses)
        cached = cached_ref_logps(ref, prompts, responses, budget)
        packed = sequence_logps(policy, prompts, responses, impl="packed", max_tokens=budget)
        a = naive_loss(policy, ref, prompts, responses, g, M)
        c = fast_loss(policy, cached, prompts, responses, g, budget)
    tol = 1e-4 if policy.dtype == torch.float32 else 2e-2
    scale = naive.abs().max()

    def err(got, want, atol):       # assert_close's |got - want| <= atol + rtol |want|, as a ratio
        return ((got - want).abs() / (atol + want.abs())).max().item()
    errs = {"policy log p": err(packed, naive, scale), "reference log p":
            err(cached, naive_ref, scale), "loss": err(c, a, 1.0)}
    limits = {"policy log p": tol, "reference log p": tol, "loss": 10 * tol}
    return dict(reference="the naive padded layout (a)", rel_err=errs, tol=limits,
                ok=all(errs[k] <= limits[k] for k in errs))


def token_counts(variant: str, state: dict) -> dict:
    """Token positions through the model forwards (padding and the reference forward
    included), through the LM head, and useful ones (each prompt once + every response)."""
    prompts, responses = state["prompts"], state["responses"]
    G, K = len(prompts), len(responses[0])
    P = sum(map(len, prompts))
    R = sum(len(r) for rs in responses for r in rs)
    if variant == "vrpo_fast":      # packed rows (with their tail padding), response tokens
        rows, width = pack_groups(prompts, responses, max_tokens=state["budget"]).shape
        model_tokens, lm_head_tokens = rows * width, R
    else:     # policy forward + reference forward, both over every padded position
        model_tokens = lm_head_tokens = 2 * padded_tokens(prompts, responses)
    return dict(groups=G, responses_per_group=K, useful_tokens=P + R,
                model_tokens=model_tokens, lm_head_tokens=lm_head_tokens, prompt_mean=P / G,
                response_mean=R / (G * K))


def probe(variant: str, **shape) -> dict:
    """Peak memory of one step, after a first step that creates AdamW's state."""
    step, state = make_step(shape, variant)
    step()
    return measure(step, tensor_bytes(*state["keep"]))
