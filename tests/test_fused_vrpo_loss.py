"""The one-sweep FusedLinearVRPOLoss (vrpo_fast.chunked.linear_vrpo_sweep with the Triton steps
of vrpo_fast.kernels.fused_linear_vrpo, or the PyTorch ones) against float64 oracles: full
(N, V) logits in float64, the per-prompt float64 formula, autograd through both for dH and dW.

Ragged groups with empty and one-token responses, ignored positions, temperature, 1e4 logits,
chunks of whole groups (and groups longer than a chunk), equality with the two-pass path
(linear_logprobs + the loss kernel), and that the logits are formed once per token. Without a GPU
the Triton steps run in Triton's interpreter (128-column blocks, so V = 150 covers a partial
block); tests marked `gpu` run the compiled kernels.
"""

import pytest
import torch
from helpers import (  # the float64 oracles and the verbose assert
    assert_close_verbose,
    assert_within_eager_error,
    eager_logprobs,
    make_inputs,
    oracle_logprobs,
    segment_sums,
)
from helpers import vrpo_formula as formula

import vrpo_fast
from vrpo_fast import chunked
from vrpo_fast.chunked import group_chunks, group_offsets
from vrpo_fast.kernels.fused_linear_vrpo import TritonSweep
from vrpo_fast.ops import FusedLinearVRPOLoss, linear_logprobs, per_prompt_vrpo_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D, V = 24, 150


def groups(G, K, max_len, seed, hidden_scale=1.0, dtype=torch.float32):
    """G groups of K responses of lengths in [0, max_len] (response 1 empty, response 2 one
    token), packed group-major; one ignored position; ref (G, K) and g (G, K / 2) in float64."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (G * K,), generator=gen)
    lengths[1], lengths[2] = 0, 1
    seg = torch.repeat_interleave(torch.arange(G * K), lengths).to(DEVICE)
    h, w, t = make_inputs(seg.numel(), D, V, dtype, hidden_scale=hidden_scale, seed=seed)
    t[3] = -100
    ref = (-torch.rand(G, K, generator=gen, dtype=torch.float64) * 10).to(DEVICE)
    g = torch.rand(G, K // 2, generator=gen, dtype=torch.float64).to(DEVICE)
    return h, w, t, seg, ref, g


def run_module(module, h, w, t, seg, G, K, ref, g, up, reduction="mean"):
    """Loss, stats and the gradients of up * loss (fresh leaves)."""
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, stats = module(hh, ww, t, seg, G, K, ref, g, reduction=reduction)
    (loss * up).backward()
    return loss.detach(), stats, hh.grad, ww.grad


def oracle(h, w, t, seg, G, K, ref, g, up, *, beta, loss_type, estimator, temperature,
           reduction):
    """float64: full logits, segment sums, the per-prompt formula; loss and d(up * loss)."""
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    logps = segment_sums(oracle_logprobs(h64, w64, t, temperature), seg, G * K).view(G, K)
    per = formula(logps, ref, g, beta, loss_type, estimator)
    loss = per.mean() if reduction == "mean" else per.sum()
    (loss * up).backward()
    return loss.detach(), logps.detach(), h64.grad, w64.grad


CASES = [  # loss_type, estimator, K, with_ref, reduction, temperature, chunk_tokens
    ("sigmoid", "vrpo", 4, True, "mean", 0.9, None),    # one chunk
    ("ipo", "vrpo", 2, False, "sum", 1.0, 5),           # group-aligned chunks, long groups sliced
    ("ramp", "vrpo", 6, True, "mean", 1.3, 2),          # most groups longer than a chunk
    ("hinge", "dpo", 4, True, "sum", 1.0, 12),
]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_and_gradients_match_float64(impl, case, monkeypatch):
    loss_type, estimator, K, with_ref, reduction, temperature, chunk_tokens = case
    steps = {"triton": 0, "torch": 0}                 # which steps ran: the dispatch
    for name, cls in (("triton", TritonSweep), ("torch", chunked.TorchSweep)):
        real = cls.head_grads_
        monkeypatch.setattr(cls, "head_grads_", lambda self, *a, real=real, name=name: (
            steps.__setitem__(name, steps[name] + 1) or real(self, *a)))
    G, beta = 3, 0.5
    h, w, t, seg, ref, g = groups(G, K, 5, seed=K)
    ref = ref if with_ref else None
    module = FusedLinearVRPOLoss(beta=beta, loss_type=loss_type, estimator=estimator,
                                 temperature=temperature, impl=impl, chunk_tokens=chunk_tokens)
    up = 1.7                                     # backward scales the stored gradients by it
    loss, stats, dh, dw = run_module(module, h, w, t, seg, G, K,
                                     None if ref is None else ref.float(), g.float(), up,
                                     reduction)
    want, logps, dh_want, dw_want = oracle(h, w, t, seg, G, K, ref, g, up, beta=beta,
                                           loss_type=loss_type, estimator=estimator,
                                           temperature=temperature, reduction=reduction)
    assert steps[impl] > 0 and steps["torch" if impl == "triton" else "triton"] == 0
    assert loss.shape == () and dh.dtype == h.dtype and dw.dtype == w.dtype
    assert_close_verbose(loss, want, 1e-5, 1e-5, "loss")
    assert_close_verbose(dh, dh_want, 1e-5, 1e-4, "dH")
    assert_close_verbose(dw, dw_want, 1e-5, 1e-4, "dW")
    _, want_stats = vrpo_fast.vrpo_loss(logps, ref, g, beta=beta, loss_type=loss_type,
                                        estimator=estimator)
    assert set(stats) == set(want_stats)
    for key in stats:
        assert not stats[key].requires_grad
        assert_close_verbose(stats[key], want_stats[key], 1e-4, 1e-4, key)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_equals_the_two_pass_path(impl):
    """linear_logprobs (per-response sums) then the loss, with autograd's separate backward."""
    G, K, beta = 4, 4, 0.3
    h, w, t, seg, ref, g = groups(G, K, 6, seed=7)
    ref, g = ref.float(), g.float()
    one = run_module(FusedLinearVRPOLoss(beta=beta, impl=impl, temperature=1.1,
                                         chunk_tokens=9), h, w, t, seg, G, K, ref, g, 1.0)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logps = linear_logprobs(hh, ww, t, segment_ids=seg, num_segments=G * K, temperature=1.1,
                            impl=impl).view(G, K)
    two = per_prompt_vrpo_loss(logps, ref, g, beta=beta, loss_type="sigmoid",
                               estimator="vrpo", impl=impl).mean()
    two.backward()
    assert_close_verbose(one[0], two, 1e-6, 1e-6, "loss")
    assert_close_verbose(one[2], hh.grad, 1e-6, 1e-5, "dH")
    assert_close_verbose(one[3], ww.grad, 1e-6, 1e-5, "dW")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_logits_of_magnitude_1e4(impl):
    G, K, beta = 2, 4, 1e-3                      # beta keeps margins of ~1e4 logps in range
    h, w, t, seg, ref, g = groups(G, K, 5, seed=3, hidden_scale=400.0)
    assert (h.double() @ w.double().T).abs().max() > 5e3
    loss, _, dh, dw = run_module(FusedLinearVRPOLoss(beta=beta, impl=impl, chunk_tokens=4),
                                 h, w, t, seg, G, K, ref.float(), g.float(), 1.0)
    want, _, dh_want, dw_want = oracle(h, w, t, seg, G, K, ref, g, 1.0, beta=beta,
                                       loss_type="sigmoid", estimator="vrpo", temperature=1.0,
                                       reduction="mean")
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all()
    # fp32 logits of ~1e4 carry ~1e-3 absolute rounding (test_kernel_linear_logprob); here the
    # gradients are scaled by beta / G, so the tolerances are relative to their size.
    assert_close_verbose(loss, want, 1e-4, 1e-5, "loss")
    assert_close_verbose(dh, dh_want, 2e-3 * dh_want.abs().max().item(), 2e-3, "dH")
    assert_close_verbose(dw, dw_want, 2e-3 * dw_want.abs().max().item(), 2e-3, "dW")


def test_logits_are_formed_once_per_token(monkeypatch):
    """6 N D V: each token's logits are computed once, except the tokens of a group longer than
    a chunk (twice), and backward computes none."""
    G, K = 3, 4
    h, w, t, seg, ref, g = groups(G, K, 5, seed=5)
    offsets = group_offsets(seg, G, K)
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    rows = []
    real = chunked.TorchSweep.logits
    monkeypatch.setattr(chunked.TorchSweep, "logits",
                        lambda self, x, out: rows.append(x.shape[0]) or real(self, x, out))
    for chunk in (max(sizes), min(sizes) + 1):
        rows.clear()
        module = FusedLinearVRPOLoss(impl="torch", chunk_tokens=chunk)
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = module(hh, ww, t, seg, G, K, ref.float(), g.float())
        forward_rows = sum(rows)
        loss.backward()
        assert sum(rows) == forward_rows                     # backward: no logits
        assert max(rows) <= chunk
        assert forward_rows == h.shape[0] + sum(s for s in sizes if s > chunk)
    # The default chunk (a byte budget) widens, up to 4x, to the largest group: no recompute.
    assert max(sizes) <= 20
    monkeypatch.setattr(chunked.TorchSweep, "buffer_bytes", 5 * V * 4)        # 5 tokens
    rows.clear()
    FusedLinearVRPOLoss(impl="torch")(h.requires_grad_(True), w, t, seg, G, K, ref, g)
    assert sum(rows) == h.shape[0] and max(rows) >= max(sizes)


def test_group_offsets_and_chunks():
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 5, 5])                      # K = 2: groups 0, 0, 0/1
    assert group_offsets(seg, 4, 2) == [0, 3, 6, 8, 8]              # group 3 empty
    assert group_offsets(seg.flip(0), 4, 2) is None                 # groups out of order
    assert group_offsets(torch.tensor([0, 8]), 4, 2) is None        # id outside [0, G K)
    assert group_offsets(torch.tensor([-1, 0]), 4, 2) is None
    assert group_offsets(torch.tensor([1, 0, 2]), 4, 2) == [0, 2, 3, 3, 3]  # within a group: any
    offsets = [0, 2, 9, 10, 10, 14]              # groups of 2, 7, 1, 0 and 4 tokens
    assert group_chunks(offsets, 4) == [(0, 1), (1, 2), (2, 4), (4, 5)]
    assert group_chunks(offsets, 100) == [(0, 5)]
    assert group_chunks([0], 4) == []


def test_non_contiguous_groups_no_grad_and_no_tokens():
    """Groups out of order take the two-pass path; no_grad and a weight-only gradient skip the
    unneeded work; a batch with no response tokens gives the formula at zero log-probs."""
    G, K = 3, 2
    h, w, t, seg, ref, g = groups(G, K, 4, seed=11)
    perm = torch.randperm(seg.numel())
    module = FusedLinearVRPOLoss(impl="torch", chunk_tokens=3)
    want, _, dh_want, dw_want = oracle(h, w, t, seg, G, K, ref, g, 1.0, beta=0.1,
                                       loss_type="sigmoid", estimator="vrpo", temperature=1.0,
                                       reduction="mean")
    loss, _, dh, dw = run_module(module, h[perm], w, t[perm].int(), seg[perm], G, K, ref, g,
                                 1.0)
    assert_close_verbose(loss, want, 1e-5, 1e-5, "permuted loss")
    assert_close_verbose(dh, dh_want[perm], 1e-5, 1e-4, "permuted dH")
    with torch.no_grad():
        loss, _ = module(h.requires_grad_(True), w, t, seg, G, K, ref, g)
    assert_close_verbose(loss, want, 1e-5, 1e-5, "no_grad loss")
    ww = w.clone().requires_grad_(True)
    loss, _ = module(h.detach(), ww, t.int(), seg.int(), G, K, ref, g)     # int32 ids
    loss.backward()
    assert_close_verbose(ww.grad, dw_want, 1e-5, 1e-4, "dW only")
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for impl in ("torch", "triton"):
        hh = torch.zeros(0, D, device=DEVICE, requires_grad=True)
        ww = w.clone().requires_grad_(True)
        loss, _ = FusedLinearVRPOLoss(impl=impl)(hh, ww, empty, empty, G, K, ref, g)
        loss.backward()
        zero = formula(torch.zeros(G, K, dtype=torch.float64, device=DEVICE), ref, g, 0.1,
                       "sigmoid", "vrpo").mean()
        assert_close_verbose(loss, zero, 1e-6, 1e-6, f"{impl}: no tokens")
        assert hh.grad.shape == (0, D) and not ww.grad.any()


def test_second_backward_through_the_same_graph_is_refused():
    h, w, t, seg, ref, g = groups(2, 4, 3, seed=2)
    hh = h.clone().requires_grad_(True)
    loss, _ = FusedLinearVRPOLoss(impl="torch")(hh, w, t, seg, 2, 4, ref, g)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_argument_errors_name_the_argument():
    h, w, t, seg, ref, g = groups(2, 4, 3, seed=2)
    with pytest.raises(ValueError, match="^chunk_tokens:"):
        FusedLinearVRPOLoss(chunk_tokens=0)
    with pytest.raises(ValueError, match="^ref_logps:"):
        FusedLinearVRPOLoss()(h, w, t, seg, 2, 4, ref[:, :1], g)
    with pytest.raises(ValueError, match="^aux_prefs:"):
        FusedLinearVRPOLoss()(h, w, t, seg, 2, 4, ref, g[:1])
    with pytest.raises(ValueError, match="^aux_prefs:"):
        FusedLinearVRPOLoss()(h, w, t, seg, 2, 4, ref, None)
    with pytest.raises(ValueError, match="^aux_prefs: every g"):     # the value checks remain
        FusedLinearVRPOLoss()(h, w, t, seg, 2, 4, ref, g + 2)


# --- compiled kernels (a CUDA device) --------------------------------------------------------

@pytest.mark.gpu
def test_gpu_bf16_within_eager_error():
    """bf16 on the GPU path: logits and dz rounded to bf16 as eager rounds them, dW accumulated
    in bf16 over a few chunks; the errors against float64 stay within a small factor of eager
    bf16 autograd's (logits in bf16, log-softmax in fp32)."""
    G, K, beta = 16, 4, 0.1
    lengths = torch.randint(1, 60, (G * K,))
    seg = torch.repeat_interleave(torch.arange(G * K), lengths).to(DEVICE)
    h, w, t = make_inputs(seg.numel(), 256, 5003, torch.bfloat16, seed=4)
    ref = -torch.rand(G, K, device=DEVICE) * 50
    g = torch.rand(G, K // 2, device=DEVICE)
    loss, _, dh, dw = run_module(FusedLinearVRPOLoss(beta=beta, impl="triton", chunk_tokens=400),
                                 h, w, t, seg, G, K, ref, g, 1.0)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    want, _, dh_want, dw_want = oracle(h, w, t, seg, G, K, ref.double(), g.double(), 1.0,
                                       beta=beta, loss_type="sigmoid", estimator="vrpo",
                                       temperature=1.0, reduction="mean")
    he, we = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logps = segment_sums(eager_logprobs(he, we, t), seg, G * K).view(G, K)
    eager, _ = vrpo_fast.vrpo_loss(logps, ref, g, beta=beta)
    eager.backward()
    assert_within_eager_error(loss.float(), eager.detach(), want, "loss")
    assert_within_eager_error(dh.float(), he.grad.float(), dh_want, "dH")
    assert_within_eager_error(dw.float(), we.grad.float(), dw_want, "dW", factor=4.0)


def test_torch_sweep_targets_far_below_the_row_maximum():
    """The PyTorch sweep reads log p(target) back from the softmax in its buffer; where
    softmax_t underflows in float32 (target logits 120 and 200 below their rows' largest) the
    row's log-sum-exp is recomputed. Log-probs (scoring and the one sweep), loss, dH and dW
    against float64, with rows so far down that their float32 softmax_t is 0."""
    G, K = 2, 2
    h, w, t, seg, ref, g = groups(G, K, 4, seed=3)
    z = h.double() @ w.double().T
    far = [0, 4, h.shape[0] - 1]
    for n, gap in zip(far, (120.0, 200.0, 90.0)):
        # Lower the target's logit by moving h_n against W[t_n], leaving the rest near 0.
        wt = w[t[n]].double()
        h[n] = (h[n].double() - (gap + z[n].max() - z[n, t[n]] + 5.0) * wt / wt.dot(wt)).float()
    z = (h.double() @ w.double().T)
    rows = torch.softmax(z.float(), 1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    assert (rows[far[:2]] == 0).all()                 # float32 softmax_t underflows there
    want = oracle_logprobs(h, w, t)
    assert want[far].max() < -80
    with torch.no_grad():
        got = linear_logprobs(h, w, t, impl="torch")
    assert torch.isfinite(got).all()
    assert_close_verbose(got, want, 1e-4, 1e-6, "no-grad log-probs")
    module = FusedLinearVRPOLoss(beta=0.1, impl="torch", chunk_tokens=5)
    loss, stats, dh, dw = run_module(module, h, w, t, seg, G, K, ref.float(), g.float(), 1.0)
    want, logps, dh_want, dw_want = oracle(h, w, t, seg, G, K, ref, g, 1.0, beta=0.1,
                                           loss_type="sigmoid", estimator="vrpo",
                                           temperature=1.0, reduction="mean")
    assert_close_verbose(loss, want, 1e-5, 1e-5, "loss")
    assert_close_verbose(dh, dh_want, 1e-5, 1e-4, "dH")
    assert_close_verbose(dw, dw_want, 1e-5, 1e-4, "dW")


def test_cpu_workspace_is_reused_never_shared():
    """The sweep's CPU logit buffer is kept between sweeps (one storage, grown when a larger
    one is asked for), a lease taken while another is held gets its own memory, and release()
    frees what is kept."""
    space = chunked._Workspace()
    with space.get(4, 6, torch.float32, "cpu") as a:
        a.fill_(1.0)
        with space.get(4, 6, torch.float32, "cpu") as b:          # nested: not the same memory
            b.fill_(2.0)
            assert a.data_ptr() != b.data_ptr() and (a == 1).all()
        ptr = a.data_ptr()
    with space.get(3, 5, torch.float32, "cpu") as c:                # smaller: the kept storage
        assert c.shape == (3, 5) and c.data_ptr() == ptr
    with space.get(8, 8, torch.float32, "cpu") as d:                # larger: grown
        assert d.shape == (8, 8) and d.untyped_storage().nbytes() >= 8 * 8 * 4
    with space.get(2, 2, torch.float64, "cpu") as e:                # per dtype
        assert e.dtype == torch.float64
    assert set(space._kept) == {torch.float32, torch.float64}
    space.release()
    assert not space._kept


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU memory probe")
def test_cpu_memory_probe_counts_the_kept_buffer():
    """The benchmarks' CPU peak (bench.memory.measure, after a warm-up call) still counts the
    sweep's logit buffer, which the warm-up call left kept in the workspace."""
    from vrpo_fast.bench.memory import measure

    N, Dh, Vv = 64, 8, 1000
    h, w, t = make_inputs(N, Dh, Vv, torch.float32)
    backend = chunked.TorchSweep(h, w, temperature=1.0, ignore_index=-100)

    def call():
        chunked.sweep_logprobs(backend, h, t)
    call()                                                    # warm-up: the buffer is kept
    assert measure(call, 0)["peak_bytes"] >= N * Vv * 4
