"""One optimizer step at HH-like lengths (BENCHMARKS.md item 3), each forward + backward +
AdamW on a small Llama-style model:

  reference_layout (a)  the reference implementation: every one of the 2 + 2M responses padded
                        in its own row with its own copy of the prompt, full logits, eager VRPO
                        loss, and a reference-model forward (no grad) every step
  dpo_naive        (b)  plain DPO (2 responses) in the same naive layout, reference forward
                        every step: what users run today
  trl_dpo               TRL's DPOTrainer (when `trl` is installed): its collator, its
                        training_step (policy and reference forwards, its own fused LM head)
                        and the optimizer step, on the same 2 responses
  vrpo_fast        (c)  pack_groups -> packed_hidden_states -> linear_logprobs (the Triton
                        kernel on CUDA, the chunked reference on the CPU) -> the VRPO loss (the
                        fused kernel on CUDA), reference log-probs from the cache that
                        `vrpo-fast score` writes (no reference forward)
  vrpo_fast_online      the trainer's step with ref.source = online: (c) plus a packed no-grad
                        reference pass every step
  vrpo_fast_online_dense  the same through SDPA over the dense (T, T) mask (the CPU path
                        before the cascade attention), rows no longer than the longest group

Packing and padding happen inside the timed step for every variant, as in a trainer. Before
timing, (a) and (c) are checked to compute the same policy and reference log-probs and the
same loss, and TRL's loss against (b)'s. Lengths: "hh" draws prompt / response lengths from
the HH-RLHF slice in data/hh-rlhf; "long" is prompt 160 tokens, responses 60-120.

Beside each time the row holds the step's arithmetic lower bound: the useful FLOPs (`bound_flops`)
over the float32 matmul rate measured in the same run just after the step's timing
(`matmul_flops_per_s`), and the ratio time / bound (`bound_ratio`); `-s` prints them.

    python -m pytest benchmarks/bench_train_step.py -q -s [--smoke]
    python -m pytest benchmarks/bench_train_step.py -q -s -k "G2-"    # the two-prompt shapes
"""

import statistics
import time

import pytest
import torch
from _layouts import build_model, make_groups, padded_logps, padded_tokens, step_flops, trl_dpo_step
from conftest import device, peak_memory, timed

from vrpo_fast.packing import trainer_budget

SHAPES = {
    "smoke": [dict(G=2, M=1, lengths="hh", cap=(24, 12), hidden=32, layers=1, vocab=500,
                   budget=None)],
    "cpu": [dict(G=4, M=M, lengths=lengths, cap=(256, 128), hidden=256, layers=4, vocab=32000,
                 budget=None) for lengths, Ms in (("hh", (1, 2, 4)), ("long", (1, 2)))
            for M in Ms]
    # Two prompts per step with many responses each (the shared prefix at its most useful).
    + [dict(G=2, M=M, lengths="long", cap=(256, 128), hidden=256, layers=4, vocab=32000,
            budget=None) for M in (2, 8)],
    "gpu": [dict(G=8, M=M, lengths=lengths, cap=(512, 256), hidden=1024, layers=8,
                 vocab=128256, budget=None) for lengths in ("hh", "long") for M in (1, 2, 4)],
}
VARIANTS = ["reference_layout", "dpo_naive", "trl_dpo", "vrpo_fast", "vrpo_fast_online",
            "vrpo_fast_online_dense"]
DPO_VARIANTS = ("dpo_naive", "trl_dpo")
BETA = 0.1


def build(shape, variant):
    """The variant's models, optimizer and data; (b) keeps the first two responses of each
    group, the labelled pair, so (a), (b) and (c) see the same prompts and pairs."""
    M = shape["M"]
    policy = build_model(shape["hidden"], shape["layers"], shape["vocab"], seed=0)
    ref = build_model(shape["hidden"], shape["layers"], shape["vocab"], seed=1).eval()
    ref.requires_grad_(False)
    prompts, responses = make_groups(shape["G"], 2 + 2 * M, shape["lengths"], shape["vocab"],
                                     tuple(shape["cap"]))
    if variant in DPO_VARIANTS:
        responses, M = [rs[:2] for rs in responses], 0
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(shape["G"], 1 + M, generator=gen).to(device())
    # Fused AdamW on both devices (the CPU has a fused kernel too): the optimizer is the same
    # fixed cost in every variant, kept as small as it can be.
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    # The trainer's packing budget (shape["budget"] plays train.max_tokens).
    budget = trainer_budget(shape["budget"], device(), prompts, responses)
    return policy, ref, opt, prompts, responses, g, M, budget


def cached_ref_logps(ref, prompts, responses, budget):
    """What `vrpo-fast score` caches: packed no-grad reference log-probs, (G, K)."""
    from vrpo_fast.logprobs import sequence_logps

    with torch.no_grad():
        return sequence_logps(ref, prompts, responses, impl="packed", max_tokens=budget)


def naive_loss(policy, ref, prompts, responses, g, M):
    """(a) and (b): padded rows, full logits, a reference forward, the eager loss."""
    from vrpo_fast.objective import vrpo_loss

    logps = padded_logps(policy, prompts, responses)
    with torch.no_grad():
        ref_logps = padded_logps(ref, prompts, responses)
    return vrpo_loss(logps, ref_logps, g, beta=BETA, estimator="vrpo" if M else "dpo",
                     check_inputs=False)[0]


def fast_loss(policy, ref_logps, prompts, responses, g, budget):
    """(c): shared-prefix packing, LM head on response positions only, cached reference."""
    from vrpo_fast.logprobs import packed_hidden_states
    from vrpo_fast.ops import linear_logprobs, per_prompt_vrpo_loss
    from vrpo_fast.packing import pack_groups, row_padding

    batch = pack_groups(prompts, responses, max_tokens=budget,
                        **row_padding(device())).to(device())
    hidden, weight = packed_hidden_states(policy, batch)
    logps = linear_logprobs(hidden, weight, batch.targets, segment_ids=batch.segment_ids,
                            num_segments=batch.num_groups * batch.group_size)
    logps = logps.float().view(batch.num_groups, batch.group_size)
    per_prompt = per_prompt_vrpo_loss(logps, ref_logps, g, beta=BETA, loss_type="sigmoid",
                                      estimator="vrpo")
    return per_prompt.mean()


def online_loss(policy, ref, prompts, responses, g, budget, attention="auto"):
    """The trainer's micro-step with an online reference: one packed batch, the policy's
    log-probs with grad, the reference's without, the VRPO loss."""
    from vrpo_fast.logprobs import packed_logps
    from vrpo_fast.ops import per_prompt_vrpo_loss
    from vrpo_fast.packing import pack_groups, row_padding

    batch = pack_groups(prompts, responses, max_tokens=budget,
                        **row_padding(device())).to(device())
    logps = packed_logps(policy, batch, attention=attention)
    with torch.no_grad():
        ref_logps = packed_logps(ref, batch, attention=attention)
    per_prompt = per_prompt_vrpo_loss(logps, ref_logps, g, beta=BETA, loss_type="sigmoid",
                                      estimator="vrpo")
    return per_prompt.mean()


def make_step(shape, variant):
    """-> (step, state): `step()` is one optimizer step; state holds what it keeps alive."""
    policy, ref, opt, prompts, responses, g, M, budget = build(shape, variant)
    if variant == "trl_dpo":
        step, _, keep = trl_dpo_step(policy, ref, prompts, responses, BETA)
        return step, dict(keep=keep, prompts=prompts, responses=responses, budget=budget)
    if variant.startswith("vrpo_fast_online"):
        attention = "sdpa" if variant.endswith("dense") else "auto"
        if attention == "sdpa":      # a dense mask pays for every pair of its row
            budget = max(len(p) + sum(map(len, rs)) for p, rs in zip(prompts, responses))

        def loss_fn():
            return online_loss(policy, ref, prompts, responses, g, budget, attention)
        keep = [policy, ref, opt, g]
    elif variant == "vrpo_fast":
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


def check_same_maths(shape):
    """(a) and (c) on the same model and data: same policy / reference log-probs, same loss."""
    policy, ref, _, prompts, responses, g, M, budget = build(shape, "reference_layout")
    with torch.no_grad():
        naive = padded_logps(policy, prompts, responses)
        naive_ref = padded_logps(ref, prompts, responses)
        cached = cached_ref_logps(ref, prompts, responses, budget)
        from vrpo_fast.logprobs import sequence_logps

        packed = sequence_logps(policy, prompts, responses, impl="packed", max_tokens=budget)
        a = naive_loss(policy, ref, prompts, responses, g, M)
        c = fast_loss(policy, cached, prompts, responses, g, budget)
    tol = 1e-4 if policy.dtype == torch.float32 else 2e-2
    scale = naive.abs().max().item()
    torch.testing.assert_close(packed, naive, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(cached, naive_ref, atol=tol * scale, rtol=tol)
    torch.testing.assert_close(c, a, atol=tol * 10, rtol=tol * 10)
    with torch.no_grad():
        online = online_loss(policy, ref, prompts, responses, g, budget)
    torch.testing.assert_close(online, a, atol=tol * 10, rtol=tol * 10)


def check_trl_loss(shape):
    """TRL's DPO loss on the first step equals (b)'s on the same model, pairs and reference."""
    policy, ref, _, prompts, responses, g, M, budget = build(shape, "trl_dpo")
    with torch.no_grad():
        want = naive_loss(policy, ref, prompts, responses, g, M)
    _, loss, _ = trl_dpo_step(policy, ref, prompts, responses, BETA)
    got = loss()
    tol = 1e-4 if policy.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.detach().float(), want.float(), atol=tol, rtol=tol)


def matmul_rate(seconds: float = 1.0) -> float:
    """FLOP/s of a (1024 x 1024) @ (1024 x 1024) float32 matmul on this device now: the median
    of the calls within `seconds`, after one warm-up. The median, not the best: on a shared
    machine the best call is one that ran alone, which the timed step, seconds long, never is."""
    a, b = (torch.randn(1024, 1024, device=device()) for _ in range(2))
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)
    a @ b
    sync()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * 1024 ** 3 / statistics.median(times)


def probe(variant, **shape):
    """Fresh-process peak memory of one step, after a first step that creates AdamW's state."""
    from _peak import measure, tensor_bytes

    step, state = make_step(shape, variant)
    step()
    return measure(step, tensor_bytes(*state["keep"]))


@pytest.mark.parametrize("variant", VARIANTS)
def bench_train_step(benchmark, record, mode, variant, shape):
    if variant == "trl_dpo":
        pytest.importorskip("trl", reason="TRL is not installed")
        check_trl_loss(shape)
    if variant == "vrpo_fast":
        check_same_maths(shape)
    step, state = make_step(shape, variant)
    benchmark.group = f"train_step {shape}"
    try:
        seconds = timed(benchmark, step, rounds=1 if mode == "smoke" else 3,
                        warmup=0 if mode == "smoke" else 1, rep_ms=3000)
        mem = {} if mode == "smoke" else peak_memory("bench_train_step:probe", variant=variant,
                                                     **shape)
    except torch.cuda.OutOfMemoryError:
        record("train_step", variant, shape, None, error="out of memory")
        pytest.skip("out of memory")
    loss = step()
    assert torch.isfinite(loss), f"{variant}: loss {loss.item()} after the timed steps"
    prompts, responses = state["prompts"], state["responses"]
    G, K = len(prompts), len(responses[0])
    P = sum(map(len, prompts))
    R = sum(len(r) for rs in responses for r in rs)
    online = variant != "vrpo_fast"             # a reference forward inside the step
    if variant.startswith("vrpo_fast"):  # packed rows (with their tail padding), response tokens
        from vrpo_fast.packing import pack_groups

        rows, width = pack_groups(prompts, responses, max_tokens=state["budget"]).shape
        model_tokens, lm_head_tokens = (1 + online) * rows * width, (1 + online) * R
    else:     # policy forward + reference forward, both over every padded position
        model_tokens = lm_head_tokens = 2 * padded_tokens(prompts, responses)
    # The arithmetic lower bound of the step this variant computes (its responses, its
    # reference pass), at the matmul rate measured now, under the same load as the timing.
    flops = step_flops(state["keep"][0], prompts, responses, reference=online)
    rate = matmul_rate()
    bound_s = flops / rate
    median = statistics.median(seconds)
    print(f"\n{variant} {shape}: {median * 1e3:.1f} ms, bound {bound_s * 1e3:.1f} ms "
          f"({flops / 1e9:.2f} GFLOP at {rate / 1e9:.1f} GFLOP/s), {median / bound_s:.2f}x")
    record("train_step", variant, shape, seconds, groups=G, responses_per_group=K,
           useful_tokens=P + R, model_tokens=model_tokens, lm_head_tokens=lm_head_tokens,
           prompt_mean=P / G, response_mean=R / (G * K), bound_flops=flops,
           matmul_flops_per_s=rate, bound_s=bound_s, bound_ratio=median / bound_s, **mem)
