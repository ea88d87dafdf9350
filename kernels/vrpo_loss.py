"""Fused VRPO loss: per-prompt loss and its gradient w.r.t. the policy log-probs, one launch each.

Columns of policy / ref (B, 2 + 2M): chosen, rejected, a_11, a_12, ..., a_M1, a_M2; g (B, 1 + M).
With r_j = beta (policy_j - ref_j), u_p = r_{2p} - r_{2p+1} and the pairwise loss l:

    L = sum_p a_p l(u_p) + b_p l(-u_p)
    vrpo (M >= 1):  a_0 = 1 - g_0,  b_0 = -(1 - g_0),  a_p = g_p / M,  b_p = (1 - g_p) / M
    dpo  (or M = 0): a_0 = 1, b_0 = 0, a_p = b_p = 0
    dL/dpolicy_{2p} = beta (a_p l'(u_p) - b_p l'(-u_p)) = -dL/dpolicy_{2p+1}

which is the VRPO estimator l(u_0) - [g_0 l(u_0) + (1 - g_0) l(-u_0)]
+ (1/M) sum_m [g_m l(u_m) + (1 - g_m) l(-u_m)] (vrpo_fast.objective). Loss types
(LOSS constexpr): 0 sigmoid -log sigmoid(u); 1 ramp relu(1 - u) - relu(-0.5 - u);
2 ipo (u / beta - 1 / (2 beta))^2; 3 hinge relu(1 - u). relu'(0) = 0, as torch.

One launch each way: a program holds a (BLOCK_B, BLOCK_P) tile of prompts x pairs in registers
and reduces over pairs; the maths is fp32 whatever the input dtypes. g is never differentiated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOSS_CODES = {"sigmoid": 0, "ramp": 1, "ipo": 2, "hinge": 3}


@triton.jit
def _pair_loss(u, beta, LOSS: tl.constexpr):
    if LOSS == 0:   # softplus(-u), stable for both signs
        return tl.maximum(-u, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(u)))
    elif LOSS == 1:
        return tl.maximum(1.0 - u, 0.0) - tl.maximum(-0.5 - u, 0.0)
    elif LOSS == 2:
        d = u / beta - 0.5 / beta
        return d * d
    else:
        return tl.maximum(1.0 - u, 0.0)


@triton.jit
def _pair_loss_grad(u, beta, LOSS: tl.constexpr):
    if LOSS == 0:   # d/du softplus(-u) = -sigmoid(-u); exp(-|u|) never overflows and keeps
        e = tl.exp(-tl.abs(u))          # the tiny gradients of large u accurate
        return tl.where(u >= 0, -e / (1.0 + e), -1.0 / (1.0 + e))
    elif LOSS == 1:
        return tl.where(u < 1.0, -1.0, 0.0) + tl.where(u < -0.5, 1.0, 0.0)
    elif LOSS == 2:
        return 2.0 * (u / beta - 0.5 / beta) / beta
    else:
        return tl.where(u < 1.0, -1.0, 0.0)


@triton.jit
def _pair_coefficients(g, pairs, M, VRPO: tl.constexpr):
    """a_p, b_p of the module docstring for a (BLOCK_B, BLOCK_P) tile of g."""
    first = pairs[None, :] == 0
    if VRPO:
        a = tl.where(first, 1.0 - g, g / M)
        b = tl.where(first, -(1.0 - g), (1.0 - g) / M)
    else:
        a = tl.where(first, 1.0, 0.0) + tl.zeros_like(g)
        b = tl.zeros_like(g)
    return a, b


@triton.jit
def _load_margins(pol_ptr, ref_ptr, rows, pairs, B, P, beta, stride_b, stride_rb,
                  HAS_REF: tl.constexpr):
    """u_p = r_{2p} - r_{2p+1} with r = beta (policy - ref), as in vrpo_fast.objective."""
    msk = (rows[:, None] < B) & (pairs[None, :] < P)
    first = rows[:, None] * stride_b + 2 * pairs[None, :]
    r1 = tl.load(pol_ptr + first, mask=msk, other=0.0).to(tl.float32)
    r2 = tl.load(pol_ptr + first + 1, mask=msk, other=0.0).to(tl.float32)
    if HAS_REF:
        ref_first = rows[:, None] * stride_rb + 2 * pairs[None, :]
        r1 -= tl.load(ref_ptr + ref_first, mask=msk, other=0.0).to(tl.float32)
        r2 -= tl.load(ref_ptr + ref_first + 1, mask=msk, other=0.0).to(tl.float32)
    return beta * r1 - beta * r2, msk


@triton.jit
def _vrpo_loss_fwd_kernel(
    # data ptrs
    pol_ptr, ref_ptr, g_ptr, loss_ptr,
    # shapes
    B, P, M, beta,
    # strides
    stride_b, stride_rb, stride_gb,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, LOSS: tl.constexpr, VRPO: tl.constexpr,
    HAS_REF: tl.constexpr,
):
    """loss[b] = sum_p a_p l(u_p) + b_p l(-u_p) for BLOCK_B prompts."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pairs = tl.arange(0, BLOCK_P)
    u, msk = _load_margins(pol_ptr, ref_ptr, rows, pairs, B, P, beta, stride_b, stride_rb,
                           HAS_REF)
    g = tl.load(g_ptr + rows[:, None] * stride_gb + pairs[None, :], mask=msk,
                other=0.0).to(tl.float32)
    a, b = _pair_coefficients(g, pairs, M, VRPO)
    terms = a * _pair_loss(u, beta, LOSS) + b * _pair_loss(-u, beta, LOSS)
    loss = tl.sum(tl.where(msk, terms, 0.0), axis=1)
    tl.store(loss_ptr + rows, loss, mask=rows < B)


@triton.jit
def _vrpo_loss_bwd_kernel(
    # data ptrs
    pol_ptr, ref_ptr, g_ptr, dloss_ptr, dpol_ptr,
    # shapes
    B, P, M, beta,
    # strides
    stride_b, stride_rb, stride_gb, stride_db,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, LOSS: tl.constexpr, VRPO: tl.constexpr,
    HAS_REF: tl.constexpr,
):
    """dpolicy[b, 2p] = dloss[b] beta (a_p l'(u_p) - b_p l'(-u_p)) = -dpolicy[b, 2p + 1]."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    pairs = tl.arange(0, BLOCK_P)
    u, msk = _load_margins(pol_ptr, ref_ptr, rows, pairs, B, P, beta, stride_b, stride_rb,
                           HAS_REF)
    g = tl.load(g_ptr + rows[:, None] * stride_gb + pairs[None, :], mask=msk,
                other=0.0).to(tl.float32)
    a, b = _pair_coefficients(g, pairs, M, VRPO)
    up = tl.load(dloss_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)
    du = a * _pair_loss_grad(u, beta, LOSS) - b * _pair_loss_grad(-u, beta, LOSS)
    d = up[:, None] * beta * du
    first = dpol_ptr + rows[:, None] * stride_db + 2 * pairs[None, :]
    tl.store(first, d, mask=msk)
    tl.store(first + 1, -d, mask=msk)


def _config(B: int, P: int) -> dict:
    """A (BLOCK_B, BLOCK_P) tile of pairs per program: at most 4096 pairs, whatever M is."""
    block_p = max(2, triton.next_power_of_2(P))
    return dict(BLOCK_B=max(2, min(triton.next_power_of_2(B), 128, 4096 // block_p)),
                BLOCK_P=block_p)


def vrpo_loss_forward(policy, ref, g, beta: float, loss_type: str, estimator: str):
    """policy, ref: (B, 2 + 2M) (ref None: zeros), g: (B, 1 + M) -> per-prompt loss (B,) fp32.

    Arguments are not validated here (vrpo_fast.ops does it once, without host syncs).
    """
    B, K = policy.shape
    P, M = K // 2, (K - 2) // 2
    policy, g = policy.contiguous(), g.contiguous()
    ref_t = ref.contiguous() if ref is not None else policy
    loss = torch.empty(B, dtype=torch.float32, device=policy.device)
    if B == 0:
        return loss
    cfg = _config(B, P)
    _vrpo_loss_fwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        policy, ref_t, g, loss, B, P, max(M, 1), beta, policy.stride(0), ref_t.stride(0),
        g.stride(0),
        LOSS=LOSS_CODES[loss_type], VRPO=estimator == "vrpo" and M > 0,
        HAS_REF=ref is not None, **cfg)
    return loss


def vrpo_loss_backward(policy, ref, g, grad_loss, beta: float, loss_type: str, estimator: str):
    """dL/dpolicy (B, 2 + 2M) in policy's dtype, given the upstream gradient grad_loss (B,)."""
    B, K = policy.shape
    P, M = K // 2, (K - 2) // 2
    policy, g = policy.contiguous(), g.contiguous()
    ref_t = ref.contiguous() if ref is not None else policy
    dpol = torch.empty(B, K, dtype=torch.float32, device=policy.device)
    if B == 0:
        return dpol.to(policy.dtype)
    cfg = _config(B, P)
    _vrpo_loss_bwd_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](
        policy, ref_t, g, grad_loss.contiguous(), dpol, B, P, max(M, 1), beta,
        policy.stride(0), ref_t.stride(0), g.stride(0), dpol.stride(0),
        LOSS=LOSS_CODES[loss_type], VRPO=estimator == "vrpo" and M > 0,
        HAS_REF=ref is not None, **cfg)
    return dpol.to(policy.dtype)


class VRPOLossFunction(torch.autograd.Function):
    """Per-prompt VRPO losses (B,), differentiable in the policy log-probs only."""

    @staticmethod
    def forward(ctx, policy, ref, g, beta, loss_type, estimator):
        ctx.save_for_backward(policy, ref, g)
        ctx.beta, ctx.loss_type, ctx.estimator = beta, loss_type, estimator
        return vrpo_loss_forward(policy, ref, g, beta, loss_type, estimator)

    @staticmethod
    def backward(ctx, grad_loss):
        policy, ref, g = ctx.saved_tensors
        dpol = vrpo_loss_backward(policy, ref, g, grad_loss, ctx.beta, ctx.loss_type,
                                  ctx.estimator)
        return dpol, None, None, None, None, None
