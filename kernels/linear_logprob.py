"""Fused linear log-prob: LM head + log-softmax + gather (+ per-segment sums), no (N, V) logits.

For hidden states h_n (N, D) of the positions that predict response tokens, the LM-head weight
W (V, D), targets t_n and temperature T:

    z_nv    = h_n . w_v / T
    lse_n   = log sum_v exp(z_nv)                      (online, streaming v in BLOCK_V tiles)
    logp_n  = z_{n, t_n} - lse_n                       (0 where t_n == ignore_index)
    out_s   = sum_{n : seg_n = s} logp_n               (optional; empty segments give 0)

With an upstream gradient g_n (per token, or g_{seg_n} when the output is per segment):

    dz_nv = g_n (1[v = t_n] - softmax(z_n)_v) / T,     dH = dz W,     dW = dz^T H.

Forward. One program owns BLOCK_N rows and one contiguous range ("split") of the vocabulary; it
computes (BLOCK_N, BLOCK_V) logit tiles with tl.dot (K-loop over D, fp32 accumulation) and keeps
a running max / sum per row (log2 domain, exp2). Splitting V keeps every SM busy when N is small
(N / BLOCK_N programs alone would leave most of an H100 idle at N = 2k). A second, tiny kernel
merges the splits' partial log-sum-exps, writes logp (N,) and the lse (N,) that backward reuses,
and adds each token into its segment with an fp32 atomic: the segment sums cost no extra pass,
and the only non-determinism is the order of at most (segment length) fp32 additions, the same
as torch's index_add_ on CUDA.

Backward, deterministic (no atomics). V is processed in chunks of C columns; per chunk one
kernel recomputes the logit tiles (same tl.dot tiles, plus the softmax-gradient epilogue) and
writes dz (N, C) in the inputs' dtype, then two plain GEMMs consume it:
    dW[chunk] = dz^T H        torch.mm (cuBLAS): every dW row is complete after its chunk, so it
                              is written once, in the weight's dtype, with fp32 accumulation;
    dH       += dz W[chunk]   cuBLAS with fp32 output (torch.addmm(..., out_dtype=float32))
                              into an fp32 (N, D) accumulator, rounded to the hidden dtype once
                              at the end.
(A hand-written Triton dH GEMM that re-read its fp32 accumulator per chunk ran at ~45 TFLOP/s on
an H100 and took 90% of the backward; cuBLAS runs the same products near the chip's peak.)
Fusing dH and dW into the logit kernel would need atomics on both (Cut Cross-Entropy's choice);
owning rows in two separate recompute kernels would re-read an fp32 accumulator for every
(BLOCK_N x BLOCK_V) tile. The chunked dz costs N * C elements (C sized to ~64 MiB) and one extra
write and two reads of it, which is small next to the 8 N D V flops of forward + backward.

Precision: fp32 accumulation everywhere; fp32 inputs use IEEE fp32 dots unless torch allows TF32
for matmuls; bf16 / fp16 inputs run the tensor cores in that dtype, and dz is rounded to it once
(as eager autograd rounds dlogits). Triton's interpreter (TRITON_INTERPRET=1, the CPU tests)
cannot multiply bf16 tiles and rounds fp32 -> bf16 by truncation, so there bf16 tiles are upcast
to fp32 (DOT_FP32) and dz / dH stay fp32 until torch rounds the result.
Token ids are not range-checked on the device (that would need a host sync): a target outside
[0, V) that is not ignore_index yields logp = -lse, and a segment id outside [0, S) is dropped.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Backward materialises dz one vocabulary chunk at a time: about this many bytes.
DZ_CHUNK_BYTES = 64 * 2**20


@triton.jit
def _logits_tile(h_ptr, w_ptr, row0, col0, rows, cols, D, stride_hn, stride_wv,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """h[row0 + rows] . w[col0 + cols] as a (BLOCK_N, BLOCK_V) fp32 tile; the indices must be
    in range."""
    offs_d = tl.arange(0, BLOCK_D)
    # The tile's origin in 64 bits (V * D passes 2^31 for the largest heads), the offsets inside
    # it in 32: 64-bit offset tiles would cost registers the dot needs.
    h_base = h_ptr + tl.cast(row0, tl.int64) * stride_hn
    w_base = w_ptr + tl.cast(col0, tl.int64) * stride_wv
    h_ptrs = h_base + (rows[:, None] * stride_hn + offs_d[None, :])
    w_ptrs = w_base + (cols[:, None] * stride_wv + offs_d[None, :])
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
            w = tl.load(w_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    return acc


@triton.jit
def _grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """Map a 1-D program id to a (tile_a, tile_b) pair, GROUP tiles of `a` at a time, so that
    programs running together share their operand tiles in L2."""
    per_group = GROUP * num_b
    first_a = (pid // per_group) * GROUP
    group_size = tl.minimum(num_a - first_a, GROUP)
    tile_a = first_a + (pid % per_group) % group_size
    tile_b = (pid % per_group) // group_size
    return tile_a, tile_b


@triton.jit
def _linear_logprob_fwd_kernel(
    # data ptrs
    h_ptr, w_ptr, tgt_ptr, part_lse_ptr, part_zt_ptr,
    # shapes
    N, V, D, V_PER_SPLIT, scale,
    # strides
    stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial log2-sum-exp2 and target logit (log2 units) of one row block over one V split."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row0 = pid_n * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_ld = tl.minimum(rows, N - 1)        # clamped: the K-loop loads need no row mask
    tgt = tl.load(tgt_ptr + rows_ld).to(tl.int32)
    v_begin = split * V_PER_SPLIT
    v_end = tl.minimum(V, v_begin + V_PER_SPLIT)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, row0, v0, rows_ld - row0, tl.minimum(cols, V - 1) - v0,
                         D, stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_FP32,
                         PRECISION)
        z = tl.where(cols[None, :] < v_end, z * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    offs = split * N + rows
    tl.store(part_lse_ptr + offs, m + tl.log2(s), mask=row_ok)
    tl.store(part_zt_ptr + offs, zt, mask=row_ok)


@triton.jit
def _linear_logprob_fwd_combine_kernel(
    # data ptrs
    part_lse_ptr, part_zt_ptr, tgt_ptr, seg_ptr, logp_ptr, lse_ptr, seg_out_ptr,
    # shapes
    N, S, NUM_SPLITS, ignore_index,
    BLOCK_N: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
):
    """Merge the splits: lse (N,), logp (N,) and the per-segment sums (S,)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, NUM_SPLITS):
        part = tl.load(part_lse_ptr + k * N + rows, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, part)
        s = s * tl.exp2(m - m_new) + tl.exp2(part - m_new)
        m = m_new
        zt += tl.load(part_zt_ptr + k * N + rows, mask=row_ok, other=0.0)
    lse2 = m + tl.log2(s)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)
    logp = tl.where(valid, (zt - lse2) * 0.6931471805599453, 0.0)
    tl.store(lse_ptr + rows, lse2 * 0.6931471805599453, mask=row_ok)
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    if HAS_SEGMENTS:
        seg = tl.load(seg_ptr + rows, mask=row_ok, other=0)
        tl.atomic_add(seg_out_ptr + seg, logp, mask=valid & (seg >= 0) & (seg < S))


@triton.jit
def _linear_logprob_bwd_kernel(
    # data ptrs
    h_ptr, w_ptr, tgt_ptr, lse_ptr, grad_ptr, seg_ptr, dz_ptr,
    # shapes
    N, V, D, S, v_begin, C, scale, inv_temp, ignore_index,
    # strides
    stride_hn, stride_wv, stride_dzn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_D: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dz[:, c] for the chunk's columns c = v - v_begin in [0, C), stored in dz's dtype."""
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(C, BLOCK_V),
                                 GROUP_N)
    row0 = pid_n * BLOCK_N
    col0 = v_begin + pid_v * BLOCK_V
    rows = row0 + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = local < C
    rows_ld = tl.minimum(rows, N - 1)
    cols = v_begin + local
    z = _logits_tile(h_ptr, w_ptr, row0, col0, rows_ld - row0, tl.minimum(cols, V - 1) - col0, D,
                     stride_hn, stride_wv, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, DOT_FP32, PRECISION)
    tgt = tl.load(tgt_ptr + rows_ld).to(tl.int32)
    lse2 = tl.load(lse_ptr + rows_ld) * 1.4426950408889634
    valid = row_ok & (tgt != ignore_index)
    if HAS_SEGMENTS:
        seg = tl.load(seg_ptr + rows_ld)
        valid = valid & (seg >= 0) & (seg < S)
        g = tl.load(grad_ptr + seg, mask=valid, other=0.0)
    else:
        g = tl.load(grad_ptr + rows_ld)
    g = tl.where(valid, g.to(tl.float32) * inv_temp, 0.0)
    p = tl.exp2(z * scale - lse2[:, None])
    dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + local[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _configs(*blocks):
    return [triton.Config(dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_D"), b[:3])), num_warps=b[3],
                          num_stages=b[4]) for b in blocks]


# The K-loop drops its D mask when D is a multiple of BLOCK_D.
_even_d = triton.heuristics({"EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0})
_fwd = _even_d(_linear_logprob_fwd_kernel)
_bwd = _even_d(_linear_logprob_bwd_kernel)
# CUDA only (the interpreter uses small fixed tiles). Both kernels only write their outputs, so
# the autotuner may run them repeatedly. Keyed on the model's (V, D), not on N, which changes
# every step. VRPO_FAST_AUTOTUNE=0 skips the search and takes each list's first configuration
# (quicker start-up: tests, short runs).
# (Compiled for sm_90 none of these spills registers; 128 x 256 tiles did in the forward.)
_AUTOTUNE = os.environ.get("VRPO_FAST_AUTOTUNE", "1") != "0"


def _tuned(kernel, configs):
    return triton.autotune(configs if _AUTOTUNE else configs[:1], key=["V", "D"])(kernel)


_fwd_tuned = _tuned(_fwd, _configs((128, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                                   (64, 256, 64, 8, 3), (128, 128, 64, 8, 4)))
_bwd_tuned = _tuned(_bwd, _configs((128, 256, 64, 8, 3), (128, 128, 64, 8, 3),
                                   (64, 256, 64, 8, 4), (128, 128, 64, 4, 4)))
# Triton's interpreter: tiles small enough that the tests cover several of them, large enough
# to keep it quick.
_FWD_CPU = dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=32)
_BWD_CPU = dict(BLOCK_N=32, BLOCK_V=128, BLOCK_D=32, GROUP_N=2)
_BLOCK_N_SPLIT = 64     # the smallest forward BLOCK_N on CUDA, used to size the V splits


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_FP32: upcast tiles before tl.dot (the interpreter cannot multiply bf16).
    PRECISION: IEEE fp32 dots for fp32 inputs unless torch allows TF32 matmuls; "tf32", the
    CUDA default, for bf16 / fp16, whose dots it does not affect."""
    matmul = torch.backends.cuda.matmul
    tf32 = getattr(matmul, "fp32_precision", None) == "tf32" or (
        not hasattr(matmul, "fp32_precision") and matmul.allow_tf32)
    on_cuda = device.type == "cuda"
    return dict(DOT_FP32=not on_cuda and dtype == torch.bfloat16,
                PRECISION="tf32" if on_cuda and (tf32 or dtype != torch.float32) else "ieee")


def _num_splits(N: int, V: int, device: torch.device) -> int:
    """Enough V splits for about two programs per SM (one split when N alone fills the GPU)."""
    if device.type != "cuda":
        return 1
    row_blocks = triton.cdiv(N, _BLOCK_N_SPLIT)
    return max(1, min(triton.cdiv(2 * _num_sms(device), row_blocks),
                      triton.cdiv(V, 256)))


def linear_logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           segment_ids: torch.Tensor | None = None,
                           num_segments: int | None = None, temperature: float = 1.0,
                           ignore_index: int = -100, num_splits: int | None = None):
    """hidden: (N, D), weight: (V, D), targets: (N,), segment_ids: (N,) or None.

    Returns (logp (N,) fp32, lse (N,) fp32, seg_out (num_segments,) fp32 or None).
    num_splits overrides the number of vocabulary splits (tests use it on the CPU).
    """
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    seg_out = None if segment_ids is None else torch.zeros(num_segments, dtype=torch.float32,
                                                           device=dev)
    if N == 0:
        return logp, lse, seg_out
    splits = num_splits or _num_splits(N, V, dev)
    # Every split gets whole 256-column blocks and at least one column.
    per_split = triton.cdiv(triton.cdiv(V, splits), 256) * 256
    splits = triton.cdiv(V, per_split)
    part_lse = torch.empty(splits, N, dtype=torch.float32, device=dev)
    part_zt = torch.empty(splits, N, dtype=torch.float32, device=dev)
    args = (hidden, weight, targets, part_lse, part_zt, N, V, D, per_split,
            LOG2E / temperature, hidden.stride(0), weight.stride(0))
    flags = _dot_flags(hidden.dtype, dev)
    if dev.type == "cuda":
        _fwd_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)](*args, **flags)
    else:
        _fwd[(triton.cdiv(N, _FWD_CPU["BLOCK_N"]), splits)](*args, **flags, **_FWD_CPU)
    has_seg = segment_ids is not None
    seg = segment_ids.contiguous() if has_seg else targets
    _linear_logprob_fwd_combine_kernel[(triton.cdiv(N, 256),)](
        part_lse, part_zt, targets, seg, logp, lse, seg_out if has_seg else logp,
        N, num_segments if has_seg else 0, splits, ignore_index,
        BLOCK_N=256, HAS_SEGMENTS=has_seg)
    return logp, lse, seg_out


def _chunk_columns(N: int, V: int, itemsize: int) -> int:
    cols = DZ_CHUNK_BYTES // max(1, N * itemsize)
    # At least 1024 columns keeps the GEMMs efficient and the dH read-modify-writes rare.
    return min(V, max(1024, cols // 256 * 256))


def linear_logprob_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            lse: torch.Tensor, grad: torch.Tensor,
                            segment_ids: torch.Tensor | None = None, temperature: float = 1.0,
                            ignore_index: int = -100, need_dh: bool = True,
                            need_dw: bool = True, chunk_size: int | None = None):
    """Gradients of sum_n g_n logp_n.

    grad: (N,) per token, or (S,) per segment when segment_ids (N,) is given; lse: (N,) from the
    forward. Returns (dH (N, D) in hidden's dtype or None, dW (V, D) in weight's dtype or None).
    chunk_size overrides the vocabulary chunk of the materialised dz (tests use it on the CPU).
    """
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if N == 0:
        return (torch.zeros_like(hidden) if need_dh else None,
                torch.zeros_like(weight) if need_dw else None)
    # dW: every element is written by its chunk's GEMM; dH: copied from the fp32 accumulator.
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    if not (need_dh or need_dw):
        return dh, dw
    grad = grad.float().contiguous()
    has_seg = segment_ids is not None
    seg = segment_ids.contiguous() if has_seg else targets
    S = grad.shape[0] if has_seg else 0
    C = min(V, chunk_size or _chunk_columns(N, V, hidden.element_size()))
    flags = _dot_flags(hidden.dtype, dev)
    on_cuda = dev.type == "cuda"
    # Triton's interpreter rounds fp32 -> bf16 by truncation (a GPU rounds to nearest even), so
    # there dz stays fp32 and torch does the one rounding at the end.
    work = torch.float32 if flags["DOT_FP32"] else hidden.dtype
    dz = torch.empty(N, C, dtype=work, device=dev)
    acc = torch.zeros(N, D, dtype=torch.float32, device=dev) if need_dh else None
    for v0 in range(0, V, C):
        c = min(C, V - v0)
        args = (hidden, weight, targets, lse, grad, seg, dz, N, V, D, S, v0, c,
                LOG2E / temperature, 1.0 / temperature, ignore_index,
                hidden.stride(0), weight.stride(0), dz.stride(0))
        if on_cuda:
            _bwd_tuned[lambda meta, c=c: (triton.cdiv(N, meta["BLOCK_N"])
                                          * triton.cdiv(c, meta["BLOCK_V"]),)](
                *args, GROUP_N=8, HAS_SEGMENTS=has_seg, **flags)
        else:
            grid = (triton.cdiv(N, _BWD_CPU["BLOCK_N"]) * triton.cdiv(c, _BWD_CPU["BLOCK_V"]),)
            _bwd[grid](*args, HAS_SEGMENTS=has_seg, **flags, **_BWD_CPU)
        dz_c = dz[:, :c]
        if need_dw:
            if work == hidden.dtype:
                torch.mm(dz_c.t(), hidden, out=dw[v0:v0 + c])
            else:
                dw[v0:v0 + c] = torch.mm(dz_c.t(), hidden.to(work))
        if need_dh:
            _addmm_fp32_(acc, dz_c, weight[v0:v0 + c].to(work))
    if need_dh:
        dh.copy_(acc)
    return dh, dw


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation and output, for a, b in any float dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):      # torch without fp32-output 16-bit GEMMs
            pass
    acc.add_(torch.mm(a, b))


class LinearLogprobFunction(torch.autograd.Function):
    """Per-token log-probs (N,), or per-segment sums (S,) when segment_ids is given;
    differentiable in hidden and weight."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, segment_ids, num_segments, temperature,
                ignore_index, num_splits=None, chunk_size=None):
        logp, lse, seg_out = linear_logprob_forward(hidden, weight, targets, segment_ids,
                                                    num_segments, temperature, ignore_index,
                                                    num_splits)
        ctx.save_for_backward(hidden, weight, targets, lse, segment_ids)
        ctx.temperature, ctx.ignore_index, ctx.chunk_size = temperature, ignore_index, chunk_size
        return logp if segment_ids is None else seg_out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse, segment_ids = ctx.saved_tensors
        dh, dw = linear_logprob_backward(hidden, weight, targets, lse, grad_out, segment_ids,
                                         ctx.temperature, ctx.ignore_index,
                                         ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                         ctx.chunk_size)
        return dh, dw, None, None, None, None, None, None, None
