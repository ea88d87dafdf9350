"""vrpo_fast.ops: dispatch between the Triton kernels and the PyTorch references, argument
errors, and FusedLinearVRPOLoss end to end against full float64 logits + the float64 formula."""

import pytest
import torch
from helpers import (  # the float64 oracles and the verbose assert
    DEVICE,
    assert_close_verbose,
    make_inputs,
    oracle_logprobs,
    segment_sums,
    vrpo_formula,
)

import vrpo_fast
import vrpo_fast.kernels.linear_logprob as kernel_module
from vrpo_fast import ops
from vrpo_fast.ops import FusedLinearVRPOLoss, linear_logprobs, per_prompt_vrpo_loss


@pytest.fixture
def spies(monkeypatch):
    """Counts the calls that reach the Triton autograd Function, the chunked reference and
    the no-grad sweep (by backend)."""
    calls = {"triton": 0, "torch": 0}
    real_apply = kernel_module.LinearLogprobFunction.apply
    real_chunked = ops.chunked_linear_logprobs
    real_sweep = ops.sweep_logprobs

    def sweep(backend, *args, **kwargs):
        key = f"sweep_{type(backend).__name__}"
        calls[key] = calls.get(key, 0) + 1
        return real_sweep(backend, *args, **kwargs)

    monkeypatch.setattr(ops, "sweep_logprobs", sweep)

    class Spy(kernel_module.LinearLogprobFunction):
        @classmethod
        def apply(cls, *args):
            calls["triton"] += 1
            return real_apply(*args)

    def chunked(*args, **kwargs):
        calls["torch"] += 1
        return real_chunked(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "LinearLogprobFunction", Spy)
    monkeypatch.setattr(ops, "chunked_linear_logprobs", chunked)
    return calls


def test_dispatch_picks_the_implementation_and_both_agree(spies):
    h, w, t = make_inputs(19, 24, 130, torch.float32)
    h.requires_grad_(True)                # the autograd paths (no grad: the sweep, below)
    t[3] = -100
    seg = torch.arange(19, device=DEVICE) // 5
    kw = dict(segment_ids=seg, num_segments=4)
    a = linear_logprobs(h, w, t, impl="triton", **kw)
    assert spies == {"triton": 1, "torch": 0}
    b = linear_logprobs(h, w, t, impl="torch", **kw)
    assert spies == {"triton": 1, "torch": 1}
    c = linear_logprobs(h, w, t, **kw)                           # auto
    on_cuda = DEVICE == "cuda"
    assert spies == {"triton": 1 + on_cuda, "torch": 2 - on_cuda}
    want = segment_sums(oracle_logprobs(h, w, t), seg, 4)
    for name, out in (("triton", a), ("torch", b), ("auto", c)):
        assert_close_verbose(out, want, 1e-4, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segmented", [False, True], ids=["per_token", "segments"])
def test_no_grad_log_probs_take_the_sweep_forward_and_match_float64(spies, dtype, segmented):
    """Scoring and reference passes (no gradient needed) run the one sweep's forward steps,
    the Triton row pass or the PyTorch one by `impl`: against float64 full logits, irregular
    sizes, ignored positions, one-token and empty segments, temperature, logits near 1e4, and
    many chunks (chunk_tokens 7 over 45 tokens) equal to one."""
    from vrpo_fast.chunked import TorchSweep, sweep_logprobs
    from vrpo_fast.kernels.fused_linear_vrpo import TritonSweep

    N, D, V = 45, 40, 1007
    h, w, t = make_inputs(N, D, V, dtype)
    t[[0, 7, 44]] = -100
    w[5] += 3e3 / D**0.5 * h.float().mean(0).sign().to(dtype)   # one vocabulary entry near 1e4
    seg = torch.tensor([0] + [1] * 10 + [2] * 20 + [4] * 13 + [5], device=DEVICE)
    kw = dict(segment_ids=seg, num_segments=6) if segmented else {}
    want = oracle_logprobs(h, w, t, temperature=0.7)
    if segmented:
        want = segment_sums(want, seg, 6)
    # The sweep computes in float32 on the CPU (bf16 inputs upcast); on CUDA it rounds h @ W^T
    # to the inputs' dtype as eager PyTorch does: bf16 logits near 1e4 are exact only to ~32,
    # so there bf16 is compared with the oracle of the rounded logits.
    rounded = (h @ w.T).double() / 0.7
    rounded = torch.where(t != -100, torch.log_softmax(rounded, -1).gather(
        1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    rounded = segment_sums(rounded, seg, 6) if segmented else rounded
    for impl, name in (("torch", "sweep_TorchSweep"), ("triton", "sweep_TritonSweep")):
        with torch.no_grad():
            got = linear_logprobs(h, w, t, temperature=0.7, impl=impl, **kw)
        assert spies.get(name) == 1 and spies["triton"] == spies["torch"] == 0, spies
        assert got.dtype == torch.float32 and not got.requires_grad
        low = dtype == torch.bfloat16 and DEVICE == "cuda" and impl == "triton"
        assert_close_verbose(got, rounded if low else want, 0.1 if low else 1e-2, 1e-5,
                             f"{impl} no-grad")
        if dtype == torch.float32:
            backend = (TorchSweep if impl == "torch" else TritonSweep)(
                h, w, temperature=0.7, ignore_index=-100)
            many = sweep_logprobs(backend, h, t, kw.get("segment_ids"), kw.get("num_segments"),
                                  chunk_tokens=7)
            assert_close_verbose(many, got, 1e-5, 1e-6, f"{impl}: 7-token chunks")


def test_auto_keeps_float64_on_the_reference(spies):
    h, w, t = make_inputs(7, 8, 33, torch.float64)
    out = linear_logprobs(h, w, t)
    assert spies["triton"] == 0
    assert_close_verbose(out, oracle_logprobs(h, w, t), 1e-6, 1e-6, "logp")
    with pytest.raises(ValueError, match="^impl: the Triton kernels take float32"):
        linear_logprobs(h, w, t, impl="triton")


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU-only error")
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    h, w, t = make_inputs(4, 8, 16, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="^impl: 'triton' on CPU tensors needs"):
        linear_logprobs(h, w, t, impl="triton")
    with pytest.raises(ValueError, match="^impl: 'triton' on CPU tensors needs"):
        per_prompt_vrpo_loss(torch.zeros(2, 4), None, torch.zeros(2, 2), beta=0.1,
                             loss_type="sigmoid", estimator="vrpo", impl="triton")


def _bad_calls():
    h, w, t = make_inputs(6, 8, 16, torch.float32)
    seg = torch.zeros(6, dtype=torch.long, device=DEVICE)
    return [
        ("impl", lambda: linear_logprobs(h, w, t, impl="cuda")),
        ("hidden, weight", lambda: linear_logprobs(h, w[:, :5], t)),
        ("hidden, weight", lambda: linear_logprobs(h[0], w, t)),
        ("targets", lambda: linear_logprobs(h, w, t[:5])),
        ("targets", lambda: linear_logprobs(h, w, t.float())),
        ("segment_ids", lambda: linear_logprobs(h, w, t, segment_ids=seg[:5], num_segments=1)),
        ("num_segments", lambda: linear_logprobs(h, w, t, segment_ids=seg)),
        ("num_segments", lambda: linear_logprobs(h, w, t, num_segments=3)),
        ("temperature", lambda: linear_logprobs(h, w, t, temperature=0.0)),
        ("loss_type", lambda: FusedLinearVRPOLoss(loss_type="logistic")),
        ("estimator", lambda: FusedLinearVRPOLoss(estimator="dr")),
        ("beta", lambda: FusedLinearVRPOLoss(beta=0.0)),
        ("dro_tau", lambda: FusedLinearVRPOLoss(dro_tau=-1.0)),
        ("group_size", lambda: FusedLinearVRPOLoss()(h, w, t, seg, 1, 3, None,
                                                     torch.zeros(1, 1, device=DEVICE))),
        ("aux_prefs", lambda: per_prompt_vrpo_loss(
            torch.zeros(2, 4, device=DEVICE), None, torch.zeros(2, 3, device=DEVICE),
            beta=0.1, loss_type="sigmoid", estimator="vrpo", impl="triton")),
        ("ref_logps", lambda: per_prompt_vrpo_loss(
            torch.zeros(2, 4, device=DEVICE), torch.zeros(2, 2, device=DEVICE),
            torch.zeros(2, 2, device=DEVICE), beta=0.1, loss_type="sigmoid",
            estimator="vrpo", impl="triton")),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_argument_errors_name_the_argument(index):
    name, call = _bad_calls()[index]
    with pytest.raises(ValueError, match=f"^{name}:"):
        call()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs_gradients_match_float64(impl):
    h, w, t = make_inputs(23, 24, 131, torch.float32, seed=1)
    t[[2, 9]] = -100
    seg = torch.tensor([0] * 6 + [2] * 1 + [3] * 16, device=DEVICE)       # segment 1 empty
    up = torch.randn(4, dtype=torch.float64, device=DEVICE)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = linear_logprobs(hh, ww, t, segment_ids=seg, num_segments=4, temperature=1.3,
                          impl=impl)
    (out * up.float()).sum().backward()
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    want = segment_sums(oracle_logprobs(h64, w64, t, 1.3), seg, 4)
    (want * up).sum().backward()
    assert_close_verbose(out, want, 1e-4, 1e-5, "logp")
    assert_close_verbose(hh.grad, h64.grad, 1e-5, 1e-4, "dH")
    assert_close_verbose(ww.grad, w64.grad, 1e-5, 1e-4, "dW")


def test_mixed_dtypes_are_promoted_and_autocast_is_honoured():
    h, w, t = make_inputs(12, 16, 70, torch.float32, seed=2)
    w16 = w.bfloat16()
    out = linear_logprobs(h, w16, t, impl="triton")              # promoted to float32
    assert_close_verbose(out, oracle_logprobs(h, w16.float(), t), 1e-5, 1e-5, "promoted")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = linear_logprobs(h, w, t, impl="triton")            # the head runs in bf16
    assert_close_verbose(out, oracle_logprobs(h.bfloat16(), w.bfloat16(), t), 1e-4, 1e-5,
                         "autocast")


# --- FusedLinearVRPOLoss ----------------------------------------------------------------------

def _fused_case(K, seed):
    """G = 3 groups of K responses of ragged lengths (one of a single token), D = 24, V = 97."""
    G, D, V = 3, 24, 97
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (G * K,), generator=gen)
    lengths[1] = 1
    seg = torch.repeat_interleave(torch.arange(G * K), lengths).to(DEVICE)
    h, w, t = make_inputs(seg.numel(), D, V, torch.float32, seed=seed)
    t[0] = -100
    ref = (-torch.rand(G, K, generator=gen, dtype=torch.float64) * 10).to(DEVICE)
    g = torch.rand(G, K // 2, generator=gen, dtype=torch.float64).to(DEVICE)
    return G, h, w, t, seg, ref, g


CASES = [  # loss_type, K, with_ref, dro_tau, reduction
    ("sigmoid", 4, True, None, "mean"),
    ("ipo", 2, False, None, "sum"),
    ("ramp", 6, True, 0.5, "mean"),
    ("hinge", 4, True, None, "none"),
]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_module_matches_full_logits_and_the_formula(impl, case):
    loss_type, K, with_ref, dro_tau, reduction = case
    G, h, w, t, seg, ref, g = _fused_case(K, seed=K)
    ref = ref if with_ref else None
    beta, temperature = 0.5, 0.9
    module = FusedLinearVRPOLoss(beta=beta, loss_type=loss_type, dro_tau=dro_tau,
                                 temperature=temperature, impl=impl)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, stats = module(hh, ww, t, seg, G, K, None if ref is None else ref.float(), g.float(),
                         reduction=reduction)
    up = torch.rand(loss.shape, dtype=torch.float64, device=DEVICE) + 0.5
    (loss * up.float()).sum().backward()

    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    logps = segment_sums(oracle_logprobs(h64, w64, t, temperature), seg, G * K).view(G, K)
    per = vrpo_formula(logps, ref, g, beta, loss_type, "vrpo")
    if dro_tau is not None:
        want = (torch.softmax(per.detach() / dro_tau, 0) * per).sum()
    else:
        want = {"mean": per.mean, "sum": per.sum, "none": lambda: per}[reduction]()
    (want * up).sum().backward()
    assert_close_verbose(loss, want, 1e-5, 1e-5, "loss")
    assert_close_verbose(hh.grad, h64.grad, 1e-5, 1e-4, "dH")
    assert_close_verbose(ww.grad, w64.grad, 1e-5, 1e-4, "dW")
    _, want_stats = vrpo_fast.vrpo_loss(logps.detach(), ref, g, beta=beta, loss_type=loss_type,
                                        dro_tau=dro_tau)
    assert set(stats) == set(want_stats)
    for key in stats:
        assert not stats[key].requires_grad
        assert_close_verbose(stats[key], want_stats[key], 1e-4, 1e-4, key)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dispatch_vrpo_loss_kernel_and_formula_agree_with_float64(reduction):
    """The one loss dispatch (trainers and FusedLinearVRPOLoss): the kernel (interpreted) and
    the reference give the float64 formula's loss and gradient and the reference's statistics;
    a labelled mask always takes the reference formula."""
    gen = torch.Generator().manual_seed(7)
    B, K = 5, 6
    pol = (-torch.rand(B, K, generator=gen) * 20).to(DEVICE)
    ref = (-torch.rand(B, K, generator=gen) * 20).to(DEVICE)
    g = torch.rand(B, K // 2, generator=gen).to(DEVICE)
    want = vrpo_formula(pol.double(), ref.double(), g.double(), 0.3, "sigmoid", "vrpo")
    want = {"none": want, "mean": want.mean(), "sum": want.sum()}[reduction]
    kw = dict(beta=0.3, loss_type="sigmoid", estimator="vrpo", reduction=reduction)
    _, want_stats = vrpo_fast.vrpo_loss(pol, ref, g, **kw)
    grads = []
    for impl in ("triton", "torch"):
        x = pol.clone().requires_grad_(True)
        loss, stats = ops.dispatch_vrpo_loss(x, ref, g, impl=impl, **kw)
        assert_close_verbose(loss.double(), want, 1e-5, 1e-5, f"{impl} loss")
        assert stats.keys() == want_stats.keys()
        for key in stats:
            assert_close_verbose(stats[key], want_stats[key], 1e-6, 1e-6, f"{impl} {key}")
        loss.sum().backward()
        grads.append(x.grad)
    x64 = pol.double().requires_grad_(True)
    vrpo_formula(x64, ref.double(), g.double(), 0.3, "sigmoid", "vrpo").sum().backward()
    scale = {"none": 1.0, "mean": 1.0 / B, "sum": 1.0}[reduction]
    for impl, grad in zip(("triton", "torch"), grads):
        assert_close_verbose(grad.double(), x64.grad * scale, 1e-5, 1e-6, f"{impl} grad")
    labelled = torch.tensor([True, False, True, True, False], device=DEVICE)
    got, _ = ops.dispatch_vrpo_loss(pol, ref, g, labelled=labelled, label_scale=2.5, **kw)
    expect, _ = vrpo_fast.vrpo_loss(pol, ref, g, labelled=labelled, label_scale=2.5, **kw)
    assert torch.equal(got, expect)
    with pytest.raises(ValueError, match="^labelled:"):
        ops.dispatch_vrpo_loss(pol, ref, g, labelled=labelled, impl="triton", **kw)


# --- compiled kernels (a CUDA device) --------------------------------------------------------

@pytest.mark.gpu
def test_gpu_auto_uses_the_kernels_and_matches_the_reference(monkeypatch):
    from vrpo_fast import chunked
    from vrpo_fast.kernels.fused_linear_vrpo import TritonSweep

    steps = {"triton": 0, "torch": 0}                # the one sweep's steps, per backend
    for name, cls in (("triton", TritonSweep), ("torch", chunked.TorchSweep)):
        monkeypatch.setattr(cls, "__init__", lambda self, *a, real=cls.__init__, name=name,
                            **kw: steps.__setitem__(name, steps[name] + 1) or
                            real(self, *a, **kw))
    G, K, D, V = 16, 6, 256, 5003
    lengths = torch.randint(1, 40, (G * K,))
    seg = torch.repeat_interleave(torch.arange(G * K), lengths).to(DEVICE)
    h, w, t = make_inputs(seg.numel(), D, V, torch.bfloat16, seed=4)
    ref = -torch.rand(G, K, device=DEVICE) * 50
    g = torch.rand(G, K // 2, device=DEVICE)
    results = []
    for impl in ("auto", "torch"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = FusedLinearVRPOLoss(beta=0.1, impl=impl)(hh, ww, t, seg, G, K, ref, g)
        loss.backward()
        results.append((loss.detach(), hh.grad.float(), ww.grad.float()))
    assert steps == {"triton": 1, "torch": 1}
    (la, dha, dwa), (lt, dht, dwt) = results
    assert_close_verbose(la, lt, 1e-3, 1e-3, "loss")
    # Both paths round their gradients to bf16 once; compare at bf16 resolution.
    assert_close_verbose(dha, dht, 1e-3, 2e-2, "dH")
    assert_close_verbose(dwa, dwt, 1e-3, 2e-2, "dW")
