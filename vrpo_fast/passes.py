"""Packed passes shared by the stages: the models of a step as modules, and batched no-grad
scoring of many prompt groups.

`SequenceLogps` turns a causal LM into packed batch -> (G, K) sequence log-probs (body on the
packed rows, LM head only on response positions, fused log-prob kernel); `SequenceRewards`
turns a sequence-classification model into packed batch -> (G, K) scores at each response's last
token. The trainers wrap their models in these so that ONE FSDP root covers body and head
(`vrpo_fast.train.modules.shard`): the root's hooks unshard the embedding, final norm and LM
head for the whole forward, including the head that runs outside the transformers model's
forward. `score`, the reward-model evaluation and best-of-n call the same modules through
`packed_scores`, which cuts a list of groups into token-budgeted packed batches.
"""

from __future__ import annotations

import torch
from torch import nn

from vrpo_fast.logprobs import packed_body, packed_logps
from vrpo_fast.packing import pack_groups, row_padding


class SequenceLogps(nn.Module):
    def __init__(self, lm: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.temperature = temperature

    def forward(self, batch) -> torch.Tensor:
        """batch: PackedBatch of G groups x K responses -> (G, K) float32 log p(y | x)."""
        # A fresh tensor, not a view: FSDP2's pre-backward hook must not sit on a view.
        return packed_logps(self.lm, batch, self.temperature).clone()


class SequenceRewards(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch) -> torch.Tensor:
        """batch: PackedBatch -> (G, K) float32 scalar rewards at each response's last token."""
        hidden = packed_body(self.classifier, batch)              # (R, T, D)
        last = hidden.flatten(0, 1)[batch.last_index]             # (G*K, D)
        scores = self.classifier.score(last).squeeze(-1)
        return scores.float().reshape(batch.num_groups, batch.group_size).clone()


def token_batches(groups: list[tuple[list[int], list[list[int]]]], max_tokens: int):
    """Consecutive (start, stop) index ranges whose groups fit the token budget together (a lone
    group over the budget gets a batch of its own)."""
    start, used = 0, 0
    for i, (prompt, responses) in enumerate(groups):
        size = len(prompt) + sum(map(len, responses))
        if i > start and used + size > max_tokens:
            yield start, i
            start, used = i, 0
        used += size
    if start < len(groups):
        yield start, len(groups)


@torch.no_grad()
def packed_scores(module_fn, groups, max_tokens: int) -> list[list[float]]:
    """Apply `module_fn(prompt_ids, response_ids, budget) -> (G, K)` over token batches of
    `groups` [(prompt ids, [response ids, ...]), ...]; one list of K values per group, in order.

    Groups with different K (a labelled row has 2 + 2M responses, an unlabelled one 2M) go into
    separate batches: one packed batch holds one K."""
    out: list[list[float] | None] = [None] * len(groups)
    by_k: dict[int, list[int]] = {}
    for i, (_, responses) in enumerate(groups):
        by_k.setdefault(len(responses), []).append(i)
    for index in by_k.values():
        sub = [groups[i] for i in index]
        for a, b in token_batches(sub, max_tokens):
            chunk = sub[a:b]
            budget = max(max_tokens, max(len(p) + sum(map(len, r)) for p, r in chunk))
            values = module_fn([p for p, _ in chunk], [r for _, r in chunk], budget)
            for i, row in zip(index[a:b], values.tolist()):   # host sync: one per batch
                out[i] = row
    return out


def reward_scores(classifier, prompt_ids, response_ids, max_tokens) -> torch.Tensor:
    """(G, K) scores of a sequence-classification model at each response's last token, from one
    packed pass (the body on the packed rows, the `score` head on the gathered last tokens)."""
    device = next(classifier.parameters()).device
    batch = pack_groups(prompt_ids, response_ids, max_tokens=max_tokens,
                        **row_padding(device)).to(device)
    return SequenceRewards(classifier)(batch)
