"""Shared-prefix packing: each prompt once, its K responses behind it, several groups per row.

Layout of one group with K = 4 (ARCHITECTURE.md):

    [ p0 p1 p2 p3 | c0 c1 c2 | r0 r1 | a0 a1 a2 a3 | b0 b1 ]       tokens
    [ 0  1  2  3  | 4  5  6  | 4  5  | 4  5  6  7  | 4  5  ]       position ids

A response token attends to its group's prompt and to the earlier tokens of its own response;
groups in one row never see each other. The first token of every response is predicted by the
last prompt token's hidden state; later ones by the previous token of the same response.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class PackedBatch:
    """G prompt groups of K responses, packed into R rows of T tokens.

    input_ids, position_ids: (R, T) long (pads hold `pad_id`, position 0).
    group: (R, T) long, the group index of each token (-1 on pads).
    response: (R, T) long, the response index within its group (-1 on prompt tokens and pads).
    pred_index: (N,) flat index into (R * T) of the hidden state that predicts response token n.
    targets: (N,) the response token predicted there.
    segment_ids: (N,) g * K + k: which response each target belongs to.
    last_index: (G * K,) flat index into (R * T) of each response's last token.
    spans: per response (row, group, k, start, end) in the packed row, in g * K + k order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group: torch.Tensor
    response: torch.Tensor
    pred_index: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor
    last_index: torch.Tensor
    num_groups: int
    group_size: int
    num_tokens: int
    spans: list = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to(self, device) -> PackedBatch:
        moved = {k: v.to(device, non_blocking=True) for k, v in vars(self).items()
                 if isinstance(v, torch.Tensor)}
        return replace(self, **moved)

    def dense_mask(self) -> torch.Tensor:
        """(R, 1, T, T) bool, True where query i may attend key j (the CPU / SDPA form)."""
        return _allowed(self.group[:, :, None], self.response[:, :, None],
                        self.group[:, None, :], self.response[:, None, :],
                        torch.arange(self.shape[1], device=self.group.device)[:, None],
                        torch.arange(self.shape[1], device=self.group.device)[None, :])[:, None]

    def block_mask(self):
        """The same mask as a FlexAttention BlockMask (the GPU form)."""
        R, T = self.shape
        group, response = self.group, self.response

        def mask_mod(b, h, q, kv):
            return _allowed(group[b, q], response[b, q], group[b, kv], response[b, kv], q, kv)

        mask_mod.__name__ = "shared_prefix_mask"
        return _compiled_create_block_mask()(mask_mod, R, None, T, T, device=group.device)


def _allowed(gq, rq, gk, rk, q, kv):
    """Same group, causal, and the key is a prompt token or in the query's own response.
    Pads (group -1) attend to themselves only, so no attention row is empty."""
    same = (gq == gk) & (gq >= 0) & (kv <= q) & ((rk == -1) | (rk == rq))
    return same | (q == kv)


_CREATE_BLOCK_MASK = None


def _compiled_create_block_mask():
    # Compiled once per process, not per call (create_block_mask is slow in eager mode).
    global _CREATE_BLOCK_MASK
    if _CREATE_BLOCK_MASK is None:
        from torch.nn.attention.flex_attention import create_block_mask

        _CREATE_BLOCK_MASK = torch.compile(create_block_mask)
    return _CREATE_BLOCK_MASK


def validate_groups(prompt_ids, response_ids, vocab_size: int | None = None) -> int:
    """Check the nested lists; returns K. ValueError names the group and index at fault."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} groups but response_ids has "
                         f"{len(response_ids)}")
    if not prompt_ids:
        raise ValueError("prompt_ids: no groups given")
    K = len(response_ids[0])
    for g, (prompt, responses) in enumerate(zip(prompt_ids, response_ids)):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids[{g}]: empty prompt (a response's first token needs a "
                             f"prompt token to be predicted from)")
        if len(responses) != K:
            raise ValueError(f"response_ids[{g}]: {len(responses)} responses, but group 0 has "
                             f"{K}; every group needs the same K")
        for k, resp in enumerate(responses):
            if len(resp) == 0:
                raise ValueError(f"response_ids[{g}][{k}]: empty response")
        if vocab_size is not None:
            for name, ids in [(f"prompt_ids[{g}]", prompt)] + [
                    (f"response_ids[{g}][{k}]", r) for k, r in enumerate(responses)]:
                bad = [t for t in ids if not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(f"{name}: token id {bad[0]} outside the vocabulary "
                                     f"[0, {vocab_size})")
    return K


def pack_groups(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], *,
                max_tokens: int | None = None, pad_id: int = 0, pad_to_multiple: int = 1,
                vocab_size: int | None = None) -> PackedBatch:
    """Pack G groups (a prompt and K responses each) into rows of at most `max_tokens` tokens.

    Groups are placed first-fit in decreasing size (None: all groups in one row). A single
    group longer than `max_tokens` is an error, never truncated.
    """
    K = validate_groups(prompt_ids, response_ids, vocab_size)
    G = len(prompt_ids)
    sizes = [len(p) + sum(len(r) for r in rs) for p, rs in zip(prompt_ids, response_ids)]
    if max_tokens is None:
        rows = [list(range(G))]
    else:
        for g, size in enumerate(sizes):
            if size > max_tokens:
                raise ValueError(f"group {g}: {size} tokens (prompt {len(prompt_ids[g])} + "
                                 f"{K} responses) exceed the packing budget max_tokens = "
                                 f"{max_tokens}; raise the budget or truncate the data")
        rows, free = [], []
        for g in sorted(range(G), key=lambda i: -sizes[i]):
            for r, room in enumerate(free):
                if sizes[g] <= room:
                    rows[r].append(g)
                    free[r] -= sizes[g]
                    break
            else:
                rows.append([g])
                free.append(max_tokens - sizes[g])
    T = max(sum(sizes[g] for g in row) for row in rows)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    R = len(rows)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    group = torch.full((R, T), -1, dtype=torch.long)
    response = torch.full((R, T), -1, dtype=torch.long)
    pred, targets, segs = [], [], []
    last = [0] * (G * K)
    spans = [None] * (G * K)
    for r, row in enumerate(rows):
        cursor = 0
        for g in row:
            prompt = prompt_ids[g]
            P = len(prompt)
            input_ids[r, cursor:cursor + P] = torch.tensor(prompt)
            position_ids[r, cursor:cursor + P] = torch.arange(P)
            group[r, cursor:cursor + P] = g
            last_prompt = r * T + cursor + P - 1
            cursor += P
            for k, resp in enumerate(response_ids[g]):
                L = len(resp)
                input_ids[r, cursor:cursor + L] = torch.tensor(resp)
                position_ids[r, cursor:cursor + L] = torch.arange(P, P + L)
                group[r, cursor:cursor + L] = g
                response[r, cursor:cursor + L] = k
                flat = r * T + cursor
                pred.append(last_prompt)
                pred.extend(range(flat, flat + L - 1))
                targets.extend(resp)
                segs.extend([g * K + k] * L)
                last[g * K + k] = flat + L - 1
                spans[g * K + k] = (r, g, k, cursor, cursor + L)
                cursor += L
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids, group=group, response=response,
        pred_index=torch.tensor(pred, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        segment_ids=torch.tensor(segs, dtype=torch.long),
        last_index=torch.tensor(last, dtype=torch.long),
        num_groups=G, group_size=K, num_tokens=sum(sizes), spans=spans)
