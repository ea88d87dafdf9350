"""`vrpo-fast run --config FILE [--section.key=value ...]`: a recipe's stages, in order.

    run.stages: [sample, score, train, eval]      # any of sample, score, train-reward, train,
                                                  # train-rl, eval, in this order

Each stage reads its own input key, which defaults to what the stage before it writes (see
`vrpo_fast.config`): sample.input -> sample.output = score.input -> score.output = data.path ->
<train.output_dir>/final = eval.policy -> eval.output.

Before any stage runs, `plan` checks the whole chain and stops with one line naming the key and
the path when it does not hold, so nothing is half-written:

- an input that no earlier stage of the run writes must exist (or be a hub name);
- an input must not be what a LATER stage writes (a stage cannot read its successor's output);
- when two consecutive stages both run, the second reads what the first writes (score.input =
  sample.output, data.path = score.output, eval.policy = <train.output_dir>/final);
- an output that exists already must have been written under this config's settings: the
  sampling and scoring settings recorded in its provenance.json, the settings a checkpoint of
  train.output_dir may not change on resumption.

Then each stage runs, continuing what an earlier run left: sample and score skip their finished
shards, a trainer resumes from its latest checkpoint (and is skipped when <train.output_dir>/final
was written at train.max_steps), eval is skipped when its results.json holds this config's
settings. Re-running the same command after a crash finishes the recipe.

With run.rounds = N >= 1 the stages run N times as on-policy rounds, each sampling and labelling
its own pairs from the previous round's policy (vrpo_fast.rounds, docs/rounds.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from vrpo_fast.config import Config, add_config_arguments, config_from_args
from vrpo_fast.errors import UserError, check_output
from vrpo_fast.evaluate import eval_settings, eval_stage
from vrpo_fast.sample import sample_stage
from vrpo_fast.score import score_stage
from vrpo_fast.train.checkpoint import config_changes, latest_checkpoint
from vrpo_fast.train.loop import train
from vrpo_fast.train.reward import train_reward
from vrpo_fast.train.rloo import train_rl

TRAINERS = ("train-reward", "train", "train-rl")


@dataclass
class Step:
    """One stage of a run: the (key, path) pairs it reads and the one it writes."""

    name: str
    inputs: list[tuple[str, str | None]]
    output: tuple[str, str | None]

    @property
    def writes(self) -> str | None:
        """The path a later stage reads: a trainer's final/ model, other stages' folder."""
        key, path = self.output
        if path is None:
            return None
        return str(Path(path) / "final") if self.name in TRAINERS else path


def steps_of(cfg: Config) -> list[Step]:
    """The stages of run.stages with their inputs and outputs."""
    aux = [("aux.path", cfg.aux.path)] if cfg.aux.mode in ("lm", "reward_model") else []
    e = cfg.eval
    table = {
        "sample": Step("sample", [("sample.input", cfg.sample.input)],
                       ("sample.output", cfg.sample.output)),
        "score": Step("score", [("score.input", cfg.score.input), *aux],
                      ("score.output", cfg.score.output)),
        "train-reward": Step("train-reward", [("data.path", cfg.data.path)],
                             ("train.output_dir", cfg.train.output_dir)),
        "train": Step("train", [("data.path", cfg.data.path), *aux],
                      ("train.output_dir", cfg.train.output_dir)),
        "train-rl": Step("train-rl", [("data.path", cfg.data.path),
                                      ("rl.reward_model", cfg.rl.reward_model)],
                         ("train.output_dir", cfg.train.output_dir)),
        "eval": Step("eval", [("eval.prompts", e.prompts), ("eval.policy", e.policy)]
                     + ([("eval.baseline", e.baseline)] if e.baseline else []),
                     ("eval.output", e.output)),
    }
    return [table[name] for name in cfg.run.stages]


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


_HUB = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_name(path: str) -> bool:
    """An owner/name that is not a local path (a hub model or data set)."""
    return bool(_HUB.match(path)) and not Path(path.split("/")[0]).exists() and \
        not re.search(r"\.(jsonl|json|gz|parquet|arrow|csv)$", path)


# (upstream stage, downstream stages, the downstream key that must read the upstream output)
LINKS = [(("sample",), ("score",), "score.input"),
         (("score",), TRAINERS, "data.path"),
         (TRAINERS, ("eval",), "eval.policy")]


def plan(cfg: Config) -> list[Step]:
    """The run's steps, once the chain of inputs and outputs holds (else a UserError)."""
    steps = steps_of(cfg)
    if not steps:
        raise UserError("run.stages: no stage to run")
    names = [s.name for s in steps]
    for step in steps:
        key, path = step.output
        if not path:
            raise UserError(f"{key}: not set; the {step.name} stage writes there")
        check_output(path, key)
    if "eval" in names and not cfg.eval.judge:
        raise UserError("eval.judge: not set; the eval stage needs a judge (synthetic, "
                        "reward_model:PATH or python:module:function)")
    for ups, downs, key in LINKS:
        up = next((s for s in steps if s.name in ups), None)
        down = next((s for s in steps if s.name in downs), None)
        if up is None or down is None:
            continue
        path = dict(down.inputs)[key]
        if not _same(path, up.writes):
            raise UserError(f"{key}: {path} is not what {up.name} writes ({up.writes}); the "
                            f"stages do not chain: leave {key} unset or equal to it")
    for i, step in enumerate(steps):
        earlier = {str(Path(s.writes).resolve()) for s in steps[:i]}
        for key, path in step.inputs:
            if not path:
                raise UserError(f"{key}: not set; the {step.name} stage reads it")
            later = next((s for s in steps[i:] if _same(path, s.writes)), None)
            if later is not None:
                raise UserError(f"{key}: {path} is what {later.name} writes ({later.output[0]}),"
                                f" which runs after {step.name}; the stages do not chain")
            if str(Path(path).resolve()) in earlier:
                continue
            if not Path(path).exists() and not _hub_name(path):
                writer = _writer_of(key)
                hint = f" and {writer} is not in run.stages" if writer and writer not in names \
                    else ""
                raise UserError(f"{key}: {path} does not exist{hint}")
        _check_existing_output(cfg, step)
    return steps


def _writer_of(key: str) -> str | None:
    return {"score.input": "sample", "data.path": "score",
            "eval.policy": "train"}.get(key)


def _check_existing_output(cfg: Config, step: Step) -> None:
    """An output folder that exists must have been written under this config's settings."""
    key, path = step.output
    out = Path(path)
    if step.name in ("sample", "score"):
        record_file = out / "provenance.json"
        if not record_file.is_file():
            return
        try:
            record = json.loads(record_file.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{key}: {record_file} is not valid JSON") from None
        for setting, recorded, wanted in _recorded_settings(cfg, step.name, record):
            if recorded != wanted:
                raise UserError(f"{key}: {out} was written with {setting} = {recorded!r}, this "
                                f"config has {wanted!r} (another config wrote it); choose a new "
                                f"{key}, or delete the folder to start over")
    elif step.name in TRAINERS:
        latest = latest_checkpoint(out)
        if latest is not None:
            fixed, _ = config_changes(latest, cfg.to_dict())
            if fixed:
                raise UserError(f"{key}: {latest} was written under another config "
                                f"({fixed[0]}); start a new {key}, or resume with its settings")


def _recorded_settings(cfg: Config, stage: str, record: dict):
    """(key, recorded value, this config's value) of the settings a provenance record holds."""
    if stage == "sample":
        s, sampling = cfg.sample, record.get("sampling") or {}
        for name in ("num_samples", "temperature", "top_p", "max_new_tokens", "seed"):
            yield f"sample.{name}", sampling.get(name), getattr(s, name)
        yield "sample.shard_size", (record.get("shards") or {}).get("size"), s.shard_size
    else:
        scoring, aux = record.get("scoring") or {}, cfg.aux
        yield "aux.mode", scoring.get("aux_mode"), aux.mode
        if aux.mode in ("lm", "reward_model"):
            yield "aux.path", scoring.get("aux_path"), aux.path
        if aux.mode == "lm":
            yield "aux.beta", scoring.get("aux_beta"), aux.beta
        for name in ("max_prompt_length", "max_response_length"):
            yield f"data.{name}", scoring.get(name), getattr(cfg.data, name)
        yield "score.shard_size", (record.get("shards") or {}).get("size"), cfg.score.shard_size


def train_done(cfg: Config) -> bool:
    """<train.output_dir>/final exists and the latest checkpoint is at train.max_steps."""
    out = Path(cfg.train.output_dir)
    latest = latest_checkpoint(out)
    return (out / "final").is_dir() and latest is not None and \
        int(latest.name.split("_")[1]) >= cfg.train.max_steps


def eval_done(cfg: Config) -> bool:
    """eval.output holds results of an evaluation with this config's settings."""
    results = Path(cfg.eval.output) / "results.json"
    if not results.is_file():
        return False
    try:
        saved = json.loads(results.read_text()).get("settings")
    except json.JSONDecodeError:
        return False
    return saved == json.loads(json.dumps(eval_settings(cfg)))


def run_stage(cfg: Config, name: str, *, progress: bool = True):
    """Run (or resume) one stage; returns what it wrote, or None when it was done already."""
    if name == "sample":
        return sample_stage(cfg, progress=progress)
    if name == "score":
        return score_stage(cfg, progress=progress)
    if name in TRAINERS:
        if train_done(cfg):
            return None
        fn = {"train": train, "train-reward": train_reward, "train-rl": train_rl}[name]
        return fn(cfg, quiet=not progress)
    if eval_done(cfg):
        return None
    return eval_stage(cfg)


def run_pipeline(cfg: Config, *, progress: bool = True) -> list[tuple[str, Path | None]]:
    """Check the chain, then run every stage of run.stages in order: [(stage, output), ...]
    (output None: the stage was done already)."""
    if cfg.run.rounds:
        from vrpo_fast.rounds import run_rounds  # imports this module

        return run_rounds(cfg, progress=progress)
    steps = plan(cfg)
    done = []
    for i, step in enumerate(steps):
        print(f"run: stage {i + 1}/{len(steps)}: {step.name}")
        out = run_stage(cfg, step.name, progress=progress)
        print(f"run: {step.name}: " + (f"wrote {out}" if out is not None else
                                       f"done already ({step.output[0]} = {step.output[1]})"))
        done.append((step.name, out))
    return done


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    if args.config is None:
        raise UserError("--config: `vrpo-fast run` needs a config file")
    run_pipeline(config_from_args(args))
    return 0

