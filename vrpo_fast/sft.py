"""Supervised warm start: teach a tiny model the synthetic task's response format, giving pi_ref.

pi_ref must put mass on many responses (VRPO samples from it), so the targets are uniform random
valid responses, not good ones.
"""

from __future__ import annotations

import random

import torch


def sft_warm_start(model, tokenizer, task, *, steps: int = 200, batch_size: int = 32,
                   lr: float = 3e-3, seed: int = 0, progress: bool = True):
    """Train `model` in place on prompt + random valid response + EOS; returns per-step losses."""
    rng = random.Random(seed)
    prompts = task.prompts()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    model.train()
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="sft warm start", unit="step", dynamic_ncols=True)
    for _ in iterator:
        rows, masks = [], []
        for _ in range(batch_size):
            prompt = rng.choice(prompts)
            p_ids = tokenizer(prompt)["input_ids"]
            r_ids = tokenizer(task.random_response(rng), add_special_tokens=False)["input_ids"]
            rows.append(p_ids + r_ids + [eos])
            masks.append([0] * len(p_ids) + [1] * (len(r_ids) + 1))
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
        attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                reduction="none")
        loss = (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress:
            iterator.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
