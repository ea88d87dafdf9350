"""Padded batches -> the fused loss, for trainers that will not repack.

Most trainers hold one right-padded row per (prompt, response): hidden states (B, T, D) from
the model body and labels (B, T) that carry the token ids on response positions and -100 on the
prompt and the pads (transformers' convention; TRL's `input_ids.masked_fill(completion_mask ==
0, -100)`). `padded_response_tokens` keeps only the positions that predict a response token, so
the LM head runs on N = sum of response lengths rows, never on the (B, T, V) logits, and tags
each with its response's segment id g * K + k, which is what `FusedLinearVRPOLoss` and
`linear_logprobs(..., segment_ids=...)` sum over. The prompt is recomputed in every row (no
shared-prefix saving): packing (`pack_groups`) is the faster path where the trainer allows it.
"""

from __future__ import annotations

import torch

LAYOUTS = ("grouped", "stacked")


def padded_response_tokens(hidden: torch.Tensor, labels: torch.Tensor, *, group_size: int,
                           layout: str = "grouped", shifted: bool = False,
                           ignore_index: int = -100
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden (N, D), targets (N,), segment_ids (N,)) of the response tokens of a padded batch.

    Args:
        hidden: (B, T, D) hidden states of the body (before the LM head).
        labels: (B, T) token ids on response positions, `ignore_index` elsewhere.
        group_size: K responses per prompt (2 for DPO's chosen and rejected, 2 + 2M for VRPO);
            B must be a multiple of it.
        layout: where response k of group g sits: "grouped", row g * K + k (a prompt's rows
            together); "stacked", row k * G + g (all chosen rows, then all rejected rows, ...:
            how TRL and Liger-Kernel batch a preference pair).
        shifted: False (transformers' labels): labels[:, t] is predicted by hidden[:, t - 1];
            True (Liger-Kernel's target): labels[:, t] is predicted by hidden[:, t].

    Returns:
        The predicting hidden states, their target ids and segment ids g * K + k in [0, B), to
        pass with `num_groups = B // K` and `group_size = K` to `FusedLinearVRPOLoss`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden, labels: expected (B, T, D) and (B, T), got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    B = labels.shape[0]
    if not isinstance(group_size, int) or group_size < 1 or B % group_size:
        raise ValueError(f"group_size: {group_size!r} does not divide the batch of {B} rows")
    if not shifted:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    keep = labels != ignore_index
    rows = torch.arange(B, device=labels.device)[:, None].expand_as(labels)[keep]
    # Boolean indexing sizes its output from the mask: one host sync per batch, which buys an LM
    # head over the response tokens only.
    if layout == "grouped":
        segments = rows
    else:
        G = B // group_size
        segments = (rows % G) * group_size + rows // G
    return hidden[keep], labels[keep], segments
