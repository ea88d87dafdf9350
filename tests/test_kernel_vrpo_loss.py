"""The fused VRPO loss kernel (vrpo_fast.kernels.vrpo_loss) against a float64 formula written
here, pair by pair, and against vrpo_fast.vrpo_loss(reduction="none"): every loss type, both
estimators, M in {0, 1, 4}, the gradient w.r.t. the policy log-probs, kinks and extremes."""

import math

import pytest
import torch

import vrpo_fast
from vrpo_fast.kernels.vrpo_loss import VRPOLossFunction, vrpo_loss_backward, vrpo_loss_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSS_TYPES = ["sigmoid", "ramp", "ipo", "hinge"]


def _index(flat, shape):
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), shape))


def assert_close_verbose(got, want, atol, rtol, name):
    """torch.isclose over every element; on failure, how many differ, the worst few and where."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        err = (got - want).abs()
        excess = torch.where(bad, err - atol - rtol * want.abs(), -1.0).flatten()
        worst = excess.argsort(descending=True)[:min(5, int(bad.sum()))]
        where = ", ".join(f"{_index(i, got.shape)}: got {got.flatten()[i].item():.6g} "
                          f"want {want.flatten()[i].item():.6g}" for i in worst.tolist())
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements differ "
                             f"(atol={atol}, rtol={rtol}, max abs err {err.max().item():.3g}); "
                             f"worst at {where}")


def pair_loss(u, loss_type, beta):
    """l(u) in float64, from the definitions (torch's relu: relu'(0) = 0)."""
    relu = torch.relu
    if loss_type == "sigmoid":
        return -torch.nn.functional.logsigmoid(u)
    if loss_type == "ramp":
        return relu(1 - u) - relu(-0.5 - u)
    if loss_type == "ipo":
        return (u / beta - 1 / (2 * beta)) ** 2
    return relu(1 - u)


def formula(policy, ref, g, beta, loss_type, estimator):
    """Per-prompt loss (B,), one prompt and one pair at a time, float64."""
    B, K = policy.shape
    M = (K - 2) // 2
    r = beta * (policy - (ref if ref is not None else torch.zeros_like(policy)))
    out = []
    for b in range(B):
        u = [r[b, 2 * p] - r[b, 2 * p + 1] for p in range(M + 1)]
        loss = pair_loss(u[0], loss_type, beta)
        if estimator == "vrpo" and M > 0:
            loss = loss - (g[b, 0] * pair_loss(u[0], loss_type, beta)
                           + (1 - g[b, 0]) * pair_loss(-u[0], loss_type, beta))
            mc = sum(g[b, m] * pair_loss(u[m], loss_type, beta)
                     + (1 - g[b, m]) * pair_loss(-u[m], loss_type, beta) for m in range(1, M + 1))
            loss = loss + mc / M
        out.append(loss)
    return torch.stack(out)


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
    loss = formula(p, ref, g, beta, loss_type, estimator)
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
