"""The LM head + VRPO loss from the packed response hidden states, forward and backward in one
call (`full`), per provider:

  eager     full (N, V) logits (upcast to fp32 in bf16 runs), log_softmax, gather, per-response
            sums, `vrpo_fast.vrpo_loss`, autograd
  compile   torch.compile of eager
  liger     Liger-Kernel's fused linear cross entropy as the LM head (reduction="none": -log p
            per token), then the per-response sums and the loss, autograd (Triton: CUDA only)
  cce       the same with Cut Cross-Entropy's linear_cross_entropy (Triton: CUDA only)
  two_pass  vrpo_fast.linear_logprobs (per-response sums) then the loss: the trainer's
            train.lm_head = two_pass (CUDA: the fused log-prob kernel + the loss kernel; CPU:
            their PyTorch references)
  ours      vrpo_fast.FusedLinearVRPOLoss, the one sweep per chunk of whole groups, the
            trainer's default head (CUDA: cuBLAS + the Triton row passes; CPU: the same steps in
            PyTorch)

G = N / (64 K) groups of K = 2 + 2M responses of about 32-96 tokens (rescaled to add up to N),
in packed order. Checked before timing: the loss and both gradients on the first two groups
against float64 eager maths. Useful FLOPs: 6 N D V. Peak memory against the lower bound: the
inputs (hidden, weight, targets, segment ids) and the two gradients, nothing of size N x V.
`benchmarks/bench_fused_vrpo.py` is the suite's version of this benchmark (M = 1).
"""

from __future__ import annotations

import torch

from vrpo_fast.bench.env import device
from vrpo_fast.bench.linear_logprob import DTYPES, TOLERANCE, fused_cross_entropy
from vrpo_fast.bench.memory import measure, tensor_bytes
from vrpo_fast.bench.references import rel_err
from vrpo_fast.objective import vrpo_loss
from vrpo_fast.ops import FusedLinearVRPOLoss, linear_logprobs, per_prompt_vrpo_loss

PROVIDERS = ("eager", "compile", "liger", "cce", "two_pass", "ours")
DIRECTIONS = ("full",)
BETA = 0.1


def make_inputs(N: int, D: int, V: int, dtype: str, M: int = 2, seed: int = 0) -> dict:
    """hidden (N, D) and weight (V, D) as leaves, targets and segment ids (N,) in packed order,
    ref (G, K) and g (G, K / 2), with K = 2 + 2M and G = max(1, N // (64 K))."""
    K = 2 + 2 * M
    gen = torch.Generator().manual_seed(seed)
    G = max(1, N // (K * 64))
    lengths = torch.randint(32, 97, (G * K,), generator=gen).double()
    lengths = (lengths * N / lengths.sum()).long().clamp(min=1)
    lengths[-1] += N - lengths.sum()       # the last response takes the rounding
    seg = torch.repeat_interleave(torch.arange(G * K), lengths)
    h = torch.randn(N, D, generator=gen).to(device(), DTYPES[dtype]).requires_grad_(True)
    w = (torch.randn(V, D, generator=gen) / D ** 0.5).to(device(), DTYPES[dtype])
    t = torch.randint(0, V, (N,), generator=gen).to(device())
    ref = (-torch.rand(G, K, generator=gen) * 50 - 100).to(device())
    g = torch.rand(G, K // 2, generator=gen).to(device())
    return dict(h=h, w=w.requires_grad_(True), t=t, seg=seg.to(device()), G=G, K=K, ref=ref, g=g)


def _loss(token_logps, seg, G, K, ref, g):
    logps = torch.zeros(G * K, dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, seg, token_logps)
    return vrpo_loss(logps.view(G, K), ref, g, beta=BETA, check_inputs=False)[0]


def eager(h, w, t, seg, G, K, ref, g):
    logits = h @ w.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    tok = torch.log_softmax(logits, -1).gather(1, t[:, None]).squeeze(1)
    return _loss(tok, seg, G, K, ref, g)


_compiled = None


def provider_fn(name: str):
    """(h, w, t, seg, G, K, ref, g) -> the scalar loss (the mean over the G groups); raises
    Unavailable where the provider cannot run here."""
    global _compiled
    if name == "eager":
        return eager
    if name == "compile":
        _compiled = _compiled or torch.compile(eager)     # once per process, as a trainer would
        return _compiled
    if name in ("liger", "cce"):
        fused = fused_cross_entropy(name)

        def head(h, w, t, seg, G, K, ref, g):
            return _loss(-fused(h, w, t, reduction="none").float(), seg, G, K, ref, g)
        return head
    impl = "triton" if device() == "cuda" else "torch"
    if name == "two_pass":
        def two_pass(h, w, t, seg, G, K, ref, g):
            logps = linear_logprobs(h, w, t, segment_ids=seg, num_segments=G * K, impl=impl)
            return per_prompt_vrpo_loss(logps.view(G, K), ref, g, beta=BETA,
                                        loss_type="sigmoid", estimator="vrpo",
                                        impl=impl).mean()
        return two_pass
    if name == "ours":
        ours = FusedLinearVRPOLoss(beta=BETA, impl=impl, check_inputs=False)
        return lambda h, w, t, seg, G, K, ref, g: ours(h, w, t, seg, G, K, ref, g)[0]
    raise ValueError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")


def _args(d: dict, n: int | None = None, groups: int | None = None) -> tuple:
    n = d["h"].shape[0] if n is None else n
    groups = d["G"] if groups is None else groups
    return (d["t"][:n], d["seg"][:n], groups, d["K"], d["ref"][:groups], d["g"][:groups])


def check(fn, d: dict, dtype: str, groups: int = 2) -> dict:
    """The loss and both gradients on the first `groups` groups against eager maths in float64:
    {"reference", "rel_err": {"loss", "d hidden", "d weight"}, "tol", "ok"}."""
    groups = min(groups, d["G"])
    n = int((d["seg"] < groups * d["K"]).sum())
    hs = d["h"][:n].detach().clone().requires_grad_(True)
    ws = d["w"].detach().clone().requires_grad_(True)
    loss = fn(hs, ws, *_args(d, n, groups))
    loss.backward()
    h64 = hs.detach().double().requires_grad_(True)
    w64 = ws.detach().double().requires_grad_(True)
    want = eager(h64, w64, *_args(d, n, groups))
    want.backward()
    errs = {"loss": rel_err(loss, want), "d hidden": rel_err(hs.grad, h64.grad),
            "d weight": rel_err(ws.grad, w64.grad)}
    tol = TOLERANCE[dtype]
    return dict(reference="float64 full logits + the VRPO formula", groups=groups,
                rel_err=errs, tol=tol, ok=all(e <= tol for e in errs.values()))


def make_op(fn, d: dict, direction: str = "full"):
    """-> (op, None): one forward + backward, the gradients dropped after it."""
    if direction != "full":
        raise ValueError(f"fused_vrpo: only the full pass (forward + backward), not "
                         f"{direction!r}")

    def full():
        fn(d["h"], d["w"], *_args(d)).backward()
        d["h"].grad = d["w"].grad = None
    return full, None


def lower_bound_bytes(N: int, D: int, V: int, dtype: str) -> int:
    """h, w, their gradients, int64 targets and segment ids: nothing of size N x V."""
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    return 2 * (N * D + V * D) * elem + 2 * N * 8


def tflops(N: int, D: int, V: int, median_s: float) -> float:
    return 6 * N * D * V / median_s / 1e12


def probe(provider: str, direction: str, N: int, D: int, V: int, dtype: str, M: int) -> dict:
    """Peak memory of one forward + backward after a warm-up call (which compiles)."""
    d = make_inputs(N, D, V, dtype, M)
    op, _ = make_op(provider_fn(provider), d, direction)
    op()
    return measure(op, tensor_bytes(*(v for v in d.values() if torch.is_tensor(v))))
