"""The preference loss, two ways.

bench_vrpo_loss: the VRPO loss on (B, 2 + 2M) sequence log-probs and (B, 1 + M) g, forward and
forward + backward: the eager formula (`vrpo_fast.vrpo_loss`), torch.compile of it, and ours
(the fused Triton kernel, CUDA only). Providers, inputs and the float64 check are the
package's (vrpo_fast.bench.vrpo_loss, what `vrpo-fast bench vrpo-loss` runs).

bench_fused_linear_dpo: the 2-response case from LM-head inputs (response hidden states, LM-head
weight, targets) to the DPO loss, reference-free so that every provider does the same maths:
  eager  padded (2B, T, D) response hidden states, full logits, log_softmax, gather, mask, sum
  liger  Liger-Kernel's LigerFusedLinearDPOLoss (chunked PyTorch + torch.compile; it runs on
         the CPU too), same padded layout
  ours   vrpo_fast.FusedLinearVRPOLoss(estimator="dpo") on the packed response tokens (N, D)
Liger's API cannot take cached reference log-probs (it recomputes them from the reference
model's hidden states each step), which is why the comparison is reference-free.

    python -m pytest benchmarks/bench_vrpo_loss.py -q [--smoke]
"""

import pytest
import torch
from _suite import peak_memory, timed

from vrpo_fast.bench import vrpo_loss as vl
from vrpo_fast.bench.env import Unavailable, device
from vrpo_fast.bench.memory import measure, tensor_bytes

SHAPES = {
    "smoke": [dict(B=8, M=1)],
    "cpu": [dict(B=B, M=M) for B in (8, 64, 512) for M in (1, 2, 4)],
    "gpu": [dict(B=B, M=M) for B in (8, 64, 512) for M in (1, 2, 4)],
}
SHAPES_BENCH_FUSED_LINEAR_DPO = {
    "smoke": [dict(B=2, R=8, D=32, V=500)],
    "cpu": [dict(B=8, R=64, D=512, V=32000)],
    "gpu": [dict(B=B, R=R, D=4096, V=128256) for B, R in ((8, 512), (32, 256))],
}
BETA = vl.BETA


@pytest.mark.parametrize("direction", ["fwd", "full"])
@pytest.mark.parametrize("provider", vl.PROVIDERS)
def bench_vrpo_loss(benchmark, record, mode, provider, direction, shape):
    try:
        fn = vl.provider_fn(provider)
    except Unavailable as why:
        pytest.skip(str(why))
    pol, ref, g = vl.make_inputs(**shape)
    check = vl.check(fn, pol, ref, g)
    assert check["ok"], f"{provider}: {check}"
    op, _ = vl.make_op(fn, pol, ref, g, direction)
    benchmark.group = f"vrpo_loss {shape} {direction}"
    seconds = timed(benchmark, op, rounds=1 if mode == "smoke" else 50,
                    warmup=0 if mode == "smoke" else 5)
    record("vrpo_loss", provider, shape, seconds, direction=direction)


# --- the 2-response case from LM-head inputs -------------------------------------------------

def dpo_inputs(B, R, D, V, seed=0):
    """Padded chosen-then-rejected response hidden states x (2B, R, D) with lengths in
    [R/2, R], weight (V, D), targets (2B, R) (-100 on pads), and the packed view of the same
    tokens: hidden (N, D), targets (N,), segment ids (N,) = pair * 2 + (0 chosen, 1 rejected)."""
    dtype = torch.bfloat16 if device() == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(R // 2, R + 1, (2 * B,), generator=gen)
    keep = torch.arange(R)[None, :] < lengths[:, None]                       # (2B, R)
    x = torch.randn(2 * B, R, D, generator=gen) * keep[..., None]
    w = torch.randn(V, D, generator=gen) / D ** 0.5
    targets = torch.randint(0, V, (2 * B, R), generator=gen).masked_fill(~keep, -100)
    row = torch.arange(2 * B)[:, None].expand(2 * B, R)[keep]
    segments = (row % B) * 2 + row // B
    order = torch.argsort(segments, stable=True)     # packed order: pair by pair
    hidden, packed_targets = x[keep][order], targets[keep][order]

    def put(t, leaf=False):
        t = t.to(device(), dtype if t.is_floating_point() else t.dtype)
        return t.requires_grad_(True) if leaf else t
    return dict(x=put(x, True), w=put(w, True), targets=put(targets), keep=put(keep),
                order=put(order), hidden=put(hidden, True), packed_targets=put(packed_targets),
                segments=put(segments[order]))


def eager_dpo(x, w, targets):
    logits = x @ w.T
    if logits.dtype != torch.float64:
        logits = logits.float()
    keep = targets != -100
    tok = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    logps = (tok * keep).sum(-1)
    B = x.shape[0] // 2
    return -torch.nn.functional.logsigmoid(BETA * (logps[:B] - logps[B:])).mean()


def dpo_fn(name, smoke):
    """-> (callable on the inputs dict giving the scalar loss, leaves whose grads it fills)."""
    if name == "eager":
        return lambda d: eager_dpo(d["x"], d["w"], d["targets"]), ("x", "w")
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # torch.compile of each chunk takes ~30 s on two CPU cores: not for the smoke run.
        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=not smoke)
        return lambda d: liger(d["w"], d["x"], d["targets"])[0], ("x", "w")
    from vrpo_fast.ops import FusedLinearVRPOLoss

    ours = FusedLinearVRPOLoss(beta=BETA, estimator="dpo")

    def run(d):
        B = d["x"].shape[0] // 2
        g = torch.full((B, 1), 0.5, device=d["x"].device)      # unused by the DPO estimator
        return ours(d["hidden"], d["w"], d["packed_targets"], d["segments"], B, 2, None, g)[0]
    return run, ("hidden", "w")


def probe_dpo(provider, smoke, **shape):
    d = dpo_inputs(**shape)
    fn, leaves = dpo_fn(provider, smoke)

    def full():
        fn(d).backward()
        for k in leaves:
            d[k].grad = None
    full()
    return measure(full, tensor_bytes(*(v for v in d.values() if torch.is_tensor(v))))


@pytest.mark.parametrize("provider", ["eager", "liger", "ours"])
def bench_fused_linear_dpo(benchmark, record, mode, provider, shape):
    d = dpo_inputs(**shape)
    fn, leaves = dpo_fn(provider, mode == "smoke")
    # Correctness: the loss and the gradients of the hidden states and the weight against
    # float64 eager maths on the padded layout.
    x64 = d["x"].detach().double().requires_grad_(True)
    w64 = d["w"].detach().double().requires_grad_(True)
    want = eager_dpo(x64, w64, d["targets"])
    want.backward()
    loss = fn(d)
    loss.backward()
    dh = d[leaves[0]].grad
    want_dh = x64.grad[d["keep"]][d["order"]] if leaves[0] == "hidden" else x64.grad
    tol = 1e-4 if d["w"].dtype == torch.float32 else 2e-2
    for name, got, ref in (("loss", loss, want), ("d hidden", dh, want_dh),
                           ("d weight", d["w"].grad, w64.grad)):
        err = ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{provider} {name}: relative error {err:.2e} > {tol:g}"

    def full():
        fn(d).backward()
        for k in leaves:
            d[k].grad = None
    full()
    benchmark.group = f"fused_linear_dpo {shape}"
    seconds = timed(benchmark, full, rounds=1 if mode == "smoke" else 5, warmup=0)
    mem = {} if mode == "smoke" else peak_memory("bench_vrpo_loss:probe_dpo", provider=provider,
                                                 smoke=False, **shape)
    record("fused_linear_dpo", provider, shape, seconds, direction="full",
           tokens=int(d["keep"].sum()), padded_tokens=d["keep"].numel(), **mem)
