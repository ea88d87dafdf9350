"""The PyTorch reference of the fused linear log-prob kernel (vrpo_fast.kernels.linear_logprob):
the same maths in vocabulary chunks with an online log-sum-exp, used on the CPU and by the
kernel tests and benchmarks."""

from __future__ import annotations

import torch


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
        hs = h / temperature if temperature != 1.0 else h         # logits = hs @ w.T
        running_max = torch.full((N,), float("-inf"), device=hidden.device)
        running_sum = torch.zeros(N, device=hidden.device)
        for v0 in range(0, V, chunk_size):
            logits = hs @ weight[v0:v0 + chunk_size].float().T
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            # In place on the chunk: one (N, chunk) temporary per chunk, not three.
            running_sum = running_sum * torch.exp(running_max - new_max) + \
                logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        target_logit = (hs * weight[tgt].float()).sum(dim=1)
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
        hs = h / T if T != 1.0 else h
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        neg_lse, neg_g = -lse[:, None], -g[:, None]
        for v0 in range(0, weight.shape[0], C):
            w = weight[v0:v0 + C].float()
            # -g softmax / T: the LSE shift rides in the GEMM (addmm), exp and scale in place.
            d_logits = torch.addmm(neg_lse, hs, w.T).exp_().mul_(neg_g)
            if grad_h is not None:
                grad_h.addmm_(d_logits, w)
            if grad_w is not None:
                grad_w[v0:v0 + C].addmm_(d_logits.T, h)
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
