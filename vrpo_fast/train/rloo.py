"""Two-stage VRPO, stage 2: `vrpo-fast train-rl --config X.yaml`, RLOO against a reward model.

REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024): each step draws k samples per
prompt from the current policy (the project's sampler), scores them with the reward model
(rl.reward_model, e.g. the output of `vrpo-fast train-reward`) and penalises the KL to pi_ref:

    r_i = R(x, y_i) - kl_coef (log pi(y_i|x) - log pi_ref(y_i|x))
    A_i = r_i - mean_{j != i} r_j,          loss = -mean_i A_i log pi(y_i|x)

The k samples share their prompt, so the policy, reference and reward-model passes are each one
packed shared-prefix forward. The loop, checkpoints, resume and metrics are the policy trainer's.
DRO (loss.dro_tau, loss.group_dro_eta) weighs each prompt's term by its loss
L_x = -mean_i r_i (the penalised reward it misses) and the DRO state, as in the other trainers:
prompts (or domains) on which the policy does worst count more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.tokenize import tokenize_prompt
from vrpo_fast.errors import UserError
from vrpo_fast.models import load_reward_model
from vrpo_fast.packing import pack_groups, row_padding, trainer_budget
from vrpo_fast.passes import SequenceRewards
from vrpo_fast.samplers import TransformersSampler
from vrpo_fast.train.checkpoint import data_fingerprint
from vrpo_fast.train.data import Groups, domain_index
from vrpo_fast.train.loop import Trainer


class PromptGroups(Groups):
    """Prompts only: the responses are drawn on-policy every step (response_ids None, M = 0,
    every prompt counted as labelled). `domains`: each prompt's domain or None (see
    train.data.TrainingGroups)."""

    def __init__(self, prompt_ids, domains=None):
        self.prompt_ids = prompt_ids
        self.domain_names, self.domain_ids = domain_index(domains)

    def select(self, idx):
        return PromptBatch([self.prompt_ids[i] for i in idx],
                           None if self.domain_ids is None else [self.domain_ids[i] for i in idx])


@dataclass
class PromptBatch:
    prompt_ids: list[list[int]]
    _domains: list[int] | None

    def __len__(self):
        return len(self.prompt_ids)

    def domain_ids(self, device) -> torch.Tensor:
        return torch.tensor(self._domains, dtype=torch.long, device=device)


class RLOOTrainer(Trainer):
    """Stage 2: RLOO on the policy trainer's loop. Overrides load_data (prompts only) and
    micro_step (draw k samples on-policy, score them, the leave-one-out surrogate), which
    calls prompt_share for the DRO weighting and the global mean."""

    supports_one_sweep = False      # its own micro_step

    def __init__(self, cfg, *args, **kwargs):
        if not cfg.rl.reward_model:
            raise UserError("rl.reward_model: train-rl needs a reward model folder")
        # The policy's own samples need fresh reference log-probs; there is no cache of them.
        cfg = dataclasses.replace(cfg, ref=dataclasses.replace(cfg.ref, source="online"),
                                  aux=dataclasses.replace(cfg.aux, mode="none"))
        super().__init__(cfg, *args, **kwargs)
        path = cfg.rl.reward_model
        self.reward = self._frozen(
            SequenceRewards,
            lambda empty: load_reward_model(path, what="rl.reward_model", empty=empty),
            path, "rl.reward_model", self.mixed)
        # The sampler runs on an unsharded copy that receives the policy's weights before each
        # draw, as an inference engine would (generation never goes through FSDP's hooks).
        self.generator = self.build_model().to(self.device).eval().requires_grad_(False)
        self._generator_step = None      # the optimizer step whose weights the generator holds

    def load_data(self) -> None:
        d = self.cfg.data
        if not d.path:
            raise UserError("data.path: no prompts given")
        examples, report = load_preference_data(d.path, on_bad_row=d.on_bad_row,
                                                split=d.split, prompts_only=True)
        if not examples:
            raise UserError(f"data.path: {d.path} holds no usable prompts")
        self.groups = PromptGroups([tokenize_prompt(ex.prompt, self.tokenizer)
                                    for ex in examples], [ex.domain for ex in examples])
        self.groups.fingerprint = data_fingerprint(examples)   # recorded in checkpoints
        self.data_report, self.M = report, 0

    @torch.no_grad()
    def _draw(self, prompt_ids):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )


        rl = self.cfg.rl
        if self._generator_step != self.step:
            # Once per optimizer step: the micro-batches of a step share the policy's weights,
            # and gathering the full state dict is an all-gather of the whole model.
            full = get_model_state_dict(self.policy,
                                        options=StateDictOptions(full_state_dict=True))
            self.generator.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()})
            self._generator_step = self.step
        sampler = TransformersSampler(self.generator, self.tokenizer,
                                      temperature=rl.temperature,
                                      max_new_tokens=rl.max_new_tokens,
                                      batch_size=len(prompt_ids))
        seed = (self.cfg.train.seed * 1_000_003 + self.step) * self.dist.world_size + \
            self.dist.rank
        draws = sampler.sample(prompt_ids, rl.num_samples, seed=seed)
        eos = self.tokenizer.eos_token_id
        return [[ids if ids else [eos] for ids in per] for per in draws]

    def micro_step(self, groups):
        rl = self.cfg.rl
        samples = self._draw(groups.prompt_ids)
        budget = trainer_budget(self.cfg.train.max_tokens, self.device, groups.prompt_ids,
                                samples, self.cfg.train.attention)
        batch = pack_groups(groups.prompt_ids, samples, max_tokens=budget,
                            **row_padding(self.device, self.cfg.train.attention)
                            ).to(self.device)
        logps = self.policy(batch)                                    # (G, k)
        with torch.no_grad():
            ref = self.ref(batch)
            scores = self.reward(batch)
            kl = logps.detach() - ref
            r = scores - rl.kl_coef * kl
            k = r.shape[1]
            advantage = r - (r.sum(dim=1, keepdim=True) - r) / (k - 1)
        per_prompt = -(advantage * logps).mean(dim=1)
        stats = {"reward": scores.mean(), "kl": kl.mean(), "penalised_reward": r.mean(),
                 "advantage_std": advantage.std(), "response_tokens": batch.targets.new_tensor(
                     batch.targets.numel(), dtype=torch.float32) / (len(groups) * k)}
        loss = self.prompt_share(per_prompt, groups, stats, values=-r.mean(dim=1))
        return loss, stats, batch.num_tokens


def train_rl(cfg, *, quiet: bool = False):
    return RLOOTrainer(cfg, quiet=quiet).fit()


# `vrpo-fast <command> --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = train_rl
