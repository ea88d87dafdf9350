"""The fused linear log-prob kernel (vrpo_fast.kernels.linear_logprob) against a float64 oracle
with full logits: values and both gradients, irregular sizes, segments (one-token, empty),
ignored positions, temperature, huge logits, several V splits and backward chunks.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET);
the interpreter uses 32 x 128 x 32 tiles, so N = 45, V = 1007, D = 40 cover partial tiles in
every dimension. Tests marked `gpu` run the compiled kernels at larger shapes.
"""

import pytest
import torch
from helpers import (
    DEVICE,
    IGNORE,
    assert_close_verbose,
    assert_within_eager_error,
    eager_logprobs,
    make_inputs,
    oracle_logprobs,
    segment_sums,
)

from vrpo_fast.kernels.linear_logprob import (
    LinearLogprobFunction,
    _dot_flags,
    linear_logprob_backward,
    linear_logprob_forward,
)


def run(fn, h, w, upstream, cast=None):
    """Output and the gradients of sum(upstream * output) w.r.t. h and w (copies as leaves)."""
    h = (h.detach().to(cast) if cast else h.detach().clone()).requires_grad_(True)
    w = (w.detach().to(cast) if cast else w.detach().clone()).requires_grad_(True)
    out = fn(h, w)
    (out * upstream.to(out.dtype)).sum().backward()
    return out.detach(), h.grad, w.grad


# Segments of 45 tokens: one-token segments 0 and 5, segment 3 empty, and an ignored position
# inside segment 2.
SEGMENTS = [0] + [1] * 10 + [2] * 20 + [4] * 13 + [5]
NUM_SEGMENTS = 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segmented", [False, True], ids=["per_token", "segments"])
@pytest.mark.parametrize("num_splits, chunk_size, temperature",
                         [(None, None, 1.0), (4, 300, 0.7)],
                         ids=["one_split_one_chunk", "four_splits_four_chunks_T0.7"])
def test_values_and_gradients_against_float64(dtype, segmented, num_splits, chunk_size,
                                               temperature):
    N, D, V = 45, 40, 1007
    h, w, t = make_inputs(N, D, V, dtype)
    t[[0, 7, 44]] = IGNORE
    seg = torch.tensor(SEGMENTS, device=DEVICE) if segmented else None
    S = NUM_SEGMENTS if segmented else None
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(S or N, generator=gen, dtype=torch.float64).to(DEVICE)

    def kernel(h_, w_):
        return LinearLogprobFunction.apply(h_, w_, t, seg, S, temperature, IGNORE, num_splits,
                                           chunk_size)

    def reduce(tok):
        return segment_sums(tok, seg, S) if segmented else tok

    out, dh, dw = run(kernel, h, w, upstream)
    want, dh_want, dw_want = run(lambda a, b: reduce(oracle_logprobs(a, b, t, temperature)),
                                 h, w, upstream, cast=torch.float64)
    assert out.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    if dtype == torch.float32:
        assert_close_verbose(out, want, 1e-4, 1e-5, "logp")
        assert_close_verbose(dh, dh_want, 1e-5, 1e-4, "dH")
        assert_close_verbose(dw, dw_want, 1e-5, 1e-4, "dW")
    else:
        eager, dh_eager, dw_eager = run(lambda a, b: reduce(eager_logprobs(a, b, t, temperature)),
                                        h, w, upstream)
        assert_within_eager_error(out, eager, want, "logp")
        assert_within_eager_error(dh, dh_eager, dh_want, "dH")
        assert_within_eager_error(dw, dw_eager, dw_want, "dW")
    # Ignored positions contribute exactly nothing, to the value or to dH.
    if segmented:
        assert out[3].item() == 0.0                                   # the empty segment
    else:
        assert out[[0, 7, 44]].abs().sum().item() == 0.0
    assert dh[[0, 7, 44]].abs().sum().item() == 0.0


def test_float16_within_twice_eager_error():
    h, w, t = make_inputs(45, 40, 1007, torch.float16, seed=2)
    t[5] = IGNORE
    upstream = torch.randn(45, dtype=torch.float64, device=DEVICE)
    out, dh, dw = run(lambda a, b: LinearLogprobFunction.apply(a, b, t, None, None, 1.0, IGNORE),
                      h, w, upstream)
    eager, dh_e, dw_e = run(lambda a, b: eager_logprobs(a, b, t), h, w, upstream)
    want, dh_w, dw_w = run(lambda a, b: oracle_logprobs(a, b, t), h, w, upstream,
                           cast=torch.float64)
    assert_within_eager_error(out, eager, want, "logp")
    assert_within_eager_error(dh, dh_e, dh_w, "dH")
    assert_within_eager_error(dw, dw_e, dw_w, "dW")


def test_logits_of_magnitude_1e4_do_not_overflow():
    N, D, V = 20, 16, 300
    h, w, t = make_inputs(N, D, V, torch.float32, hidden_scale=400.0, seed=3)
    logits = h.double() @ w.double().T
    assert logits.abs().max() > 5e3                     # the regime the test is about
    t[1] = logits[1].argmax()                           # a target that wins (logp ~ 0) ...
    t[2] = logits[2].argmin()                           # ... and one that loses (logp ~ -1e4)
    upstream = torch.randn(N, dtype=torch.float64, device=DEVICE)
    out, dh, dw = run(lambda a, b: LinearLogprobFunction.apply(a, b, t, None, None, 1.0, IGNORE,
                                                               2, 128), h, w, upstream)
    want, dh_want, dw_want = run(lambda a, b: oracle_logprobs(a, b, t), h, w, upstream,
                                 cast=torch.float64)
    assert torch.isfinite(out).all() and torch.isfinite(dh).all() and torch.isfinite(dw).all()
    # fp32 logits of ~1e4 carry ~1e-3 absolute rounding; the float64 oracle sees exact inputs.
    # A logit error d scales the softmax weights by exp(d) ~ 1 + d, so gradients inherit a
    # relative error of ~1e-3 (seen on an H100, whose dot order differs from the CPU's: 6e-4 in dH,
    # 3e-4 in dW).
    assert_close_verbose(out, want, 2e-2, 1e-5, "logp")
    assert_close_verbose(dh, dh_want, 1e-3, 2e-3, "dH")
    assert_close_verbose(dw, dw_want, 1e-2, 2e-3, "dW")


def test_gradient_for_hidden_only_and_for_weight_only():
    h, w, t = make_inputs(21, 24, 150, torch.float32, seed=4)
    upstream = torch.randn(21, dtype=torch.float64, device=DEVICE)
    _, dh_want, dw_want = run(lambda a, b: oracle_logprobs(a, b, t), h, w, upstream,
                              cast=torch.float64)
    hh = h.clone().requires_grad_(True)                 # frozen LM head
    (LinearLogprobFunction.apply(hh, w, t, None, None, 1.0, IGNORE) * upstream.float()).sum() \
        .backward()
    assert_close_verbose(hh.grad, dh_want, 1e-5, 1e-4, "dH")
    ww = w.clone().requires_grad_(True)                 # frozen body
    (LinearLogprobFunction.apply(h, ww, t, None, None, 1.0, IGNORE) * upstream.float()).sum() \
        .backward()
    assert_close_verbose(ww.grad, dw_want, 1e-5, 1e-4, "dW")


def test_host_functions_return_lse_and_handle_no_tokens():
    h, w, t = make_inputs(19, 24, 130, torch.float32, seed=5)
    logp, lse, seg_out = linear_logprob_forward(h, w, t, temperature=2.0)
    assert seg_out is None
    assert_close_verbose(lse, torch.logsumexp(h.double() @ w.double().T / 2.0, -1), 1e-5, 1e-6,
                         "lse")
    assert_close_verbose(logp, oracle_logprobs(h, w, t, 2.0), 1e-5, 1e-6, "logp")

    empty = h[:0]
    logp, lse, seg_out = linear_logprob_forward(empty, w, t[:0], torch.zeros(0, dtype=torch.long,
                                                device=DEVICE), 3)
    assert logp.shape == (0,) and lse.shape == (0,) and seg_out.tolist() == [0.0, 0.0, 0.0]
    dh, dw = linear_logprob_backward(empty, w, t[:0], lse, torch.zeros(0, device=DEVICE))
    assert dh.shape == (0, 24) and dw.abs().sum().item() == 0.0


def test_all_positions_ignored_gives_zeros():
    h, w, t = make_inputs(10, 16, 70, torch.float32, seed=6)
    t[:] = IGNORE
    seg = torch.tensor([0] * 5 + [1] * 5, device=DEVICE)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = LinearLogprobFunction.apply(hh, ww, t, seg, 2, 1.0, IGNORE)
    out.sum().backward()
    assert out.tolist() == [0.0, 0.0]
    assert hh.grad.abs().sum().item() == 0.0 and ww.grad.abs().sum().item() == 0.0


# --- compiled kernels (a CUDA device) --------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 4096])
def test_gpu_values_and_gradients(dtype, chunk_size):
    """Autotuned kernels at a size with many splits / chunks; both layouts."""
    N, D, V = 2000, 1024, 32003
    h, w, t = make_inputs(N, D, V, dtype, seed=7)
    t[::97] = IGNORE
    seg = torch.sort(torch.randint(0, 67, (N,), device=DEVICE)).values
    for segmented in (False, True):
        S = 70 if segmented else None
        ids = seg if segmented else None
        upstream = torch.randn(S or N, dtype=torch.float64, device=DEVICE)

        def reduce(tok, segmented=segmented):
            return segment_sums(tok, seg, 70) if segmented else tok

        out, dh, dw = run(lambda a, b, ids=ids, S=S: LinearLogprobFunction.apply(
            a, b, t, ids, S, 0.8, IGNORE, None, chunk_size), h, w, upstream)
        want, dh_w, dw_w = run(lambda a, b: reduce(oracle_logprobs(a, b, t, 0.8)), h, w,
                               upstream, cast=torch.float64)
        ieee = _dot_flags(dtype, h.device)["PRECISION"] == "ieee"
        eager, dh_e, dw_e = run(lambda a, b: reduce(eager_logprobs(a, b, t, 0.8)), h, w,
                                upstream)
        if dtype == torch.float32 and ieee:         # fp32 dots unless torch allows TF32
            assert_close_verbose(out, want, 1e-3, 1e-5, "logp")
            assert_close_verbose(dh, dh_w, 1e-5, 1e-4, "dH")
            # A dW entry sums ~N terms u*(1[t=v] - p)*h that cancel: where one p ~ 1 dominates
            # (logits here reach ~22), fp32 logit rounding (~1e-5 over D=1024) leaves ~1e-4 in an
            # entry of ~0.07, for eager fp32 as much as for the kernel. So: absolute 2e-4, and
            # within 2x eager fp32's own error.
            assert_close_verbose(dw, dw_w, 2e-4, 1e-4, "dW")
            assert_within_eager_error(dw, dw_e, dw_w, "dW")
        else:
            assert_within_eager_error(out, eager, want, "logp")
            assert_within_eager_error(dh, dh_e, dh_w, "dH")
            assert_within_eager_error(dw, dw_e, dw_w, "dW")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_never_allocates_logits():
    from vrpo_fast.kernels.linear_logprob import DZ_CHUNK_BYTES

    N, D, V = 4096, 1024, 65536
    h, w, t = make_inputs(N, D, V, torch.bfloat16, seed=8)
    upstream = torch.randn(N, device=DEVICE)
    grads, peaks = [], []
    for _ in range(3):          # the first call autotunes (its benchmarks allocate)
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (LinearLogprobFunction.apply(hh, ww, t, None, None, 1.0, IGNORE) * upstream).sum() \
            .backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append((hh.grad, ww.grad))
    # The gradients themselves, one dz chunk, the fp32 dH running sum, and small vectors.
    bound = 2 * (N * D + V * D) + DZ_CHUNK_BYTES + 4 * N * D + 16 * 2**20
    assert peaks[-1] <= bound < N * V * 2, f"peak {peaks[-1] / 2**20:.0f} MiB"
    assert torch.equal(grads[1][0], grads[2][0]) and torch.equal(grads[1][1], grads[2][1])
