"""Packed passes shared by the stages: the models of a step as modules, and batched no-grad
scoring of many prompt groups.

`SequenceLogps` turns a causal LM into packed batch -> (G, K) sequence log-probs (body on the
packed rows, LM head only on response positions, fused log-prob kernel); `SequenceVRPOLoss`,
the policy trainer's module, is the same and can also run the LM head and the VRPO loss of the
batch in one sweep; `SequenceRewards`
turns a sequence-classification model into packed batch -> (G, K) scores at each response's last
token. The trainers wrap their models in these so that ONE FSDP root covers body and head
(`vrpo_fast.train.modules.shard`): the root's hooks unshard the embedding, final norm and LM
head for the whole forward, including the head that runs outside the transformers model's
forward. `score`, the reward-model evaluation and best-of-n call the same modules through
`packed_scores`, which cuts a list of groups into token-budgeted packed batches.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from vrpo_fast.logprobs import packed_body, packed_hidden_states, packed_logps
from vrpo_fast.ops import linear_vrpo_loss
from vrpo_fast.packing import pack_groups, row_padding


class SequenceLogps(nn.Module):
    """attention: the body's attention (`vrpo_fast.logprobs.packed_body`; "auto" in the
    trainers, others for benchmarks that compare them)."""

    def __init__(self, lm: nn.Module, temperature: float = 1.0, attention: str = "auto"):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.attention = attention

    def forward(self, batch) -> torch.Tensor:
        """batch: PackedBatch of G groups x K responses -> (G, K) float32 log p(y | x)."""
        # A fresh tensor, not a view: FSDP2's pre-backward hook must not sit on a view.
        return packed_logps(self.lm, batch, self.temperature,
                            attention=self.attention).clone()


class SequenceVRPOLoss(SequenceLogps):
    """`SequenceLogps` whose forward can also return the VRPO loss of the batch, with the LM
    head and the loss in one sweep; the policy trainer's module (vrpo_fast.train.loop).

    Called with a batch alone it is SequenceLogps (the trainer's reference pass with LoRA
    adapters off, a lagged copy of the policy, scoring). Called with g it runs the body on the
    packed rows as `packed_logps` does, then the LM head on the response positions through the
    one-sweep LM head + loss (`vrpo_fast.ops.linear_vrpo_loss`): per chunk of whole prompt
    groups the logits once, the log-probs, the groups' losses and their derivatives, and at
    once the logit gradients, dH and dW; its backward only scales the stored gradients. It
    holds the same parameters under the same names (`lm.*`), so checkpoints, final/, lagged
    copies and resume are those of SequenceLogps, and it is the FSDP root as SequenceLogps is
    (vrpo_fast.train.modules: the root's hooks unshard the LM head, which runs here, outside
    the transformers model's forward).

    The sum over groups is exact only for losses that are a sum of per-group terms: the
    trainer takes the two-pass path (SequenceLogps's log-probs, then the loss) under DRO
    weighting, which couples the groups of a step, and for stages with their own loss.
    """

    def forward(self, batch, ref_logps=None, aux_prefs=None, labelled=None, label_scale=None,
                **loss):
        """batch: PackedBatch of G groups x K responses.

        Without aux_prefs: (G, K) float32 log p(y | x), as SequenceLogps. With aux_prefs (G,
        1 + M), never differentiated: ref_logps (G, K) or None (zeros), labelled (G,) bool or
        None and label_scale as in `vrpo_fast.vrpo_loss`, loss: beta, loss_type, estimator.
        Returns (the sum over the G groups of their per-prompt losses (), differentiable in
        the parameters; the detached (G, K) float32 policy log-probs, for the statistics).
        """
        if aux_prefs is None:
            return super().forward(batch)
        hidden, weight = packed_hidden_states(self.lm, batch, attention=self.attention)
        return linear_vrpo_loss(hidden, weight, batch.targets, batch.segment_ids,
                                group_token_offsets(batch), batch.group_size, ref_logps,
                                aux_prefs, reduction="sum", temperature=self.temperature,
                                labelled=labelled, label_scale=label_scale, **loss)


def group_token_offsets(batch) -> list[int]:
    """Offsets (G + 1,) of each group's tokens in the batch's (N,) response-token order
    (group-major, so each group's tokens are contiguous), from the spans on the host: the
    one sweep's chunk boundaries without the device sync of `chunked.group_offsets`."""
    sizes = [0] * batch.num_groups
    for span in batch.spans:
        sizes[span.group] += span.end - span.start
    return list(itertools.accumulate(sizes, initial=0))


class SequenceRewards(nn.Module):
    """attention: the body's attention, as `SequenceLogps`'s."""

    def __init__(self, classifier: nn.Module, attention: str = "auto"):
        super().__init__()
        self.classifier = classifier
        self.attention = attention

    def forward(self, batch) -> torch.Tensor:
        """batch: PackedBatch -> (G, K) float32 scalar rewards at each response's last token."""
        hidden = packed_body(self.classifier, batch, attention=self.attention)  # (R, T, D)
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
