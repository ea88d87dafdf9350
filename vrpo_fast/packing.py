"""Shared-prefix packing: each prompt once, its K responses behind it, several groups per row.

Layout of one group with K = 4 (ARCHITECTURE.md):

    [ p0 p1 p2 p3 | c0 c1 c2 | r0 r1 | a0 a1 a2 a3 | b0 b1 ]       tokens
    [ 0  1  2  3  | 4  5  6  | 4  5  | 4  5  6  7  | 4  5  ]       position ids

A response token attends to its group's prompt and to the earlier tokens of its own response;
groups in one row never see each other. The first token of every response is predicted by the
last prompt token's hidden state; later ones by the previous token of the same response, so the
language-model head only ever sees the N = sum of response lengths positions in `pred_index`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch


class Span(NamedTuple):
    """Where response `response` of group `group` lies: row `row`, columns [start, end)."""

    row: int
    group: int
    response: int
    start: int
    end: int


@dataclass
class PackedBatch:
    """G prompt groups of K responses, packed into R rows of T tokens.

    Per token of the packed rows, (R, T) long:
        input_ids: token ids (pads hold `pad_id`);
        position_ids: position within its own prompt + response (pads 0);
        group: the group index g (-1 on pads);
        response: the response index k within the group (-1 on prompt tokens and pads).
    Per response token, (N,) long, in group-major order (g, then k, then t), so segment_ids is
    sorted:
        pred_index: flat index into (R * T) of the hidden state that predicts the token;
        targets: the token predicted there;
        segment_ids: g * K + k, the response it belongs to.
    Per response, in g * K + k order:
        last_index: (G * K,) long, flat index into (R * T) of its last token (where a reward
            model scores it);
        spans: G * K `Span`s (row, group, response, start, end).
    num_groups, group_size: G and K; num_tokens: real (non-pad) tokens in the rows;
    max_length: the longest prompt + response (positions run from 0 to max_length - 1).
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
    max_length: int
    spans: list[Span]

    @property
    def shape(self) -> tuple[int, int]:
        """(R, T): packed rows and their width."""
        return tuple(self.input_ids.shape)

    def to(self, device) -> PackedBatch:
        moved = {k: v.to(device, non_blocking=True) for k, v in vars(self).items()
                 if isinstance(v, torch.Tensor)}
        return replace(self, **moved)

    def dense_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """(R, 1, T, T) bool, True where query i may attend key j: the CPU / SDPA form.

        sliding_window: also require pos(i) - pos(j) < sliding_window (transformers' window
        convention), for models whose attention layers use one.
        """
        T = self.shape[1]
        idx = torch.arange(T, device=self.group.device)
        g, r, p = self.group, self.response, self.position_ids
        return _allowed(g[:, :, None], r[:, :, None], p[:, :, None],
                        g[:, None, :], r[:, None, :], p[:, None, :],
                        idx[:, None], idx[None, :], sliding_window)[:, None]

    def block_mask(self, device=None, sliding_window: int | None = None):
        """The same mask as a FlexAttention BlockMask (the GPU form), built on `device`
        (default: where the batch is). Compiled on CUDA; eager elsewhere, where it only serves
        forward-only checks (FlexAttention has no CPU backward)."""
        device = torch.device(device) if device is not None else self.group.device
        R, T = self.shape
        g, r, p = (t.to(device) for t in (self.group, self.response, self.position_ids))

        def shared_prefix_mask(b, h, q, kv):
            return _allowed(g[b, q], r[b, q], p[b, q], g[b, kv], r[b, kv], p[b, kv], q, kv,
                            sliding_window)

        create = _compiled_create_block_mask() if device.type == "cuda" else _create_block_mask()
        return create(shared_prefix_mask, R, None, T, T, device=device)


def _allowed(gq, rq, pq, gk, rk, pk, q, kv, sliding_window):
    """Same group, causal, and the key is a prompt token or in the query's own response (and
    within the window). Pads (group -1) attend to themselves only, so no attention row is empty
    (an empty row would make SDPA return NaN)."""
    ok = (gq == gk) & (gq >= 0) & (kv <= q) & ((rk == -1) | (rk == rq))
    if sliding_window is not None:
        ok = ok & (pq - pk < sliding_window)
    return ok | (q == kv)


def _create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask


@functools.cache
def _compiled_create_block_mask():
    # Compiled once per process, on first GPU use rather than at import: importing dynamo
    # costs seconds, and the CPU path never needs it. Eager create_block_mask would
    # materialise the full (R, T, T) mask.
    return torch.compile(_create_block_mask())


def _as_ids(ids, what: str, vocab_size: int | None) -> torch.Tensor:
    """One sequence of token ids as a 1-D long tensor; ValueError naming `what` if it is not."""
    if len(ids) == 0:
        raise ValueError(f"{what}: empty sequence")
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what}: expected a list of integer token ids ({err})") from None
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what}: expected a flat list of integer token ids, got a "
                         f"{t.dtype} tensor of shape {tuple(t.shape)}")
    t = t.to("cpu", torch.long)
    bad = (t < 0) if vocab_size is None else (t < 0) | (t >= vocab_size)
    if bad.any():
        bounds = "(negative)" if vocab_size is None else f"[0, {vocab_size})"
        raise ValueError(f"{what}: token id {int(t[bad][0])} outside the vocabulary "
                         f"{bounds} (at position {int(bad.nonzero()[0, 0])})")
    return t


def validate_groups(prompt_ids, response_ids, vocab_size: int | None = None):
    """Check the nested id lists; returns (prompts, responses) as 1-D long tensors.

    prompt_ids: G non-empty sequences; response_ids: G lists of K non-empty sequences (the same
    K for every group). ValueError names the group and index at fault.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} groups but response_ids has "
                         f"{len(response_ids)}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids: no groups given")
    K = len(response_ids[0])
    if K == 0:
        raise ValueError("response_ids[0]: no responses")
    prompts, responses = [], []
    for g, (prompt, group) in enumerate(zip(prompt_ids, response_ids)):
        if len(prompt) == 0:
            # The first response token is predicted from the last prompt token.
            raise ValueError(f"prompt_ids[{g}]: empty prompt (a response's first token is "
                             f"predicted from the last prompt token)")
        if len(group) != K:
            raise ValueError(f"response_ids[{g}]: {len(group)} responses, but group 0 has {K}; "
                             f"every group needs the same K")
        prompts.append(_as_ids(prompt, f"prompt_ids[{g}]", vocab_size))
        responses.append([_as_ids(resp, f"response_ids[{g}][{k}]", vocab_size)
                          for k, resp in enumerate(group)])
    return prompts, responses


def _first_fit_decreasing(sizes: list[int], budget: int | None) -> list[list[int]]:
    """Groups per row: largest first, each into the first row with room (None: one row)."""
    if budget is None:
        return [list(range(len(sizes)))]
    rows, free = [], []
    for g in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, room in enumerate(free):
            if sizes[g] <= room:
                rows[r].append(g)
                free[r] -= sizes[g]
                break
        else:
            rows.append([g])
            free.append(budget - sizes[g])
    return rows


def pack_groups(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], *,
                max_tokens: int | None = None, pad_id: int = 0, pad_to_multiple: int = 1,
                vocab_size: int | None = None) -> PackedBatch:
    """Pack G groups (a prompt and K responses each) into rows of at most `max_tokens` tokens.

    Args:
        prompt_ids: G non-empty lists of token ids.
        response_ids: G lists of K non-empty lists of token ids (the same K for all groups).
        max_tokens: token budget of one row (prompt + responses of the groups in it); groups
            are placed first-fit in decreasing size. None: every group in one row. A group
            longer than the budget is a ValueError, never truncated.
        pad_id: the id written on pad positions (any valid id: pads are never attended to by
            real tokens nor predicted).
        pad_to_multiple: round the row width T up to a multiple of this (e.g. 128 for
            FlexAttention blocks); T may then exceed max_tokens by less than this.
        vocab_size: when given, ids outside [0, vocab_size) are a ValueError.

    Returns:
        PackedBatch with R rows of width T.
    """
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens: expected a positive int or None, got {max_tokens!r}")
    if not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple: expected a positive int, got {pad_to_multiple!r}")
    prompts, responses = validate_groups(prompt_ids, response_ids, vocab_size)
    G, K = len(prompts), len(responses[0])
    sizes = [len(p) + sum(len(r) for r in rs) for p, rs in zip(prompts, responses)]
    if max_tokens is not None:
        for g, size in enumerate(sizes):
            if size > max_tokens:
                raise ValueError(f"group {g}: {size} tokens (prompt {len(prompts[g])} + {K} "
                                 f"responses) exceed the packing budget max_tokens = "
                                 f"{max_tokens}; raise the budget or shorten the data")
    rows = _first_fit_decreasing(sizes, max_tokens)
    T = max(sum(sizes[g] for g in row) for row in rows)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    R = len(rows)

    # One "piece" per prompt and per response, in group-major input order; the token-level
    # tensors then come from a few vectorised ops instead of a Python loop over tokens.
    offset = [0] * G                                           # flat start of each group
    for r, row in enumerate(rows):
        col = 0
        for g in row:
            offset[g] = r * T + col
            col += sizes[g]
    starts, lengths, pos0, piece_group, piece_k, spans = [], [], [], [], [], []
    for g in range(G):
        P, flat = len(prompts[g]), offset[g]
        starts.append(flat)
        lengths.append(P)
        pos0.append(0)
        piece_group.append(g)
        piece_k.append(-1)
        flat += P
        for k, resp in enumerate(responses[g]):
            starts.append(flat)
            lengths.append(len(resp))
            pos0.append(P)
            piece_group.append(g)
            piece_k.append(k)
            row, col = divmod(flat, T)
            spans.append(Span(row, g, k, col, col + len(resp)))
            flat += len(resp)
    starts, lengths, pos0, piece_group, piece_k = (
        torch.tensor(x, dtype=torch.long) for x in (starts, lengths, pos0, piece_group, piece_k))
    tokens = torch.cat([t for g in range(G) for t in (prompts[g], *responses[g])])
    piece = torch.repeat_interleave(torch.arange(len(lengths)), lengths)      # per token
    within = torch.arange(len(tokens)) - (torch.cumsum(lengths, 0) - lengths)[piece]
    flat = starts[piece] + within

    input_ids = torch.full((R * T,), pad_id, dtype=torch.long)
    position_ids = torch.zeros(R * T, dtype=torch.long)
    group = torch.full((R * T,), -1, dtype=torch.long)
    response = torch.full((R * T,), -1, dtype=torch.long)
    input_ids[flat] = tokens
    position_ids[flat] = pos0[piece] + within
    group[flat] = piece_group[piece]
    response[flat] = piece_k[piece]

    is_resp = piece_k[piece] >= 0
    # A response's first token is predicted by its group's last prompt token (the prompt piece
    # sits k + 1 pieces before response k); every other token by the token just before it.
    prompt_piece = piece - piece_k[piece] - 1
    last_prompt = starts[prompt_piece] + lengths[prompt_piece] - 1
    pred_index = torch.where(within == 0, last_prompt, flat - 1)[is_resp]
    resp_pieces = piece_k >= 0
    return PackedBatch(
        input_ids=input_ids.view(R, T), position_ids=position_ids.view(R, T),
        group=group.view(R, T), response=response.view(R, T),
        pred_index=pred_index, targets=tokens[is_resp],
        segment_ids=(piece_group * K + piece_k)[piece][is_resp],
        last_index=(starts + lengths - 1)[resp_pieces],
        num_groups=G, group_size=K, num_tokens=sum(sizes),
        max_length=max(len(p) + max(map(len, rs)) for p, rs in zip(prompts, responses)),
        spans=spans)
