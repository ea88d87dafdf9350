"""The trainer's one-sweep LM head (train.lm_head, vrpo_fast.passes.SequenceVRPOLoss) against
its two-pass path (the fused log-prob head, then the reference loss formula), which the rest of
the suite checks against float64 oracles: the loss and every statistic of each step, every
parameter's gradient after the first step and the weights after three, in every setting the
one sweep takes (plain VRPO, estimator dpo, unlabelled prompts, each reference source, aux.mode
lm, LoRA, micro-batching, FSDP on one process and on two). DRO runs keep the two-pass path, and
the one sweep's labelled masks match the float64 formula on both backends."""

import json
import random
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, assert_close_verbose, mixed_data, random_groups

from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError

TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
         "intermediate_size: 64}", "--train.batch_groups=4", "--train.micro_batch_groups=2",
         "--train.mixed_precision=fp32", "--train.save_every=0"]
STEPS = 3


def cfg_for(tmp_path, *overrides, name="run"):
    return load_config(TINY, [f"--train.output_dir={tmp_path / name}", *SMALL, *overrides])


def _run(cfg, monkeypatch):
    """STEPS optimizer steps of a fresh trainer: (records, the gradients of step 1 before
    clipping, the weights after the last step, one-sweep calls)."""
    import vrpo_fast.passes as passes
    from vrpo_fast.train.loop import Trainer

    trainer = Trainer(cfg, quiet=True)
    sweeps, grads = [], {}
    real_sweep, real_clip = passes.linear_vrpo_loss, torch.nn.utils.clip_grad_norm_

    def sweep(*args, **kwargs):
        sweeps.append(1)
        return real_sweep(*args, **kwargs)

    def clip(params, *args, **kwargs):
        if not grads:
            grads.update({n: p.grad.detach().clone()
                          for n, p in trainer.policy.named_parameters() if p.grad is not None})
        return real_clip(params, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(passes, "linear_vrpo_loss", sweep)
        m.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        records = [trainer.train_step() for _ in range(STEPS)]
    weights = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer._release_lock()
    return records, grads, weights, len(sweeps), trainer.lm_head


def _assert_same_run(got, want, what, keys=None):
    """The records (every key, or `keys`), step-1 gradients and final weights of two runs."""
    g_records, g_grads, g_weights = got[:3]
    w_records, w_grads, w_weights = want[:3]
    if keys is None:
        keys = sorted(set(w_records[0]) - {"tokens_per_s", "mfu"})
        assert set(g_records[0]) - {"tokens_per_s", "mfu"} == set(keys)
        assert {"loss", "grad_norm", "margin", "term_label", "term_mc", "accuracy"} <= set(keys)
    table = lambda records: _table(records, keys)
    assert_close_verbose(table(g_records), table(w_records), 1e-6, 1e-5, f"{what}: {keys}")
    assert g_grads.keys() == w_grads.keys() and w_grads
    assert any(g.abs().max() > 0 for g in w_grads.values())
    for name, grad in w_grads.items():
        # float32 sums in two orders: tolerance relative to the tensor's own scale.
        scale = grad.abs().max().item()
        assert_close_verbose(g_grads[name], grad, 1e-5 * scale + 1e-9, 1e-4,
                             f"{what}: step-1 gradient of {name}")
    for name, weight in w_weights.items():
        # AdamW normalises each element's step (lr = 3e-3): float32 rounding in a gradient
        # near zero moves its update by a small fraction of lr; a wrong gradient by about lr.
        assert_close_verbose(g_weights[name], weight, 1e-5, 1e-5,
                             f"{what}: weight {name} after {STEPS} steps")


def _table(records, keys):
    """The records' values of `keys` (steps x keys), step 1's accuracy left out (0): at step 1
    the policy is pi_ref, so every margin is a tie broken by float32 rounding, which differs
    between the two heads, and accuracy (the share of margins > 0) counts those ties."""
    return torch.tensor([[r[k] if (i or k != "accuracy") else 0.0 for k in keys]
                         for i, r in enumerate(records)], dtype=torch.float64)


def _compare(tmp_path, monkeypatch, *overrides, name):
    sweep = _run(cfg_for(tmp_path, *overrides, name=f"{name}_sweep"), monkeypatch)
    two = _run(cfg_for(tmp_path, *overrides, "--train.lm_head=two_pass",
                       name=f"{name}_two"), monkeypatch)
    assert sweep[4] == "one_sweep" and sweep[3] == STEPS * 2     # 2 micro-batches a step
    assert two[4] == "two_pass" and two[3] == 0
    _assert_same_run(sweep, two, name)


def _save_aux_lm(tmp_path):
    from vrpo_fast.models import build_tiny_causal_lm

    path = tmp_path / "aux_lm"
    build_tiny_causal_lm(seed=3, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize("setting", ["vrpo", "dpo", "unlabelled", "ref_none", "aux_lm", "lora",
                                     "fsdp_one_process"])
def test_one_sweep_trains_as_the_two_pass_head(tmp_path, monkeypatch, setting):
    """vrpo: M = 2, g given, pi_ref online; dpo: the estimator; unlabelled: every third prompt
    without a labelled pair, so the labelled terms carry the step's label_scale; ref_none: a
    reference-free run; aux_lm: g from an auxiliary LM's implicit reward against pi_ref's
    log-probs; lora: adapters trained, pi_ref the policy with them off; fsdp_one_process: FSDP2
    (CPU offload keeps it on one process), its root's hooks unsharding the head the sweep
    reads."""
    overrides = {
        "vrpo": [],
        "dpo": ["--loss.estimator=dpo"],
        "unlabelled": [f"--data.path={mixed_data(tmp_path)}"],
        "ref_none": ["--ref.source=none"],
        "aux_lm": ["--aux.mode=lm", f"--aux.path={_save_aux_lm(tmp_path)}"],
        "lora": ["--lora.enabled=true", "--lora.r=4", "--lora.alpha=8",
                 "--lora.target_modules=[q_proj, v_proj, down_proj]"],
        "fsdp_one_process": ["--train.cpu_offload=true"],
    }[setting]
    _compare(tmp_path, monkeypatch, *overrides, name=setting)


def test_micro_batches_do_not_change_the_one_sweep(tmp_path, monkeypatch):
    """Four micro-batches of one group and one of four: the run of two of two groups (the
    unlabelled prompts make a micro-batch's labelled count differ from the step's)."""
    data = f"--data.path={mixed_data(tmp_path)}"
    want = _run(cfg_for(tmp_path, data, "--train.lm_head=two_pass", name="two"), monkeypatch)
    for micro in (1, 4):
        got = _run(cfg_for(tmp_path, data, f"--train.micro_batch_groups={micro}",
                           name=f"micro{micro}"), monkeypatch)
        assert got[4] == "one_sweep" and got[3] == STEPS * 4 // micro
        # Statistics that are means over a micro-batch's labelled prompts differ with the
        # split by design (test_train.py); the loss, the gradients and the weights may not.
        _assert_same_run(got, want, f"micro {micro}",
                         keys=["loss", "grad_norm", "tokens", "term_mc", "mean_g"])


@pytest.mark.parametrize("dro", [["--loss.dro_tau=1.0"],
                                 ["--loss.group_dro_eta=0.1", "--data.path=DOMAINS"]])
def test_dro_keeps_the_two_pass_path_and_refuses_one_sweep(tmp_path, monkeypatch, dro):
    """DRO weights couple the groups of a step: auto takes the two-pass path (no sweep runs),
    and train.lm_head=one_sweep is one line naming the key."""
    if "--data.path=DOMAINS" in dro:
        rows = [json.loads(line) for line in (ROOT / "configs/data/tiny.jsonl").open()]
        for i, row in enumerate(rows):
            row["domain"] = "ab"[i % 2]
        path = tmp_path / "domains.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dro = [dro[0], f"--data.path={path}"]
    records, _, _, sweeps, head = _run(cfg_for(tmp_path, *dro, name="auto"), monkeypatch)
    assert head == "two_pass" and sweeps == 0 and len(records) == STEPS
    with pytest.raises(UserError, match=r"^train\.lm_head: one_sweep .*DRO") as err:
        _run(cfg_for(tmp_path, *dro, "--train.lm_head=one_sweep", name="forced"), monkeypatch)
    assert "\n" not in str(err.value)


def test_the_batch_offsets_are_the_token_offsets_of_each_group():
    """The one sweep's chunk boundaries from the packed spans (no device sync) are where each
    group's response tokens start in the (N,) order, as segment ids say."""
    from vrpo_fast.chunked import group_offsets
    from vrpo_fast.packing import pack_groups
    from vrpo_fast.passes import group_token_offsets

    for seed in range(5):
        prompts, responses = random_groups(7, 4, random.Random(seed))
        batch = pack_groups(prompts, responses, max_tokens=60)
        assert batch.shape[0] > 1                            # several rows
        want = group_offsets(batch.segment_ids, 7, 4)
        assert want is not None and group_token_offsets(batch) == want
        assert want[-1] == sum(len(r) for rs in responses for r in rs)


def _formula64(h, w, t, seg, G, K, ref, g, labelled, label_scale, estimator):
    """The float64 loss sum from full logits and the per-prompt formula written out."""
    logp = torch.log_softmax(h.double() @ w.double().T, dim=1).gather(1, t[:, None])[:, 0]
    pol = torch.zeros(G * K, dtype=torch.float64).index_add(0, seg, logp).view(G, K)
    u = 0.1 * ((pol - ref.double())[:, 0::2] - (pol - ref.double())[:, 1::2])
    l_fwd, l_rev = torch.nn.functional.softplus(-u), torch.nn.functional.softplus(u)
    expected = g.double() * l_fwd + (1 - g.double()) * l_rev
    if estimator == "dpo":
        return l_fwd[:, 0].sum()
    first_two = l_fwd[:, 0] - expected[:, 0]
    return (labelled.double() * label_scale * first_two + expected[:, 1:].mean(dim=1)).sum()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("label_scale", [None, 2.5])
def test_one_sweep_labelled_mask_matches_the_float64_formula(backend, label_scale):
    """The sweep's labelled masks (no loss kernel has one) against the float64 formula, the
    default label_scale over the whole batch though chunks hold one group each."""
    from vrpo_fast.chunked import TorchSweep, group_offsets, one_sweep_vrpo_loss

    if backend == "triton":
        from vrpo_fast.kernels.fused_linear_vrpo import TritonSweep as cls
    else:
        cls = TorchSweep
    G, K, D, V = 5, 6, 8, 40
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 5, (G * K,), generator=gen)
    seg = torch.repeat_interleave(torch.arange(G * K), lengths)
    N = seg.numel()
    h = torch.randn(N, D, generator=gen, requires_grad=True)
    w = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=gen)
    ref = torch.randn(G, K, generator=gen)
    g = torch.rand(G, K // 2, generator=gen)
    labelled = torch.tensor([True, False, True, True, False])
    loss, _ = one_sweep_vrpo_loss(h, w, t, seg, group_offsets(seg, G, K), K, ref, g, beta=0.1,
                                  loss_type="sigmoid", estimator="vrpo", reduction="sum",
                                  labelled=labelled, label_scale=label_scale, chunk_tokens=4,
                                  backend_cls=cls)
    loss.backward()
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    want = _formula64(h64, w64, t, seg, G, K, ref, g, labelled,
                      G / 3 if label_scale is None else label_scale, "vrpo")
    want.backward()
    assert_close_verbose(loss, want, 1e-5, 1e-5, "loss")
    assert_close_verbose(h.grad, h64.grad, 1e-6, 1e-4, "dH")
    assert_close_verbose(w.grad, w64.grad, 1e-6, 1e-4, "dW")


def test_stages_with_their_own_loss_keep_two_passes_and_refuse_one_sweep(tmp_path):
    """The reward-model trainer has no LM head: auto runs it as before, one_sweep is one line."""
    from vrpo_fast.train.reward import RewardTrainer

    cfg = cfg_for(tmp_path, "--ref.source=none", name="rm")
    trainer = RewardTrainer(cfg, quiet=True)
    assert trainer.lm_head == "two_pass"
    trainer._release_lock()
    with pytest.raises(UserError, match=r"^train\.lm_head: one_sweep .*sequence log-probs"):
        RewardTrainer(cfg_for(tmp_path, "--ref.source=none", "--train.lm_head=one_sweep",
                              name="rm_forced"), quiet=True)


ONE_SWEEP_TWO_RANKS = ["--train.max_steps=3", "--aux.mode=lagged", "--aux.refresh_every=2",
                       "--train.save_every=0"]


@pytest.mark.slow
def test_two_fsdp_processes_compute_what_one_two_pass_process_does(tmp_path):
    """FSDP2 on 2 gloo processes with the one sweep (each rank one micro-batch, its own
    chunk of groups; the head unsharded by the root's hooks, dW reduce-scattered) logs the
    steps of one unsharded two-pass process accumulating 2 micro-batches, and writes its
    weights (the lagged copy of g included)."""
    import os

    from vrpo_fast.train.loop import Trainer
    from vrpo_fast.train.metrics import read_metrics

    one = cfg_for(tmp_path, *ONE_SWEEP_TWO_RANKS, "--train.lm_head=two_pass", name="one")
    Trainer(one, quiet=True).fit()
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "--standalone", "--no-python", sys.executable, "-m", "vrpo_fast.cli",
                        "train", "--config", str(TINY), f"--train.output_dir={two}", *SMALL,
                        *ONE_SWEEP_TWO_RANKS, "--train.lm_head=one_sweep"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = read_metrics(one.train.output_dir), read_metrics(two)
    keys = sorted(set(want[0]) - {"tokens_per_s", "mfu"})
    assert set(got[0]) - {"tokens_per_s", "mfu"} == set(keys) and len(got) == 3
    torch.testing.assert_close(
        _table(got, keys), _table(want, keys), rtol=1e-4, atol=1e-5,
        msg=lambda m: f"{keys}: {m}")
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(one.train.output_dir + "/final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(two / "final").state_dict()
    for name in a:
        assert_close_verbose(b[name], a[name], 1e-5, 1e-4, f"final {name}")
