"""One optimizer step of preference training, three ways, each forward + backward + AdamW:

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
                        `vrpo-fast score` writes (no reference forward): the trainer's
                        train.lm_head=two_pass
  vrpo_fast_one_sweep   (c) with the LM head and the loss in one sweep
                        (vrpo_fast.passes.SequenceVRPOLoss, the trainer's default head): per
                        chunk of whole groups the logits once, their gradients formed at once
  vrpo_fast_online      the trainer's step with ref.source = online, as it runs by default: a
                        packed no-grad reference pass every step, then the one-sweep head
  vrpo_fast_online_dense  the same through SDPA over the dense (T, T) mask (the CPU path
                        before the cascade attention), rows no longer than the longest group
  vrpo_fast_online_flash  the same through flash-attn's varlen kernel (attention="flash";
                        CUDA with flash-attn installed), beside vrpo_fast_online's
                        FlexAttention on a GPU

Packing and padding happen inside the timed step for every variant, as in a trainer. Before
timing, (a) and (c) are checked to compute the same policy and reference log-probs and the
same loss (and the online and one-sweep steps the same loss), and TRL's loss against (b)'s.

Beside each time, `bound` gives the step's arithmetic lower bound: its useful FLOPs
(`step_flops`) over the matmul rate in the model's dtype measured in the same run
(`matmul_rate`; on the CPU between the timed calls, by a `RateProbe`).

A shape is a JSON-able dict: G groups, M Monte Carlo pairs, lengths ("hh", "long" or "P,R"),
cap (prompt, response) for "hh", budget (train.max_tokens; None: the trainer's default), and
the model: `preset` (a name in presets.PRESETS, `layers` optionally fewer) or `path` (a local
model, loaded with its weights) or hidden / layers / vocab (a Llama-style model).
"""

from __future__ import annotations

import statistics
import time

import torch

from vrpo_fast.attention import flash_varlen_func
from vrpo_fast.bench.env import Unavailable, device
from vrpo_fast.bench.layouts import (
    build_model,
    make_groups,
    padded_logps,
    padded_tokens,
    parse_lengths,
)
from vrpo_fast.bench.memory import measure, tensor_bytes
from vrpo_fast.bench.presets import preset
from vrpo_fast.logprobs import packed_hidden_states, packed_logps, sequence_logps
from vrpo_fast.models import byte_tokenizer, load_causal_lm
from vrpo_fast.objective import vrpo_loss
from vrpo_fast.ops import linear_logprobs, per_prompt_vrpo_loss
from vrpo_fast.packing import pack_groups, row_padding, trainer_budget
from vrpo_fast.passes import SequenceVRPOLoss

VARIANTS = ("reference_layout", "dpo_naive", "trl_dpo", "vrpo_fast", "vrpo_fast_one_sweep",
            "vrpo_fast_online", "vrpo_fast_online_dense", "vrpo_fast_online_flash")
CACHED_REF = ("vrpo_fast", "vrpo_fast_one_sweep")     # no reference forward inside the step
DPO_VARIANTS = ("dpo_naive", "trl_dpo")
BETA = 0.1


def build_lm(shape: dict, seed: int):
    """The shape's model on the benchmark device (bf16 on a GPU); `seed` picks the random
    initialisation (a loaded model ignores it: policy and reference start from its weights)."""
    if shape.get("path"):
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
    if variant in DPO_VARIANTS:
        responses, M = [rs[:2] for rs in responses], 0
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(shape["G"], 1 + M, generator=gen).to(device())
    # Fused AdamW on both devices (the CPU has a fused kernel too): the optimizer is the same
    # fixed cost in every variant, kept as small as it can be.
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    # The trainer's packing budget (shape["budget"] plays train.max_tokens): unset, one row
    # (the dense-mask variant's own, set in make_step: rows no longer than the longest group).
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


def one_sweep_loss(policy, ref_logps, prompts, responses, g, budget):
    """(c) with the LM head and the loss in one sweep, as the trainer runs it: the summed
    per-prompt losses of `SequenceVRPOLoss`, over the groups."""
    batch = pack_groups(prompts, responses, max_tokens=budget,
                        **row_padding(device())).to(device())
    total, _ = SequenceVRPOLoss(policy)(batch, ref_logps, g, beta=BETA, loss_type="sigmoid",
                                        estimator="vrpo")
    return total / batch.num_groups


def online_loss(policy, ref, prompts, responses, g, budget, attention="auto"):
    """The trainer's micro-step with an online reference, as it runs by default: one packed
    batch, the reference's log-probs without grad, then the policy's LM head and the VRPO loss
    in one sweep (`SequenceVRPOLoss`)."""
    batch = pack_groups(prompts, responses, max_tokens=budget,
                        **row_padding(device(), attention)).to(device())
    with torch.no_grad():
        ref_logps = packed_logps(ref, batch, attention=attention)
    total, _ = SequenceVRPOLoss(policy, attention=attention)(
        batch, ref_logps, g, beta=BETA, loss_type="sigmoid", estimator="vrpo")
    return total / batch.num_groups


def trl_dpo_step(policy, ref, prompts, responses, beta: float):
    """TRL's DPOTrainer on (policy, ref) and the pairs (prompt, responses[0] chosen,
    responses[1] rejected) -> (step, loss, keep): `step()` runs its collator, its training_step
    (forward + backward of the policy, no-grad reference forward, DPO sigmoid loss) and a fused
    AdamW step; `loss()` the loss alone, without grad. The trainer is built on a one-row text
    dataset (its constructor tokenizes one); the timed batches are the id lists themselves."""
    import tempfile

    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        raise Unavailable("trl is not installed (pip install vrpo-fast[trl])") from None


    scratch = tempfile.TemporaryDirectory(prefix="vrpo-bench-trl-")
    args = DPOConfig(output_dir=scratch.name, per_device_train_batch_size=len(prompts),
                     learning_rate=1e-6, beta=beta, loss_type=["sigmoid"], max_length=None,
                     report_to=[], save_strategy="no", logging_strategy="no",
                     bf16=policy.dtype == torch.bfloat16, use_cpu=policy.device.type != "cuda",
                     optim="adamw_torch_fused")
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b",
                                                           "rejected": "c"}]),
                         processing_class=byte_tokenizer())
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1    # what Trainer.train sets per step
    examples = [{"prompt_ids": p, "chosen_ids": rs[0], "rejected_ids": rs[1]}
                for p, rs in zip(prompts, responses)]

    def batch():
        return trainer._prepare_inputs(trainer.data_collator(examples))

    def step():
        trainer.model.train()
        out = trainer.training_step(trainer.model, batch())
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return out

    def loss():
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch())
    return step, loss, [trainer.model, ref, trainer.optimizer, scratch]


def make_step(shape: dict, variant: str):
    """-> (step, state): `step()` is one optimizer step; state holds what it keeps alive.
    Unavailable when the variant cannot run here (trl_dpo without TRL, the flash-attn step
    without CUDA or flash-attn)."""
    if variant == "vrpo_fast_online_flash":
        if device() != "cuda":
            raise Unavailable("vrpo_fast_online_flash: flash-attn's kernels are CUDA only "
                              "(GPU-only provider)")
        try:
            flash_varlen_func()
        except ImportError as err:
            raise Unavailable(f"vrpo_fast_online_flash: {err}") from None
    policy, ref, opt, prompts, responses, g, M, budget = build(shape, variant)
    if variant == "trl_dpo":
        step, _, keep = trl_dpo_step(policy, ref, prompts, responses, BETA)
        return step, dict(keep=keep, prompts=prompts, responses=responses, budget=budget)
    if variant.startswith("vrpo_fast_online"):
        attention = {"vrpo_fast_online_dense": "sdpa",
                     "vrpo_fast_online_flash": "flash"}.get(variant, "auto")
        budget = trainer_budget(shape["budget"], device(), prompts, responses, attention)

        def loss_fn():
            return online_loss(policy, ref, prompts, responses, g, budget, attention)
        keep = [policy, ref, opt, g]
    elif variant in CACHED_REF:
        ref_logps = cached_ref_logps(ref, prompts, responses, budget)
        del ref                      # the cache replaces the reference model in training
        head = fast_loss if variant == "vrpo_fast" else one_sweep_loss

        def loss_fn():
            return head(policy, ref_logps, prompts, responses, g, budget)
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


def per_group_padded_logps(model, prompts, responses):
    """`padded_logps` one group at a time -> (G, K): the same naive layout and full logits,
    but never all groups' at once, which at the trainer's micro-batch on a GPU (16 groups x 18
    responses x ~768 positions x a 152k vocabulary, in fp32) would not fit in its memory."""
    return torch.cat([padded_logps(model, prompts[i:i + 1], responses[i:i + 1])
                      for i in range(len(prompts))])


def check_same_maths(shape: dict) -> dict:
    """(a) and (c) on the same model and data: the packed policy log-probs, the cached
    reference log-probs and the loss against the naive layout's, each as the largest
    |got - want| / (atol + |want|) (atol: the largest |log p|, or 1 for the loss), within
    1e-4 in fp32 and 2e-2 in bf16 (10x that for the loss)."""
    policy, ref, _, prompts, responses, g, M, budget = build(shape, "reference_layout")
    with torch.no_grad():
        naive = per_group_padded_logps(policy, prompts, responses)
        naive_ref = per_group_padded_logps(ref, prompts, responses)
        cached = cached_ref_logps(ref, prompts, responses, budget)
        packed = sequence_logps(policy, prompts, responses, impl="packed", max_tokens=budget)
        a = vrpo_loss(naive, naive_ref, g, beta=BETA, estimator="vrpo" if M else "dpo",
                      check_inputs=False)[0]           # naive_loss on the same log-probs
        c = fast_loss(policy, cached, prompts, responses, g, budget)
        online = online_loss(policy, ref, prompts, responses, g, budget)
        sweep = one_sweep_loss(policy, cached, prompts, responses, g, budget)
    tol = 1e-4 if policy.dtype == torch.float32 else 2e-2
    scale = naive.abs().max()

    def err(got, want, atol):       # assert_close's |got - want| <= atol + rtol |want|, as a ratio
        return ((got - want).abs() / (atol + want.abs())).max().item()
    errs = {"policy log p": err(packed, naive, scale), "reference log p":
            err(cached, naive_ref, scale), "loss": err(c, a, 1.0),
            "online loss": err(online, a, 1.0), "one-sweep loss": err(sweep, a, 1.0)}
    limits = {"policy log p": tol, "reference log p": tol, "loss": 10 * tol,
              "online loss": 10 * tol, "one-sweep loss": 10 * tol}
    return dict(reference="the naive padded layout (a)", rel_err=errs, tol=limits,
                ok=all(errs[k] <= limits[k] for k in errs))


def check_trl_loss(shape: dict) -> dict:
    """TRL's DPO loss on the first step against (b)'s on the same model, pairs and reference,
    as |got - want| / (atol + |want|) (atol 1), within 1e-4 in fp32 and 2e-2 in bf16."""
    policy, ref, _, prompts, responses, g, M, _ = build(shape, "trl_dpo")
    with torch.no_grad():
        want = naive_loss(policy, ref, prompts, responses, g, M).float()
    _, loss, _ = trl_dpo_step(policy, ref, prompts, responses, BETA)
    got = loss().detach().float()
    tol = 1e-4 if policy.dtype == torch.float32 else 2e-2
    err = ((got - want).abs() / (1.0 + want.abs())).item()
    return dict(reference="plain DPO in the naive layout (b)", rel_err={"loss": err},
                tol={"loss": tol}, ok=err <= tol)


def step_flops(model, prompts, responses, *, reference: bool) -> float:
    """Useful FLOPs of one training step on these groups: the arithmetic a step cannot avoid.

    Per forward: 2 P per token through the body (P: the decoder layers' matrix parameters; each
    prompt counted once, every response token once), 4 H d per needed query-key pair per layer
    (q.k and p.v; a prompt token meets its earlier prompt tokens, a response token the whole
    prompt and its own earlier tokens, nothing else), 2 N D V for the LM head on the N response
    tokens. The policy's forward + backward is 3 forwards; an online reference adds one.
    """
    cfg = model.config
    body = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    D, V, H = cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or D // H
    N = sum(len(r) for rs in responses for r in rs)
    tokens = sum(map(len, prompts)) + N
    pairs = sum(len(p) * (len(p) + 1) // 2 +
                sum(len(r) * len(p) + len(r) * (len(r) + 1) // 2 for r in rs)
                for p, rs in zip(prompts, responses))
    forward = 2 * body * tokens + 4 * H * d * cfg.num_hidden_layers * pairs + 2 * N * D * V
    return float(forward * (3 + reference))


def matmul_rate(seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in `dtype` (the model's: float32 on the CPU, bf16
    on a GPU) on this device now, n = 1024 on the CPU and 8192 on a GPU (where a 1024^3 matmul
    is too short to reach the chip's rate): the median of the calls within `seconds`, after
    one warm-up. The median, not the best: on a shared machine the best call is one that ran
    alone, which the timed step, seconds long, never is."""
    n = 8192 if device() == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device()).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)
    a @ b
    sync()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


class RateProbe:
    """The matmul rate taken between a step's timed calls: passed as the timing's untimed
    `setup`, it runs `matmul_rate(seconds, dtype)` before every call, so that the bound is
    measured under the load the steps themselves ran under (a shared machine's load drifts over
    the minutes a benchmark takes: one probe after the timing moved the ratio by +-20 % between
    runs of the same step). On a GPU, whose timing makes many short calls, it is not passed
    and `bound` probes once after the timing."""

    def __init__(self, seconds: float = 0.5, dtype: torch.dtype = torch.float32):
        self.seconds, self.dtype, self.rates = seconds, dtype, []

    def __call__(self) -> tuple:
        self.rates.append(matmul_rate(self.seconds, self.dtype))
        return ()

    def rate(self) -> float | None:
        """The median of the rates taken (None if none was)."""
        return statistics.median(self.rates) if self.rates else None


def rate_probe(state: dict) -> RateProbe | None:
    """The probe to pass as the timing's setup for `make_step`'s state: a `RateProbe` in the
    model's dtype on the CPU, None on a GPU."""
    if device() == "cuda":
        return None
    return RateProbe(dtype=next(state["keep"][0].parameters()).dtype)


def bound(variant: str, state: dict, median_s: float, rate: float | None = None) -> dict:
    """The step's arithmetic lower bound (useful FLOPs of the step this variant computes, its
    responses and its reference pass, at the matmul rate `rate`, FLOP/s: a `RateProbe`'s taken
    between the timed calls, or, when None, one probe now in the model's dtype) and the ratio of
    the measured median to it; on a GPU in `train.metrics.PEAK_FLOPS` also the MFU (useful
    FLOP/s over the chip's peak)."""
    online = variant not in CACHED_REF         # a reference forward inside the step
    model = state["keep"][0]
    flops = step_flops(model, state["prompts"], state["responses"], reference=online)
    rate = rate or matmul_rate(dtype=next(model.parameters()).dtype)
    out = dict(bound_flops=flops, matmul_flops_per_s=rate, bound_s=flops / rate,
               bound_ratio=median_s * rate / flops)
    if device() == "cuda":
        # MFU: the same useful FLOPs per second over the chip's dense bf16 peak (the trainer's
        # table), where the chip is in it.
        from vrpo_fast.train.metrics import peak_flops

        peak = peak_flops(torch.cuda.get_device_name())
        if peak:
            out["mfu"] = flops / median_s / peak
    return out


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (dynamo's unique-graph count):
    the difference around a variant's first and timed steps counts its compilations, on a GPU
    FlexAttention's and its block masks' (vrpo_fast.packing), once per new shape."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def token_counts(variant: str, state: dict) -> dict:
    """Token positions through the model forwards (padding and the reference forward
    included), through the LM head, and useful ones (each prompt once + every response)."""
    prompts, responses = state["prompts"], state["responses"]
    G, K = len(prompts), len(responses[0])
    P = sum(map(len, prompts))
    R = sum(len(r) for rs in responses for r in rs)
    online = variant not in CACHED_REF          # a reference forward inside the step
    if variant.startswith("vrpo_fast"):  # packed rows (with their tail padding), response tokens
        rows, width = pack_groups(prompts, responses, max_tokens=state["budget"]).shape
        model_tokens, lm_head_tokens = (1 + online) * rows * width, (1 + online) * R
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
