"""TRL's DPOTrainer with shared-prefix packing and the VRPO estimator.

    from vrpo_fast.integrations.trl import VRPOConfig, VRPOTrainer

    trainer = VRPOTrainer(model=model, ref_model=ref_model, processing_class=tokenizer,
                          args=VRPOConfig(output_dir="out", estimator="vrpo", beta=0.1),
                          train_dataset=dataset)
    trainer.train()

DPOTrainer's collator and loss split every batch into a chosen and a rejected half, so a loss over
K = 2 + 2M responses per prompt cannot plug into it. This subclass replaces the three pieces that
carry that assumption and keeps everything else TRL's (logging, checkpoints, accelerate with
DeepSpeed / FSDP, PEFT, callbacks, the reference model's set-up, sync_ref_model):
- the data set: TRL's preference columns (prompt, chosen, rejected; strings or messages; an
  implicit prompt) plus VRPO's (`samples` or a_1 .. a_2M, `aux_prefs`, optional `ref_logps`),
  validated and tokenized by `vrpo_fast.data` (BOS once, one EOS per response, the sampled ids
  exactly when `sample_ids` is given; `max_length` truncates prompts from the start and
  responses from the end);
- the collator: each prompt once with its K responses behind it (`pack_groups` with the
  packing budget `max_tokens` and `row_padding` for the device);
- the loss: `model(vrpo_batch=...)` (`add_packed_forward`: body on the packed rows, the fused
  log-prob operation on the response positions only, inside the model's forward so accelerate's
  wrappers cover it), then `FusedLinearVRPOLoss.from_logps` (the fused loss kernel on CUDA).
The reference log-probs come from `ref_logps` in the data when every row has them and
precompute_ref_log_probs is set, else from the reference model (or the PEFT model with its
adapter off) on the same packed batch. DPOConfig options that change DPO's maths in ways this
loss does not implement are refused by name before anything runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from datasets import IterableDataset
from trl import DPOConfig, DPOTrainer

from vrpo_fast.data.tokenize import tokenize_example
from vrpo_fast.data.validate import validate_row
from vrpo_fast.errors import UserError
from vrpo_fast.integrations.packed import add_packed_forward
from vrpo_fast.objective import ESTIMATORS
from vrpo_fast.ops import FusedLinearVRPOLoss
from vrpo_fast.packing import pack_groups, row_padding, trainer_budget

LOSS_TYPES = ("sigmoid", "hinge", "ramp")   # the same maths in TRL and vrpo_fast (ramp: ours)
TOKENIZED = ("prompt_ids", "response_ids", "aux_prefs", "ref_logps")


@dataclass
class VRPOConfig(DPOConfig):
    """DPOConfig plus the VRPO settings. `beta` and `loss_type` (one of sigmoid, hinge, ramp)
    keep their DPOConfig meaning."""

    estimator: str = field(default="vrpo", metadata={
        "help": "vrpo: DPO's loss plus the control variate over the Monte Carlo pairs, weighted "
                "by g (aux_prefs); dpo: plain DPO on chosen and rejected (the other columns are "
                "ignored)."})
    num_mc_pairs: int | None = field(default=None, metadata={
        "help": "M, the Monte Carlo pairs used per prompt (the first 2M samples); None: all the "
                "data has (the fewest of any row). Ignored by estimator=dpo."})
    dro_tau: float | None = field(default=None, metadata={
        "help": "KL-DRO temperature over the prompts of a batch: weights softmax(L / tau), not "
                "differentiated; None: the plain mean."})
    max_tokens: int | None = field(default=None, metadata={
        "help": "Packing budget: tokens per packed row (a prompt and its responses never split "
                "across rows). None: one row per batch on CUDA, rows no longer than the longest "
                "group elsewhere. Never changes the maths."})

    def __post_init__(self):
        super().__post_init__()
        if self.estimator not in ESTIMATORS:
            raise UserError(f"estimator: unknown {self.estimator!r}; expected one of "
                            f"{', '.join(ESTIMATORS)}")
        if self.num_mc_pairs is not None and (not isinstance(self.num_mc_pairs, int)
                                              or self.num_mc_pairs < 0):
            raise UserError(f"num_mc_pairs: expected an int >= 0 or None, got "
                            f"{self.num_mc_pairs!r}")
        if self.dro_tau is not None and not self.dro_tau > 0:
            raise UserError(f"dro_tau: must be > 0 or None, got {self.dro_tau}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise UserError(f"max_tokens: expected a positive int or None, got "
                            f"{self.max_tokens!r}")


def _refuse_unsupported(args: VRPOConfig) -> None:
    """DPOConfig options whose maths this trainer does not implement: one line naming it."""
    if not isinstance(args, VRPOConfig):
        raise UserError("args: VRPOTrainer takes a VRPOConfig (DPOConfig plus estimator, "
                        "num_mc_pairs, dro_tau, max_tokens)")
    loss_types = list(args.loss_type)
    if len(loss_types) != 1 or loss_types[0] not in LOSS_TYPES:
        raise UserError(f"loss_type: {loss_types} not supported by VRPOTrainer; expected one of "
                        f"{', '.join(LOSS_TYPES)} (TRL's ipo is length-normalised, vrpo_fast's "
                        f"is not)")
    refused = {
        "loss_weights": args.loss_weights not in (None, [1.0]),
        "f_divergence_type": args.f_divergence_type != "reverse_kl",
        "ld_alpha": args.ld_alpha is not None,
        "label_smoothing": args.label_smoothing != 0,
        "use_weighting": args.use_weighting,
        "padding_free": args.padding_free,
        "truncation_mode": args.truncation_mode != "keep_start",
    }
    for name, bad in refused.items():
        if bad:
            raise UserError(f"{name}: {getattr(args, name)!r} is not supported by VRPOTrainer "
                            f"(leave it at DPOConfig's default)")


@dataclass
class VRPOCollator:
    """Rows of the prepared data set -> {"vrpo_batch": PackedBatch of B groups x K responses,
    "aux_prefs": (B, 1 + M), "ref_logps": (B, K) when every row has them}."""

    num_mc_pairs: int
    pad_id: int
    vocab_size: int
    device: torch.device
    max_tokens: int | None = None

    def __call__(self, rows: list[dict]) -> dict:
        M = self.num_mc_pairs
        K = 2 + 2 * M
        prompts = [r["prompt_ids"] for r in rows]
        responses = [r["response_ids"][:K] for r in rows]
        budget = trainer_budget(self.max_tokens, self.device, prompts, responses)
        batch = pack_groups(prompts, responses, max_tokens=budget, pad_id=self.pad_id,
                            vocab_size=self.vocab_size, **row_padding(self.device))
        # g is unused by the DPO estimator and by M = 0; its shape still has to be (B, 1 + M).
        aux = [r["aux_prefs"][:1 + M] if r.get("aux_prefs") is not None else [0.5] * (1 + M)
               for r in rows]
        out = {"vrpo_batch": batch, "aux_prefs": torch.tensor(aux, dtype=torch.float32)}
        if all(r.get("ref_logps") is not None for r in rows):
            out["ref_logps"] = torch.tensor([r["ref_logps"][:K] for r in rows],
                                            dtype=torch.float32)
        return out


def _tokenize_row(raw: dict, index: int, tokenizer, max_length: int | None, name: str) -> dict:
    """One raw row -> prompt_ids, response_ids (chosen, rejected, a_1 .. a_2M), aux_prefs,
    ref_logps; the first problem of a bad row as a UserError."""
    example, problems = validate_row(dict(raw), index, unit="row")
    if problems:
        raise UserError(f"{name}_dataset: {problems[0]}")
    if not example.labelled:
        raise UserError(f"{name}_dataset: row {index} has no chosen / rejected pair, which "
                        f"VRPOTrainer needs in every row")
    tok = tokenize_example(example, tokenizer, max_length=max_length)
    return {"prompt_ids": tok.prompt_ids, "response_ids": tok.response_ids,
            "aux_prefs": tok.aux_prefs, "ref_logps": tok.ref_logps}


class VRPOTrainer(DPOTrainer):
    """DPOTrainer with packed prompt groups and the VRPO loss; built like DPOTrainer.

    Bad input fails in the constructor, one line each (UserError): a DPOConfig option this
    trainer cannot honour, a data set without the VRPO columns under estimator="vrpo", a bad row,
    a model whose LM head the packed path cannot find.
    """

    _tag_names = ["trl", "vrpo"]
    _name = "VRPO"

    def __init__(self, model, ref_model=None, args: VRPOConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        if args is None:
            raise UserError("args: VRPOTrainer needs a VRPOConfig (output_dir and the VRPO "
                            "settings)")
        _refuse_unsupported(args)
        if data_collator is not None:
            raise UserError("data_collator: VRPOTrainer packs its batches itself; leave it None")
        if isinstance(model, torch.nn.Module):
            self._check_model(model)
        self._num_mc_pairs = None if args.estimator == "vrpo" else 0
        # DPOTrainer builds its own collator when given None; a placeholder keeps it from doing
        # so, and the real one (which needs M, known once the data is prepared, and the model's
        # vocabulary) replaces it.
        super().__init__(model=model, ref_model=ref_model, args=args,
                         data_collator=_Placeholder(), train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if self.aux_loss_enabled:
            raise UserError("router_aux_loss_coef: the MoE load-balancing loss is not supported "
                            "by VRPOTrainer (set it to 0)")
        self._check_model(self.model)
        self.data_collator = self._collator()
        if self.ref_model is not None:
            add_packed_forward(self.accelerator.unwrap_model(self.ref_model))
        self.loss_fn = FusedLinearVRPOLoss(beta=args.beta, loss_type=args.loss_type[0],
                                           estimator=args.estimator, dro_tau=args.dro_tau,
                                           check_inputs=False)

    @staticmethod
    def _base(model):
        from accelerate.utils import is_peft_model

        return model.get_base_model() if is_peft_model(model) else model

    def _check_model(self, model) -> None:
        try:
            add_packed_forward(self._base(model))
        except ValueError as err:
            raise UserError(str(err)) from None

    # --- data -------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        columns = set(dataset.column_names or next(iter(dataset)).keys())
        if {"prompt_ids", "response_ids"} <= columns:
            return dataset                                 # already prepared (evaluate())
        if {"image", "images"} & columns:
            raise UserError(f"{dataset_name}_dataset: image columns; VRPOTrainer takes text "
                            f"preference data only")
        if args.estimator == "vrpo" and args.num_mc_pairs != 0:
            missing = [what for what, cols in (("samples (or a_1 .. a_2M)", {"samples", "a_1"}),
                                               ("aux_prefs (or chosen_preference, ...)",
                                                {"aux_prefs", "chosen_preference"}))
                       if not cols & columns]
            if missing:
                raise UserError(f"{dataset_name}_dataset: estimator='vrpo' needs the columns "
                                f"{' and '.join(missing)} (columns here: {sorted(columns)}); "
                                f"make them with `vrpo-fast sample` and `vrpo-fast score`, or "
                                f"set estimator='dpo'")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        kwargs = {"remove_columns": list(dataset.column_names)} if dataset.column_names else {}
        dataset = dataset.map(_tokenize_row, with_indices=True,
                              fn_kwargs={"tokenizer": tokenizer, "max_length": args.max_length,
                                         "name": dataset_name}, **kwargs)
        M = self._mc_pairs(dataset, args, dataset_name)
        if self._num_mc_pairs is None:
            self._num_mc_pairs = M
        elif M < self._num_mc_pairs:
            raise UserError(f"{dataset_name}_dataset: {M} Monte Carlo pairs per prompt, but the "
                            f"training data uses {self._num_mc_pairs}")
        return dataset

    def _mc_pairs(self, dataset, args, name) -> int:
        """M this data set supports for the run's settings; UserError if it falls short."""
        if args.estimator == "dpo":
            return 0
        if isinstance(dataset, IterableDataset):
            if args.num_mc_pairs is None:
                raise UserError(f"num_mc_pairs: must be set for a streamed {name}_dataset "
                                f"(its rows cannot be counted in advance)")
            return args.num_mc_pairs
        available = min((len(r) - 2) // 2 for r in dataset["response_ids"])
        wanted = available if args.num_mc_pairs is None else args.num_mc_pairs
        if wanted > available:
            raise UserError(f"num_mc_pairs: {wanted} Monte Carlo pairs asked for, but "
                            f"{name}_dataset has {available} for some prompt")
        if wanted and any(g is None for g in dataset["aux_prefs"]):
            raise UserError(f"{name}_dataset: estimator='vrpo' needs aux_prefs (g) in every row; "
                            f"score the data with `vrpo-fast score` or set estimator='dpo'")
        return wanted

    def _collator(self) -> VRPOCollator:
        tokenizer = self._tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            (tokenizer.eos_token_id or 0)
        # From the config: under ZeRO-3 the weight itself may be an empty placeholder here.
        vocab = self._base(self.accelerator.unwrap_model(self.model)).config \
            .get_text_config().vocab_size
        return VRPOCollator(num_mc_pairs=self._num_mc_pairs or 0, pad_id=pad, vocab_size=vocab,
                            device=self.args.device, max_tokens=self.args.max_tokens)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(TOKENIZED)

    # --- reference log-probs ------------------------------------------------------------------

    def _reference_context(self):
        """No gradient, and for a PEFT policy without a reference model: its adapter off."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(disable_gradient_checkpointing(
            self.model, self.args.gradient_checkpointing_kwargs))
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            stack.enter_context(use_adapter(
                unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
        return stack

    def _reference_logps(self, batch) -> torch.Tensor:
        model = self.ref_model if self.ref_model is not None else self.model
        add_packed_forward(self._base(self.accelerator.unwrap_model(model)))
        with self._reference_context():
            return model(vrpo_batch=batch)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """ref_logps for every row, unless the data brings them (`vrpo-fast score`)."""
        if isinstance(dataset, IterableDataset):
            raise UserError("precompute_ref_log_probs: not supported for a streamed data set")
        if all(r is not None for r in dataset["ref_logps"]):
            return dataset
        values = []
        device = self.accelerator.device
        collate = self._collator()
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            inputs = collate(list(rows))
            values += self._reference_logps(inputs["vrpo_batch"].to(device)).cpu().tolist()
        return dataset.remove_columns("ref_logps").add_column("ref_logps", values)

    # --- loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        batch = inputs["vrpo_batch"]
        policy = model(vrpo_batch=batch)                               # (B, K)
        ref = inputs.get("ref_logps")
        if ref is None:
            ref = self._reference_logps(batch)
        loss, stats = self.loss_fn.from_logps(policy, ref, inputs["aux_prefs"])
        self._log_stats(mode, policy.detach(), stats)
        return (loss, None) if return_outputs else loss

    def _log_stats(self, mode: str, policy: torch.Tensor, stats: dict) -> None:
        """TRL's reward metrics plus the estimator's terms, averaged over ranks (one host sync
        per value, as DPOTrainer's own logging)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        chosen, rejected = stats["reward_chosen"], stats["reward_rejected"]
        for key, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected),
                           ("rewards/margins", stats["margin"]),
                           ("rewards/accuracies", stats["accuracy"]),
                           ("logps/chosen", policy[:, 0].mean()),
                           ("logps/rejected", policy[:, 1].mean()),
                           ("vrpo/term_dpo", stats["term_dpo"]),
                           ("vrpo/term_label", stats["term_label"]),
                           ("vrpo/term_mc", stats["term_mc"]), ("vrpo/mean_g", stats["mean_g"])):
            metrics[key].append(gather(value.float().reshape(1)).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class _Placeholder:
    """Stands in for the collator while DPOTrainer's constructor runs (see VRPOTrainer)."""

    def __call__(self, rows):
        raise RuntimeError("VRPOTrainer's collator was not set up")
