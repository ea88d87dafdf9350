"""What the model-level benchmarks (the training step, packed vs naive log-probs) run on: a
Llama- or Qwen2-style model of a preset's shape, groups of prompts and responses at HH-RLHF
lengths, and the naive padded layout that the reference implementation and DPO trainers use.

The HH-RLHF length distribution ships inside the package (hh_lengths.json), so no data file is
read at run time. It was computed from the harmless-base test slice in the repository's
data/hh-rlhf; regenerate it with

    python -m vrpo_fast.bench.layouts data/hh-rlhf/harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import sys
from importlib import resources
from pathlib import Path

import torch

from vrpo_fast.bench.env import device
from vrpo_fast.errors import UserError
from vrpo_fast.logprobs import padded_rows
from vrpo_fast.models import build_tiny_causal_lm

LENGTHS_TABLE = "hh_lengths.json"
ASSISTANT = "\n\nAssistant:"


def hh_lengths_from_jsonl(path: Path) -> tuple[list[int], list[int]]:
    """(prompt lengths, response lengths) in tokens of an HH-RLHF jsonl(.gz) file, counted as
    characters / 4 (~4 characters per BPE token in English; no tokenizer needed). Prompt =
    everything up to the last "Assistant:" of the chosen text; responses = chosen and rejected,
    in file order."""
    prompts, responses = [], []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            for key in ("chosen", "rejected"):
                text = row[key]
                cut = text.rfind(ASSISTANT) + len(ASSISTANT)
                if key == "chosen":
                    prompts.append(max(4, cut // 4))
                responses.append(max(1, (len(text) - cut) // 4))
    return prompts, responses


@functools.lru_cache(maxsize=1)
def hh_lengths() -> tuple[list[int], list[int]]:
    """The packaged table of `hh_lengths_from_jsonl` on the harmless-base test slice: mean
    prompt ~121 tokens (p90 ~275), mean response ~47 (p90 ~105)."""
    table = json.loads(resources.files("vrpo_fast.bench").joinpath(LENGTHS_TABLE).read_text())
    return table["prompt"], table["response"]


def parse_lengths(lengths: str) -> str | tuple[int, int]:
    """"hh", "long", or "P,R" (every prompt P tokens, every response R) -> itself or (P, R)."""
    if lengths in ("hh", "long"):
        return lengths
    try:
        P, R = (int(x) for x in lengths.split(","))
    except ValueError:
        raise UserError(f"--lengths: expected hh, long or P,R (two token counts), got "
                        f"{lengths!r}") from None
    if P < 1 or R < 1:
        raise UserError(f"--lengths: prompt and response lengths must be >= 1, got {lengths!r}")
    return P, R


def make_groups(G: int, K: int, lengths: str | tuple[int, int], vocab: int,
                cap: tuple[int, int], seed: int = 0):
    """G prompts with K responses each, random token ids (never zeros or specials).

    lengths="hh": prompt and response lengths drawn from HH-RLHF (capped at cap = (prompt,
    response) tokens); "long": prompts of 160 tokens, responses of 60-120 tokens; (P, R):
    prompts of P tokens, responses of R."""
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
        P, R = lengths
        prompt_lens, resp_lens = [P] * G, [[R] * K for _ in range(G)]
    prompts = [[rng.randrange(3, vocab) for _ in range(P)] for P in prompt_lens]
    responses = [[[rng.randrange(3, vocab) for _ in range(L)] for L in ls] for ls in resp_lens]
    return prompts, responses


def build_model(hidden: int, layers: int, vocab: int, seed: int = 0, *, heads: int | None = None,
                kv_heads: int | None = None, intermediate: int | None = None,
                arch: str = "llama", tie: bool = False, max_positions: int = 4096):
    """A randomly initialised causal LM on the benchmark device, bf16 on a GPU. Without the
    head counts: GQA with heads of 64, 2 query heads per KV head, SwiGLU width 3 x hidden."""
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    return build_tiny_causal_lm(seed=seed, dtype=dtype, vocab_size=vocab, hidden_size=hidden,
                                num_layers=layers, num_heads=heads or max(2, hidden // 64),
                                num_kv_heads=kv_heads or max(1, hidden // 128),
                                intermediate_size=intermediate or 3 * hidden,
                                max_position_embeddings=max_positions, arch=arch,
                                tie_word_embeddings=tie).to(device())


def padded_batch(prompts, responses, device):
    """The naive layout (`vrpo_fast.logprobs.padded_rows`) on `device`."""
    return tuple(t.to(device) for t in padded_rows(prompts, responses))


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


if __name__ == "__main__":
    prompt, response = hh_lengths_from_jsonl(Path(sys.argv[1]))
    out = Path(__file__).with_name(LENGTHS_TABLE)
    out.write_text(json.dumps({"source": Path(sys.argv[1]).name, "unit": "characters / 4",
                               "prompt": prompt, "response": response},
                              separators=(",", ":")) + "\n")
    print(f"wrote {out}: {len(prompt)} prompts, {len(response)} responses")
