"""Fused linear log-prob: LM head + log-softmax + gather (+ per-segment sums) in one pass.

For hidden states h_n (N, D) of the positions that predict response tokens, the LM-head weight
W (V, D), targets t_n and temperature T:

    z_nv    = h_n . w_v / T
    lse_n   = log sum_v exp(z_nv)                      (online, streaming v in BLOCK_V tiles)
    logp_n  = z_{n, t_n} - lse_n                       (0 where t_n == ignore_index)
    out_s   = sum_{n : seg_n = s} logp_n               (optional, accumulated in the same pass)

Backward recomputes each logit tile; with upstream g_n (per token, or g_{seg_n} per segment),

    dz_nv = g_n (1[v = t_n] - softmax(z_n)_v) / T,    dH = dz W,    dW = dz^T H.

The (N, V) logits never exist in memory. dH and dW are computed by two kernels so that each
program owns the rows it writes (no atomics, deterministic): one over N-blocks streaming V, one
over V-blocks streaming N. Accumulation is fp32 for bf16 / fp16 / fp32 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_wv, inv_temp,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 IEEE: tl.constexpr):
    """z[rows, cols] = h[rows] . w[cols] / T as a (BLOCK_N, BLOCK_V) fp32 tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + dd[None, :],
                    mask=(rows[:, None] < N) & (dd[None, :] < D), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + dd[None, :],
                    mask=(cols[:, None] < V) & (dd[None, :] < D), other=0.0)
        if IEEE:
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    return acc * inv_temp


@triton.jit
def _linear_logprob_fwd_kernel(
    # data ptrs
    h_ptr, w_ptr, tgt_ptr, seg_ptr, logp_ptr, lse_ptr, seg_out_ptr,
    # shapes
    N, V, D, inv_temp, ignore_index,
    # strides
    stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_wv, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_D, IEEE)
        z = tl.where(cols[None, :] < V, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)
    valid = row_ok & (tgt != ignore_index)
    logp = tl.where(valid, z_t - lse, 0.0)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    if HAS_SEGMENTS:
        seg = tl.load(seg_ptr + rows, mask=row_ok, other=0)
        tl.atomic_add(seg_out_ptr + seg, logp, mask=valid)


@triton.jit
def _linear_logprob_bwd_dh_kernel(
    # data ptrs
    h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, dh_ptr,
    # shapes
    N, V, D, inv_temp, ignore_index,
    # strides
    stride_hn, stride_wv, stride_dhn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    """dH[rows] = sum over V tiles of dz (BLOCK_N, BLOCK_V) @ W[cols]; this program owns rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    g = tl.where(row_ok & (tgt != ignore_index), g, 0.0) * inv_temp
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_wv, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_D, IEEE)
        p = tl.where(cols[None, :] < V, tl.exp(z - lse[:, None]), 0.0)
        dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            w = tl.load(w_ptr + cols[:, None] * stride_wv + dd[None, :],
                        mask=(cols[:, None] < V) & (dd[None, :] < D), other=0.0)
            ptrs = dh_ptr + rows[:, None] * stride_dhn + dd[None, :]
            msk = row_ok[:, None] & (dd[None, :] < D)
            if IEEE:
                upd = tl.dot(dz, w.to(tl.float32), input_precision="ieee")
            else:
                upd = tl.dot(dz.to(w.dtype), w)
            tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + upd, mask=msk)


@triton.jit
def _linear_logprob_bwd_dw_kernel(
    # data ptrs
    h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, dw_ptr,
    # shapes
    N, V, D, inv_temp, ignore_index,
    # strides
    stride_hn, stride_wv, stride_dwv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    """dW[cols] = sum over N tiles of dz^T (BLOCK_V, BLOCK_N) @ H[rows]; this program owns cols."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        g = tl.where(row_ok & (tgt != ignore_index), g, 0.0) * inv_temp
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, D, stride_hn, stride_wv, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_D, IEEE)
        p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
        dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
        dz_t = tl.trans(dz)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            h = tl.load(h_ptr + rows[:, None] * stride_hn + dd[None, :],
                        mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
            ptrs = dw_ptr + cols[:, None] * stride_dwv + dd[None, :]
            msk = col_ok[:, None] & (dd[None, :] < D)
            if IEEE:
                upd = tl.dot(dz_t, h.to(tl.float32), input_precision="ieee")
            else:
                upd = tl.dot(dz_t.to(h.dtype), h)
            tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + upd, mask=msk)


def _exact_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """fp32 inputs keep IEEE fp32 dots (no TF32). On the CPU (Triton's interpreter, which
    cannot multiply bf16 tiles) every dtype is upcast to fp32 inside the kernel."""
    return dtype == torch.float32 or device.type != "cuda"


def _blocks(N: int, V: int, D: int, device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
    # TRITON_INTERPRET=1 on the CPU: small tiles keep the interpreter quick.
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)


def linear_logprob_forward(hidden, weight, targets, segment_ids=None, num_segments=None,
                           temperature: float = 1.0, ignore_index: int = -100):
    """Returns (logp (N,) fp32, lse (N,) fp32, seg_out (S,) fp32 or None)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    N, D = hidden.shape
    V = weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    has_seg = segment_ids is not None
    seg_out = torch.zeros(num_segments if has_seg else 1, dtype=torch.float32,
                          device=hidden.device)
    seg = segment_ids.contiguous() if has_seg else targets
    cfg = _blocks(N, V, D, hidden.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
    _linear_logprob_fwd_kernel[grid](
        hidden, weight, targets.contiguous(), seg, logp, lse, seg_out,
        N, V, D, 1.0 / temperature, ignore_index,
        hidden.stride(0), weight.stride(0),
        HAS_SEGMENTS=has_seg, IEEE=_exact_fp32(hidden.dtype, hidden.device), **cfg)
    return logp, lse, (seg_out if has_seg else None)


def linear_logprob_backward(hidden, weight, targets, lse, grad_tokens, temperature: float,
                            ignore_index: int, need_dh: bool = True, need_dw: bool = True):
    """grad_tokens: (N,) dL/dlogp_n -> (dH (N, D), dW (V, D)) in the inputs' dtypes."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    N, D = hidden.shape
    V = weight.shape[0]
    g = grad_tokens.float().contiguous()
    cfg = _blocks(N, V, D, hidden.device)
    ieee = _exact_fp32(hidden.dtype, hidden.device)
    args = (N, V, D, 1.0 / temperature, ignore_index)
    dh = dw = None
    if need_dh:
        dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
        _linear_logprob_bwd_dh_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            hidden, weight, targets, lse, g, dh, *args,
            hidden.stride(0), weight.stride(0), dh.stride(0), IEEE=ieee, **cfg)
        dh = dh.to(hidden.dtype)
    if need_dw:
        dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device)
        _linear_logprob_bwd_dw_kernel[(triton.cdiv(V, cfg["BLOCK_V"]),)](
            hidden, weight, targets, lse, g, dw, *args,
            hidden.stride(0), weight.stride(0), dw.stride(0), IEEE=ieee, **cfg)
        dw = dw.to(weight.dtype)
    return dh, dw


class LinearLogprobFunction(torch.autograd.Function):
    """Autograd wrapper: per-token log-probs (N,), or per-segment sums (S,) with segments."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, segment_ids, num_segments, temperature,
                ignore_index):
        logp, lse, seg_out = linear_logprob_forward(hidden, weight, targets, segment_ids,
                                                    num_segments, temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse, segment_ids)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.has_segments = segment_ids is not None
        return seg_out if ctx.has_segments else logp

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse, segment_ids = ctx.saved_tensors
        # The upstream gradient is one scalar per segment: broadcast it to the tokens.
        g = grad_out[segment_ids] if ctx.has_segments else grad_out
        dh, dw = linear_logprob_backward(hidden, weight, targets, lse, g, ctx.temperature,
                                         ctx.ignore_index, ctx.needs_input_grad[0],
                                         ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None, None
