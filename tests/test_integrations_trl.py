"""VRPOTrainer (TRL's DPOTrainer with packing and the VRPO loss) against TRL itself.

The peer reference: on a plain TRL preference data set with estimator="dpo", VRPOTrainer's
per-step losses and gradients equal DPOTrainer's on the same tiny model, data and seed. TRL's
own details are pinned on both sides: one sigmoid loss averaged over the batch (TRL's
`per_sequence_loss.mean()`), an explicit reference model (no precompute), no gradient clipping,
float32, no truncation (max_length None), the same data order (Trainer's seeded sampler over data
sets of equal length, which both tokenizations give the same ids: checked first).
"""

import copy

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from vrpo_fast import vrpo_loss  # noqa: E402
from vrpo_fast.errors import UserError  # noqa: E402
from vrpo_fast.integrations.trl import VRPOConfig, VRPOTrainer  # noqa: E402
from vrpo_fast.logprobs import naive_sequence_logps  # noqa: E402
from vrpo_fast.models import build_tiny_causal_lm  # noqa: E402

PROMPTS = ["Human: hi there\n\nAssistant:", "Human: what is 2+2?\n\nAssistant:",
           "Human: name a colour\n\nAssistant:", "Human: say yes\n\nAssistant:",
           "Human: a fruit?\n\nAssistant:", "Human: count to 3\n\nAssistant:"]
CHOSEN = [" Hello!", " 4.", " Blue.", " Yes.", " An apple, which is red.", " 1, 2, 3."]
REJECTED = [" Go away, I am busy", " 5", " I do not know any colours", " No", " Rocks",
            " 3 2 1"]


def _preference_data():
    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})


def _vrpo_data(M=2, seed=0):
    """TRL's columns plus 2M samples per prompt and g for each pair."""
    gen = torch.Generator().manual_seed(seed)
    samples = [[f" sample {i}.{j} " + "x" * int(torch.randint(1, 6, (1,), generator=gen))
                for j in range(2 * M)] for i in range(len(PROMPTS))]
    aux = torch.rand(len(PROMPTS), 1 + M, generator=gen).tolist()
    return Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED,
                              "samples": samples, "aux_prefs": aux})


class _Grads(TrainerCallback):
    """Every parameter's gradient just before each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None})


def _recording(cls):
    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.losses.append(float(loss.detach()))
            return loss

    Recording.losses = None
    return Recording


COMMON = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, beta=0.5,
              seed=7, bf16=False, max_grad_norm=0.0, max_length=None, report_to=[],
              logging_steps=1, save_strategy="no", gradient_checkpointing=False,
              use_cpu=True, dataloader_num_workers=0)


def _train(cls, config_cls, tokenizer, data, tmp_path, ref_seed=None, **extra):
    """A trainer on the tiny model; the reference is a copy of it, or (ref_seed) another tiny
    model, so that the first step's margins are not all zero."""
    model = build_tiny_causal_lm(seed=1)
    ref = copy.deepcopy(model) if ref_seed is None else build_tiny_causal_lm(seed=ref_seed)
    grads = _Grads()
    trainer = _recording(cls)(model=model, ref_model=ref, processing_class=tokenizer,
                              args=config_cls(output_dir=str(tmp_path / cls.__name__),
                                              **{**COMMON, **extra}),
                              train_dataset=data, callbacks=[grads])
    trainer.losses = []
    return trainer, grads


def test_dpo_estimator_steps_equal_trl_dpotrainer(tokenizer, tmp_path):
    data = _preference_data()
    trl_trainer, trl_grads = _train(DPOTrainer, DPOConfig, tokenizer, data, tmp_path)
    ours, our_grads = _train(VRPOTrainer, VRPOConfig, tokenizer, data, tmp_path,
                             estimator="dpo")
    # Both tokenizations give the same ids (TRL: prompt + completion tokenized together).
    theirs = trl_trainer.train_dataset
    for mine, t in zip(ours.train_dataset, theirs):
        assert mine["prompt_ids"] == t["prompt_ids"]
        assert mine["response_ids"] == [t["chosen_ids"], t["rejected_ids"]]
    trl_trainer.train()
    ours.train()
    assert len(ours.losses) == len(trl_trainer.losses) == 3
    # The first step's loss to float32 rounding; after two AdamW steps (which normalise tiny
    # gradient differences into updates of a fixed size) at the gradients' and weights'
    # tolerance below: 1.3e-5 apart at step 3 on this CPU's reduction order.
    torch.testing.assert_close(ours.losses[0], trl_trainer.losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ours.losses), torch.tensor(trl_trainer.losses),
                               rtol=1e-4, atol=1e-5)
    assert len(our_grads.steps) == len(trl_grads.steps) == 3
    for mine, theirs in zip(our_grads.steps, trl_grads.steps):
        assert mine.keys() == theirs.keys()
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=name: f"{n}: {m}")
    # Training moved the weights the same way (TRL's optimizer and scheduler untouched): within
    # 5 % of one step's size (lr = 1e-3; AdamW turns a near-zero gradient's rounding into a
    # step of up to lr, 1.4e-5 seen on this CPU).
    for a, b in zip(ours.model.parameters(), trl_trainer.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)
    assert "rewards/margins" in ours.state.log_history[0]


def test_vrpo_estimator_loss_equals_the_naive_forward(tokenizer, tmp_path):
    """First step of estimator="vrpo" with M = 2 against vrpo_loss on the naive unpacked
    forward (full logits, one padded sequence per response) in float64. One batch holds the
    whole data set, so the sampler's order does not matter (a mean over prompts)."""
    data = _vrpo_data(M=2)
    trainer, _ = _train(VRPOTrainer, VRPOConfig, tokenizer, data, tmp_path, estimator="vrpo",
                        ref_seed=2, max_steps=1, per_device_train_batch_size=6, max_tokens=200)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["vrpo_batch"].group_size == 6
    model = copy.deepcopy(trainer.model).double()
    ref = copy.deepcopy(trainer.ref_model).double()
    rows = list(trainer.train_dataset)
    prompts = [r["prompt_ids"] for r in rows]
    responses = [r["response_ids"] for r in rows]
    aux = torch.tensor([r["aux_prefs"] for r in rows], dtype=torch.float64)
    with torch.no_grad():
        ref_logps = naive_sequence_logps(ref, prompts, responses).double()
    policy = naive_sequence_logps(model, prompts, responses).double()
    want, _ = vrpo_loss(policy, ref_logps, aux, beta=0.5, estimator="vrpo")
    trainer.train()
    assert trainer.losses[0] == pytest.approx(float(want.detach()), rel=1e-4, abs=1e-6)


def test_data_ref_logps_and_precompute_match_the_reference_model(tokenizer, tmp_path):
    """precompute_ref_log_probs fills ref_logps with the reference model's packed log-probs:
    the first step's loss equals the one computed with the reference model online."""
    online, _ = _train(VRPOTrainer, VRPOConfig, tokenizer, _vrpo_data(M=1), tmp_path / "a",
                       ref_seed=2, max_steps=1)
    pre, _ = _train(VRPOTrainer, VRPOConfig, tokenizer, _vrpo_data(M=1), tmp_path / "b",
                    ref_seed=2, max_steps=1, precompute_ref_log_probs=True)
    assert all(r is not None for r in pre.train_dataset["ref_logps"])
    online.train()
    pre.train()
    assert pre.losses[0] == pytest.approx(online.losses[0], rel=1e-5, abs=1e-6)


def test_bad_input_is_one_line_before_training(tokenizer, tmp_path):
    model = build_tiny_causal_lm(seed=1)

    def build(data=None, **kw):
        return VRPOTrainer(model=model, ref_model=copy.deepcopy(model),
                           processing_class=tokenizer,
                           args=VRPOConfig(output_dir=str(tmp_path / "bad"), bf16=False,
                                           use_cpu=True, report_to=[], **kw),
                           train_dataset=data if data is not None else _preference_data())

    with pytest.raises(UserError, match=r"estimator='vrpo' needs the columns samples .* and "
                                        r"aux_prefs"):
        build()                                               # plain TRL data, vrpo estimator
    with pytest.raises(UserError, match="^ld_alpha: "):
        build(estimator="dpo", ld_alpha=0.5)
    with pytest.raises(UserError, match="^loss_type: "):
        build(estimator="dpo", loss_type="ipo")
    with pytest.raises(UserError, match="^use_weighting: "):
        build(estimator="dpo", use_weighting=True)
    with pytest.raises(UserError, match="^num_mc_pairs: 3 Monte Carlo pairs asked for"):
        build(_vrpo_data(M=2), num_mc_pairs=3)

    class Headless(torch.nn.Module):
        config = model.config

    with pytest.raises(UserError, match="^model: "):
        VRPOTrainer(model=Headless(), ref_model=None, processing_class=tokenizer,
                    args=VRPOConfig(output_dir=str(tmp_path / "bad"), estimator="dpo",
                                    bf16=False, use_cpu=True, report_to=[]),
                    train_dataset=_preference_data())
