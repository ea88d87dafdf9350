"""Shared-prefix (cascade) attention on packed rows, without a T x T mask.

In a packed group (vrpo_fast/packing.py)

    [ p0 p1 p2 p3 | c0 c1 c2 | r0 r1 | ... ]

the prompt attends causally to itself, and each response to the whole prompt and causally to
its own earlier tokens; nothing else. A dense (T, T) mask makes SDPA score every query-key pair
of the row and throw most away: with K responses of length L behind a prompt of length P, the
row has (P + K L)^2 pairs, of which P^2 / 2 + K (L P + L^2 / 2) are needed (11 % at P = 160,
K = 18, L ~ 90). Here the row is cut into its segments and attention runs per segment:

    prompt:      SDPA(q_p, k_p, v_p, causal)
    response r:  SDPA(q_r, [k_p; k_r], [v_p; v_r], mask (L_r, P + L_r))

The response's small mask is the lower-right causal one (query i, at position P + i, sees keys
0 .. P + i), a slice of one (max_length, max_length) lower-triangular matrix, as the prompt's is
when a sliding window applies. This is the cascade / shared-KV decomposition with its merge
done inside SDPA: the response's queries meet the prompt's keys and its own in one softmax,
which is exactly the two partial attentions merged by their log-sum-exp. SDPA on the CPU cannot
return that LSE, so the concatenation is the form that also keeps the backward a plain autograd
graph (split / cat / SDPA). The prompt's keys and values are shared, not copied per response:
their gradients sum the K responses' contributions and the prompt's own.

Pads at a row's tail attend to nothing; their output is zero (no real token reads them).

On a GPU with flash-attn installed the same decomposition runs as one varlen kernel call per
layer (`varlen_attention_forward`, attention="flash"): every segment is a sequence of its own,
its queries the segment's tokens, its keys and values the segment's for a prompt and the
prompt's followed by the response's for a response (gathered once per layer by one index,
`VarlenLayout.kv_index`; its backward sums a prompt's K copies). The copies cost memory, not
FLOPs: each response's gathered keys and values hold its prompt's again. flash-attn aligns the
causal mask of a sequence with more keys than queries at the bottom right, which is exactly the
response's (query i sees keys 0 .. P + i), and its window (w - 1, 0) is the model's sliding
window. flash-attn is imported only when that path runs.

The functions are registered with transformers' AttentionInterface under `NAME` and
`VARLEN_NAME`; `packed_body` sets a model to one and passes the layout (`CascadeLayout`,
`VarlenLayout`) as the `vrpo_cascade` (`vrpo_varlen`) keyword, which
transformers hands through the decoder layers to the attention call (and activation
checkpointing keeps for the recomputed forward). Called without it (generate, a plain forward
of a model left on this implementation), the function is transformers' own SDPA attention with
transformers' own mask, so the model stays usable.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vrpo_fast.packing import PackedBatch, Segment

NAME = "vrpo_cascade"
VARLEN_NAME = "vrpo_varlen"


@dataclass(frozen=True)
class CascadeLayout:
    """What the attention of one packed forward needs besides q, k, v.

    rows: the batch's `PackedBatch.row_segments()`;
    windows: per decoder layer, the sliding window it applies (None: none, or none shorter than
        the batch's longest sequence);
    seen: window -> (max_length, max_length) bool, True where position a may see position b.
    """

    rows: tuple[tuple[Segment, ...], ...]
    windows: tuple[int | None, ...]
    seen: dict
    _additive: dict = field(default_factory=dict, compare=False, repr=False)

    def additive(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """`seen[window]` as the additive mask SDPA takes (0 where seen, -inf elsewhere) in
        `dtype`, built once per layout: a boolean mask would be converted on every call (once
        per response per layer)."""
        key = window, dtype
        if key not in self._additive:
            mask = torch.zeros(self.seen[window].shape, dtype=dtype,
                               device=self.seen[window].device)
            self._additive[key] = mask.masked_fill_(~self.seen[window], float("-inf"))
        return self._additive[key]


def cascade_layout(batch: PackedBatch, windows: list[int | None]) -> CascadeLayout:
    """The layout of `batch` for a model whose layers use `windows` (one entry per layer)."""
    L, device = batch.max_length, batch.input_ids.device
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    seen = {w: causal if w is None else causal.triu(1 - w) for w in set(windows)}
    return CascadeLayout(batch.row_segments(), tuple(windows), seen)


@dataclass(frozen=True)
class VarlenLayout:
    """What the varlen attention of one packed forward needs besides q, k, v: the segments as
    flash-attn's sequences over the flattened (R * T) positions.

    q_index: (Nq,) the real (non-pad) positions, in order (None when the batch has no pads);
    kv_index: (Nk,) the positions whose keys and values each sequence reads, sequence after
        sequence (a response's: its prompt's, then its own);
    cu_q, cu_k: (S + 1,) int32 offsets of the S sequences in q_index / kv_index order;
    max_q, max_k: the longest sequence of each;
    windows: per decoder layer, the sliding window it applies (None: none).
    """

    q_index: torch.Tensor | None
    kv_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    windows: tuple[int | None, ...]


def varlen_layout(batch: PackedBatch, windows: list[int | None]) -> VarlenLayout:
    """The varlen layout of `batch` for a model whose layers use `windows`; built on the host
    from the row segments, copied to the batch's device once."""
    R, T = batch.shape
    q_parts, kv_parts, len_q, len_k = [], [], [], []
    for r, segments in enumerate(batch.row_segments()):
        starts = [r * T]
        for seg in segments:
            starts.append(starts[-1] + seg.length)
        for i, seg in enumerate(segments):
            if seg.pad:
                continue
            own = torch.arange(starts[i], starts[i + 1])
            q_parts.append(own)
            if seg.prompt >= 0:
                kv_parts.append(torch.arange(starts[seg.prompt], starts[seg.prompt + 1]))
            kv_parts.append(own)
            len_q.append(seg.length)
            len_k.append(seg.length + (segments[seg.prompt].length if seg.prompt >= 0 else 0))
    q_index = torch.cat(q_parts)
    device = batch.input_ids.device

    def offsets(lengths):
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(device)

    return VarlenLayout(
        q_index=None if len(q_index) == R * T else q_index.to(device),
        kv_index=torch.cat(kv_parts).to(device), cu_q=offsets(len_q), cu_k=offsets(len_k),
        max_q=max(len_q), max_k=max(len_k), windows=tuple(windows))


def flash_varlen_func():
    """flash-attn's `flash_attn_varlen_func`, imported on first use (an optional extra)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("attention='flash' needs flash-attn (a CUDA build): "
                          "pip install -e '.[flash]'") from err
    return flash_attn_varlen_func


@functools.cache
def _register(name: str, function) -> str:
    """Register an attention function with transformers under `name` (once per process), with
    SDPA's mask function for the plain forwards that carry no layout; returns the name, for
    `model.set_attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def register() -> str:
    """The cascade attention registered; its name."""
    return _register(NAME, cascade_attention_forward)


def register_varlen() -> str:
    """The varlen (flash-attn) attention registered; its name."""
    return _register(VARLEN_NAME, varlen_attention_forward)


def _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """A forward without a packed layout (generate, a plain padded forward): transformers' own
    SDPA attention with its own mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _refuse_unsupported(module, kwargs) -> None:
    """Attention the packed paths would compute wrongly, refused: logit softcapping (Gemma 2)
    and attention sinks (`s_aux`: GPT-OSS and others), which transformers hands over as
    keywords this implementation would otherwise ignore."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"model: {type(module).__name__} softcaps its attention logits, which "
                         f"the packed attention does not support (attention='sdpa' does not "
                         f"either; use the model's eager attention outside the packed path)")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"model: {type(module).__name__} has attention sinks (s_aux), which "
                         f"the packed attention does not support (use the model's eager "
                         f"attention outside the packed path)")


def cascade_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, *,
                              vrpo_cascade: CascadeLayout | None = None, **kwargs
                              ) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (R, H, T, d), key / value
    (R, H_kv, T, d) (grouped-query heads are broadcast by SDPA, never copied) -> ((R, T, H, d),
    None). `attention_mask` is ignored when the layout is given (`packed_body` passes a
    placeholder so that transformers builds no mask)."""
    if vrpo_cascade is None:
        return _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _refuse_unsupported(module, kwargs)
    window = vrpo_cascade.windows[module.layer_idx]
    seen = vrpo_cascade.additive(window, query.dtype)
    sdpa = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout, scale=scaling,
                             enable_gqa=query.shape[1] != key.shape[1])
    out_rows = []
    for r, segments in enumerate(vrpo_cascade.rows):
        sizes = [s.length for s in segments]
        # Views of (1, H, length, d): split's backward is one concatenation per tensor, where
        # slicing each piece would allocate and add a full-row gradient per segment. Keeping 4-D
        # inputs lets SDPA take its fused CPU kernel (3-D inputs fall back to the math path).
        qs, ks, vs = (x[r:r + 1].split(sizes, dim=2) for x in (query, key, value))
        outs = []
        for i, seg in enumerate(segments):
            if seg.pad:
                outs.append(torch.zeros_like(qs[i]))
            elif seg.prompt < 0:
                P = seg.length
                if window is None or window >= P:
                    outs.append(sdpa(qs[i], ks[i], vs[i], is_causal=True))
                else:
                    outs.append(sdpa(qs[i], ks[i], vs[i], attn_mask=seen[:P, :P]))
            else:
                p = seg.prompt
                P, L = sizes[p], seg.length
                k = torch.cat([ks[p], ks[i]], dim=2)
                v = torch.cat([vs[p], vs[i]], dim=2)
                outs.append(sdpa(qs[i], k, v, attn_mask=seen[P:P + L, :P + L]))
        out_rows.append(torch.cat(outs, dim=2))
    return torch.cat(out_rows).transpose(1, 2).contiguous(), None


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, *,
                             vrpo_varlen: VarlenLayout | None = None, **kwargs
                             ) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, as `cascade_attention_forward`: one
    flash-attn varlen call over the layout's sequences (grouped-query heads are flash-attn's
    own); pads' outputs are zero."""
    if vrpo_varlen is None:
        return _plain_sdpa(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    _refuse_unsupported(module, kwargs)
    layout = vrpo_varlen
    R, H, T, d = query.shape
    # (R, H, T, d) -> (R * T, H, d): flash-attn's packed layout, heads after tokens.
    q, k, v = (x.transpose(1, 2).reshape(R * T, x.shape[1], d) for x in (query, key, value))
    if layout.q_index is not None:
        q = q.index_select(0, layout.q_index)
    k, v = k.index_select(0, layout.kv_index), v.index_select(0, layout.kv_index)
    window = layout.windows[module.layer_idx]
    out = flash_varlen_func()(
        q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, dropout_p=dropout,
        softmax_scale=scaling, causal=True,
        window_size=(-1, -1) if window is None else (window - 1, 0))
    if layout.q_index is not None:
        out = out.new_zeros(R * T, H, d).index_copy(0, layout.q_index, out)
    return out.view(R, T, H, d), None
