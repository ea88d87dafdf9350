"""One-sweep fused LM head + VRPO loss: the GPU steps of a chunk of whole prompt groups.

The trainer never needs the log-probs' backward as a separate pass: a group's loss is known as
soon as its sequence log-probs are, so the gradient of every logit can be formed while the
chunk's logits are still in a bounded buffer. For a chunk of consecutive whole groups (packed
groups are contiguous), with hidden states h_n (n, D), LM-head weight W (V, D), temperature T:

    z        = h W^T                                   (n, V) buffer: torch.mm (cuBLAS), once
    lse_n    = log sum_v exp(z_nv / T)                 _sweep_lse_kernel, one row per program
    logp_n   = z_{n, t_n} / T - lse_n                  (0 where t_n == ignore_index)
    pi_s     = sum_{n in s} logp_n                     per-sequence sums (index_add_)
    L_b, dL/dpi_s                                      the fused VRPO loss kernels on (b, K)
    c_n      = dLoss/dpi_{seg_n} / T                   (0 on ignored positions)
    z       <- c_n (1[v = t_n] - softmax(z_n / T)_v)   _sweep_dlogits_kernel, in place
    dH[chunk] = z W,   dW += z^T h                     torch.mm / addmm_ (cuBLAS)

That is 2 n D V flops per GEMM, 6 n D V in all, nothing recomputed; the loss's backward then
only scales the stored dH and dW by its incoming scalar. The loop over chunks, the chunking at
group boundaries and the autograd Function are `vrpo_fast.chunked.linear_vrpo_sweep` /
`one_sweep_vrpo_loss` (shared with the PyTorch reference, the same maths in torch with its
passes over the buffer arranged for the CPU); this module supplies the GPU steps as
`TritonSweep`.

Why cuBLAS for the GEMMs and Triton only for the row passes: the three GEMMs are all the flops
and cuBLAS runs them near the chip's peak, where the earlier hand-written Triton logit tiles
reached ~410 TFLOP/s on an H100 (benchmarks/RESULTS.md); the row passes are memory-bound reads
(and one write) of the chunk buffer, a small fraction of the GEMM time.

Memory: the (n, V) buffer in the inputs' dtype (SWEEP_CHUNK_BYTES, ~128 MiB, about 6% of the
lower bound at N = 8192, D = 4096, V = 128256; widened up to 4x when a group is longer) plus dH
and dW themselves. 16-bit weights: dW
accumulates in the weight's dtype (fp32 accumulation inside each GEMM, one rounding per chunk,
as Liger-Kernel's fused linear cross entropy does), so that no fp32 (V, D) copy is needed;
fp32 weights accumulate exactly in fp32. The logits are rounded to the inputs' dtype before the
softmax, as eager PyTorch's `h @ W.T` does.
Triton's interpreter (the CPU tests) rounds fp32 -> bf16 by truncation and cannot multiply bf16
tiles, so there bf16 inputs run in fp32 (`TritonSweep.work`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .vrpo_loss import vrpo_loss_backward, vrpo_loss_forward

LOG2E = 1.4426950408889634

# The chunk's logit buffer on CUDA: about this many bytes (tokens per chunk = bytes / (V * size)).
SWEEP_CHUNK_BYTES = 128 * 2**20


@triton.jit
def _sweep_lse_kernel(
    # data ptrs
    z_ptr, tgt_ptr, lse_ptr, logp_ptr,
    # shapes
    V, scale, ignore_index,
    # strides
    stride_zn,
    BLOCK_V: tl.constexpr,
):
    """lse and logp of one buffer row; scale = log2(e) / T (the running sums are in log2)."""
    row = tl.program_id(0)
    z_row = z_ptr + tl.cast(row, tl.int64) * stride_zn
    m = float("-inf")                    # scalars: one row per program
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z - m_new), axis=0)
        m = m_new
    lse2 = m + tl.log2(s)
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    zt = tl.load(z_row + tl.where(valid, tgt, 0)).to(tl.float32) * scale
    tl.store(lse_ptr + row, lse2 * 0.6931471805599453)
    tl.store(logp_ptr + row, tl.where(valid, (zt - lse2) * 0.6931471805599453, 0.0))


@triton.jit
def _sweep_dlogits_kernel(
    # data ptrs
    z_ptr, tgt_ptr, lse_ptr, coef_ptr,
    # shapes
    V, scale,
    # strides
    stride_zn,
    BLOCK_V: tl.constexpr,
):
    """z <- c (1[v = t] - exp(z / T - lse)) on one BLOCK_V slice of one row, in z's dtype.
    Ignored rows have c = 0 (and a target outside [0, V)), so they become zeros."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ptrs = z_ptr + tl.cast(row, tl.int64) * stride_zn + cols
    z = tl.load(ptrs, mask=cols < V, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + row) * 1.4426950408889634
    c = tl.load(coef_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    dz = c * (tl.where(cols == tgt, 1.0, 0.0) - tl.exp2(z * scale - lse2))
    tl.store(ptrs, dz.to(z_ptr.dtype.element_ty), mask=cols < V)


# (BLOCK_V, num_warps) per kernel: CUDA (untuned: no GPU has run them yet) and the interpreter,
# whose small blocks let the tests cover several per row.
_LSE_CUDA, _DZ_CUDA = (2048, 8), (1024, 4)
_CPU = (128, 1)


def sweep_lse_logp(z: torch.Tensor, targets: torch.Tensor, temperature: float,
                   ignore_index: int):
    """z: (n, V) raw logits h W^T (a contiguous buffer), targets: (n,).
    Returns (lse (n,) fp32 of z / T, logp (n,) fp32, 0 on ignored positions)."""
    n, V = z.shape
    lse = torch.empty(n, dtype=torch.float32, device=z.device)
    logp = torch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        block_v, warps = _LSE_CUDA if z.is_cuda else _CPU
        _sweep_lse_kernel[(n,)](z, targets, lse, logp, V, LOG2E / temperature, ignore_index,
                                z.stride(0), BLOCK_V=block_v, num_warps=warps)
    return lse, logp


def sweep_dlogits_(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   coef: torch.Tensor, temperature: float) -> torch.Tensor:
    """In place: z (n, V) raw logits -> dz = coef_n (onehot(t_n) - softmax(z_n / T)).
    coef: (n,) fp32, 0 on ignored positions."""
    n, V = z.shape
    if n:
        block_v, warps = _DZ_CUDA if z.is_cuda else _CPU
        _sweep_dlogits_kernel[(n, triton.cdiv(V, block_v))](
            z, targets, lse, coef, V, LOG2E / temperature, z.stride(0), BLOCK_V=block_v,
            num_warps=warps)
    return z


class TritonSweep:
    """The GPU steps of `vrpo_fast.chunked.linear_vrpo_sweep`: cuBLAS logits, the Triton row
    passes above and the fused VRPO loss kernels (`vrpo_fast.kernels.vrpo_loss`).

    weight: (V, D); work: the dtype of the GEMMs, the logit buffer and the dH / dW
    accumulators (the inputs' dtype; fp32 for bf16 in Triton's interpreter).
    """

    buffer_bytes = SWEEP_CHUNK_BYTES

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, *, temperature: float,
                 ignore_index: int, **loss):
        self.work = (torch.float32 if not hidden.is_cuda and hidden.dtype == torch.bfloat16
                     else hidden.dtype)
        self.weight = weight.to(self.work).contiguous()
        self.temperature, self.ignore_index = temperature, ignore_index
        self.loss = loss            # beta, loss_type, estimator (none for sweep_logprobs)

    def logits(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """h: (n, D) -> out (n, V) = h W^T in the work dtype."""
        return torch.mm(h.to(self.work), self.weight.T, out=out)

    def lse_logp(self, z, targets, h=None):
        return sweep_lse_logp(z, targets, self.temperature, self.ignore_index)

    def dlogits_(self, z, targets, lse, coef):
        return sweep_dlogits_(z, targets, lse, coef, self.temperature)

    def head_grads_(self, z, targets, lse, coef, h, dh, dw):
        """dlogits in place in z (one Triton pass), then dH = dlogits W into dh and
        dw += dlogits^T h (cuBLAS); dh / dw None: not wanted."""
        dz = self.dlogits_(z, targets, lse, coef)
        if dh is not None:
            torch.mm(dz, self.weight, out=dh)
        if dw is not None:
            dw.addmm_(dz.T, h.to(self.work))

    def loss_grad(self, policy, ref, g, grad_scale: float):
        """policy, ref: (b, K) fp32, g: (b, K / 2) -> (per-prompt loss (b,), grad_scale *
        dL_b / dpolicy (b, K)), two launches and no host sync."""
        per = vrpo_loss_forward(policy, ref, g, **self.loss)
        scale = torch.full_like(per, grad_scale)
        return per, vrpo_loss_backward(policy, ref, g, scale, **self.loss)
