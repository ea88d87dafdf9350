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
