"""The fused loss embedded without packing: padded batches against the naive full-logits
computation in float64, and the Liger-shaped drop-in against Liger-Kernel's own module."""

import pytest
import torch

from vrpo_fast import vrpo_loss
from vrpo_fast.integrations.padded import padded_response_tokens
from vrpo_fast.ops import FusedLinearVRPOLoss


def _padded_batch(B, T, D, V, *, prompt_lens, resp_lens, dtype=torch.float64):
    """Right-padded rows: prompt, response, pads; labels hold response ids only."""
    hidden = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    labels = torch.full((B, T), -100)
    for b in range(B):
        p, r = prompt_lens[b], resp_lens[b]
        labels[b, p:p + r] = ids[b, p:p + r]
    return hidden, labels


def _naive_row_logps(hidden, weight, labels, shifted):
    """Full (B, T, V) logits, log_softmax, gather, masked sum per row."""
    if not shifted:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    keep = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(keep, tok, 0).sum(1)


@pytest.mark.parametrize("layout", ["grouped", "stacked"])
@pytest.mark.parametrize("shifted", [False, True])
def test_padded_batch_matches_full_logits_in_float64(layout, shifted):
    G, K, T, D, V = 3, 4, 12, 8, 50                    # K = 2 + 2M with M = 1
    B = G * K
    hidden, labels = _padded_batch(B, T, D, V, prompt_lens=[1 + b % 5 for b in range(B)],
                                   resp_lens=[1 + (3 * b) % 6 for b in range(B)])
    weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(G, K, dtype=torch.float64)
    aux = torch.rand(G, K // 2, dtype=torch.float64)
    loss_fn = FusedLinearVRPOLoss(beta=0.5, estimator="vrpo", impl="torch")

    h, t, s = padded_response_tokens(hidden, labels, group_size=K, layout=layout,
                                     shifted=shifted)
    loss, _ = loss_fn(h, weight, t, s, G, K, ref, aux)
    grads = torch.autograd.grad(loss, (hidden, weight))

    rows = _naive_row_logps(hidden, weight, labels, shifted)                 # (B,)
    order = torch.arange(B) if layout == "grouped" else \
        torch.arange(B).view(K, G).T.reshape(-1)        # row of response k of group g
    want, _ = vrpo_loss(rows[order].view(G, K), ref, aux, beta=0.5, estimator="vrpo")
    want_grads = torch.autograd.grad(want, (hidden, weight))
    # The fused operation computes in float32 (fp32 GEMMs, float32 sums: its documented
    # output); the reference stays float64 throughout. Over 240 seeded cases its loss was within
    # 1.8e-6 of the reference (a bound of 1e-7 held on one CPU's reduction order, not another's).
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)


def test_padded_rejects_a_batch_the_group_size_does_not_divide():
    with pytest.raises(ValueError, match="group_size"):
        padded_response_tokens(torch.zeros(3, 4, 2), torch.zeros(3, 4, dtype=torch.long),
                               group_size=2)


def test_liger_drop_in_matches_liger_kernels_module_on_the_cpu():
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    from vrpo_fast.integrations.liger import LigerFusedLinearDPOLoss

    B, T, D, V = 3, 10, 16, 40
    hidden, target = _padded_batch(2 * B, T, D, V, dtype=torch.float32,
                                   prompt_lens=[2, 0, 3, 1, 4, 2], resp_lens=[5, 7, 3, 8, 2, 6])
    weight = torch.randn(V, D, requires_grad=True)
    ref_hidden, ref_weight = torch.randn(2 * B, T, D), torch.randn(V, D)
    outs = []
    for cls in (chunked.LigerFusedLinearDPOLoss, LigerFusedLinearDPOLoss):
        for loss_type in ("sigmoid", "hinge"):
            kw = dict(compiled=False) if cls is chunked.LigerFusedLinearDPOLoss else {}
            loss, aux = cls(beta=0.2, loss_type=loss_type, **kw)(
                weight, hidden, target, ref_input=ref_hidden, ref_weight=ref_weight)
            outs.append((loss, aux, torch.autograd.grad(loss, (hidden, weight))))
    for (l1, a1, g1), (l2, a2, g2) in zip(outs[:2], outs[2:]):
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        assert len(a2) == len(a1)
        for x, y in zip(a2, a1):
            torch.testing.assert_close(torch.as_tensor(x).float(), torch.as_tensor(y).float(),
                                       rtol=1e-4, atol=1e-5)
        for x, y in zip(g2, g1):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_liger_drop_in_refuses_the_settings_it_cannot_honour():
    from vrpo_fast.integrations.liger import LigerFusedLinearDPOLoss

    for kw, name in ((dict(compute_nll_loss=True), "compute_nll_loss"),
                     (dict(average_log_prob=True), "average_log_prob"),
                     (dict(loss_type="apo_zero"), "loss_type")):
        with pytest.raises(ValueError, match=name):
            LigerFusedLinearDPOLoss(**kw)
