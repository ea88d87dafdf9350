"""Sequence log-probabilities: the packed path (body once per prompt group, LM head only on
response positions, vocabulary in chunks) and the naive oracle (one padded forward per pair).

The pieces are callable on their own (for the kernels' tests and the benchmarks):
`packed_body` (R, T, D) -> `packed_hidden_states` (N, D) + head weight -> `packed_logps` (G, K).
The LM head goes through `vrpo_fast.ops.linear_logprobs`: the fused Triton kernel on CUDA, its
chunked PyTorch reference (`vrpo_fast.chunked.chunked_linear_logprobs`) on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

import vrpo_fast.attention as packed_attention
from vrpo_fast.attention import cascade_layout, register, register_varlen, varlen_layout
from vrpo_fast.ops import linear_logprobs
from vrpo_fast.packing import PackedBatch, pack_groups, row_padding, validate_groups

ATTENTION = ("auto", "cascade", "flash", "sdpa", "flex")
IMPLS = ("packed", "naive")


def _body(model: nn.Module) -> nn.Module:
    """The transformer body (embeddings, blocks, final norm) of a transformers model."""
    body = getattr(model, "model", None)
    if body is None and hasattr(model, "get_decoder"):
        body = model.get_decoder()
    if not isinstance(body, nn.Module):
        raise ValueError(f"model: expected a transformers causal LM with a `.model` body "
                         f"(Llama, Qwen2, Mistral style), got {type(model).__name__}")
    return body


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The (V, D) LM-head weight (the embedding matrix when tied); ValueError for heads the
    packed path cannot reproduce exactly (a bias, a final logit softcap)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"model: {type(model).__name__} has no linear LM head "
                         f"(get_output_embeddings() gave {type(head).__name__})")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"model: {type(model).__name__} has an LM head with a bias, which the "
                         f"packed log-prob path does not support")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"model: {type(model).__name__} softcaps its logits "
                         f"(final_logit_softcapping), which the packed log-prob path does not "
                         f"support")
    return head.weight


def _sliding_window(config, batch: PackedBatch) -> tuple[int | None, list[str]]:
    """(window, kinds): the sliding window the packed attention must apply (None when the model
    has none or when no sequence is long enough for it to matter), and the kind of each layer
    ("full_attention" / "sliding_attention").

    A custom mask replaces transformers' own, window included, so the window must be in it.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    kinds = list(layer_types) if layer_types else \
        ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    unknown = set(kinds) - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"model: attention layer types {sorted(unknown)} are not supported by "
                         f"the packed path (full_attention and sliding_attention are)")
    matters = "sliding_attention" in kinds and window is not None and window < batch.max_length
    return (window if matters else None), kinds


def _attention_inputs(model: nn.Module, batch: PackedBatch, attention: str) -> dict:
    """The body's keywords that carry the packed layout in the form the chosen attention takes,
    setting the model's attention implementation to match (and leaving it so: activation
    checkpointing re-runs the forward during backward and must find the same implementation).

    "cascade": the row segments (vrpo_fast.attention), with a placeholder 4-D mask so that
    transformers builds none; "flash": the same segments as flash-attn varlen sequences
    (`VarlenLayout`), with the placeholder; "sdpa": the dense (R, 1, T, T) mask; "flex": the
    BlockMask.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention: expected one of {ATTENTION}, got {attention!r}")
    if attention == "auto":
        # FlexAttention has no backward on the CPU (torch 2.13); the cascade runs there, per
        # segment, instead of SDPA over a dense mask that is mostly False.
        attention = "flex" if batch.input_ids.is_cuda else "cascade"
    if attention == "cascade":
        impl = register()
    elif attention == "flash":
        packed_attention.flash_varlen_func()        # ImportError now, not in the first layer
        impl = register_varlen()
    else:
        impl = "flex_attention" if attention == "flex" else "sdpa"
    if model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)
    window, kinds = _sliding_window(model.config, batch)
    if attention in ("cascade", "flash"):
        windows = [window if kind == "sliding_attention" else None for kind in kinds]
        placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=batch.input_ids.device)
        if attention == "flash":
            return {"attention_mask": placeholder, "vrpo_varlen": varlen_layout(batch, windows)}
        return {"attention_mask": placeholder, "vrpo_cascade": cascade_layout(batch, windows)}
    if attention == "flex":
        make = lambda w: batch.block_mask(sliding_window=w)
    else:
        make = lambda w: batch.dense_mask(sliding_window=w)
    if window is not None and "full_attention" in kinds:
        # Models with both layer kinds (Qwen2 with max_window_layers) take one mask per kind.
        return {"attention_mask": {"full_attention": make(None),
                                   "sliding_attention": make(window)}}
    return {"attention_mask": make(window)}


def packed_body(model: nn.Module, batch: PackedBatch, *, attention: str = "auto"
                ) -> torch.Tensor:
    """The transformer body (no LM head) on the packed rows -> hidden states (R, T, D).

    attention: "auto" (FlexAttention BlockMask on CUDA, the cascade attention elsewhere),
    "cascade" (vrpo_fast.attention: SDPA per prompt and per response, no T x T mask), "flash"
    (the same decomposition in one flash-attn varlen call per layer: CUDA, fp16 / bf16,
    flash-attn installed), "sdpa" (a dense 4-D mask) or "flex" to force one (FlexAttention
    runs forward-only on the CPU).
    Works for causal LMs and sequence classifiers alike (a reward model scores at
    `batch.last_index`). Hidden states at pad positions depend on the attention (zero
    attention output under the cascade); nothing reads them.
    """
    out = _body(model)(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       use_cache=False, **_attention_inputs(model, batch, attention))
    return out.last_hidden_state


def packed_hidden_states(model: nn.Module, batch: PackedBatch, *, attention: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, D) at `batch.pred_index`, the positions predicting response tokens,
    LM-head weight (V, D))."""
    weight = lm_head_weight(model)
    hidden = packed_body(model, batch, attention=attention).flatten(0, 1)[batch.pred_index]
    return hidden, weight


def _response_logps(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch,
                    temperature: float) -> torch.Tensor:
    """The LM-head step: per-response sums of log p(target), (G * K,) float32."""
    return linear_logprobs(hidden, weight, batch.targets, segment_ids=batch.segment_ids,
                           num_segments=batch.num_groups * batch.group_size,
                           temperature=temperature)


def packed_logps(model: nn.Module, batch: PackedBatch, temperature: float = 1.0, *,
                 attention: str = "auto") -> torch.Tensor:
    """(G, K) float32 sequence log-probs of a packed batch, differentiable in the model's
    parameters. No (N, V) logits tensor is ever materialised."""
    hidden, weight = packed_hidden_states(model, batch, attention=attention)
    logps = _response_logps(hidden, weight, batch, temperature)
    return logps.float().view(batch.num_groups, batch.group_size)


def sequence_logps(model: nn.Module, prompt_ids: list[list[int]],
                   response_ids: list[list[list[int]]], *, impl: str = "packed",
                   max_tokens: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """log p(response | prompt) summed over response tokens -> (G, K) float32.

    Args:
        model: a transformers causal LM (Llama, Qwen2, Mistral style; tied or untied
            embeddings; float32 or bfloat16).
        prompt_ids: G non-empty lists of token ids.
        response_ids: G lists of K non-empty lists of token ids.
        impl: "packed": the body runs once per packed row (each prompt once), the LM head only
            on response positions, in vocabulary chunks; "naive": one padded forward per
            (prompt, response) with full logits (the oracle and benchmark baseline).
        max_tokens: packing budget per row (packed only); None packs every group in one row.
        temperature: the logits are divided by it.

    Differentiable in the model's parameters when grad is enabled. Empty sequences, mismatched
    K, ids outside the vocabulary: ValueError naming the group and index.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    weight = lm_head_weight(model) if impl == "packed" else model.get_output_embeddings().weight
    vocab_size, device = weight.shape[0], weight.device
    if impl == "naive":
        validate_groups(prompt_ids, response_ids, vocab_size)
        return naive_sequence_logps(model, prompt_ids, response_ids, temperature=temperature)
    batch = pack_groups(prompt_ids, response_ids, max_tokens=max_tokens, vocab_size=vocab_size,
                        **row_padding(device))
    return packed_logps(model, batch.to(device), temperature)


def padded_rows(prompt_ids, response_ids):
    """The naive layout: every (prompt, response) in its own right-padded row.
    -> input_ids (S, T), attention_mask (S, T), response_mask (S, T - 1) over the shifted
    targets (token t + 1 is a response token: past the prompt, not padding), S = G * K rows,
    on the CPU."""
    seqs, starts = [], []
    for prompt, responses in zip(prompt_ids, response_ids):
        for resp in responses:
            seqs.append([int(t) for t in prompt] + [int(t) for t in resp])
            starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    pos = torch.arange(1, width)[None, :]
    keep = (pos >= torch.tensor(starts)[:, None]) & (attn[:, 1:] == 1)
    return ids, attn, keep


def naive_sequence_logps(model: nn.Module, prompt_ids, response_ids, *,
                         temperature: float = 1.0) -> torch.Tensor:
    """The oracle: every (prompt, response) as its own right-padded sequence in one batched
    SDPA forward with full logits and log_softmax -> (G, K) float32. Memory grows with
    G * K * length * V: for tests and as the benchmark baseline only."""
    device = model.get_output_embeddings().weight.device
    ids, attn, keep = (t.to(device) for t in padded_rows(prompt_ids, response_ids))
    if model.config._attn_implementation not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)             # (S, width - 1)
    return torch.where(keep, tok, 0).sum(dim=1).view(len(prompt_ids), len(response_ids[0]))
