"""Shared-prefix packing: each prompt once, its K responses behind it, several groups per row.

Layout of one group with K = 4:

    [ p0 p1 p2 p3 | c0 c1 c2 | r0 r1 | a0 a1 a2 a3 | b0 b1 ]       tokens
    [ 0  1  2  3  | 4  5  6  | 4  5  | 4  5  6  7  | 4  5  ]       position ids

A response token attends to its group's prompt and to the earlier tokens of its own response;
groups in one row never see each other. The first token of every response is predicted by the
last prompt token's hidden state; later ones by the previous token of the same response, so the
language-model head only ever sees the N = sum of response lengths positions in `pred_index`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import numbers
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch


class Segment(NamedTuple):
    """One piece of a packed row, in column order: a prompt (`prompt` -1), a response (`prompt`:
    the index, among its row's segments, of its group's prompt), or the row's tail padding
    (`pad` True, `prompt` -1)."""

    length: int
    prompt: int
    pad: bool = False


class Span(NamedTuple):
    """Where response `response` of group `group` (-1: its prompt) lies in the packed rows:
    row `row`, columns [start, end)."""

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
    prompt_spans: G `Span`s of the prompts (response -1).
    num_groups, group_size: G and K; num_tokens: real (non-pad) tokens in the rows;
    max_length: the longest prompt + response (positions run from 0 to max_length - 1).

    The attention masks are built once per batch and kept: the policy, the reference and the
    auxiliary model of a training step all attend through the same mask.
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
    prompt_spans: list[Span]
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        key = ("dense", sliding_window)
        if key not in self._masks:
            self._masks[key] = self._dense_mask(sliding_window)
        return self._masks[key]

    def _dense_mask(self, sliding_window):
        R, T = self.shape
        device = self.group.device
        mask = torch.zeros(R, T, T, dtype=torch.bool, device=device)
        # Written block by block from the spans (a group's tokens are contiguous in its row):
        # a few slice writes per response instead of elementwise ops over all R * T * T pairs.
        # seen[a, b]: may the token at position a see the one at position b of its sequence.
        L = self.max_length
        seen = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        if sliding_window is not None:
            seen = seen.triu(1 - sliding_window)
        for p in self.prompt_spans:
            P = p.end - p.start
            mask[p.row, p.start:p.end, p.start:p.end] = seen[:P, :P]
        for s in self.spans:
            p = self.prompt_spans[s.group]
            P, end = p.end - p.start, p.end - p.start + s.end - s.start
            mask[s.row, s.start:s.end, p.start:p.end] = seen[P:end, :P]
            mask[s.row, s.start:s.end, s.start:s.end] = seen[P:end, P:end]
        # Pads attend to themselves, so that no attention row is empty (SDPA would give NaN).
        mask.diagonal(dim1=1, dim2=2).logical_or_(self.group < 0)
        return mask[:, None]

    def row_segments(self) -> tuple[tuple[Segment, ...], ...]:
        """The R rows as `Segment`s in column order, each row's lengths summing to T: the form
        the cascade attention (vrpo_fast.attention) takes, which attends segment by segment
        and never builds a T x T mask."""
        if "segments" not in self._masks:
            self._masks["segments"] = self._row_segments()
        return self._masks["segments"]

    def _row_segments(self):
        R, T = self.shape
        rows: list[list[Segment]] = [[] for _ in range(R)]
        prompt_at: dict[int, int] = {}                    # group -> its prompt's segment index
        for s in sorted([*self.prompt_spans, *self.spans], key=lambda s: (s.row, s.start)):
            if s.response < 0:
                prompt_at[s.group] = len(rows[s.row])
            rows[s.row].append(Segment(s.end - s.start,
                                       -1 if s.response < 0 else prompt_at[s.group]))
        for row in rows:
            used = sum(seg.length for seg in row)
            if used < T:
                row.append(Segment(T - used, -1, pad=True))
        return tuple(map(tuple, rows))

    def block_mask(self, device=None, sliding_window: int | None = None):
        """The same mask as a FlexAttention BlockMask (the GPU form), built on `device`
        (default: where the batch is). Compiled on CUDA; eager elsewhere, where it only serves
        forward-only checks (FlexAttention has no CPU backward)."""
        device = torch.device(device) if device is not None else self.group.device
        key = ("block", device, sliding_window)
        if key not in self._masks:
            self._masks[key] = self._block_mask(device, sliding_window)
        return self._masks[key]

    def _block_mask(self, device, sliding_window):
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


def validate_groups(prompt_ids, response_ids, vocab_size: int | None = None):
    """Check the nested id lists; returns (tokens, lengths).

    prompt_ids: G non-empty sequences; response_ids: G lists of K non-empty sequences (the same
    K for every group). ValueError names the group and index at fault.
    tokens: (total,) long, every sequence concatenated in group-major order (prompt g, then its
    responses); lengths: the G * (K + 1) sequence lengths in that order.
    """
    if _length(prompt_ids, "prompt_ids") != _length(response_ids, "response_ids"):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} groups but response_ids has "
                         f"{len(response_ids)}")
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids: no groups given")
    K = _length(response_ids[0], "response_ids[0]")
    if K == 0:
        raise ValueError("response_ids[0]: no responses")
    seqs, names = [], []
    for g, (prompt, group) in enumerate(zip(prompt_ids, response_ids)):
        if _length(prompt, f"prompt_ids[{g}]") == 0:
            raise ValueError(f"prompt_ids[{g}]: empty prompt (a response's first token is "
                             f"predicted from the last prompt token)")
        if _length(group, f"response_ids[{g}]") != K:
            raise ValueError(f"response_ids[{g}]: {len(group)} responses, but group 0 has {K}; "
                             f"every group needs the same K")
        seqs.append(prompt)
        names.append(f"prompt_ids[{g}]")
        for k, resp in enumerate(group):
            if _length(resp, f"response_ids[{g}][{k}]") == 0:
                raise ValueError(f"response_ids[{g}][{k}]: empty response")
            seqs.append(resp)
            names.append(f"response_ids[{g}][{k}]")
    lengths = [len(x) for x in seqs]
    # One conversion for all ids; the offending sequence is located only on failure.
    try:
        tokens = torch.tensor(list(itertools.chain.from_iterable(seqs)))
    except (TypeError, ValueError, RuntimeError) as err:
        what = next((n for n, x in zip(names, seqs) if not _is_id_list(x)), "token ids")
        raise ValueError(f"{what}: expected a flat list of integer token ids ({err})") from None
    if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex() or \
            tokens.dtype == torch.bool:
        what = next((n for n, x in zip(names, seqs) if not _is_id_list(x)), "token ids")
        raise ValueError(f"{what}: expected a flat list of integer token ids")
    tokens = tokens.long()
    bad = (tokens < 0) if vocab_size is None else (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        seq = bisect.bisect_right(list(itertools.accumulate(lengths)), i)
        pos = i - sum(lengths[:seq])
        bounds = "(negative)" if vocab_size is None else f"[0, {vocab_size})"
        raise ValueError(f"{names[seq]}: token id {int(tokens[i])} outside the vocabulary "
                         f"{bounds} (at position {pos})")
    return tokens, lengths


def _length(seq, what: str) -> int:
    try:
        return len(seq)
    except TypeError:
        raise ValueError(f"{what}: expected a list, got {type(seq).__name__}") from None


def _is_id_list(seq) -> bool:
    return all(isinstance(t, numbers.Integral) and not isinstance(t, bool) or
               isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point()
               for t in seq)


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


def bucket_width(tokens: int, multiple: int) -> int:
    """The smallest width >= `tokens` of the form multiple * 2^k or multiple * 3 * 2^k (k >= 0):
    multiple x 1, 2, 3, 4, 6, 8, 12, 16, ... Two sizes per doubling, so a run's packed rows come
    in a handful of widths; the padding beyond the multiple is under a third of the width
    (~15% on average over HH-like micro-batches)."""
    blocks = max(1, -(-tokens // multiple))
    power = 1 << (blocks - 1).bit_length()                       # smallest 2^k >= blocks
    three = 3 * power // 4                                       # the 3 * 2^(k-2) between
    return (three if 4 <= power and blocks <= three else power) * multiple


def row_padding(device: torch.device | str, attention: str = "auto") -> dict:
    """`pack_groups` keywords for the rows a model on `device` runs on with `attention`
    (`vrpo_fast.logprobs.packed_body`'s; "auto" is FlexAttention on CUDA).

    FlexAttention on CUDA: widths in whole 128-token blocks (its compiled kernel switches to a
    decoding kernel, without a training path, for rows under 128 tokens; whole blocks also keep
    the BlockMask exact), rounded up to a `bucket_width`. transformers compiles FlexAttention
    for training with dynamic=False, so each new (rows, width) shape is a fresh compile (minutes
    with max-autotune), and past torch._dynamo's recompile limit (8) FlexAttention falls back
    to eager, which materialises every attention score. Buckets keep the shapes of a run few.
    Elsewhere (the cascade, flash-attn's varlen kernel, a dense SDPA mask): no padding, which
    only the body would run through.
    """
    if torch.device(device).type == "cuda" and attention in ("auto", "flex"):
        return {"pad_to_multiple": 128, "bucket_widths": True}
    return {}


def trainer_budget(max_tokens: int | None, device, prompt_ids, response_ids,
                   attention: str = "auto") -> int | None:
    """The packing budget of a training micro-batch: `max_tokens` (None: the whole micro-batch
    in one row). The packed attentions (FlexAttention skipping blocks on CUDA, the cascade on
    the CPU, flash-attn's varlen sequences) do not pay for the pairs between groups, so one row
    costs nothing there and leaves no tail padding for the body to run through. The dense mask
    (attention "sdpa") scores every pair of its row: unset, its rows hold at most the longest
    group."""
    if max_tokens is None and attention == "sdpa":
        return max(len(p) + sum(map(len, rs)) for p, rs in zip(prompt_ids, response_ids))
    return max_tokens


def pack_groups(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], *,
                max_tokens: int | None = None, pad_id: int = 0, pad_to_multiple: int = 1,
                bucket_widths: bool = False, vocab_size: int | None = None) -> PackedBatch:
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
        bucket_widths: round T further up to `bucket_width(T, pad_to_multiple)`, but not past
            max_tokens rounded up to the multiple: the rows of many batches then share a few
            widths (for kernels compiled per shape). `row_padding(device)` gives the keywords
            the trainer uses.
        vocab_size: when given, ids outside [0, vocab_size) are a ValueError.

    Returns:
        PackedBatch with R rows of width T.
    """
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens: expected a positive int or None, got {max_tokens!r}")
    if not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple: expected a positive int, got {pad_to_multiple!r}")
    tokens, lengths = validate_groups(prompt_ids, response_ids, vocab_size)
    G, K = len(prompt_ids), len(response_ids[0])
    # Piece i = g * (K + 1) + j: the prompt of group g (j = 0) or its response j - 1.
    sizes = [sum(lengths[g * (K + 1):(g + 1) * (K + 1)]) for g in range(G)]
    if max_tokens is not None:
        for g, size in enumerate(sizes):
            if size > max_tokens:
                raise ValueError(f"group {g}: {size} tokens (prompt {lengths[g * (K + 1)]} + "
                                 f"{K} responses) exceed the packing budget max_tokens = "
                                 f"{max_tokens}; raise the budget or shorten the data")
    rows = _first_fit_decreasing(sizes, max_tokens)
    T = max(sum(sizes[g] for g in row) for row in rows)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    if bucket_widths:
        T = bucket_width(T, pad_to_multiple)
        if max_tokens is not None:                               # every row holds <= max_tokens
            T = min(T, -(-max_tokens // pad_to_multiple) * pad_to_multiple)
    R = len(rows)

    # Where each piece starts in the flattened (R * T) rows; the token-level tensors then come
    # from a few vectorised ops instead of a Python loop over tokens.
    starts = [0] * len(lengths)
    spans, prompt_spans = [], [None] * G
    for r, row in enumerate(rows):
        col = 0
        for g in row:
            for j in range(K + 1):
                i = g * (K + 1) + j
                starts[i] = r * T + col
                span = Span(r, g, j - 1, col, col + lengths[i])
                if j == 0:
                    prompt_spans[g] = span
                else:
                    spans.append(span)
                col += lengths[i]
    spans.sort(key=lambda sp: sp.group * K + sp.response)
    n_pieces = G * (K + 1)
    starts, lengths_t = torch.tensor(starts), torch.tensor(lengths)
    piece_k = torch.arange(n_pieces) % (K + 1) - 1                  # -1 for prompts
    piece_group = torch.arange(n_pieces) // (K + 1)
    prompt_len = lengths_t[piece_group * (K + 1)]
    piece = torch.repeat_interleave(torch.arange(n_pieces), lengths_t)         # per token
    within = torch.arange(len(tokens)) - (torch.cumsum(lengths_t, 0) - lengths_t)[piece]
    flat = starts[piece] + within

    input_ids = torch.full((R * T,), pad_id, dtype=torch.long)
    position_ids = torch.zeros(R * T, dtype=torch.long)
    group = torch.full((R * T,), -1, dtype=torch.long)
    response = torch.full((R * T,), -1, dtype=torch.long)
    input_ids[flat] = tokens
    position_ids[flat] = torch.where(piece_k[piece] >= 0, prompt_len[piece], 0) + within
    group[flat] = piece_group[piece]
    response[flat] = piece_k[piece]

    is_resp = piece_k[piece] >= 0
    # A response's first token is predicted by its group's last prompt token; every other
    # token by the token just before it.
    prompt_piece = piece_group[piece] * (K + 1)
    last_prompt = starts[prompt_piece] + prompt_len[piece] - 1
    pred_index = torch.where(within == 0, last_prompt, flat - 1)[is_resp]
    return PackedBatch(
        input_ids=input_ids.view(R, T), position_ids=position_ids.view(R, T),
        group=group.view(R, T), response=response.view(R, T),
        pred_index=pred_index, targets=tokens[is_resp],
        segment_ids=(piece_group * K + piece_k)[piece][is_resp],
        last_index=(starts + lengths_t - 1)[piece_k >= 0],
        num_groups=G, group_size=K, num_tokens=sum(sizes),
        max_length=max(lengths[g * (K + 1)] + max(lengths[g * (K + 1) + 1:(g + 1) * (K + 1)])
                       for g in range(G)),
        spans=spans, prompt_spans=prompt_spans)
