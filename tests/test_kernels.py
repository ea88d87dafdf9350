"""The Triton kernels (TRITON_INTERPRET=1 on the CPU; compiled on a GPU) against float64 oracles
and the PyTorch references."""

import pytest
import torch

import vrpo_fast
from vrpo_fast.kernels.linear_logprob import LinearLogprobFunction
from vrpo_fast.kernels.vrpo_loss import VRPOLossFunction
from vrpo_fast.ops import FusedLinearVRPOLoss, linear_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_verbose(got, want, atol, rtol, name):
    """Reports how many elements differ and the worst one, not just the first."""
    got, want = got.double().cpu(), want.double().cpu()
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        idx = (got - want).abs().argmax().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, "
            f"rtol={rtol}); worst at flat index {idx}: got {got.flatten()[idx]:.6g}, "
            f"want {want.flatten()[idx]:.6g}")


def oracle_logprobs(hidden, weight, targets, temperature, ignore_index=-100):
    logits = hidden.double() @ weight.double().T / temperature
    lp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(targets != ignore_index, lp, torch.zeros_like(lp))


def make_inputs(N, D, V, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=gen) * scale).to(DEVICE, dtype)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5 * 4).to(DEVICE, dtype)
    t = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    return h, w, t


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-4), (torch.bfloat16, None)])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_linear_logprob_values_and_gradients(dtype, atol, segments, temperature):
    N, D, V = 45, 40, 1007           # no multiple of any block size
    h, w, t = make_inputs(N, D, V, dtype)
    t[[0, 7, 44]] = -100             # ignored positions
    seg = kw = None
    if segments:
        # one-token segments (0, 5), an empty segment (3), ragged others
        seg = torch.tensor([0] + [1] * 10 + [2] * 20 + [4] * 13 + [5], device=DEVICE)
        kw = dict(segment_ids=seg, num_segments=6)
    h.requires_grad_(True)
    w.requires_grad_(True)
    out = LinearLogprobFunction.apply(h, w, t, seg, 6 if segments else None, temperature, -100)
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref_tok = oracle_logprobs(h64, w64, t, temperature)
    ref = torch.zeros(6, dtype=torch.float64, device=DEVICE).index_add(0, seg, ref_tok) \
        if segments else ref_tok
    up = torch.randn(ref.shape, dtype=torch.float64, device=DEVICE)
    (out * up.to(out.dtype)).sum().backward()
    (ref * up).sum().backward()
    if dtype == torch.float32:
        assert_close_verbose(out, ref, atol, 1e-5, "logp")
        assert_close_verbose(h.grad, h64.grad, atol, 1e-4, "dH")
        assert_close_verbose(w.grad, w64.grad, atol, 1e-4, "dW")
    else:
        # Kernel error <= 2x the error of eager bf16 PyTorch (both against float64) + slack.
        hb = h.detach().clone().requires_grad_(True)
        wb = w.detach().clone().requires_grad_(True)
        logits = (hb @ wb.T).float() / temperature
        eager_tok = torch.log_softmax(logits, -1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        eager_tok = torch.where(t != -100, eager_tok, torch.zeros_like(eager_tok))
        eager = torch.zeros(6, device=DEVICE).index_add(0, seg, eager_tok) if segments \
            else eager_tok
        (eager * up.float()).sum().backward()
        for name, got, eag, want in (("logp", out, eager, ref), ("dH", h.grad, hb.grad, h64.grad),
                                     ("dW", w.grad, wb.grad, w64.grad)):
            err = (got.double() - want).abs().max().item()
            err_eager = (eag.double() - want).abs().max().item()
            assert err <= 2 * err_eager + 1e-2, (name, err, err_eager)
    if kw is not None:
        assert out[3].item() == 0.0                      # the empty segment
    assert h.grad[7].abs().sum().item() == 0.0           # ignored positions get no gradient


def test_huge_logits_do_not_overflow():
    h, w, t = make_inputs(20, 16, 300, torch.float32, scale=200.0)   # logits ~1e4
    out = LinearLogprobFunction.apply(h, w, t, None, None, 1.0, -100)
    assert torch.isfinite(out).all()
    assert_close_verbose(out, oracle_logprobs(h, w, t, 1.0), 1e-2, 1e-5, "logp")


def test_dispatch_between_triton_and_torch():
    h, w, t = make_inputs(19, 24, 130, torch.float32)
    seg = torch.arange(19, device=DEVICE) // 5
    a = linear_logprobs(h, w, t, segment_ids=seg, num_segments=4, impl="triton")
    b = linear_logprobs(h, w, t, segment_ids=seg, num_segments=4, impl="torch")
    c = linear_logprobs(h, w, t, segment_ids=seg, num_segments=4)              # auto
    assert_close_verbose(a, b, 1e-4, 1e-5, "triton vs torch")
    assert torch.equal(c, a if DEVICE == "cuda" else b)
    with pytest.raises(ValueError, match="impl"):
        linear_logprobs(h, w, t, impl="cuda")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ramp", "ipo", "hinge"])
@pytest.mark.parametrize("estimator", ["vrpo", "dpo"])
@pytest.mark.parametrize("M", [0, 1, 4])
def test_fused_vrpo_loss_matches_the_objective(loss_type, estimator, M):
    B = 37
    gen = torch.Generator().manual_seed(M)
    pol = (-20 + 4 * torch.randn(B, 2 + 2 * M, generator=gen, dtype=torch.float64))
    ref = (-20 + 4 * torch.randn(B, 2 + 2 * M, generator=gen, dtype=torch.float64))
    g = torch.rand(B, 1 + M, generator=gen, dtype=torch.float64)
    p64 = pol.clone().requires_grad_(True)
    want, _ = vrpo_fast.vrpo_loss(p64, ref, g, beta=0.3, loss_type=loss_type,
                                  estimator=estimator, reduction="none")
    up = torch.rand(B, dtype=torch.float64, generator=gen)
    (want * up).sum().backward()
    p32 = pol.float().to(DEVICE).requires_grad_(True)
    got = VRPOLossFunction.apply(p32, ref.float().to(DEVICE), g.float().to(DEVICE), 0.3,
                                 loss_type, estimator)
    (got * up.float().to(DEVICE)).sum().backward()
    assert_close_verbose(got, want, 1e-4, 1e-5, "loss")
    assert_close_verbose(p32.grad, p64.grad, 1e-5, 1e-5, "dpolicy")


def test_fused_module_end_to_end_against_full_logits():
    """FusedLinearVRPOLoss == full logits in float64 + the float64 objective."""
    G, K, D, V = 3, 4, 24, 97
    seg = torch.tensor([0] * 3 + [1] * 1 + [2] * 4 + [3] * 2 + [4] * 2 + [5] * 3 + [6] * 1
                       + [7] * 2 + [8] * 3 + [9] * 1 + [10] * 2 + [11] * 2, device=DEVICE)
    N = seg.numel()
    h, w, t = make_inputs(N, D, V, torch.float32, seed=3)
    ref = -torch.rand(G, K, device=DEVICE) * 10
    g = torch.rand(G, K // 2, device=DEVICE)
    h.requires_grad_(True)
    w.requires_grad_(True)
    module = FusedLinearVRPOLoss(beta=0.5, loss_type="sigmoid", impl="triton")
    loss, stats = module(h, w, t, seg, G, K, ref, g)
    loss.backward()
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    logps = torch.zeros(G * K, dtype=torch.float64, device=DEVICE).index_add(
        0, seg, oracle_logprobs(h64, w64, t, 1.0)).view(G, K)
    want, _ = vrpo_fast.vrpo_loss(logps, ref.double(), g.double(), beta=0.5)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-4
    assert_close_verbose(h.grad, h64.grad, 1e-5, 1e-4, "dH")
    assert_close_verbose(w.grad, w64.grad, 1e-5, 1e-4, "dW")
    assert set(stats) >= {"term_dpo", "term_label", "term_mc", "accuracy", "margin"}
