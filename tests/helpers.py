"""What several test files share: the independent float64 references (full-logit log-probs,
the per-pair VRPO formula, one unpadded forward per sequence), random prompt groups, a verbose
elementwise assert and the tiny model shapes. Test files import this module and never each
other. The float64 full-logit oracle and the eager LM head are the package's benchmark
references (vrpo_fast.bench.references), which every benchmark provider is checked against:
tests and benchmarks share one definition. Nothing else here calls the code under test, except
to build tiny models."""

from __future__ import annotations

from pathlib import Path

import torch

from vrpo_fast.bench.references import eager_linear_logprobs as eager_logprobs
from vrpo_fast.bench.references import oracle_linear_logprobs as oracle_logprobs

__all__ = ["eager_logprobs", "oracle_logprobs"]   # re-exported for the test files

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100

# The tiny model the stage tests build: `model.tiny` as keyword arguments and as a YAML override.
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
TINY_YAML = ("{hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
             "intermediate_size: 64}")


# -- asserts ---------------------------------------------------------------------------------

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


# -- inputs ----------------------------------------------------------------------------------

def random_groups(G, K, rng, vocab=259, prompt=(1, 12), resp=(1, 7)):
    """G prompts of K responses each, token ids in [3, vocab) (no special tokens); lengths
    uniform in the inclusive ranges `prompt` and `resp`. rng: a random.Random."""
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))] for _ in range(G)]
    responses = [[[rng.randrange(3, vocab) for _ in range(rng.randint(*resp))] for _ in range(K)]
                 for _ in range(G)]
    return prompts, responses


def make_inputs(N, D, V, dtype, hidden_scale=1.0, seed=0):
    """LM-head inputs on DEVICE: hidden (N, D), weight (V, D) with logits of a few units,
    targets (N,)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen) * hidden_scale
    w = torch.randn(V, D, generator=gen) * (4 / D**0.5)
    t = torch.randint(0, V, (N,), generator=gen)
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype), t.to(DEVICE)


# -- float64 references ----------------------------------------------------------------------

def segment_sums(tok, seg, num_segments):
    return torch.zeros(num_segments, dtype=tok.dtype, device=tok.device).index_add(0, seg, tok)


def float64_logps(model64, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt): one unpadded forward of a float64 model, full logits."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model64(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt) - 1:].sum().item()


def float64_reward(rm64, prompt: list[int], response: list[int]) -> float:
    """A float64 sequence classifier's score of prompt + response (one unpadded forward)."""
    with torch.no_grad():
        return rm64(input_ids=torch.tensor([list(prompt) + list(response)])).logits[0, 0].item()


def pair_loss(u, loss_type, beta):
    """l(u) in float64, from the definitions (torch's relu: relu'(0) = 0)."""
    relu = torch.relu
    if loss_type == "sigmoid":
        return -torch.nn.functional.logsigmoid(u)
    if loss_type == "ramp":
        return relu(1 - u) - relu(-0.5 - u)
    if loss_type == "ipo":
        return (u / beta - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return relu(1 - u)
    raise AssertionError(loss_type)


def vrpo_formula(policy, ref, g, beta, loss_type, estimator):
    """Per-prompt VRPO loss (B,), one prompt and one pair at a time, in the inputs' dtype
    (float64 tensors for a reference): policy, ref (B, 2 + 2M) (ref None: reference-free),
    g (B, 1 + M). Column 2p is pair p's first response, 2p + 1 its second; pair 0 is (chosen,
    rejected)."""
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


def assert_within_eager_error(got, eager, want, name, factor=2.0):
    """Low-precision rule (flash-attention's): the kernel's max error against the float64
    oracle is at most `factor` x that of eager PyTorch in the same dtype."""
    err = (got.double() - want).abs().max().item()
    err_eager = (eager.double() - want).abs().max().item()
    assert err <= factor * err_eager, (
        f"{name}: kernel max error {err:.3g} > {factor} x eager max error {err_eager:.3g}")


# -- training fixtures -----------------------------------------------------------------------

def mixed_data(tmp_path) -> Path:
    """configs/data/tiny.jsonl with every third row unlabelled (no chosen / rejected; g keeps
    its 0.5 placeholder there), written to tmp_path / "mixed.jsonl"."""
    import json

    rows = [json.loads(line) for line in (ROOT / "configs/data/tiny.jsonl").open()]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            del row["chosen"], row["rejected"]
            row["aux_prefs"][0] = 0.5
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def capture_g(monkeypatch, *, weights: bool = False) -> list[dict]:
    """Records, for every micro-batch of a Trainer, the step, the groups and the g the loss
    receives (and with `weights` the policy's full weights at the start of the micro-batch), on
    either LM-head path: the one sweep's loss (passes.linear_vrpo_loss, g its 8th argument) or
    the two-pass loss (dispatch_vrpo_loss). Returns the list the records land in."""
    import vrpo_fast.passes as passes
    import vrpo_fast.train.loop as loop
    from vrpo_fast.train import checkpoint as ckpt

    seen = []
    real_loss, real_micro = loop.dispatch_vrpo_loss, loop.Trainer.micro_step
    real_sweep = passes.linear_vrpo_loss

    def micro_step(self, groups):
        entry = {"step": self.step, "groups": groups}
        if weights:
            entry["weights"] = {k.removeprefix("lm."): v.clone()
                                for k, v in ckpt.full_model_state_dict(self.policy).items()}
        seen.append(entry)
        return real_micro(self, groups)

    def dispatch_vrpo_loss(policy_logps, ref_logps, g, **kw):
        seen[-1]["g"] = g.detach().double().cpu().clone()
        return real_loss(policy_logps, ref_logps, g, **kw)

    def linear_vrpo_loss(*args, **kw):
        seen[-1]["g"] = args[7].detach().double().cpu().clone()
        return real_sweep(*args, **kw)

    monkeypatch.setattr(loop.Trainer, "micro_step", micro_step)
    monkeypatch.setattr(loop, "dispatch_vrpo_loss", dispatch_vrpo_loss)
    monkeypatch.setattr(passes, "linear_vrpo_loss", linear_vrpo_loss)
    return seen
