"""On-policy rounds (`run.rounds: N`): iterative VRPO (and DPO), where every round's labelled
pairs and Monte Carlo pairs are drawn from that round's pi_ref, so VRPO's correction is
mean-zero by construction (docs/rounds.md).

    vrpo-fast run --config configs/rounds/tiny-rounds.yaml         # run.rounds: 2; re-run to resume

Round r lives in rounds.output/r<r>/ and runs, in order:

    round.json     the round's settings, its slice of prompts and pi_ref_r (path, weight files'
                   sha256): round 0's is model.path (or model.tiny), round r's is round r - 1's
                   train/final. Written before anything else of the round.
    prompts.jsonl  the round's prompts: the r-th slice of rounds.prompts_per_round prompts of
                   sample.input (shuffled first by rounds.seed with rounds.shuffle), no overlap
    sampled/       ONE sampling call per shard from pi_ref_r drawing 2 + 2M responses per prompt
                   (2M = sample.num_samples; 2 only with loss.estimator = dpo): the first two are
                   the pair to label, the others the Monte Carlo responses
    labelled/      the labeller's verdict on the pair (vrpo_fast.label: one Bernoulli draw per
                   pair, seeded by (label.seed, round, prompt id)) as chosen / rejected, the 2M
                   others as samples; with aux.mode = given, g (aux_prefs) is the labeller's p
    scored/        `score` against pi_ref_r (when run.stages has score)
    train/         `train` from pi_ref_r's weights with pi_ref = pi_ref_r; train/final is
                   pi_ref_{r+1}
    eval/          `eval` of train/final against pi_ref_r (when run.stages has eval)

Before any work the whole plan is checked (`plan_rounds`): the prompt set holds N slices, the
labeller loads, and every round folder already on disk was written under this config's
settings, else one line naming the first key that differs. Then each round's steps resume
or are skipped as complete: sampled, labelled and scored shards on disk are kept (each shard's
draws are seeded by its index, the labels by their prompt), the trainer resumes from its latest
checkpoint, and eval is skipped when its results hold these settings. A run killed anywhere
and re-run with the same command finishes with the same weights and results as one that was
never interrupted.

The sampler: where the sampler object has `update_weights(model)` (an engine that stays up,
such as vLLM's), the rounds keep it and hand it each round's new weights; otherwise each round
builds a fresh sampler from pi_ref_r's saved weights.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from pathlib import Path

from vrpo_fast import shards
from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.tokenize import tokenize_prompt
from vrpo_fast.errors import UserError, check_output, renamed
from vrpo_fast.label import FunctionLabeller, draw_label, draw_seed, make_labeller
from vrpo_fast.models import model_from_config, tokenizer_from_config
from vrpo_fast.pipeline import _hub_name as hub_name
from vrpo_fast.pipeline import run_stage
from vrpo_fast.provenance import (
    build_provenance,
    files_fingerprint,
    ids_fingerprint,
    read_provenance,
)
from vrpo_fast.sample import choose_backend, make_sampler, shard_drawer
from vrpo_fast.samplers import stop_token_ids
from vrpo_fast.stage import run_sharded_stage, shard_count

RECORD = "round.json"
FORMAT = 1
# Keys that do not change what a round computes: where things go, how much is logged or kept,
# and how many rounds there are (raising run.rounds adds rounds to a finished run).
NOT_SETTINGS = ("run.rounds", "run.stages", "rounds.output", "sample.input", "sample.output",
                "score.input", "score.output", "data.path", "data.cache_dir",
                "train.output_dir", "train.save_every", "train.keep_last", "train.log_every",
                "train.tensorboard", "train.wandb_project", "train.keep_host_memory",
                "eval.policy", "eval.output", "eval.batch_size", "score.max_tokens",
                "audit", "rl")


def round_dir(cfg, r: int) -> Path:
    return Path(cfg.rounds.output) / f"r{r}"


def round_seed(seed: int, r: int) -> int:
    """Round r's sampling seed (31 bits), from sample.seed: unrelated streams per round."""
    digest = hashlib.sha256(f"round:{seed}:{r}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def num_mc_pairs(cfg) -> int:
    """M of the rounds' sampling: sample.num_samples / 2, none for the DPO estimator."""
    return 0 if cfg.loss.estimator == "dpo" else cfg.sample.num_samples // 2


def flat_settings(cfg, per_round: int) -> dict:
    """The settings that decide what a round computes, as {dotted key: value}."""
    out = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted not in NOT_SETTINGS and section not in NOT_SETTINGS:
                out[dotted] = value
    out["rounds.prompts_per_round"] = per_round
    return json.loads(json.dumps(out))


@dataclasses.dataclass
class Plan:
    """What the rounds need, checked before any of them runs."""

    examples: list                # the prompt set (PreferenceExample, prompts only)
    order: list[int]              # prompt ids in slicing order
    per_round: int
    settings: dict
    labeller: object
    g_function: object            # label.g_function's labeller, or None

    def prompt_ids(self, r: int) -> list[int]:
        return self.order[r * self.per_round:(r + 1) * self.per_round]


def plan_rounds(cfg) -> Plan:
    """Check the rounds before any work (else one UserError naming the key): outputs
    writable, a prompt slice for every round, the labeller loads, and each round folder on disk
    holds this config's settings."""
    n, s = cfg.run.rounds, cfg.sample
    check_output(cfg.rounds.output, "rounds.output")
    if "eval" in cfg.run.stages:
        if not cfg.eval.judge:
            raise UserError("eval.judge: not set; the eval stage needs a judge (synthetic, "
                            "reward_model:PATH, lm:PATH or python:module:function)")
        if not cfg.eval.prompts:
            raise UserError("eval.prompts: not set; the eval stage of each round needs "
                            "held-out prompts")
        if not Path(cfg.eval.prompts).exists() and not hub_name(cfg.eval.prompts):
            raise UserError(f"eval.prompts: {cfg.eval.prompts} does not exist")
    if not s.input:
        raise UserError("sample.input: no prompt set for the rounds to slice")
    try:
        examples, report = load_preference_data(s.input, on_bad_row=cfg.data.on_bad_row,
                                                split=cfg.data.split, prompts_only=True)
    except UserError as err:
        raise renamed(err, "sample.input") from None
    if report.skipped:
        print(f"rounds: skipped {report.skipped} bad rows of {s.input} (data.on_bad_row = skip)")
    per_round = cfg.rounds.prompts_per_round or len(examples) // n
    if per_round < 1 or per_round * n > len(examples):
        raise UserError(f"rounds.prompts_per_round: {n} rounds x {per_round} prompts need "
                        f"{n * per_round} prompts, sample.input holds {len(examples)} "
                        f"({s.input}); lower run.rounds or rounds.prompts_per_round, or give "
                        f"more prompts")
    order = list(range(len(examples)))
    if cfg.rounds.shuffle:
        random.Random(cfg.rounds.seed).shuffle(order)
    settings = flat_settings(cfg, per_round)
    for r in range(n):
        _check_record(round_dir(cfg, r), settings, None)
    g_function = None if cfg.label.g_function is None else \
        FunctionLabeller(cfg.label.g_function, key="label.g_function")
    return Plan(examples, order, per_round, settings, make_labeller(cfg), g_function)


def _check_record(folder: Path, settings: dict, previous: dict | None) -> None:
    """A round folder's round.json must hold these settings (and, when `previous` is given,
    the same pi_ref weights); no record: nothing of the round was written yet."""
    path = folder / RECORD
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
        old = record["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"rounds.output: {path} is not a round record; delete {folder} to "
                        f"start that round over") from None
    for key in sorted(set(old) & set(settings)):   # a key added since is not a change
        if old.get(key) != settings.get(key):
            raise UserError(f"rounds.output: {folder} was written with {key} = "
                            f"{old.get(key)!r}, this config has {settings.get(key)!r}; choose "
                            f"a new rounds.output, or delete the folder to start over")
    if previous is not None and record.get("pi_ref", {}).get("files_sha256") != \
            previous["files_sha256"]:
        raise UserError(f"rounds.output: {folder} was trained on from pi_ref weights "
                        f"{str(record.get('pi_ref', {}).get('files_sha256'))[:12]}, but "
                        f"{previous['path']} now holds {str(previous['files_sha256'])[:12]}; "
                        f"delete {folder} (and the rounds after it) to redo them")


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def round_config(cfg, r: int, pi_ref: str | None):
    """Round r's config: pi_ref_r as model.path (round 0: as configured), its stage folders
    under rounds.output/r<r>/, its sampling seed."""
    c = copy.deepcopy(cfg)
    folder = round_dir(cfg, r)
    if pi_ref is not None:
        c.model.path, c.model.tiny = pi_ref, None
    c.run.rounds = 0
    c.sample.input = str(folder / "prompts.jsonl")
    c.sample.output = str(folder / "sampled")
    c.sample.seed = round_seed(cfg.sample.seed, r)
    c.score.input = str(folder / "labelled")
    c.score.output = str(folder / "scored")
    c.data.path = c.score.output if "score" in cfg.run.stages else c.score.input
    c.train.output_dir = str(folder / "train")
    c.eval.policy = str(folder / "train" / "final")
    c.eval.output = str(folder / "eval")
    return c


class Engine:
    """The sampler the rounds share when it can take new weights in place (update_weights);
    otherwise each round builds its own."""

    def __init__(self):
        self.sampler = None

    def for_round(self, cfg_r, tokenizer, backend: str, ref_model):
        kept = self.sampler
        if kept is not None and kept.backend == backend and hasattr(kept, "update_weights"):
            kept.update_weights(ref_model)
            return kept
        sampler = make_sampler(cfg_r, tokenizer, backend, ref_model)
        self.sampler = sampler if hasattr(sampler, "update_weights") else None
        return sampler


def sample_round(cfg_r, examples, engine: Engine, *, progress: bool) -> Path:
    """2 + 2M responses per prompt from pi_ref_r, one sampling call per shard (shard i under
    shard_seed(round's seed, i)), as resumable shards with the sampling provenance."""
    s = cfg_r.sample
    out = Path(s.output)
    n = 2 + 2 * num_mc_pairs(cfg_r)
    tokenizer = tokenizer_from_config(cfg_r)
    prompt_ids = [tokenize_prompt(ex.prompt, tokenizer) for ex in examples]
    backend = choose_backend(cfg_r)
    ref = model_from_config(cfg_r, "ref")
    sampling = {"num_samples": n, "temperature": s.temperature, "top_p": s.top_p,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed, "backend": backend,
                "stop_token_ids": stop_token_ids(tokenizer, ref.generation_config)}
    record = build_provenance(
        ref, tokenizer, sampling=sampling,
        prompts={"source": s.input, "count": len(examples), "sha256": ids_fingerprint(prompt_ids)},
        shards={"count": shard_count(len(examples), s.shard_size), "size": s.shard_size},
        runtime={"batch_size": s.batch_size}, backend=backend)

    def announce(done: int, mine: int) -> None:
        print(f"rounds: sample: {len(examples)} prompts x {n} responses (2 to label, "
              f"{n - 2} Monte Carlo), {done} of {mine} shards done, backend {backend}")

    def setup():
        sampler = engine.for_round(cfg_r, tokenizer, backend, ref)
        return shard_drawer(sampler, examples, prompt_ids, n, s.seed, tokenizer)

    return run_sharded_stage(
        out, record, num_items=len(examples), shard_size=s.shard_size, key="rounds.output",
        holds="samples", differs_hint="other model, prompts or sampling settings",
        announce=announce, setup=setup, progress=progress, desc="sample", unit="prompt")


def label_round(cfg_r, r: int, prompt_ids: list[int], labeller, *, g_function=None,
                progress: bool) -> Path:
    """The labelled set of round r: the first two responses of each prompt labelled by one
    draw from the labeller's p, the others the Monte Carlo samples; with aux.mode given, g
    (aux_prefs) of every pair from `g_function` (label.g_function) or the labeller's own p.
    Every label is computed and checked before the first shard is written."""
    sampled, out = Path(cfg_r.sample.output), Path(cfg_r.score.input)
    rows = shards.read_shards(sampled)
    record = {**read_provenance(sampled), "labelling": {
        "labeller": labeller.identity(), "seed": cfg_r.label.seed, "round": r,
        "g": "labeller" if _g_from_labeller(cfg_r) else None}}
    size = cfg_r.sample.shard_size
    M = num_mc_pairs(cfg_r)
    g_source = labeller if g_function is None else g_function
    if g_source is not labeller and _g_from_labeller(cfg_r):
        record["labelling"]["g"] = g_source.identity()

    def announce(done: int, mine: int) -> None:
        print(f"rounds: label: {len(rows)} pairs by {labeller.identity()['mode']}, {done} of "
              f"{mine} shards done")

    def labels() -> list[dict]:
        items = [(row["prompt"], row["samples"][0], row["samples"][1]) for row in rows]
        mc_items = [(row["prompt"], a, b) for row in rows
                    for a, b in zip(row["samples"][2::2], row["samples"][3::2])]
        if g_source is labeller and _g_from_labeller(cfg_r):
            p = labeller.ask(items + mc_items)
        else:
            p = labeller.ask(items)
            if _g_from_labeller(cfg_r):     # g of label.g_function, in the same layout
                p += g_source.ask(items + mc_items)
        labelled = []
        for i, (row, pid) in enumerate(zip(rows, prompt_ids)):
            y1, y2 = row["samples"][:2]
            first = draw_label(p[i], draw_seed(cfg_r.label.seed, r, pid))
            new = {"prompt": row["prompt"], "chosen": y1 if first else y2,
                   "rejected": y2 if first else y1, "samples": row["samples"][2:],
                   "sample_ids": row["sample_ids"][2:]}
            # The pair as sampled: a response cut at max_new_tokens is scored without the EOS
            # its text would get, exactly like the Monte Carlo responses.
            ids1, ids2 = row["sample_ids"][:2]
            new["pair_ids"] = [ids1, ids2] if first else [ids2, ids1]
            if _g_from_labeller(cfg_r):
                g = p[len(rows):] if g_source is labeller else p[2 * len(rows):]
                g_pair = p[i] if g_source is labeller else p[len(rows) + i]
                mc = g[i * M:(i + 1) * M]
                new["aux_prefs"] = [g_pair if first else 1.0 - g_pair, *mc]
            if row.get("domain") is not None:
                new["domain"] = row["domain"]
            labelled.append(new)
        return labelled

    # Every label is drawn and checked before the folder is made: a labeller's bad answer
    # leaves nothing of the labelled set on disk.
    labelled = labels() if shards.pending_shards(out, shard_count(len(rows), size)) else []
    return run_sharded_stage(
        out, record, num_items=len(rows), shard_size=size, key="rounds.output",
        holds="labels", differs_hint="other samples", announce=announce,
        setup=lambda: lambda index, lo, hi: labelled[lo:hi],
        progress=progress, desc="label", unit="pair")


def _g_from_labeller(cfg) -> bool:
    """aux.mode = given in the rounds: g is the labeller's p (nothing else writes aux_prefs)."""
    return cfg.aux.mode == "given" and cfg.loss.estimator == "vrpo"


def pi_ref_record(cfg, r: int) -> tuple[str | None, dict]:
    """pi_ref_r: (its path as round r's model.path, None for round 0's configured model; the
    record round.json keeps: path, weight files' sha256, and the tiny config of round 0)."""
    if r == 0:
        path = cfg.model.path
        return None, {"path": path, "tiny": cfg.model.tiny,
                      "files_sha256": files_fingerprint(path) if path else None}
    final = round_dir(cfg, r - 1) / "train" / "final"
    if not final.is_dir():
        raise UserError(f"rounds.output: {final} is missing, round {r} cannot start")
    return str(final), {"path": str(final), "tiny": None,
                        "files_sha256": files_fingerprint(final)}


def run_rounds(cfg, *, progress: bool = True) -> list[tuple[str, Path | None]]:
    """Run (or resume) run.rounds rounds; returns [(round/stage, output or None when done
    already), ...]."""
    plan = plan_rounds(cfg)
    engine = Engine()
    n, done = cfg.run.rounds, []
    for r in range(n):
        folder = round_dir(cfg, r)
        pi_ref, ref_record = pi_ref_record(cfg, r)
        _check_record(folder, plan.settings, ref_record)
        cfg_r = round_config(cfg, r, pi_ref)
        ids = plan.prompt_ids(r)
        # The prompts alone: a labelled pair the prompt set may carry is not pi_ref_r's.
        examples = [dataclasses.replace(plan.examples[i], chosen=None, rejected=None)
                    for i in ids]
        prompts_sha = ids_fingerprint(ex.prompt for ex in examples)
        print(f"rounds: round {r + 1}/{n}: {len(ids)} prompts, pi_ref = "
              f"{ref_record['path'] or 'model.tiny'}")
        if (folder / RECORD).is_file():
            recorded = json.loads((folder / RECORD).read_text()).get("prompts", {})
            if recorded.get("sha256") != prompts_sha:
                raise UserError(f"sample.input: round {r}'s slice of {cfg.sample.input} holds "
                                f"other prompts than {folder} was written with; give the same "
                                f"prompts, or choose a new rounds.output")
        else:
            prompts = [{"prompt": ex.prompt, **({"domain": ex.domain} if ex.domain else {})}
                       for ex in examples]
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / ".prompts.jsonl.tmp"
            tmp.write_text("".join(json.dumps(p) + "\n" for p in prompts))
            tmp.replace(folder / "prompts.jsonl")
            _write_json(folder / RECORD, {
                "format": FORMAT, "round": r, "pi_ref": ref_record, "settings": plan.settings,
                "prompts": {"source": str(cfg.sample.input), "ids": ids,
                            "sha256": prompts_sha}})
        done.append((f"r{r}/sample", sample_round(cfg_r, examples, engine, progress=progress)))
        done.append((f"r{r}/label", label_round(cfg_r, r, ids, plan.labeller,
                                                g_function=plan.g_function,
                                                progress=progress)))
        for stage in cfg.run.stages:
            if stage == "sample":
                continue
            out = run_stage(cfg_r, stage, progress=progress)
            print(f"rounds: r{r} {stage}: " + (f"wrote {out}" if out is not None else
                                               "done already"))
            done.append((f"r{r}/{stage}", out))
    return done
