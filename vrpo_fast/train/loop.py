"""The VRPO training loop: lean FSDP2, packed shared-prefix steps, atomic checkpoints.

    vrpo-fast train --config configs/tiny.yaml [--train.max_steps=20 ...]
    torchrun --nproc-per-node 2 -m vrpo_fast.cli train --config configs/tiny.yaml

One optimizer step = `train.batch_groups` prompt groups over all ranks, each group packed as its
prompt once followed by its 2 + 2M responses; the policy runs forward/backward on the packed
rows, the LM head only on response positions, and the loss is normalised by the global number
of groups. The LM head and the loss run in one sweep (train.lm_head, vrpo_fast.passes.
SequenceVRPOLoss: the logit gradients formed while the logits are in a chunk buffer) unless
DRO weighting or a stage's own loss needs the log-probs first (then the fused log-prob kernel
and the loss in two passes). With loss.dro_tau or loss.group_dro_eta each group's loss is
weighted by its own value and a DRO state updated once per step (vrpo_fast.dro): micro-batching
and ranks change neither the weights nor the objective, and the state is checkpointed.
"""

from __future__ import annotations

import atexit
import math
import time
import warnings
from pathlib import Path

import torch

import vrpo_fast.attention as packed_attention
from vrpo_fast.config import Config
from vrpo_fast.dro import KLDRO, Chi2DRO, GroupDRO
from vrpo_fast.errors import UserError, check_output
from vrpo_fast.host_memory import keep_freed_memory
from vrpo_fast.judge import load_judge, pairs_of
from vrpo_fast.models import (
    adapters_off,
    add_lora,
    check_dtype,
    check_model_path,
    load_causal_lm,
    load_reward_model,
    lora_initial_value,
    model_from_config,
    model_path,
    tokenizer_from_config,
    weight_files,
)
from vrpo_fast.objective import implicit_preference, reward_preference, vrpo_loss
from vrpo_fast.ops import dispatch_vrpo_loss
from vrpo_fast.packing import pack_groups, row_padding, trainer_budget
from vrpo_fast.passes import SequenceLogps, SequenceRewards, SequenceVRPOLoss
from vrpo_fast.train import lock
from vrpo_fast.train.checkpoint import Checkpointer, seed_everything
from vrpo_fast.train.data import GroupStream, load_training_groups
from vrpo_fast.train.distributed import (
    Dist,
    all_reduce_,
    broadcast_object,
    init_distributed,
)
from vrpo_fast.train.metrics import (
    CvGapWatch,
    MarginWatch,
    MetricsLogger,
    StepStats,
    check_loggers,
    peak_flops,
)
from vrpo_fast.train.modules import needs_fsdp, shard, shard_empty


def check_attention(attention: str, device: torch.device, *, bf16: bool) -> None:
    """train.attention that cannot train on this device (or in this precision): one line."""
    if attention == "flex" and device.type != "cuda":
        raise UserError("train.attention: flex has no backward on the CPU (FlexAttention); use "
                        "auto, cascade or sdpa")
    if attention == "flash":
        if device.type != "cuda":
            raise UserError(f"train.attention: flash runs flash-attn's CUDA kernels; this run "
                            f"is on {device.type} (use auto or cascade)")
        if not bf16:
            raise UserError("train.attention: flash computes in bf16 only; set "
                            "train.mixed_precision to auto or bf16 (or model.dtype=bfloat16)")
        try:
            packed_attention.flash_varlen_func()
        except ImportError as err:
            raise UserError(f"train.attention: {err} (or use auto)") from None


def cosine_lr(step: int, cfg) -> float:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """The policy trainer of `vrpo-fast train`, and the base of the two-stage trainers.

    Built from a `Config` (and a `Dist`, default: from the environment, torchrun or one
    process): it takes the output folder's lock, loads and checks the data, builds the policy
    (FSDP2-sharded, mixed precision on a GPU), the online reference, the auxiliary model of
    aux.mode and the DRO state, and an AdamW optimizer. `fit()` resumes from the newest usable
    checkpoint, runs `train_step()` to train.max_steps with atomic checkpoints, and writes
    <output_dir>/final/.

    Extension points (the public methods below; `RewardTrainer` and `RLOOTrainer` override
    them, everything else is shared):

        load_data()                   set self.groups (the prompt groups) and self.M
        build_model()                 the model to train (a fresh copy also serves aux lagged)
        wrap(model)                   model -> module mapping a PackedBatch to (B, K) scores
        export_class                  the transformers class <output_dir>/final is saved as
        preferences(batch, groups, ref_logps)      g, (B, 1 + M) in [0, 1], no gradient
        compute_loss(scores, ref_logps, g, labelled, groups)
                                      this micro-batch's share of the step's loss, and stats
        micro_step(groups)            one micro-batch: pack, forward, g, loss
        prompt_share(per_prompt, groups, stats, values=None)
                                      per-prompt losses -> the micro-batch's share of the
                                      global (DRO-weighted) mean; for overrides to call

    A subclass that keeps micro_step and overrides preferences / compute_loss changes only
    the objective; one that overrides micro_step (on-policy sampling) owns the whole
    micro-batch and returns (loss, stats, tokens) the same way. A subclass with either
    override declares `supports_one_sweep = False`: it keeps the two-pass LM head (`lm_head`),
    so that compute_loss receives the policy's log-probs; the one sweep computes this class's
    own compute_loss without them.
    """

    # The one sweep (SequenceVRPOLoss: LM head and loss together) computes this class's
    # objective; False in a subclass that overrides compute_loss or micro_step.
    supports_one_sweep = True

    def __init__(self, cfg: Config, dist: Dist | None = None, *, quiet: bool = False):
        self.cfg = cfg
        self.dist = dist or init_distributed()
        self.device = self.dist.device
        t = cfg.train
        # bf16 compute under FSDP2's MixedPrecisionPolicy: asked for, or auto on a GPU. Every
        # model of the run (policy, pi_ref, g's model, train-rl's reward model) takes it.
        self.mixed = t.mixed_precision == "bf16" or (
            t.mixed_precision == "auto" and self.device.type == "cuda")
        check_attention(t.attention, self.device,
                        bf16=self.mixed or cfg.model.dtype == "bfloat16")
        check_loggers(t)
        # Model paths that cannot be models: refused before the lock, the data and its cache.
        for key, path in [("model.path", cfg.model.path),
                          ("ref.path", cfg.ref.path if cfg.ref.source == "online" else None),
                          ("aux.path", cfg.aux.path if cfg.aux.mode in ("lm", "reward_model",
                                                                        "judge") else None)]:
            if path:
                check_model_path(path, key)
        if cfg.data.cache_dir:      # else <train.output_dir>/cache, which the lock checks
            check_output(cfg.data.cache_dir, "data.cache_dir")
        if t.keep_host_memory and self.device.type == "cpu":
            keep_freed_memory()     # vrpo_fast/host_memory.py: no page faults on each step
        world = self.dist.world_size
        if t.batch_groups % (world * t.micro_batch_groups):
            raise UserError(f"train.batch_groups: {t.batch_groups} prompt groups do not split "
                            f"into {world} ranks x train.micro_batch_groups = "
                            f"{t.micro_batch_groups}")
        self.local_groups = t.batch_groups // world
        self.out = Path(t.output_dir)
        self._lock = self._take_lock()
        seed_everything(t.seed)
        self.checkpointer = Checkpointer(self)   # resume, checkpoints, final/


        self.tokenizer = tokenizer_from_config(cfg)
        self.load_data()
        self._check_budget()
        self.stream = GroupStream(len(self.groups), t.batch_groups, seed=t.seed,
                                  shuffle=t.shuffle)

        mixed = self.mixed
        # A model FSDP2 shards, from a local safetensors folder, is built empty and each rank
        # reads only its own shard (train/modules.py); else it is loaded whole, then sharded.
        policy_files = self._shard_files(cfg.model.path, t.cpu_offload or needs_fsdp(mixed)) \
            if type(self).build_model is Trainer.build_model else None
        self._empty_policy = policy_files is not None
        self.lm = self.build_model(empty=True) if self._empty_policy \
            else self.build_model().to(self.device)
        self.lm.config.use_cache = False
        options = dict(mixed_precision=mixed, activation_checkpointing=t.activation_checkpointing,
                       compile_layers=t.compile, cpu_offload=t.cpu_offload)
        if self._empty_policy:
            self.policy = shard_empty(self.wrap(self.lm), self.lm, device=self.device,
                                      files=policy_files, what="model.path",
                                      initial=self._lora_initial, **options)
        else:
            self.policy = shard(self.wrap(self.lm), self.lm, **options)
        self.ref = None
        if cfg.ref.source == "online" and cfg.lora.enabled:
            self.ref = AdaptersOff(self.policy, self.lm)    # no second copy of the weights
        elif cfg.ref.source == "online":
            self.ref = self._frozen(
                SequenceLogps, lambda empty: model_from_config(cfg, "ref", empty=empty),
                model_path(cfg, "ref"), "ref.path" if cfg.ref.path else "model.path", mixed)
        self.aux = self._build_aux(mixed)
        self.dro = self._build_dro()

        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
            fused=True)    # one kernel over all parameters, on the CPU as on a GPU
        self.step = 0
        self.skipped_total = 0
        self.bad_in_row = 0
        self._label_scale: float | None = None   # the step's (_step_label_scale), set per step
        self.metrics = MetricsLogger(self.out, cfg, is_main=self.dist.is_main, quiet=quiet)
        # Each step's record passes these (they add fields and warn).
        self.watchers = (MarginWatch(),
                         CvGapWatch(cfg, self.groups, self.stream, self.M, self.out,
                                    is_main=self.dist.is_main))
        self._n_params = sum(p.numel() for p in self.lm.parameters())
        self._peak_flops = peak_flops(torch.cuda.get_device_name(self.device)) \
            if self.device.type == "cuda" else None
        self.lm_head = self._choose_lm_head()

    # -- set-up (extension points: the two-stage trainers override these) ---------------------

    export_class = "AutoModelForCausalLM"    # the Hugging Face class of <output_dir>/final

    def load_data(self) -> None:
        """Load the training data: sets `self.groups` (a train.data.Groups: len(),
        select(indices) -> a micro-batch of groups, ...), `self.data_report` and `self.M`, the Monte
        Carlo pairs per prompt. Runs before the model is built."""
        self.groups, self.data_report = load_training_groups(self.cfg, self.tokenizer,
                                                             self.dist)
        self.M = self.groups.num_mc_pairs

    def build_model(self, empty: bool = False):
        """The model to train, unwrapped and on the CPU (also the lagged copy of aux.mode
        lagged): the policy's starting point (model.path / model.tiny) in model.dtype; with
        lora.enabled, its weights frozen and LoRA adapters injected (vrpo_fast.models.add_lora).
        empty: parameters on the meta device, for `shard_empty` to fill from model.path's
        files (LoRA adapters keep their initial values). The two-stage trainers build their
        own."""
        check_dtype(getattr(torch, self.cfg.model.dtype), self.device)
        model = model_from_config(self.cfg, "policy", empty=empty)
        if self.cfg.lora.enabled:
            if self.export_class != "AutoModelForCausalLM":
                raise UserError(f"lora.enabled: LoRA trains causal LMs; this stage trains a "
                                f"{self.export_class} (set lora.enabled=false)")
            model = add_lora(model, self.cfg.lora, self.cfg.model.path, seed=self.cfg.train.seed)
        return model

    def wrap(self, model):
        """The module the loop shards and calls: PackedBatch -> (B, K) per-response scores
        (here sequence log-probs through the fused LM head, by `SequenceVRPOLoss`, which can
        also take the loss in one sweep; a reward model's rewards in train-reward). Its first
        attribute names the weights in checkpoints."""
        return SequenceVRPOLoss(model, attention=self.cfg.train.attention)

    def _take_lock(self):
        """One writer per output folder (see train/lock.py): rank 0 takes the lock, every rank
        stops on its verdict. Released when fit() ends, or when the process exits."""
        held = refusal = None
        if self.dist.is_main:
            try:
                held = lock.acquire(self.out)
                atexit.register(held.release)
            except UserError as err:
                refusal = str(err)
        refusal = broadcast_object(refusal)
        if refusal is not None:
            raise UserError(refusal)
        return held

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            atexit.unregister(self._lock.release)
            self._lock = None

    def _check_budget(self) -> None:
        """A packing budget must hold the largest prompt group (its prompt once and all its
        responses): groups are never split or truncated to fit."""
        budget = self.cfg.train.max_tokens
        responses = self.groups.response_ids    # None: drawn during training
        if budget is None or responses is None:
            return
        largest = max(len(p) + sum(map(len, rs))
                      for p, rs in zip(self.groups.prompt_ids, responses))
        if largest > budget:
            raise UserError(f"train.max_tokens: a packed row of {budget} tokens cannot hold the "
                            f"largest prompt group ({largest} tokens: its prompt once and its "
                            f"{2 + 2 * self.M} responses); set it to at least {largest}, or "
                            f"leave it unset")

    def _lora_initial(self, name, shape):
        """The initial value of a LoRA adapter the empty policy lacks (None otherwise)."""
        if not self.cfg.lora.enabled or "lora_" not in name:
            return None
        return lora_initial_value(name, shape, self.cfg.train.seed)

    @staticmethod
    def _shard_files(path, fsdp: bool):
        """The weight files a sharded model is filled from (`shard_empty`), or None when the
        model is loaded whole: no FSDP (one full-precision rank holds the whole model anyway),
        a tiny model, or weights that are not a local safetensors folder."""
        return weight_files(path) if fsdp else None

    def _frozen(self, wrap, load, path, what, mixed):
        """A frozen model of the step (pi_ref, g's model), sharded: wrap(load(empty)), built
        empty and filled shard by shard from `path` when it is sharded and has weight files.
        Frozen models are never offloaded: they hold no gradients or optimizer states."""
        files = self._shard_files(path, needs_fsdp(mixed))
        wrapper = wrap(load(files is not None))
        wrapper.attention = self.cfg.train.attention     # every model of the step attends alike
        inner = getattr(wrapper, "lm", None) or wrapper.classifier
        wrapper.eval().requires_grad_(False)
        if files is None:
            return shard(wrapper.to(self.device), inner, mixed_precision=mixed)
        return shard_empty(wrapper, inner, device=self.device, files=files, what=what,
                           mixed_precision=mixed)

    def _build_aux(self, mixed):
        mode, path = self.cfg.aux.mode, self.cfg.aux.path
        if mode == "lm":
            return self._frozen(
                SequenceLogps, lambda empty: load_causal_lm(path, what="aux.path", empty=empty),
                path, "aux.path", mixed)
        if mode == "reward_model":
            return self._frozen(
                SequenceRewards,
                lambda empty: load_reward_model(path, what="aux.path", empty=empty),
                path, "aux.path", mixed)
        if mode == "judge":
            # Unsharded and unwrapped: each rank judges its own micro-batches, no grad.
            judge = load_judge(self.cfg.aux, self.device)
            judge.attention = self.cfg.train.attention
            return judge
        if mode == "lagged":
            # The policy's copy: built empty like the policy, its values copied from it.
            if self._empty_policy:
                model = self.build_model(empty=True)
                frozen = self.wrap(model).eval().requires_grad_(False)
                frozen = shard_empty(frozen, model, device=self.device, files=None,
                                     what="model.path", mixed_precision=mixed)
            else:
                frozen = self._frozen(self.wrap, lambda empty: self.build_model(), None,
                                      "model.path", mixed)
            self._refresh_lagged(frozen)
            return frozen
        return None

    def _build_dro(self):
        """The DRO state of loss.dro_tau / loss.group_dro_eta (vrpo_fast.dro), or None."""
        loss = self.cfg.loss
        if loss.group_dro_eta is not None:
            if self.groups.domain_names is None:
                raise UserError(f"loss.group_dro_eta: group DRO needs a `domain` on every row "
                                f"of {self.cfg.data.path}")
            return GroupDRO(len(self.groups.domain_names), loss.group_dro_eta, self.device)
        if loss.dro_tau is None:
            return None
        cls = KLDRO if loss.dro_ambiguity == "kl" else Chi2DRO
        return cls(loss.dro_tau, loss.dro_gamma, self.device)

    @torch.no_grad()
    def _refresh_lagged(self, frozen=None) -> None:
        # Both are sharded identically, so copying local shards copies the whole model.
        frozen = frozen or self.aux
        for dst, src in zip(frozen.parameters(), self.policy.parameters()):
            dst.copy_(src)

    # -- one step ----------------------------------------------------------------------------

    def preferences(self, batch, groups, ref_logps):
        """g of this micro-batch, (B, 1 + M) in [0, 1] without gradient: for (chosen,
        rejected), then each Monte Carlo pair, by aux.mode (the data's column, the auxiliary
        model's preference, or 1/2 where no g is needed). `ref_logps` is (B, K) or None."""
        mode = self.cfg.aux.mode
        if mode == "given" and groups.has_aux:
            return groups.aux_prefs(self.device)
        if mode in ("none", "given"):  # no g needed: estimator dpo or M = 0
            return torch.full((batch.num_groups, 1 + self.M), 0.5, device=self.device)
        if mode == "judge":
            return self._judge_preferences(groups)
        with torch.no_grad():
            if mode == "reward_model":
                return reward_preference(self.aux(batch))
            return implicit_preference(self.aux(batch), ref_logps, self.cfg.aux.beta)

    def _judge_preferences(self, groups) -> torch.Tensor:
        """(G, 1 + M) g of the judge, which reads the micro-batch's texts (decoded from the
        policy's token ids, special tokens dropped); an unlabelled group's placeholder pair is
        two equal responses, g = 1/2."""
        def text(ids):
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        items = [(text(p), pairs_of([text(r) for r in rs]))
                 for p, rs in zip(groups.prompt_ids, groups.response_ids)]
        # Host syncs (one per packed pass): the judge's contexts are built from text on the host.
        g = self.aux.preferences(items, self.cfg.aux.judge_max_tokens)
        return torch.tensor(g, dtype=torch.float32, device=self.device)

    def micro_step(self, groups) -> tuple[torch.Tensor, dict, int]:
        """One micro-batch (`groups`, from self.groups.select): packs it, runs the reference
        and auxiliary passes, then the policy, and returns (its share of the step's loss, to
        backpropagate; detached statistics; tokens packed). The policy's LM head and loss run
        in one sweep or in two passes (`lm_head`): the same maths."""
        cfg = self.cfg
        budget = trainer_budget(cfg.train.max_tokens, self.device, groups.prompt_ids,
                                groups.response_ids, cfg.train.attention)
        batch = pack_groups(groups.prompt_ids, groups.response_ids, max_tokens=budget,
                            **row_padding(self.device, cfg.train.attention)).to(self.device)
        # pi_ref and g first: neither depends on the policy's pass, and the one sweep needs
        # both before the policy's LM head runs.
        if cfg.ref.source == "cache":
            ref_logps = groups.ref_logps(self.device)
        elif cfg.ref.source == "online":
            with torch.no_grad():
                ref_logps = self.ref(batch)
        else:
            ref_logps = None
        g = self.preferences(batch, groups, ref_logps)
        labelled = groups.labelled_mask(self.device)
        if labelled is None and self._label_scale is not None:
            # A fully labelled micro-batch of a step that has unlabelled prompts elsewhere.
            labelled = torch.ones(len(groups), dtype=torch.bool, device=self.device)
        if self.lm_head == "one_sweep":
            loss, stats = self._one_sweep_loss(batch, ref_logps, g, labelled)
        else:
            policy_logps = self.policy(batch)
            loss, stats = self.compute_loss(policy_logps, ref_logps, g, labelled, groups)
        return loss, stats, batch.num_tokens

    def _one_sweep_loss(self, batch, ref_logps, g, labelled):
        """compute_loss's value and statistics with the LM head and the loss in one sweep
        (`SequenceVRPOLoss`): the sum of the micro-batch's per-prompt losses over this rank's
        groups, as prompt_share without DRO; the statistics by the reference formula from the
        detached policy log-probs, as `ops.dispatch_vrpo_loss` takes them."""
        loss = self.cfg.loss
        settings = dict(beta=loss.beta, loss_type=loss.loss_type, estimator=loss.estimator)
        total, policy_logps = self.policy(batch, ref_logps, g, labelled, self._label_scale,
                                          **settings)
        with torch.no_grad():
            _, stats = vrpo_loss(policy_logps, ref_logps, g, labelled=labelled,
                                 label_scale=self._label_scale, reduction="none",
                                 check_inputs=False, **settings)
        return total / self.local_groups, stats

    def _choose_lm_head(self) -> str:
        """train.lm_head resolved: "one_sweep" where the one sweep computes this stage's
        objective exactly, else "two_pass"; train.lm_head=one_sweep where it cannot: one
        line saying why."""
        choice = self.cfg.train.lm_head
        if choice == "two_pass":
            return choice
        if not isinstance(self.policy, SequenceVRPOLoss):
            why = "the trained model does not give sequence log-probs (this stage's wrap)"
        elif not self.supports_one_sweep:
            why = f"{type(self).__name__} computes its own loss"
        elif self.dro is not None:
            why = ("DRO weighting (loss.dro_tau / loss.group_dro_eta) couples the groups of a "
                   "step")
        else:
            return "one_sweep"
        if choice == "one_sweep":
            raise UserError(f"train.lm_head: one_sweep cannot compute this run's loss: {why}; "
                            f"use auto or two_pass")
        return "two_pass"

    def compute_loss(self, policy_logps, ref_logps, g, labelled, groups):
        """This micro-batch's share of the global (robust) mean loss, and its statistics.

        policy_logps: (B, K) what `wrap`'s module returned; ref_logps: (B, K) or None; g:
        (B, 1 + M) from `preferences`; labelled: (B,) bool or None (every prompt labelled).
        An override computes per-prompt losses (B,) and returns
        (self.prompt_share(per_prompt, groups, stats), stats)."""
        cfg = self.cfg
        # Inputs were validated when the data was loaded; value checks here would add host
        # syncs. The fused loss kernel on CUDA, the reference formula for the statistics (and
        # for micro-batches with unlabelled prompts): `ops.dispatch_vrpo_loss`.
        per_prompt, stats = dispatch_vrpo_loss(
            policy_logps, ref_logps, g, beta=cfg.loss.beta, loss_type=cfg.loss.loss_type,
            estimator=cfg.loss.estimator, labelled=labelled, label_scale=self._label_scale,
            reduction="none", check_inputs=False)
        return self.prompt_share(per_prompt, groups, stats), stats

    def prompt_share(self, per_prompt, groups, stats, values=None) -> torch.Tensor:
        """This micro-batch's share of the step's mean over prompts: (1 / N) sum_x w_x L_x
        over its prompts, with w_x = 1, or the DRO weight of the prompt's own value (its loss,
        or `values`) and the DRO state, so batching cannot change the step's objective."""
        if self.dro is not None:
            values = per_prompt.detach() if values is None else values
            domains = groups.domain_ids(self.device) if isinstance(self.dro, GroupDRO) else None
            self.dro.observe(values, domains)
            weights = self.dro.weights(values, domains)
            stats.pop("dro_ess", None)          # the one-batch weighting's, not these weights'
            stats["dro_weight_mean"] = weights.mean()
            per_prompt = weights * per_prompt
        # FSDP averages gradients over ranks, so dividing by this rank's groups gives the
        # mean over the global batch when every rank holds the same number of groups.
        return per_prompt.sum() / self.local_groups

    def _step_label_scale(self) -> float | None:
        """With unlabelled prompts, the factor that makes a labelled prompt's first two terms a
        mean over the labelled prompts of the step's GLOBAL batch (known from the data order, no
        collective), so micro-batches and ranks cannot change the objective."""
        batch = self.stream.global_indices(self.step)
        count = self.groups.labelled_count(batch)
        return None if count == len(batch) else len(batch) / max(1, count)

    def _dro_begin(self) -> None:
        domains = None
        if isinstance(self.dro, GroupDRO):
            domains = [self.groups.domain_ids[i] for i in self.stream.global_indices(self.step)]
        self.dro.begin(domains)

    def _dro_end(self, step_stats: StepStats) -> None:
        """Update the DRO state from the step's global batch (one collective) and add it to
        the step's statistics (the same on every rank, weight 1 each: the ranks' mean is the
        value)."""
        world, rank = self.dist.world_size, self.dist.rank

        def gather(t):                          # (k,) per rank -> (world, k), one all-reduce
            slots = t.new_zeros((world, *t.shape))
            slots[rank] = t
            return all_reduce_(slots)

        self.dro.update(gather)
        step_stats.put("dro_objective", self.dro.objective())
        if isinstance(self.dro, GroupDRO):
            for name, q in zip(self.groups.domain_names, self.dro.domain_weights()):
                step_stats.put(f"dro_weight/{name}", q)

    def train_step(self) -> dict:
        """One optimizer step: this rank's share of the step's `train.batch_groups` groups in
        micro-batches of train.micro_batch_groups (gradients accumulated, reduced once), the
        DRO state updated from the global batch, gradients clipped to train.grad_clip, and the
        update applied unless the loss or gradient norm is not finite (then skipped and
        counted). Advances self.step (and refreshes a lagged g's copy when due).

        Returns the step's record for metrics.jsonl: step, loss (the global mean), lr,
        grad_norm, tokens (over all ranks), tokens_per_s, skipped, skipped_total, the loss's
        statistics as means over the step's global batch (each micro-batch's mean weighed by its
        prompts, or by its labelled prompts for `LABELLED_STATS`; those are left out of a step
        without labelled prompts), and mfu on a GPU. One host sync for the skip decision and
        one for the record."""
        cfg, t = self.cfg, self.cfg.train
        self.policy.train()
        lr = cosine_lr(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        indices = self.stream.indices(self.step, self.dist.rank, self.dist.world_size)
        micro = [indices[i:i + t.micro_batch_groups]
                 for i in range(0, len(indices), t.micro_batch_groups)]
        loss_sum = torch.zeros((), device=self.device)
        step_stats = StepStats(self.device)
        start = time.perf_counter()
        if self.dro is not None:
            self._dro_begin()
        self._label_scale = self._step_label_scale()
        for i, idx in enumerate(micro):
            # Reduce-scatter gradients only after the last micro-batch (FSDP only: one rank
            # in full precision runs unsharded, see train/modules.py).
            if hasattr(self.policy, "set_requires_gradient_sync"):
                self.policy.set_requires_gradient_sync(i == len(micro) - 1)
            loss, stats, ntok = self.micro_step(self.groups.select(idx))
            loss.backward()
            loss_sum += loss.detach()
            step_stats.add(stats, ntok, prompts=len(idx),
                           labelled=self.groups.labelled_count(idx))
        if self.dro is not None:
            self._dro_end(step_stats)
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_sum = all_reduce_(loss_sum) / self.dist.world_size
        # Host sync (one per step): the skip decision needs the loss and the gradient norm.
        finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            self.skipped_total += 1
            self.bad_in_row += 1
            warnings.warn(f"step {self.step + 1}: non-finite loss or gradient, step skipped "
                          f"({self.bad_in_row} in a row)", stacklevel=1)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if cfg.aux.mode == "lagged" and self.step % cfg.aux.refresh_every == 0:
            self._refresh_lagged()
        elapsed = time.perf_counter() - start
        # One collective and one host copy: tokens and the statistics over all ranks.
        total_tokens, means = step_stats.reduce()
        record = {"step": self.step, "loss": loss_sum.item(), "lr": lr,
                  "grad_norm": grad_norm.item(), "tokens": int(total_tokens),
                  "tokens_per_s": total_tokens / max(elapsed, 1e-9),
                  "skipped": int(not finite), "skipped_total": self.skipped_total}
        record.update(means)
        if self._peak_flops:
            # 6 N per token for forward + backward of the policy (reference passes not counted).
            record["mfu"] = 6 * self._n_params * record["tokens_per_s"] / (
                self._peak_flops * self.dist.world_size)
        for watch in self.watchers:
            watch.observe(record)
        return record

    # -- the run -----------------------------------------------------------------------------

    def save(self) -> None:
        """A checkpoint of the current step (train/checkpoint.py: Checkpointer.save)."""
        self.checkpointer.save()

    def fit(self) -> Path:
        t = self.cfg.train
        try:
            self.checkpointer.resume()
            if self.step > t.max_steps:
                # final/ would be the step-N model under a config that asked for fewer steps.
                raise UserError(f"train.max_steps: {t.max_steps}, but {self.out} holds a "
                                f"checkpoint at step {self.step}; raise train.max_steps to "
                                f"train on from it, or choose a new train.output_dir")
            self.metrics.start(self.step, t.max_steps, self._summary())
            while self.step < t.max_steps:
                record = self.train_step()
                if record["skipped"] and self.bad_in_row >= t.max_bad_steps:
                    raise UserError(f"step {self.step}: {self.bad_in_row} non-finite steps in a "
                                    f"row (train.max_bad_steps = {t.max_bad_steps}); stopping. "
                                    f"Lower train.lr, use loss.loss_type=ramp, or check the data")
                self.metrics.log(record)
                if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps:
                    self.save()
            self.metrics.close()
            return self.checkpointer.save_final()
        finally:
            self.metrics.close()
            self._release_lock()

    def _summary(self) -> str:
        return (f"policy: {self._n_params / 1e6:.2f}M parameters on {self.device} x "
                f"{self.dist.world_size}; {len(self.groups)} prompt groups, M = {self.M} "
                f"Monte Carlo pairs ({2 + 2 * self.M} responses per group); "
                f"{self.cfg.train.batch_groups} groups per step; loss {self.cfg.loss.loss_type}"
                f"/{self.cfg.loss.estimator}, g: {self.cfg.aux.mode}, "
                f"reference: {self.cfg.ref.source}"
                + (f"; DRO: {self.dro.kind}" if self.dro is not None else ""))


class AdaptersOff:
    """pi_ref of a LoRA run: the policy module itself, called with its adapters switched off
    (the frozen base weights), so the reference costs one no-grad pass and no memory."""

    def __init__(self, policy, lm):
        self.policy, self.lm = policy, lm

    def __call__(self, batch) -> torch.Tensor:
        with adapters_off(self.lm):
            return self.policy(batch)


def train(cfg: Config, *, quiet: bool = False) -> Path:
    """Run (or resume) the training job of `cfg`; returns the final model's folder.
    `quiet` keeps the progress bar but not the resolved config (it is still saved)."""
    trainer = Trainer(cfg, quiet=quiet)
    return trainer.fit()


# `vrpo-fast train --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = train
