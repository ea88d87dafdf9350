"""The fused VRPO loss kernel (vrpo_fast.kernels.vrpo_loss) against the float64 formula written
pair by pair (tests/helpers.py) and against vrpo_fast.vrpo_loss(reduction="none"): every loss
type, both estimators, M in {0, 1, 4}, the gradient w.r.t. the policy log-probs, kinks and
extremes."""

import math

import pytest
import torch
from helpers import DEVICE, assert_close_verbose, vrpo_formula

import vrpo_fast
from vrpo_fast.kernels.vrpo_loss import VRPOLossFunction, vrpo_loss_backward, vrpo_loss_forward

LOSS_TYPES = ["sigmoid", "ramp", "ipo", "hinge"]


def make(B, M, seed, spread=4.0):
    gen = torch.Generator().manual_seed(seed)
    pol = -20 + spread * torch.randn(B, 2 + 2 * M, generator=gen, dtype=torch.float64)
    ref = -20 + spread * torch.randn(B, 2 + 2 * M, generator=gen, dtype=torch.float64)
    g = torch.rand(B, 1 + M, generator=gen, dtype=torch.float64)
    up = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    return pol, ref, g, up


def kernel_loss_and_grad(pol, ref, g, up, beta, loss_type, estimator, dtype=torch.float32):
    p = pol.to(DEVICE, dtype).requires_grad_(True)
    ref_k = None if ref is None else ref.to(DEVICE, dtype)
    loss = VRPOLossFunction.apply(p, ref_k, g.to(DEVICE, dtype), beta, loss_type, estimator)
    (loss * up.to(DEVICE, loss.dtype)).sum().backward()
    return loss.detach(), p.grad


def formula_loss_and_grad(pol, ref, g, up, beta, loss_type, estimator):
    p = pol.clone().requires_grad_(True)
    loss = vrpo_formula(p, ref, g, beta, loss_type, estimator)
    (loss * up).sum().backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("estimator", ["vrpo", "dpo"])
@pytest.mark.parametrize("M", [0, 1, 4])
def test_loss_and_gradient_match_float64_formula(loss_type, estimator, M):
    # B = 150: more than one program (BLOCK_B <= 128) and a partial last block.
    pol, ref, g, up = make(150, M, seed=M)
    beta = 0.3
    got, dgot = kernel_loss_and_grad(pol, ref, g, up, beta, loss_type, estimator)
    want, dwant = formula_loss_and_grad(pol, ref, g, up, beta, loss_type, estimator)
    assert got.dtype == torch.float32 and dgot.dtype == torch.float32
    assert_close_verbose(got, want, 1e-4, 1e-5, "loss")
    assert_close_verbose(dgot, dwant, 1e-5, 1e-4, "dpolicy")
    # ... and the project's reference, whose per-prompt losses the kernel must reproduce.
    ref_loss, _ = vrpo_fast.vrpo_loss(pol, ref, g, beta=beta, loss_type=loss_type,
                                      estimator=estimator, reduction="none")
    assert_close_verbose(got, ref_loss, 1e-4, 1e-5, "loss vs vrpo_loss")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_without_reference_logps(loss_type):
    pol, _, g, up = make(9, 2, seed=11, spread=0.5)
    pol = pol + 19.5                                  # margins of order 1 at beta = 1
    got, dgot = kernel_loss_and_grad(pol, None, g, up, 1.0, loss_type, "vrpo")
    want, dwant = formula_loss_and_grad(pol, None, g, up, 1.0, loss_type, "vrpo")
    assert_close_verbose(got, want, 1e-5, 1e-5, "loss")
    assert_close_verbose(dgot, dwant, 1e-5, 1e-5, "dpolicy")


@pytest.mark.parametrize("loss_type", ["ramp", "hinge"])
def test_kinks_follow_torch_subgradient(loss_type):
    """u exactly at the kinks (1 and -0.5) and at 0: relu'(0) = 0, as torch's autograd."""
    u = torch.tensor([1.0, -0.5, 0.0, 2.0, -3.0], dtype=torch.float64)
    pol = torch.stack([u, torch.zeros_like(u)], dim=1)       # beta = 1, ref 0 -> margin u
    g = torch.full((5, 1), 0.5, dtype=torch.float64)
    up = torch.ones(5, dtype=torch.float64)
    got, dgot = kernel_loss_and_grad(pol, None, g, up, 1.0, loss_type, "dpo")
    want, dwant = formula_loss_and_grad(pol, None, g, up, 1.0, loss_type, "dpo")
    assert_close_verbose(got, want, 0, 0, "loss")
    assert_close_verbose(dgot, dwant, 0, 0, "dpolicy")


def test_sigmoid_is_stable_at_extreme_margins():
    u = torch.tensor([-300.0, -40.0, 0.0, 40.0, 300.0], dtype=torch.float64)
    pol = torch.stack([u, torch.zeros_like(u)], dim=1)
    g = torch.rand(5, 1, dtype=torch.float64)
    up = torch.ones(5, dtype=torch.float64)
    got, dgot = kernel_loss_and_grad(pol, None, g, up, 1.0, "sigmoid", "dpo")
    assert torch.isfinite(got).all() and torch.isfinite(dgot).all()
    # -log sigmoid(u) = softplus(-u): 300, 40 + e^-40, log 2, e^-40, e^-300 (0 in fp32)
    want = torch.nn.functional.softplus(-u)
    assert_close_verbose(got, want, 1e-6, 1e-6, "loss")
    # dL/du = -sigmoid(-u), accurate in relative terms even where it is tiny.
    assert_close_verbose(dgot[:, 0], -torch.sigmoid(-u), 1e-37, 1e-5, "dpolicy")
    assert dgot[3, 0].item() != 0.0 and math.isclose(-dgot[3, 0].item(), math.exp(-40),
                                                      rel_tol=1e-5)


def test_half_precision_policy_and_no_prompts():
    pol, ref, g, up = make(33, 1, seed=5)
    got, dgot = kernel_loss_and_grad(pol, ref, g, up, 0.1, "sigmoid", "vrpo",
                                     dtype=torch.bfloat16)
    pol_b, ref_b = pol.bfloat16().double(), ref.bfloat16().double()
    want, dwant = formula_loss_and_grad(pol_b, ref_b, g.bfloat16().double(), up, 0.1, "sigmoid",
                                        "vrpo")
    assert got.dtype == torch.float32 and dgot.dtype == torch.bfloat16
    assert_close_verbose(got, want, 1e-4, 1e-4, "loss")
    assert_close_verbose(dgot, dwant, 1e-3, 1e-2, "dpolicy")     # one bf16 rounding
    empty = torch.zeros(0, 4, device=DEVICE)
    assert vrpo_loss_forward(empty, None, torch.zeros(0, 2, device=DEVICE), 0.1, "sigmoid",
                             "vrpo").shape == (0,)
    assert vrpo_loss_backward(empty, None, torch.zeros(0, 2, device=DEVICE),
                              torch.zeros(0, device=DEVICE), 0.1, "sigmoid",
                              "vrpo").shape == (0, 4)


def test_many_monte_carlo_pairs():
    """M = 40: BLOCK_P = 64 pairs per row, the tile shrinks in B to stay small."""
    pol, ref, g, up = make(70, 40, seed=9)
    got, dgot = kernel_loss_and_grad(pol, ref, g, up, 0.2, "ramp", "vrpo")
    want, dwant = formula_loss_and_grad(pol, ref, g, up, 0.2, "ramp", "vrpo")
    assert_close_verbose(got, want, 1e-4, 1e-5, "loss")
    assert_close_verbose(dgot, dwant, 1e-5, 1e-4, "dpolicy")


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gpu_large_batch(loss_type):
    pol, ref, g, up = make(4099, 2, seed=3)
    got, dgot = kernel_loss_and_grad(pol, ref, g, up, 0.1, loss_type, "vrpo")
    want, _ = vrpo_fast.vrpo_loss(pol.requires_grad_(True), ref, g, beta=0.1,
                                  loss_type=loss_type, reduction="none")
    (want * up).sum().backward()
    assert_close_verbose(got, want, 1e-4, 1e-5, "loss")
    assert_close_verbose(dgot, pol.grad, 1e-5, 1e-4, "dpolicy")
