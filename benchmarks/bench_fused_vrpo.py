"""LM head + VRPO loss, forward + backward, from the packed response hidden states (N, D), the
LM-head weight (V, D), targets, segment ids, cached reference log-probs and g, per provider:

  eager     full (N, V) logits (fp32 in bf16 runs), log_softmax, gather, per-response sums,
            `vrpo_fast.vrpo_loss`, autograd
  compile   torch.compile of eager (CUDA only: compiling it takes minutes on the CPU runners)
  two_pass  vrpo_fast.linear_logprobs (per-response sums) then the loss, autograd between them:
            the path FusedLinearVRPOLoss took before the one sweep (CUDA: the fused linear
            log-prob kernel + the loss kernel; CPU: their PyTorch references)
  ours      vrpo_fast.FusedLinearVRPOLoss, one sweep per chunk of whole groups (CUDA: cuBLAS +
            the Triton row passes; CPU: the same steps in PyTorch, impl="torch")

G = N / 256 groups of K = 4 responses (M = 1) of about 32-96 tokens, N tokens in all. Useful
FLOPs: 6 N D V. Peak memory against the lower bound: inputs (hidden, weight, targets, segment
ids) and the two gradients.

    python -m pytest benchmarks/bench_fused_vrpo.py -q [--smoke]
"""

import pytest
import torch
from _suite import peak_memory, timed

from vrpo_fast.bench.env import device

SHAPES = {
    "smoke": [dict(N=600, D=32, V=1000)],
    "cpu": [dict(N=1024, D=512, V=32000)],
    "gpu": [dict(N=8192, D=4096, V=128256), dict(N=16384, D=4096, V=128256),
            dict(N=8192, D=4096, V=152064)],
}
PROVIDERS = ["eager", "compile", "two_pass", "ours"]
K, BETA = 4, 0.1


def make_inputs(N, D, V, seed=0):
    """hidden (N, D) and weight (V, D) as leaves, targets and segment ids (N,) in packed order,
    ref (G, K), g (G, K / 2)."""
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    G = max(1, N // (K * 64))
    # G K responses of 32-96 tokens, rescaled to add up to N (the last one takes the rounding).
    lengths = torch.randint(32, 97, (G * K,), generator=gen).double()
    lengths = (lengths * N / lengths.sum()).long().clamp(min=1)
    lengths[-1] += N - lengths.sum()
    seg = torch.repeat_interleave(torch.arange(G * K), lengths)
    h = torch.randn(N, D, generator=gen).to(device(), dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5).to(device(), dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=gen).to(device())
    ref = (-torch.rand(G, K, generator=gen) * 50 - 100).to(device())
    g = torch.rand(G, K // 2, generator=gen).to(device())
    return dict(h=h, w=w, t=t, seg=seg.to(device()), G=G, ref=ref, g=g)


def eager(h, w, t, seg, G, ref, g):
    from vrpo_fast.objective import vrpo_loss

    logits = h @ w.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    tok = torch.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)
    logps = torch.zeros(G * K, dtype=tok.dtype, device=tok.device).index_add(0, seg, tok)
    return vrpo_loss(logps.view(G, K), ref, g, beta=BETA, check_inputs=False)[0]


_compiled = None


def provider_fn(name):
    """(h, w, t, seg, G, ref, g) -> the scalar loss; skips where the provider cannot run here."""
    global _compiled
    if name == "eager":
        return eager
    if name == "compile":
        if device() != "cuda":
            pytest.skip("compile: compiling the loss takes minutes on the CPU runners")
        _compiled = _compiled or torch.compile(eager)
        return _compiled
    from vrpo_fast.ops import FusedLinearVRPOLoss, linear_logprobs, per_prompt_vrpo_loss

    impl = "triton" if device() == "cuda" else "torch"
    if name == "two_pass":
        def two_pass(h, w, t, seg, G, ref, g):
            logps = linear_logprobs(h, w, t, segment_ids=seg, num_segments=G * K, impl=impl)
            return per_prompt_vrpo_loss(logps.view(G, K), ref, g, beta=BETA,
                                        loss_type="sigmoid", estimator="vrpo",
                                        impl=impl).mean()
        return two_pass
    ours = FusedLinearVRPOLoss(beta=BETA, impl=impl, check_inputs=False)
    return lambda h, w, t, seg, G, ref, g: ours(h, w, t, seg, G, K, ref, g)[0]


def check(fn, d, groups=2):
    """The loss and both gradients of the first `groups` groups against float64 eager maths."""
    n = int((d["seg"] < groups * K).sum())
    hs = d["h"][:n].detach().clone().requires_grad_(True)
    ws = d["w"].detach().clone().requires_grad_(True)
    args = (d["t"][:n], d["seg"][:n], groups, d["ref"][:groups], d["g"][:groups])
    fn(hs, ws, *args).backward()
    h64 = hs.detach().double().requires_grad_(True)
    w64 = ws.detach().double().requires_grad_(True)
    eager(h64, w64, *args).backward()
    tol = 1e-4 if d["h"].dtype == torch.float32 else 2e-2
    for name, got, want in (("d hidden", hs.grad, h64.grad), ("d weight", ws.grad, w64.grad)):
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:g} against float64"


def make_op(fn, d):
    def full():
        fn(d["h"], d["w"], d["t"], d["seg"], d["G"], d["ref"], d["g"]).backward()
        d["h"].grad = d["w"].grad = None
    return full


def probe(provider, N, D, V):
    """Fresh-process peak memory of one forward + backward (after a warm-up call)."""
    from _peak import measure, tensor_bytes

    d = make_inputs(N, D, V)
    op = make_op(provider_fn(provider), d)
    op()
    return measure(op, tensor_bytes(*(v for v in d.values() if torch.is_tensor(v))))


@pytest.mark.parametrize("provider", PROVIDERS)
def bench_fused_vrpo(benchmark, record, mode, provider, shape):
    fn = provider_fn(provider)
    d = make_inputs(**shape)
    check(fn, d)
    N, D, V = shape["N"], shape["D"], shape["V"]
    elem = d["h"].element_size()
    lower = 2 * (N * D + V * D) * elem + 2 * N * 8              # h, w, their grads, t, seg
    benchmark.group = f"fused_vrpo {shape}"
    try:
        seconds = timed(benchmark, make_op(fn, d), rounds=1 if mode == "smoke" else 3,
                        warmup=0 if mode == "smoke" else 1)
    except torch.cuda.OutOfMemoryError:
        record("fused_vrpo", provider, shape, None, direction="full", dtype=str(d["h"].dtype),
               error="out of memory")
        pytest.skip("out of memory")
    mem = {} if mode == "smoke" else peak_memory("bench_fused_vrpo:probe", provider=provider,
                                                 **shape)
    median = sorted(seconds)[len(seconds) // 2]
    record("fused_vrpo", provider, shape, seconds, direction="full", dtype=str(d["h"].dtype),
           groups=d["G"], tflops=6 * N * D * V / median / 1e12, lower_bound_bytes=lower, **mem)
