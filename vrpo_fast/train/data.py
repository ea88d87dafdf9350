"""Training data: validated and tokenized once at start-up, then served as prompt groups.

The order of groups is a pure function of (seed, step), so the data position of a checkpoint is
its step and resume needs no iterator state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.tokenize import tokenize_dataset
from vrpo_fast.errors import UserError
from vrpo_fast.models import context_length, model_from_config
from vrpo_fast.provenance import check_provenance
from vrpo_fast.train.checkpoint import data_fingerprint
from vrpo_fast.train.distributed import broadcast_object


@dataclass
class GroupBatch:
    """Micro-batch of G prompt groups, each with K = 2 + 2M responses (chosen, rejected, a_*)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    _aux: list | None
    _ref: list | None
    _labelled: list[bool]
    _domains: list[int] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def domain_ids(self, device) -> torch.Tensor:
        """(G,) index of each group's domain in `TrainingGroups.domain_names`."""
        return torch.tensor(self._domains, dtype=torch.long, device=device)

    @property
    def has_aux(self) -> bool:
        return all(a is not None for a in self._aux)

    def aux_prefs(self, device) -> torch.Tensor:
        return torch.tensor(self._aux, dtype=torch.float32, device=device)

    def ref_logps(self, device) -> torch.Tensor:
        return torch.tensor(self._ref, dtype=torch.float32, device=device)

    def labelled_mask(self, device) -> torch.Tensor | None:
        if all(self._labelled):
            return None
        return torch.tensor(self._labelled, dtype=torch.bool, device=device)


class Groups:
    """The prompt groups a trainer trains on, as its loop reads them: `TrainingGroups`
    (responses from the data) and `train.rloo.PromptGroups` (prompts only).

        len(groups), select(indices)   the number of groups; a micro-batch of them
        prompt_ids                     each group's prompt token ids
        response_ids                   each group's responses' token ids; None: drawn in training
        labelled                       each group's "has a labelled pair"; None: all have
        num_mc_pairs                   M, the Monte Carlo pairs per group
        domain_names, domain_ids       see `domain_index`; both None without domains
        fingerprint                    the rows' `data_fingerprint` (resume checks it), or None
    """

    prompt_ids: list[list[int]]
    domain_names: list[str] | None
    domain_ids: list[int] | None
    response_ids: list[list[list[int]]] | None = None
    labelled: list[bool] | None = None
    num_mc_pairs: int = 0
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, idx: list[int]):
        raise NotImplementedError

    def labelled_count(self, indices) -> int:
        """How many of the groups at `indices` have a labelled pair."""
        return len(indices) if self.labelled is None else sum(self.labelled[i] for i in indices)


class TrainingGroups(Groups):
    """All tokenized groups, truncated to the M Monte Carlo pairs the loss uses.

    domains: each example's domain (None for none); when every example has one, domain_names
    lists them sorted and domain_ids holds each group's index into it (else both are None).
    """

    def __init__(self, examples, num_mc_pairs: int, eos_id: int, domains=None):
        self.num_mc_pairs = num_mc_pairs
        self.domain_names, self.domain_ids = domain_index(domains)
        K = 2 + 2 * num_mc_pairs
        self.prompt_ids, self.response_ids, self.aux, self.ref, self.labelled = [], [], [], [], []
        for ex in examples:
            responses = list(ex.response_ids)
            if not ex.labelled:
                # Unlabelled prompts carry only Monte Carlo pairs; a one-token placeholder keeps
                # K fixed, and the loss ignores it (labelled mask).
                responses = [[eos_id], [eos_id]] + responses
            self.prompt_ids.append(ex.prompt_ids)
            self.response_ids.append(responses[:K])
            self.aux.append(None if ex.aux_prefs is None else list(ex.aux_prefs[:1 + num_mc_pairs]))
            ref = None if ex.ref_logps is None else list(ex.ref_logps)
            if ref is not None and not ex.labelled:
                ref = [0.0, 0.0] + ref
            self.ref.append(None if ref is None else ref[:K])
            self.labelled.append(bool(ex.labelled))

    def select(self, idx: list[int]) -> GroupBatch:
        return GroupBatch([self.prompt_ids[i] for i in idx], [self.response_ids[i] for i in idx],
                          [self.aux[i] for i in idx], [self.ref[i] for i in idx],
                          [self.labelled[i] for i in idx],
                          None if self.domain_ids is None else [self.domain_ids[i] for i in idx])


def domain_index(domains) -> tuple[list[str] | None, list[int] | None]:
    """Domain names (sorted) and each item's index into them; (None, None) unless every item
    has a domain."""
    if not domains or any(d is None for d in domains):
        return None, None
    names = sorted(set(domains))
    index = {d: i for i, d in enumerate(names)}
    return names, [index[d] for d in domains]


class GroupStream:
    """Step -> global batch of group indices: consecutive slices of seeded epoch permutations."""

    def __init__(self, n: int, batch_groups: int, *, seed: int, shuffle: bool = True):
        self.n, self.batch_groups, self.seed, self.shuffle = n, batch_groups, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
            else:
                self._perms[epoch] = list(range(self.n))
        return self._perms[epoch]

    def global_indices(self, step: int) -> list[int]:
        start = step * self.batch_groups
        stop = start + self.batch_groups
        return [self._perm(i // self.n)[i % self.n] for i in range(start, stop)]

    def indices(self, step: int, rank: int, world_size: int) -> list[int]:
        """This rank's share of step's global batch (contiguous, equal sizes)."""
        g = self.global_indices(step)
        per = len(g) // world_size
        return g[rank * per:(rank + 1) * per]


def load_training_groups(cfg, tokenizer, dist) -> tuple[TrainingGroups, object]:
    """Load, validate (data.on_bad_row), check provenance and tokenize the training data."""
    d = cfg.data
    if not d.path:
        raise UserError("data.path: no training data given")
    # Rows longer than the model's context are bad rows like those over data.max_length: the
    # model has no positions for them (and their packed attention mask would not fit anyway).
    limit = min((n for n in (d.max_length, context_length(cfg)) if n is not None), default=None)
    examples, report = load_preference_data(d.path, on_bad_row=d.on_bad_row, split=d.split,
                                            tokenizer=tokenizer, max_length=limit,
                                            max_prompt_length=d.max_prompt_length,
                                            max_response_length=d.max_response_length)
    if dist.is_main and getattr(report, "skipped", 0):
        print(f"data: skipped {report.skipped} bad rows of {d.path} (data.on_bad_row = skip)")
    if not examples:
        raise UserError(f"data.path: {d.path} holds no usable rows")
    _check_provenance(cfg, d.path, tokenizer, dist)
    cache = d.cache_dir or f"{cfg.train.output_dir}/cache"
    tokenized, stats = tokenize_dataset(examples, tokenizer, cache_dir=cache,
                                        max_prompt_length=d.max_prompt_length,
                                        max_response_length=d.max_response_length)
    if dist.is_main and stats.get("truncated"):
        print(f"data: truncated {stats['truncated']} rows (prompts keep their end, responses "
              f"their start)")
    available = min(len(ex.response_ids) - (2 if ex.labelled else 0) for ex in tokenized) // 2
    M = available if cfg.loss.num_mc_pairs is None else cfg.loss.num_mc_pairs
    if M > available:
        raise UserError(f"loss.num_mc_pairs: {M} Monte Carlo pairs asked for, but the data has "
                        f"{available} per prompt")
    _check_columns(cfg, tokenized, M)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    groups = TrainingGroups(tokenized, M, eos, [ex.domain for ex in examples])
    groups.fingerprint = data_fingerprint(examples)   # recorded in checkpoints (resume check)
    return groups, report


def _check_columns(cfg, tokenized, M) -> None:
    uses_g = cfg.loss.estimator == "vrpo" and M > 0
    for ex in tokenized:
        if cfg.ref.source == "cache" and ex.ref_logps is None:
            raise UserError(f"ref.source: 'cache' needs ref_logps in the data, row {ex.row} has "
                            f"none: run `vrpo-fast score` first, or set ref.source=online")
        if uses_g and cfg.aux.mode == "given" and ex.aux_prefs is None:
            raise UserError(f"aux.mode: 'given' needs aux_prefs (g) in the data, row {ex.row} has "
                            f"none: run `vrpo-fast score`, or choose aux.mode lm / lagged / "
                            f"reward_model")
        if not ex.labelled and (M == 0 or cfg.loss.estimator == "dpo"):
            raise UserError(f"data.path: row {ex.row} is unlabelled, which only the vrpo "
                            f"estimator with M >= 1 can use")


def _check_provenance(cfg, path, tokenizer, dist=None) -> None:
    """Refuse data not drawn from (or scored with) this run's pi_ref. Rank 0 checks, the other
    ranks take its verdict: when pi_ref's weight files are not the recorded ones the check
    loads the model, and one copy in host memory is enough."""
    from pathlib import Path


    root = Path(path)
    prov = (root if root.is_dir() else root.parent) / "provenance.json"
    if not prov.is_file():
        return
    # Cached ref_logps must cover the tokens this run trains on: same truncation as scoring.
    truncation = {"max_prompt_length": cfg.data.max_prompt_length,
                  "max_response_length": cfg.data.max_response_length} \
        if cfg.ref.source == "cache" else None
    refusal = failure = None
    if dist is None or dist.is_main:
        try:
            check_provenance(prov.parent, lambda: model_from_config(cfg, "ref"), tokenizer,
                             truncation=truncation, ref_path=cfg.ref.path or cfg.model.path)
        except UserError as err:
            refusal = str(err)
        except Exception as err:  # the other ranks must not wait for a verdict forever
            failure = err
            refusal = f"data.path: rank 0 could not check {prov}: {type(err).__name__}: {err}"
    if dist is not None:
        refusal = broadcast_object(refusal)
    if failure is not None:
        raise failure
    if refusal is not None:
        raise UserError(refusal)
