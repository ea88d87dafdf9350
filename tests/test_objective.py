"""The VRPO objective against an independent float64 implementation, and its statistical
guarantees (unbiasedness for any g, variance reduction with g = truth) on an exact tabular problem.
"""

import math

import pytest
import torch
from helpers import pair_loss, vrpo_formula

from vrpo_fast import vrpo_loss, vrpo_reward_loss

LOSS_TYPES = ["sigmoid", "ramp", "ipo", "hinge"]


# ---------------------------------------------------------------------------------------------
# An independent float64 reference (tests/helpers.py): one prompt and one pair at a time, the
# gradient by central differences.
# ---------------------------------------------------------------------------------------------

def ref_prompt_loss(pol, ref, g, beta, loss_type, estimator):
    """L for one prompt from python floats: pol, ref (2 + 2M,), g (1 + M,)."""
    row = lambda x: torch.tensor([x], dtype=torch.float64)
    return vrpo_formula(row(pol), row(ref), row(g), beta, loss_type, estimator)[0].item()


def ref_l(u: float, loss_type: str, beta: float) -> float:
    return pair_loss(torch.tensor(u, dtype=torch.float64), loss_type, beta).item()


def ref_loss_and_grad(pol, ref, g, beta, loss_type, estimator, h=1e-6):
    """Mean loss and its gradient by central differences, in float64."""
    B, K = len(pol), len(pol[0])
    loss = sum(ref_prompt_loss(pol[i], ref[i], g[i], beta, loss_type, estimator)
               for i in range(B)) / B
    grad = [[0.0] * K for _ in range(B)]
    for i in range(B):
        for j in range(K):
            up, dn = list(pol[i]), list(pol[i])
            up[j] += h
            dn[j] -= h
            fp = ref_prompt_loss(up, ref[i], g[i], beta, loss_type, estimator)
            fm = ref_prompt_loss(dn, ref[i], g[i], beta, loss_type, estimator)
            grad[i][j] = (fp - fm) / (2 * h) / B
    return loss, grad


def random_inputs(B, M, dtype=torch.float64, scale=3.0):
    pol = -20 + scale * torch.randn(B, 2 + 2 * M, dtype=dtype)
    ref = -20 + scale * torch.randn(B, 2 + 2 * M, dtype=dtype)
    g = torch.rand(B, 1 + M, dtype=dtype)
    return pol, ref, g


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("estimator", ["vrpo", "dpo"])
@pytest.mark.parametrize("M", [0, 1, 3])
def test_matches_float64_reference(loss_type, estimator, M):
    beta = 0.7
    pol, ref, g = random_inputs(6, M)
    pol.requires_grad_(True)
    loss, stats = vrpo_loss(pol, ref, g, beta=beta, loss_type=loss_type, estimator=estimator)
    loss.backward()
    exp_loss, exp_grad = ref_loss_and_grad(pol.tolist(), ref.tolist(), g.tolist(), beta,
                                           loss_type, estimator)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(pol.grad, torch.tensor(exp_grad, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    # The three terms recombine into the loss, and the rewards are beta * (pi - ref).
    if estimator == "vrpo" and M > 0:
        recombined = stats["term_dpo"] - stats["term_label"] + stats["term_mc"]
        assert recombined.item() == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)
    r = beta * (pol.detach() - ref)
    assert stats["reward_chosen"].item() == pytest.approx(r[:, 0].mean().item())
    assert stats["accuracy"].item() == pytest.approx((r[:, 0] > r[:, 1]).double().mean().item())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ramp", "hinge"])
@pytest.mark.parametrize("M", [0, 2])
def test_reward_loss_matches_reference(loss_type, M):
    rewards, _, g = random_inputs(5, M)
    rewards.requires_grad_(True)
    loss, _ = vrpo_reward_loss(rewards, g, loss_type=loss_type)
    loss.backward()
    zeros = [[0.0] * rewards.shape[1] for _ in range(5)]
    exp_loss, exp_grad = ref_loss_and_grad(rewards.tolist(), zeros, g.tolist(), 1.0,
                                           loss_type, "vrpo")
    assert loss.item() == pytest.approx(exp_loss, rel=1e-10)
    torch.testing.assert_close(rewards.grad, torch.tensor(exp_grad, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    pol, ref, g = random_inputs(3, 2)
    pol.requires_grad_(True)

    def f(p):
        return vrpo_loss(p, ref, g, beta=0.5, loss_type=loss_type)[0]

    # Random inputs sit away from the kinks of ramp / hinge with probability one.
    assert torch.autograd.gradcheck(f, (pol,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    pol, ref, g = random_inputs(8, 2)
    exp, _ = vrpo_loss(pol, ref, g, beta=0.1)
    p = pol.to(dtype).requires_grad_(True)
    got, stats = vrpo_loss(p, ref.to(dtype), g.to(dtype), beta=0.1)
    got.backward()
    assert got.dtype == dtype and p.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert got.double().item() == pytest.approx(exp.item(), rel=tol, abs=tol)


def test_m0_is_dpo_and_estimators_agree():
    pol, ref, g = random_inputs(7, 0)
    a, _ = vrpo_loss(pol, ref, g, estimator="vrpo")
    b, _ = vrpo_loss(pol, ref, g, estimator="dpo")
    u = 0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    dpo = -torch.nn.functional.logsigmoid(u).mean()
    assert a.item() == b.item() == pytest.approx(dpo.item(), rel=1e-12)


def test_dpo_estimator_ignores_mc_columns():
    pol, ref, g = random_inputs(4, 3)
    a, _ = vrpo_loss(pol, ref, g, estimator="dpo")
    b, _ = vrpo_loss(pol[:, :2], ref[:, :2], g[:, :1], estimator="dpo")
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_half_g_sigmoid_is_finite_with_implied_gradient():
    # With g = 1/2 and the sigmoid loss: l(u) - [l(u) + l(-u)]/2 = (l(u) - l(-u))/2 = -u/2,
    # so the labelled part has gradient -beta/2 on chosen and +beta/2 on rejected, and each MC
    # pair contributes (l(u) + l(-u)) / (2M), whose derivative is (sigmoid(u) - 1/2) beta / M.
    beta, M = 0.3, 2
    pol, ref, _ = random_inputs(1, M)
    g = torch.full((1, 1 + M), 0.5, dtype=torch.float64)
    pol.requires_grad_(True)
    loss, _ = vrpo_loss(pol, ref, g, beta=beta)
    loss.backward()
    assert torch.isfinite(loss)
    assert pol.grad[0, 0].item() == pytest.approx(-beta / 2, rel=1e-9)
    assert pol.grad[0, 1].item() == pytest.approx(beta / 2, rel=1e-9)
    r = beta * (pol.detach() - ref)[0]
    for m in range(1, M + 1):
        um = (r[2 * m] - r[2 * m + 1]).item()
        dm = (1 / (1 + math.exp(-um)) - 0.5) * beta / M
        assert pol.grad[0, 2 * m].item() == pytest.approx(dm, rel=1e-9, abs=1e-12)
        assert pol.grad[0, 2 * m + 1].item() == pytest.approx(-dm, rel=1e-9, abs=1e-12)


def test_reference_free_equals_zero_reference():
    pol, _, g = random_inputs(3, 1)
    a, _ = vrpo_loss(pol, None, g)
    b, _ = vrpo_loss(pol, torch.zeros_like(pol), g)
    assert a.item() == b.item()


def test_reductions():
    pol, ref, g = random_inputs(5, 1)
    per, _ = vrpo_loss(pol, ref, g, reduction="none")
    mean, _ = vrpo_loss(pol, ref, g)
    total, _ = vrpo_loss(pol, ref, g, reduction="sum")
    assert per.shape == (5,)
    exp = [ref_prompt_loss(pol[i].tolist(), ref[i].tolist(), g[i].tolist(), 0.1, "sigmoid", "vrpo")
           for i in range(5)]
    torch.testing.assert_close(per, torch.tensor(exp, dtype=torch.float64))
    assert mean.item() == pytest.approx(sum(exp) / 5) and total.item() == pytest.approx(sum(exp))


def test_unlabelled_prompts_contribute_mc_term_only():
    beta, M = 0.2, 2
    pol, ref, g = random_inputs(6, M)
    labelled = torch.tensor([True, False, True, True, False, False])
    loss, stats = vrpo_loss(pol, ref, g, beta=beta, labelled=labelled)
    lab_terms, mc_terms = [], []
    for i in range(6):
        full = ref_prompt_loss(pol[i].tolist(), ref[i].tolist(), g[i].tolist(), beta, "sigmoid",
                               "vrpo")
        # The MC term alone: a prompt with zero labelled margin weight.
        r = (beta * (pol[i] - ref[i])).tolist()
        mc = sum(g[i, m].item() * ref_l(r[2 * m] - r[2 * m + 1], "sigmoid", beta)
                 + (1 - g[i, m].item()) * ref_l(r[2 * m + 1] - r[2 * m], "sigmoid", beta)
                 for m in range(1, M + 1)) / M
        mc_terms.append(mc)
        if labelled[i]:
            lab_terms.append(full - mc)
    exp = sum(lab_terms) / len(lab_terms) + sum(mc_terms) / 6
    assert loss.item() == pytest.approx(exp, rel=1e-10)
    # Corrupting the ignored chosen/rejected columns of unlabelled rows changes nothing.
    pol2 = pol.clone()
    pol2[~labelled, :2] = 123.0
    loss2, _ = vrpo_loss(pol2, ref, g, beta=beta, labelled=labelled)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)

    # Split into parts (gradient accumulation, ranks) with the whole batch's label_scale, the
    # parts' per-prompt sums add up to the whole batch's loss; with each part's own scale
    # (the default) they do not.
    scale = 6 / int(labelled.sum())
    parts = [slice(0, 2), slice(2, 4), slice(4, 6)]
    split = sum(vrpo_loss(pol[p], ref[p], g[p], beta=beta, labelled=labelled[p],
                          label_scale=scale, reduction="sum")[0].item() for p in parts) / 6
    assert split == pytest.approx(exp, rel=1e-10)
    own = sum(vrpo_loss(pol[p], ref[p], g[p], beta=beta, labelled=labelled[p],
                        reduction="sum")[0].item() for p in parts) / 6
    assert abs(own - exp) > 1e-3


def test_dro_limits():
    pol, ref, g = random_inputs(8, 1)
    per, _ = vrpo_loss(pol, ref, g, reduction="none")
    plain, _ = vrpo_loss(pol, ref, g)
    wide, st_wide = vrpo_loss(pol, ref, g, dro_tau=1e8)
    assert wide.item() == pytest.approx(plain.item(), rel=1e-6)
    assert st_wide["dro_ess"].item() == pytest.approx(8.0, rel=1e-6)
    narrow, st_narrow = vrpo_loss(pol, ref, g, dro_tau=1e-4)
    assert narrow.item() == pytest.approx(per.max().item(), rel=1e-6)
    assert st_narrow["dro_ess"].item() == pytest.approx(1.0, abs=1e-3)
    # In between, weights follow exp(L / tau) and are not differentiated.
    tau = 0.5
    p = pol.clone().requires_grad_(True)
    mid, _ = vrpo_loss(p, ref, g, dro_tau=tau)
    w = torch.softmax(per / tau, 0)
    assert mid.item() == pytest.approx((w * per).sum().item(), rel=1e-10)
    mid.backward()
    p2 = pol.clone().requires_grad_(True)
    per2, _ = vrpo_loss(p2, ref, g, reduction="none")
    (w * per2).sum().backward()
    torch.testing.assert_close(p.grad, p2.grad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy_logps=torch.zeros(3, 3)), r"policy_logps.*\(3, 3\)"),
        (dict(ref_logps=torch.zeros(3, 5)), r"ref_logps.*\(3, 5\).*\(3, 4\)"),
        (dict(aux_prefs=torch.zeros(3, 1)), r"aux_prefs.*\(3, 2\).*\(3, 1\)"),
        (dict(aux_prefs=torch.full((3, 2), 1.5)), r"aux_prefs.*\[0, 1\]"),
        (dict(aux_prefs=torch.full((3, 2), float("nan"))), r"aux_prefs"),
        (dict(policy_logps=torch.full((3, 4), float("inf"))), r"policy_logps.*non-finite"),
        (dict(loss_type="logistic"), r"loss_type.*logistic"),
        (dict(estimator="ipw"), r"estimator.*ipw"),
        (dict(beta=0.0), r"beta"),
        (dict(dro_tau=-1.0), r"dro_tau"),
        (dict(policy_logps=torch.zeros(3, 4, dtype=torch.long)), r"policy_logps.*floating"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(policy_logps=torch.zeros(3, 4), ref_logps=torch.zeros(3, 4),
                aux_prefs=torch.full((3, 2), 0.5))
    args.update(kwargs)
    pol, ref, g = args.pop("policy_logps"), args.pop("ref_logps"), args.pop("aux_prefs")
    with pytest.raises(ValueError, match=match):
        vrpo_loss(pol, ref, g, **args)


def test_reward_loss_rejects_ipo():
    with pytest.raises(ValueError, match="ipo"):
        vrpo_reward_loss(torch.zeros(2, 2), torch.full((2, 1), 0.5), loss_type="ipo")


# ---------------------------------------------------------------------------------------------
# Statistical properties on a tabular problem, exact by enumeration.
#
# One prompt, Y possible responses, pi_ref = softmax(ref_logits), policy pi = softmax(theta).
# The true preference is a mixture of two Bradley-Terry annotator populations, which is not
# itself Bradley-Terry. A labelled pair is (y1, y2) ~ pi_ref x pi_ref with y1 preferred with
# probability P*(y1, y2); Monte Carlo pairs are drawn from pi_ref.
# ---------------------------------------------------------------------------------------------

Y = 5
BETA = 1.0


def _tabular(seed=1234, weight=0.6, spread=0.5):
    """Two annotator populations: the second mostly reverses the first's reward (by `spread`)."""
    gen = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(Y, generator=gen, dtype=torch.float64)
    theta = ref_logits + 0.8 * torch.randn(Y, generator=gen, dtype=torch.float64)
    r1 = 3.0 * torch.randn(Y, generator=gen, dtype=torch.float64)
    r2 = -r1 + spread * torch.randn(Y, generator=gen, dtype=torch.float64)
    p_star = weight * torch.sigmoid(r1[:, None] - r1[None, :]) + \
        (1 - weight) * torch.sigmoid(r2[:, None] - r2[None, :])
    return ref_logits, theta, p_star


def _exact_dpo_gradient(ref_logits, theta, p_star, loss_type):
    """E[grad_theta l(beta * h(chosen, rejected))], enumerated over every pair and label."""
    pi_ref = torch.softmax(ref_logits, 0)
    logp_ref = torch.log_softmax(ref_logits, 0)
    th = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(th, 0)
    r = BETA * (logp - logp_ref)
    u = r[:, None] - r[None, :]                      # u[y1, y2] = margin of y1 over y2
    if loss_type == "sigmoid":
        l_of = -torch.nn.functional.logsigmoid(u)
    else:  # ramp
        l_of = torch.clamp(1 - u, min=0) - torch.clamp(-0.5 - u, min=0)
    w = pi_ref[:, None] * pi_ref[None, :]
    # y1 beats y2 with prob P*(y1, y2): chosen = y1 then; else chosen = y2.
    expected = (w * (p_star * l_of + (1 - p_star) * l_of.T)).sum()
    (grad,) = torch.autograd.grad(expected, th)
    return grad


def _sample_batch(ref_logits, p_star, M, n, gen, g_table):
    """n i.i.d. prompts: column indices (n, 2 + 2M) of responses and g (n, 1 + M)."""
    pi_ref = torch.softmax(ref_logits, 0)
    y = torch.multinomial(pi_ref, n * (2 + 2 * M), replacement=True, generator=gen)
    y = y.view(n, 2 + 2 * M)
    first_wins = torch.rand(n, generator=gen, dtype=torch.float64) < p_star[y[:, 0], y[:, 1]]
    chosen = torch.where(first_wins, y[:, 0], y[:, 1])
    rejected = torch.where(first_wins, y[:, 1], y[:, 0])
    y = torch.cat([chosen[:, None], rejected[:, None], y[:, 2:]], dim=1)
    g = g_table[y[:, 0::2], y[:, 1::2]]
    return y, g


def _per_sample_gradients(ref_logits, theta, y, g, M, loss_type, estimator, labelled=None):
    """(n, Y) gradient of each prompt's loss w.r.t. theta, through vrpo_fast.vrpo_loss."""
    logp_ref = torch.log_softmax(ref_logits, 0)
    logp = torch.log_softmax(theta, 0)
    pol = logp[y].clone().requires_grad_(True)
    loss, _ = vrpo_loss(pol, logp_ref[y], g, beta=BETA, loss_type=loss_type,
                        estimator=estimator, labelled=labelled, reduction="sum")
    (d_pol,) = torch.autograd.grad(loss, pol)      # row i only depends on prompt i
    # d log softmax(theta)[y] / d theta = onehot(y) - pi
    pi = torch.softmax(theta, 0)
    onehot = torch.nn.functional.one_hot(y, Y).to(torch.float64)
    return (d_pol[..., None] * (onehot - pi)).sum(dim=1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ramp"])
@pytest.mark.parametrize("g_kind", ["true", "wrong"])
def test_vrpo_gradient_is_unbiased_for_any_g(loss_type, g_kind):
    ref_logits, theta, p_star = _tabular()
    if g_kind == "true":
        g_table = p_star
    else:  # a deliberately wrong, even anti-correlated, preference model
        gen = torch.Generator().manual_seed(7)
        s = 2 * torch.randn(Y, generator=gen, dtype=torch.float64)
        g_table = torch.sigmoid(s[:, None] - s[None, :])
        g_table = 0.5 * g_table + 0.5 * (1 - p_star)
    exact = _exact_dpo_gradient(ref_logits, theta, p_star, loss_type)
    gen = torch.Generator().manual_seed(99)
    n, M = 200_000, 3
    y, g = _sample_batch(ref_logits, p_star, M, n, gen, g_table)
    grads = _per_sample_gradients(ref_logits, theta, y, g, M, loss_type, "vrpo")
    mean = grads.mean(0)
    # A coordinate can have zero gradient in every sample (ramp's flat parts): se = 0 there.
    se = (grads.std(0) / math.sqrt(n)).clamp(min=1e-12)
    z = (mean - exact) / se
    # Y coordinates; |z| < 4.5 has false-alarm probability ~1e-5 per coordinate.
    assert z.abs().max().item() < 4.5, (mean, exact, z)
    # The enumeration is the right reference: plain DPO's Monte Carlo mean agrees with it.
    grads_dpo = _per_sample_gradients(ref_logits, theta, y, g, M, loss_type, "dpo")
    z_dpo = (grads_dpo.mean(0) - exact) / (grads_dpo.std(0) / math.sqrt(n)).clamp(min=1e-12)
    assert z_dpo.abs().max().item() < 4.5
    # And the test has power: the Monte Carlo term alone (g distilled on reference samples,
    # without the label correction) is unbiased only when g is the truth; with a wrong g the
    # z-test must reject it.
    unlabelled = torch.zeros(n, dtype=torch.bool)
    grads_mc = _per_sample_gradients(ref_logits, theta, y, g, M, loss_type, "vrpo", unlabelled)
    z_mc = (grads_mc.mean(0) - exact) / (grads_mc.std(0) / math.sqrt(n)).clamp(min=1e-12)
    if g_kind == "true":
        assert z_mc.abs().max().item() < 4.5
    else:
        assert z_mc.abs().max().item() > 10


def test_vrpo_reduces_gradient_variance_as_m_grows():
    ref_logits, theta, p_star = _tabular(seed=1, weight=0.8, spread=3.0)
    gen = torch.Generator().manual_seed(5)
    n = 200_000

    def total_variance(M, estimator):
        y, g = _sample_batch(ref_logits, p_star, M, n, gen, p_star)
        grads = _per_sample_gradients(ref_logits, theta, y, g, M, "sigmoid", estimator)
        return grads.var(0).sum().item()

    v_dpo = total_variance(1, "dpo")
    ratios = {M: total_variance(M, "vrpo") / v_dpo for M in (1, 4, 16)}
    # Var(vrpo) = E[Var(l | pair)] + Var(E[l | pair]) / M: one MC pair removes almost nothing,
    # several remove a clear share, and more remove more.
    assert 0.9 < ratios[1] < 1.1, ratios
    assert ratios[4] < 0.85, ratios
    assert ratios[16] < ratios[4] - 0.03, ratios


def test_implicit_and_reward_preference():
    from vrpo_fast.objective import implicit_preference, reward_preference

    pol, ref, _ = random_inputs(3, 2)
    g = implicit_preference(pol, ref, 0.5)
    for i in range(3):
        for p in range(3):
            h = (pol[i, 2 * p] - ref[i, 2 * p]) - (pol[i, 2 * p + 1] - ref[i, 2 * p + 1])
            assert g[i, p].item() == pytest.approx(1 / (1 + math.exp(-0.5 * h.item())), rel=1e-6)
    r = reward_preference(pol)
    assert r[1, 2].item() == pytest.approx(
        1 / (1 + math.exp(-(pol[1, 4] - pol[1, 5]).item())), rel=1e-6)
