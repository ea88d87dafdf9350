"""Two-stage VRPO: packed reward scores, the variance-reduced reward loss's unbiasedness, and a
tiny end-to-end run (reward model, then RLOO) on the synthetic task."""

import json
import math
import random
import shutil

import pytest
import torch

from vrpo_fast import vrpo_reward_loss
from vrpo_fast.models import tiny_llama_config
from vrpo_fast.packing import pack_groups
from vrpo_fast.passes import SequenceRewards


def tiny_reward_model(seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    conf = tiny_llama_config(num_labels=1, hidden_size=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=64)
    return AutoModelForSequenceClassification.from_config(conf, attn_implementation="sdpa")


def test_packed_reward_scores_equal_per_response_scoring():
    rm = tiny_reward_model()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 259) for _ in range(rng.randint(2, 9))] for _ in range(3)]
    responses = [[[rng.randrange(3, 259) for _ in range(rng.randint(1, 6))] for _ in range(4)]
                 for _ in range(3)]
    batch = pack_groups(prompts, responses, max_tokens=40)
    packed = SequenceRewards(rm)(batch)
    rm.zero_grad()
    packed.sum().backward()
    g_packed = {n: p.grad.clone() for n, p in rm.named_parameters()}
    rm.zero_grad()
    naive = torch.stack([torch.stack([rm(input_ids=torch.tensor([p + r])).logits[0, 0]
                                      for r in rs]) for p, rs in zip(prompts, responses)])
    naive.sum().backward()
    torch.testing.assert_close(packed, naive, atol=1e-4, rtol=0)
    for name, p in rm.named_parameters():
        torch.testing.assert_close(g_packed[name], p.grad, atol=1e-4, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("g_kind", ["true", "wrong"])
def test_vr_reward_loss_is_unbiased_for_any_g(g_kind):
    """Tabular reward model r = phi (Y,), pairs from a reference distribution, labels from a
    mixture-of-two-populations truth: E[grad VR loss] = E[grad BT loss], by enumeration. The
    reward loss's own unbiasedness (test_objective checks vrpo_loss's), with the same power
    check: the Monte Carlo term alone is biased under a wrong g, and the z-test sees it."""
    Y = 5
    gen = torch.Generator().manual_seed(11)
    pi_ref = torch.softmax(torch.randn(Y, generator=gen, dtype=torch.float64), 0)
    phi = torch.randn(Y, generator=gen, dtype=torch.float64)
    r1 = 3 * torch.randn(Y, generator=gen, dtype=torch.float64)
    r2 = -r1 + torch.randn(Y, generator=gen, dtype=torch.float64)
    p_star = 0.7 * torch.sigmoid(r1[:, None] - r1[None, :]) + \
        0.3 * torch.sigmoid(r2[:, None] - r2[None, :])
    g_table = p_star if g_kind == "true" else torch.full((Y, Y), 0.9, dtype=torch.float64)
    g_table = g_table if g_kind == "true" else g_table.triu(1) + (1 - g_table.T).tril(-1) + \
        0.5 * torch.eye(Y, dtype=torch.float64)
    # exact E[grad] of the plain Bradley-Terry loss
    ph = phi.clone().requires_grad_(True)
    u = ph[:, None] - ph[None, :]
    w = pi_ref[:, None] * pi_ref[None, :]
    exact_loss = (w * (p_star * -torch.nn.functional.logsigmoid(u)
                       + (1 - p_star) * -torch.nn.functional.logsigmoid(-u))).sum()
    (exact,) = torch.autograd.grad(exact_loss, ph)
    # Monte Carlo average of the variance-reduced loss's per-sample gradient
    n, M = 200_000, 2
    y = torch.multinomial(pi_ref, n * (2 + 2 * M), replacement=True, generator=gen)
    y = y.view(n, 2 + 2 * M)
    wins = torch.rand(n, generator=gen, dtype=torch.float64) < p_star[y[:, 0], y[:, 1]]
    c = torch.where(wins, y[:, 0], y[:, 1])
    rj = torch.where(wins, y[:, 1], y[:, 0])
    y = torch.cat([c[:, None], rj[:, None], y[:, 2:]], 1)
    g = g_table[y[:, 0::2], y[:, 1::2]]
    scores = phi[y].clone().requires_grad_(True)
    loss, _ = vrpo_reward_loss(scores, g, reduction="sum")
    (d,) = torch.autograd.grad(loss, scores)
    per_sample = torch.zeros(n, Y, dtype=torch.float64).scatter_add_(1, y, d)
    z = (per_sample.mean(0) - exact) / (per_sample.std(0) / math.sqrt(n))
    assert z.abs().max().item() < 4.5, z
    # And the test has power: the Monte Carlo term alone (no prompt labelled, so no label
    # correction) is unbiased only when g is the truth; with a wrong g the z-test rejects it.
    scores = phi[y].clone().requires_grad_(True)
    loss_mc, _ = vrpo_reward_loss(scores, g, labelled=torch.zeros(n, dtype=torch.bool),
                                  reduction="sum")
    (d,) = torch.autograd.grad(loss_mc, scores)
    per_sample = torch.zeros(n, Y, dtype=torch.float64).scatter_add_(1, y, d)
    z_mc = (per_sample.mean(0) - exact) / (per_sample.std(0) / math.sqrt(n))
    if g_kind == "true":
        assert z_mc.abs().max().item() < 4.5, z_mc
    else:
        assert z_mc.abs().max().item() > 10, z_mc


def test_rloo_syncs_the_generator_once_per_optimizer_step(tmp_path, monkeypatch):
    """Two micro-batches per step draw from the same weights: one full-state gather per step,
    and each draw sees the policy as it is at that step."""
    import torch.distributed.checkpoint.state_dict as dcp_sd

    from vrpo_fast.config import load_config
    from vrpo_fast.train.rloo import RLOOTrainer

    tiny_reward_model().save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ("ab>", "cd>", "ba>", "dc>")))
    trainer = RLOOTrainer(load_config(None, [
        f"--data.path={tmp_path / 'prompts.jsonl'}", "--model.tokenizer=byte",
        "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
        "intermediate_size: 64}", f"--rl.reward_model={tmp_path / 'rm'}",
        "--rl.num_samples=2", "--rl.max_new_tokens=3", "--train.max_steps=2",
        "--train.batch_groups=4", "--train.micro_batch_groups=2", "--train.lr=1e-2",
        "--train.save_every=0", f"--train.output_dir={tmp_path / 'rl'}"]), quiet=True)
    gathers, draws = [], []
    real = dcp_sd.get_model_state_dict
    monkeypatch.setattr(dcp_sd, "get_model_state_dict",
                        lambda *a, **k: gathers.append(trainer.step) or real(*a, **k))
    sample = trainer._draw

    def checked(prompt_ids):
        out = sample(prompt_ids)
        for name, p in trainer.generator.named_parameters():
            q = trainer.policy.lm.get_parameter(name)     # a DTensor under FSDP
            assert torch.equal(p, q.full_tensor() if hasattr(q, "full_tensor") else q), name
        draws.append((trainer.step, next(trainer.generator.parameters()).clone()))
        return out
    monkeypatch.setattr(trainer, "_draw", checked)
    for _ in range(2):
        trainer.train_step()
    assert [step for step, _ in draws] == [0, 0, 1, 1] and gathers == [0, 1]
    assert not torch.equal(draws[1][1], draws[2][1])        # the policy moved between steps


@pytest.mark.slow
def test_two_stage_end_to_end_raises_the_true_reward(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.config import load_config
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.demo import TINY_MODEL, _label
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer, load_causal_lm
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.samplers import draw
    from vrpo_fast.sft import sft_warm_start
    from vrpo_fast.synthetic import SyntheticTask, write_jsonl
    from vrpo_fast.train.reward import (
        best_of_n,
        evaluate_reward_model,
        reliability_plot,
        train_reward,
    )
    from vrpo_fast.train.rloo import train_rl

    task, tok = SyntheticTask(), byte_tokenizer()
    ref = build_tiny_causal_lm(seed=0, **TINY_MODEL)
    sft_warm_start(ref, tok, task, steps=120, progress=False)
    ref.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    write_jsonl([{"prompt": p} for p in task.prompts() for _ in range(64)],
                tmp_path / "prompts.jsonl")
    base = [f"--model.path={tmp_path / 'ref'}", "--model.tokenizer=byte"]

    def labelled(name, seed):
        """Pairs and samples drawn from pi_ref, labelled by the truth (g = P*)."""
        sample_stage(load_config(None, base + [f"--sample.input={tmp_path / 'prompts.jsonl'}",
                                               f"--sample.output={tmp_path / name}",
                                               "--sample.num_samples=6",
                                               "--sample.max_new_tokens=8",
                                               f"--sample.seed={seed}"]), progress=False)
        rows = _label(task, tmp_path / name, random.Random(seed), 0.25, tok.eos_token)["true_g"]
        write_jsonl(rows, tmp_path / f"{name}_rm" / "data.jsonl")
        shutil.copyfile(tmp_path / name / "provenance.json",
                        tmp_path / f"{name}_rm" / "provenance.json")
        return tmp_path / f"{name}_rm" / "data.jsonl"

    train_data, heldout = labelled("sampled", 0), labelled("heldout", 1)

    # Stage 1: the variance-reduced reward model (g = the true preference).
    rm_final = train_reward(load_config(None, [
        f"--ref.path={tmp_path / 'ref'}", f"--model.tiny={json.dumps(TINY_MODEL)}",
        "--model.tokenizer=byte", f"--data.path={train_data}",
        "--aux.mode=given", f"--train.output_dir={tmp_path / 'rm_run'}", "--train.max_steps=200",
        "--train.save_every=0", "--train.batch_groups=16", "--train.micro_batch_groups=16",
        "--train.lr=2e-3", "--train.warmup_steps=5"]), quiet=True)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_final)   # loads as plain HF
    # Judged on fresh pi_ref pairs: on its own training pairs the VR loss's label term is
    # linear in the margin, so a reward model can fit label noise there.
    examples, _ = load_preference_data(str(heldout))
    report = evaluate_reward_model(rm, tok, examples, true_preference=task.preference)
    assert report["pairs"] == 64 * len(task.prompts())
    assert report["accuracy_vs_truth"] > 0.55
    reliability_plot(report, tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").is_file()

    # Stage 2: RLOO against it, KL to pi_ref.
    policy = train_rl(load_config(None, base + [
        f"--data.path={tmp_path / 'prompts.jsonl'}", f"--rl.reward_model={rm_final}",
        "--rl.num_samples=4", "--rl.max_new_tokens=8", "--rl.kl_coef=0.02",
        f"--train.output_dir={tmp_path / 'rl'}", "--train.max_steps=40", "--train.save_every=0",
        "--train.batch_groups=12", "--train.micro_batch_groups=12", "--train.lr=1e-3",
        "--train.warmup_steps=2"]), quiet=True)
    prompts = task.prompts()

    def true_reward(texts):
        return sum(task.true_reward(p, y) for p, ys in zip(prompts, texts) for y in ys) / \
            sum(map(len, texts))

    ref_texts, _, _ = draw(ref, tok, prompts, 64, seed=5, max_new_tokens=8)
    rl_texts, _, _ = draw(load_causal_lm(str(policy)), tok, prompts, 64, seed=5,
                          max_new_tokens=8)
    assert true_reward(rl_texts) > true_reward(ref_texts) + 0.1
    # Best-of-n keeps, for each prompt, the sample the reward model scores highest, as scoring
    # each sample on its own (full sequence, last token) says.
    best = best_of_n(ref, rm, tok, prompts[:3], 5, seed=9, max_new_tokens=8)
    texts, prompt_ids, ids = draw(ref, tok, prompts[:3], 5, seed=9, max_new_tokens=8)
    with torch.no_grad():
        for b, p, per_text, per_ids in zip(best, prompt_ids, texts, ids):
            own = [rm(input_ids=torch.tensor([p + (r or [tok.eos_token_id])])).logits[0, 0]
                   .item() for r in per_ids]
            assert b == per_text[max(range(5), key=own.__getitem__)]


def test_rloo_reward_model_takes_train_mixed_precision(tmp_path):
    """train.mixed_precision reaches train-rl's reward model as it reaches the policy (it was
    derived from the device alone, so bf16 on a CPU left the reward model in float32)."""
    from torch.distributed.fsdp import FSDPModule

    from vrpo_fast.config import load_config
    from vrpo_fast.train.rloo import RLOOTrainer

    tiny_reward_model().save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ("ab>", "cd>")))
    trainer = RLOOTrainer(load_config(None, [
        f"--data.path={tmp_path / 'prompts.jsonl'}", "--model.tokenizer=byte",
        "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
        "intermediate_size: 64}", f"--rl.reward_model={tmp_path / 'rm'}",
        "--rl.num_samples=2", "--rl.max_new_tokens=3", "--train.max_steps=1",
        "--train.batch_groups=2", "--train.micro_batch_groups=2",
        "--train.mixed_precision=bf16", "--train.save_every=0",
        f"--train.output_dir={tmp_path / 'rl'}"]), quiet=True)

    def param_dtype(module):
        assert isinstance(module, FSDPModule), type(module)
        return module._get_fsdp_state()._mp_policy.param_dtype

    assert param_dtype(trainer.policy) == param_dtype(trainer.reward) == torch.bfloat16
