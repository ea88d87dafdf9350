"""Sequence log-probabilities: the packed path (body once per prompt group, LM head only on
response positions, vocabulary in chunks) and the naive oracle (one padded forward per pair).

`chunked_linear_logprobs` is the PyTorch reference of the fused Triton kernel
(vrpo_fast.kernels.linear_logprob): the same maths, used on the CPU and by the kernel tests.
"""

from __future__ import annotations

import torch
from torch import nn

from vrpo_fast.packing import PackedBatch, pack_groups, validate_groups


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """log p(target) = h.w_t / T - logsumexp_v(h.w_v / T), vocabulary streamed in chunks.

    Forward keeps a running max and sum per row (online log-sum-exp) and saves only the LSE (N,);
    backward recomputes each logit chunk: dlogits = g (onehot - softmax) / T. Nothing of size
    (N, V) is ever allocated: the largest temporaries are (N, chunk_size).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, segment_ids, num_segments, temperature,
                ignore_index, chunk_size):
        N, V = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        tgt = torch.where(valid, targets, torch.zeros_like(targets))
        h = hidden.float()
        running_max = torch.full((N,), float("-inf"), device=hidden.device)
        running_sum = torch.zeros(N, device=hidden.device)
        for v0 in range(0, V, chunk_size):
            logits = (h @ weight[v0:v0 + chunk_size].float().T) / temperature
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + \
                torch.exp(logits - new_max[:, None]).sum(dim=1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        target_logit = (h * weight[tgt].float()).sum(dim=1) / temperature
        logp = torch.where(valid, target_logit - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, tgt, valid, lse, segment_ids)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.has_segments = segment_ids is not None
        if segment_ids is None:
            return logp
        return torch.zeros(num_segments, device=hidden.device).index_add_(0, segment_ids, logp)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, tgt, valid, lse, segment_ids = ctx.saved_tensors
        T, C = ctx.temperature, ctx.chunk_size
        g = grad_out.float()[segment_ids] if ctx.has_segments else grad_out.float()
        g = torch.where(valid, g, torch.zeros_like(g)) / T        # (N,)
        h = hidden.float()
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for v0 in range(0, weight.shape[0], C):
            w = weight[v0:v0 + C].float()
            d_logits = -g[:, None] * torch.exp(h @ w.T / T - lse[:, None])   # -g softmax / T
            if grad_h is not None:
                grad_h += d_logits @ w
            if grad_w is not None:
                grad_w[v0:v0 + C] += d_logits.T @ h
        # The one-hot part: + g / T at each row's target.
        if grad_h is not None:
            grad_h += g[:, None] * weight[tgt].float()
            grad_h = grad_h.to(hidden.dtype)
        if grad_w is not None:
            grad_w.index_add_(0, tgt, g[:, None] * h)
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def chunked_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            *, segment_ids: torch.Tensor | None = None,
                            num_segments: int | None = None, temperature: float = 1.0,
                            ignore_index: int = -100, chunk_size: int = 4096) -> torch.Tensor:
    """Per-token log p(target) (N,), or per-segment sums (num_segments,) with `segment_ids`.

    hidden: (N, D), weight: (V, D) (the LM head), targets: (N,) with `ignore_index` for positions
    that contribute nothing. fp32 accumulation for any input dtype; output float32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets: expected shape ({hidden.shape[0]},), got "
                         f"{tuple(targets.shape)}")
    if segment_ids is not None:
        if segment_ids.shape != targets.shape:
            raise ValueError(f"segment_ids: expected shape {tuple(targets.shape)}, got "
                             f"{tuple(segment_ids.shape)}")
        if num_segments is None:
            raise ValueError("num_segments: required with segment_ids")
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    return _ChunkedLinearLogprobs.apply(hidden, weight, targets, segment_ids, num_segments,
                                        float(temperature), ignore_index, chunk_size)


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


def _linear_logprobs(hidden, weight, targets, segment_ids, num_segments, temperature):
    # The one place the packed path computes log-probs: the dispatching fused kernel when the
    # kernels package is importable, else the chunked PyTorch reference.
    try:
        from vrpo_fast.ops import linear_logprobs
    except ImportError:
        return chunked_linear_logprobs(hidden, weight, targets, segment_ids=segment_ids,
                                       num_segments=num_segments, temperature=temperature)
    return linear_logprobs(hidden, weight, targets, segment_ids=segment_ids,
                           num_segments=num_segments, temperature=temperature)


def packed_logps(model: nn.Module, batch: PackedBatch, temperature: float = 1.0) -> torch.Tensor:
    """(G, K) float32 sequence log-probs of a packed batch (differentiable)."""
    hidden, weight = packed_hidden_states(model, batch)
    lp = _linear_logprobs(hidden, weight, batch.targets, batch.segment_ids,
                          batch.num_groups * batch.group_size, temperature)
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
