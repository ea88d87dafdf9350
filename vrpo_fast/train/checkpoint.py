"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of <output_dir>/checkpoints/:
    step_00000050/            a complete checkpoint (DCP shards + .metadata, config.yaml,
                              trainer_rank{r}.pt with scheduler, RNG states, step, skipped steps)
    step_00000100.tmp/        a save in progress; never read, removed on the next start
A save writes into the .tmp folder and is renamed only after every rank has finished, so a crash
during a save leaves the previous checkpoint intact. Only the newest `keep_last` are kept.

A checkpoint resumes on any number of ranks: DCP reshards the model and optimizer, and the
step (with it the schedule and the data order, which are global) is the same on every rank.
On the world size that wrote it the resume is exact; on another one the trajectory is the same
up to the order of the gradient reductions, and a rank with no saved state of its own gets its
random streams from the seed, the step and its rank.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from vrpo_fast.train.distributed import barrier

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / ".metadata").is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def remove_incomplete(output_dir: str | Path, is_main: bool) -> None:
    root = checkpoint_root(output_dir)
    if is_main and root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
    barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(output_dir, step: int, model, optimizer, extra: dict, *, rank: int,
                    keep_last: int, config_yaml: str, frozen: dict | None = None) -> Path:
    """Write step_<step> atomically (see module docstring); returns its path.

    `frozen`: name -> module of extra models whose weights are training state (a lagged copy).
    """
    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (frozen or {}).items()})
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(extra, tmp / f"trainer_rank{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():  # an earlier run reached this step and crashed after the rename
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)),
                      key=lambda p: p.name)
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# Settings a resumed run must keep: the data order of the steps still to come is a function of
# them (a change would skip or repeat prompts), or the saved weights would not fit the model.
RESUME_FIXED = ("train.seed", "train.batch_groups", "train.shuffle", "model.tiny")
# Settings that change how a run is carried out, never what it computes.
RESUME_FREE = ("train.output_dir", "train.save_every", "train.keep_last", "train.log_every",
               "train.tensorboard", "train.wandb_project", "train.max_bad_steps",
               "train.micro_batch_groups", "train.max_tokens", "train.activation_checkpointing",
               "train.compile", "data.cache_dir", "sample.", "score.", "eval.",
               "run.")


def config_changes(path: Path, config: dict) -> tuple[list[str], list[str]]:
    """Settings of `config` (Config.to_dict()) that differ from those checkpoint `path` was
    written under, as "key: old -> new" lines: (those RESUME_FIXED forbids, the others that
    change the training trajectory)."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return [], []
    saved = _flatten(yaml.safe_load(saved_file.read_text()) or {})
    now = _flatten(config)
    fixed, other = [], []
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key) == now.get(key) or key.startswith(RESUME_FREE):
            continue
        line = f"{key}: {saved.get(key)!r} -> {now.get(key)!r}"
        (fixed if key in RESUME_FIXED else other).append(line)
    return fixed, other


def _flatten(config: dict) -> dict:
    """{"section.key": value} (values that are mappings, like model.tiny, stay whole)."""
    return {f"{section}.{key}": value for section, values in config.items()
            for key, value in (values or {}).items()}


def load_checkpoint(path: Path, model, optimizer, *, rank: int,
                    frozen: dict | None = None) -> dict:
    """Restore model, optimizer (and `frozen` models) in place; returns this rank's state:
    step, skipped_total, rng (None when the checkpoint holds no state for this rank) and
    world_size (the number of ranks that wrote it)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (frozen or {}).items()})
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    for name, m in (frozen or {}).items():
        set_model_state_dict(m, state[name])
    written = len(list(path.glob("trainer_rank*.pt")))
    own = path / f"trainer_rank{rank}.pt"
    state = torch.load(own if own.is_file() else path / "trainer_rank0.pt", weights_only=False)
    if not own.is_file():
        state["rng"] = None
    return {**state, "world_size": written}


def full_model_state_dict(model) -> dict:
    """Unsharded weights on CPU (rank 0 gets them; other ranks get an empty dict)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
