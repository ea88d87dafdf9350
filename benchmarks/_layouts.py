"""Shared pieces of the model-level benchmarks (bench_packing, bench_train_step): the small
Llama-style model, HH-like prompt / response lengths, and the naive padded layout that the
reference implementation and plain DPO trainers use."""

import functools
import gzip
import json
import os
import random
from pathlib import Path

import torch

# The HH-RLHF slice shipped in the repository (data/hh-rlhf, MIT licence beside it);
# VRPO_BENCH_HH points elsewhere.
HH = Path(os.environ.get("VRPO_BENCH_HH", Path(__file__).resolve().parents[1] / "data" /
                         "hh-rlhf" / "harmless-base-test.jsonl.gz"))


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0):
    """A small Llama-style causal LM (GQA, SwiGLU width 3 x hidden), bf16 on a GPU."""
    from vrpo_fast.models import build_tiny_causal_lm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    return build_tiny_causal_lm(seed=seed, dtype=dtype, vocab_size=vocab, hidden_size=hidden,
                                num_layers=layers, num_heads=max(2, hidden // 64),
                                num_kv_heads=max(1, hidden // 128),
                                intermediate_size=3 * hidden,
                                max_position_embeddings=4096).to(dev)


@functools.lru_cache(maxsize=1)
def hh_lengths() -> tuple[list[int], list[int]]:
    """(prompt lengths, response lengths) in tokens of the HH-RLHF harmless test slice, counted
    as characters / 4 (no tokenizer can be downloaded here; ~4 characters per BPE token in
    English). Prompt = everything up to the last "Assistant:"; responses = chosen and rejected.
    Mean prompt ~121 tokens (p90 ~275), mean response ~47 (p90 ~105)."""
    if not HH.is_file():
        raise FileNotFoundError(f"{HH}: the HH-RLHF slice the length distribution comes from")
    prompts, responses = [], []
    with gzip.open(HH, "rt") as f:
        for line in f:
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                text = row[key]
                cut = text.rfind("\n\nAssistant:") + len("\n\nAssistant:")
                if key == "chosen":
                    prompts.append(max(4, cut // 4))
                responses.append(max(1, (len(text) - cut) // 4))
    return prompts, responses


def make_groups(G: int, K: int, lengths: str, vocab: int, cap: tuple[int, int], seed: int = 0):
    """G prompts with K responses each, random token ids (never zeros or specials).

    lengths="hh": prompt and response lengths drawn from HH-RLHF (capped at cap = (prompt,
    response) tokens); "long": prompts of 160 tokens, responses of 60-120 tokens."""
    rng = random.Random(seed)
    if lengths == "hh":
        prompt_pool, response_pool = hh_lengths()
        prompt_lens = [min(cap[0], rng.choice(prompt_pool)) for _ in range(G)]
        resp_lens = [[min(cap[1], rng.choice(response_pool)) for _ in range(K)]
                     for _ in range(G)]
    elif lengths == "long":
        prompt_lens = [160] * G
        resp_lens = [[rng.randint(60, 120) for _ in range(K)] for _ in range(G)]
    else:
        raise ValueError(f"lengths: expected 'hh' or 'long', got {lengths!r}")
    prompts = [[rng.randrange(3, vocab) for _ in range(P)] for P in prompt_lens]
    responses = [[[rng.randrange(3, vocab) for _ in range(L)] for L in ls] for ls in resp_lens]
    return prompts, responses


def padded_batch(prompts, responses, device):
    """The naive layout: every (prompt, response) in its own right-padded row.
    -> input_ids (S, T), attention_mask (S, T), response_mask (S, T - 1) over the shifted
    targets, S = G * K rows."""
    seqs, starts = [], []
    for prompt, rs in zip(prompts, responses):
        for r in rs:
            seqs.append(prompt + r)
            starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    pos = torch.arange(1, width)[None, :]
    resp = (pos >= torch.tensor(starts)[:, None]) & (attn[:, 1:] == 1)
    return ids.to(device), attn.to(device), resp.to(device)


def padded_logps(model, prompts, responses):
    """(G, K) log p(response | prompt) the way DPO trainers compute it: one padded forward,
    full logits `model(...).logits`, log_softmax, gather, masked sum (logits upcast to fp32
    in bf16, as TRL's DPO trainer does)."""
    ids, attn, resp = padded_batch(prompts, responses, model.device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    if logits.dtype != torch.float32:
        logits = logits.float()
    tok = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (tok * resp).sum(-1).view(len(prompts), -1)


def padded_tokens(prompts, responses) -> int:
    """Token positions of the padded layout (rows x width)."""
    width = max(len(p) + len(r) for p, rs in zip(prompts, responses) for r in rs)
    return sum(len(rs) for rs in responses) * width


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


def trl_dpo_step(policy, ref, prompts, responses, beta: float):
    """TRL's DPOTrainer on (policy, ref) and the pairs (prompt, responses[0] chosen,
    responses[1] rejected) -> (step, loss, keep): `step()` runs its collator, its training_step
    (forward + backward of the policy, no-grad reference forward, DPO sigmoid loss) and a fused
    AdamW step; `loss()` the loss alone, without grad. The trainer is built on a one-row text
    dataset (its constructor tokenizes one); the timed batches are the id lists themselves."""
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from vrpo_fast.models import byte_tokenizer

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
