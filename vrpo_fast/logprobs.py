"""Sequence log-probabilities: the packed path (body once per prompt group, LM head only on
response positions, vocabulary in chunks) and the naive oracle (one padded forward per pair).

The LM head goes through `vrpo_fast.ops.linear_logprobs`: the fused Triton kernel on CUDA, its
chunked PyTorch reference (`vrpo_fast.chunked`) on the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from vrpo_fast.ops import linear_logprobs
from vrpo_fast.packing import PackedBatch, pack_groups, validate_groups

# --- the packed model forward ---------------------------------------------------------------

def _body(model: nn.Module) -> nn.Module:
    body = getattr(model, "model", None)
    if body is None and hasattr(model, "get_decoder"):
        body = model.get_decoder()
    if body is None:
        raise ValueError(f"{type(model).__name__}: expected a transformers causal LM with a "
                         f"`.model` body (Llama, Qwen2, Mistral style)")
    return body


def _attention_for(model: nn.Module, batch: PackedBatch):
    """The packed mask in the form the device supports, setting the attention implementation.

    CUDA: FlexAttention with a BlockMask (compiles to Triton). CPU: FlexAttention has no backward
    in torch 2.13, so the same mask as a dense 4-D boolean tensor through SDPA.
    """
    want = "flex_attention" if batch.input_ids.is_cuda else "sdpa"
    if model.config._attn_implementation != want:
        model.set_attn_implementation(want)
    return batch.block_mask() if want == "flex_attention" else batch.dense_mask()


def packed_body(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The transformer body on the packed rows -> hidden states (R, T, D)."""
    mask = _attention_for(model, batch)
    out = _body(model)(input_ids=batch.input_ids, attention_mask=mask,
                       position_ids=batch.position_ids, use_cache=False)
    return out.last_hidden_state


def packed_hidden_states(model: nn.Module, batch: PackedBatch):
    """(hidden (N, D) at the positions predicting response tokens, LM-head weight (V, D))."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: an LM head with a bias is not supported by "
                         f"the packed path")
    hidden = packed_body(model, batch).flatten(0, 1)[batch.pred_index]
    return hidden, head.weight


def packed_logps(model: nn.Module, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """(G, K) float32 sequence log-probs of a packed batch (differentiable)."""
    hidden, weight = packed_hidden_states(model, batch)
    lp = linear_logprobs(hidden, weight, batch.targets, segment_ids=batch.segment_ids,
                         num_segments=batch.num_groups * batch.group_size,
                         temperature=temperature)
    return lp.float().view(batch.num_groups, batch.group_size)


def sequence_logps(model: nn.Module, prompt_ids: list[list[int]],
                   response_ids: list[list[list[int]]], *, impl: str = "packed",
                   max_tokens: int | None = None, temperature: float = 1.0) -> torch.Tensor:
    """log p(response | prompt) summed over response tokens -> (G, K) float32.

    prompt_ids: G lists of token ids; response_ids: G lists of K non-empty lists of ids.
    impl="packed": the body runs once per packed row (each prompt once), the LM head only on
    response positions in vocabulary chunks; impl="naive": one padded forward per (prompt,
    response) with full logits (the oracle). Differentiable in the model's parameters when
    grad is enabled.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    validate_groups(prompt_ids, response_ids, vocab)
    device = model.get_output_embeddings().weight.device
    if impl == "packed":
        batch = pack_groups(prompt_ids, response_ids, max_tokens=max_tokens).to(device)
        return packed_logps(model, batch, temperature)
    if impl == "naive":
        return _naive_sequence_logps(model, prompt_ids, response_ids, temperature, device)
    raise ValueError(f"impl: unknown {impl!r}; expected 'packed' or 'naive'")


def _naive_sequence_logps(model, prompt_ids, response_ids, temperature, device):
    seqs, starts = [], []
    for prompt, responses in zip(prompt_ids, response_ids):
        for resp in responses:
            seqs.append(list(prompt) + list(resp))
            starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    ids, attn = ids.to(device), attn.to(device)
    if model.config._attn_implementation not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)          # (S, width - 1)
    pos = torch.arange(1, width, device=device)[None, :]
    start = torch.tensor(starts, device=device)[:, None]
    keep = (pos >= start) & (attn[:, 1:] == 1)
    G, K = len(prompt_ids), len(response_ids[0])
    return (tok * keep).sum(dim=1).view(G, K)
