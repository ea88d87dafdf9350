"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of <output_dir>/checkpoints/:
    step_00000050/            a checkpoint: DCP shards (__<rank>_<n>.distcp) + .metadata,
                              trainer_rank{r}.pt (scheduler step, skipped steps, RNG states),
                              config.yaml and checkpoint.json (step, world size, data fingerprint)
    step_00000100.tmp/        a save in progress; never read, removed on the next start
A save writes into the .tmp folder and is renamed only after every rank has finished, so a crash
during a save leaves the previous checkpoint intact. Pruning keeps the newest `keep_last`
complete ones and never removes the newest complete one.

A checkpoint is resumed only when it is complete (`checkpoint_problem`: every file it needs is
there, each shard holds the bytes .metadata points into, every small file parses); a damaged one
is passed over for the one before it. Nothing in a checkpoint runs code when read: the trainer
files load with `torch.load(weights_only=True)` (RNG states are stored as tensors, tuples and
ints), DCP's .metadata goes through an unpickler that builds DCP's own metadata classes and
nothing else, and the optimizer's non-tensor entries load with `weights_only=True` too.

A checkpoint resumes on any number of ranks: DCP reshards the model and optimizer, and the
step (with it the schedule and the data order, which are global) is the same on every rank.
On the world size that wrote it the resume is exact; on another one the trajectory is the same
up to the order of the gradient reductions, and a rank with no saved state of its own gets its
random streams from the seed, the step and its rank.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
import yaml
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from vrpo_fast.errors import UserError
from vrpo_fast.models import save_lora
from vrpo_fast.train.distributed import all_reduce_, barrier, broadcast_object

_STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "checkpoint.json"


class CheckpointUnreadable(Exception):
    """A checkpoint that cannot be resumed (a file missing, cut short, or not what it claims)."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Every finished save (renamed from .tmp), newest first, complete or not."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()),
                  key=step_of, reverse=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    return next((p for p in checkpoints(output_dir) if checkpoint_problem(p) is None), None)


def remove_incomplete(output_dir: str | Path, is_main: bool) -> None:
    root = checkpoint_root(output_dir)
    if is_main and root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
    barrier()


# -- reading without running code ----------------------------------------------------------------

def _dcp_class(module: str, name: str):
    """The classes a DCP .metadata file is made of, and nothing else."""
    if module == dcp_metadata.__name__:
        obj = getattr(dcp_metadata, name, None)
        if isinstance(obj, type) and obj.__module__ == module:
            return obj
    if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        return _StorageInfo
    if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None),
                                                           torch.dtype)):
        return getattr(torch, name)
    if (module, name) == ("torch.serialization", "_get_layout"):  # a name -> torch.layout
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath",
                                        "PureWindowsPath"):
        import pathlib

        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        import collections

        return collections.OrderedDict
    raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _dcp_class(module, name)


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """A checkpoint's DCP .metadata, unpickled with only DCP's metadata classes available (a
    pickle naming anything else is refused before anything is built)."""
    try:
        with open(path / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError,
            ValueError, IndexError, KeyError) as err:
        raise CheckpointUnreadable(f".metadata: {_reason(err)}") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointUnreadable(".metadata: not DCP metadata")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with .metadata read by `read_metadata`."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with the non-tensor entries (the optimizer's hyper-parameters) read
    with weights_only=True; DCP's own planner unpickles them without restriction."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def _load_trainer_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError) as err:
        raise CheckpointUnreadable(f"{path.name}: {_reason(err)}") from None
    if not isinstance(state, dict) or not {"step", "skipped_total", "rng"} <= state.keys():
        raise CheckpointUnreadable(f"{path.name}: not a trainer state")
    return state


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed, or None when it is complete: its manifest,
    config.yaml, .metadata, every shard .metadata names (inside the folder, holding the bytes it
    points into) and the trainer file of every rank that wrote it, each present and readable.
    Cheap: the shards are measured, not read."""
    try:
        manifest = read_manifest(path)
        if manifest.get("step") != step_of(path):
            raise CheckpointUnreadable(f"{MANIFEST}: step {manifest.get('step')!r} in a folder "
                                       f"named {path.name}")
        try:
            yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise CheckpointUnreadable(f"config.yaml: {_reason(err)}") from None
        ends: dict[str, int] = {}
        for info in read_metadata(path).storage_data.values():
            name = str(getattr(info, "relative_path", ""))
            if not name or Path(name).name != name or name.startswith("."):
                raise CheckpointUnreadable(f".metadata: shard {name!r} outside the checkpoint")
            ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
        for name, end in sorted(ends.items()):
            size = (path / name).stat().st_size if (path / name).is_file() else None
            if size is None:
                raise CheckpointUnreadable(f"{name}: missing")
            if size < end:
                raise CheckpointUnreadable(f"{name}: {size} bytes, .metadata needs {end}")
        for rank in range(manifest["world_size"]):
            state = _load_trainer_state(path / f"trainer_rank{rank}.pt")
            if state["step"] != manifest["step"]:
                raise CheckpointUnreadable(f"trainer_rank{rank}.pt: step {state['step']!r}")
    except CheckpointUnreadable as err:
        return str(err)
    return None


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointUnreadable(f"{MANIFEST}: {_reason(err)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("world_size"), int) or \
            manifest["world_size"] < 1:
        raise CheckpointUnreadable(f"{MANIFEST}: no world_size")
    return manifest


# -- RNG states, stored as tensors, tuples and ints (weights_only loads them) ---------------------

def rng_state() -> dict:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def data_fingerprint(rows) -> str:
    """SHA-256 of the training rows' content in order (PreferenceExample fields, not where they
    came from): the same file moved gives the same value, a file edited in place another."""
    h = hashlib.sha256()
    for ex in rows:
        pair = [ex.pair_ids] if getattr(ex, "pair_ids", None) is not None else []
        h.update(json.dumps([ex.prompt, ex.chosen, ex.rejected, ex.samples, ex.aux_prefs,
                             ex.ref_logps, ex.sample_ids, ex.domain, *pair],
                            sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def save_checkpoint(output_dir, step: int, model, optimizer, extra: dict, *, rank: int,
                    world_size: int, keep_last: int, config_yaml: str,
                    data: str | None = None, frozen: dict | None = None) -> Path:
    """Write step_<step> atomically (see module docstring); returns its path.

    `data`: the training data's fingerprint (rank 0's is recorded). `frozen`: name -> module of
    extra models whose weights are training state (a lagged copy).
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
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "world_size": world_size,
                                                "data": data}) + "\n")
        if final.exists():  # an earlier run reached this step and crashed after the rename
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(output_dir, keep_last)
    barrier()
    return final


def _prune(output_dir, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints and whatever is newer than the oldest of
    them; a damaged save never pushes the last complete one out."""
    complete = 0
    for path in checkpoints(output_dir):
        if complete >= keep_last:
            shutil.rmtree(path, ignore_errors=True)
        elif checkpoint_problem(path) is None:
            complete += 1


# Settings a resumed run must keep: the data order of the steps still to come is a function of
# them (a change would skip or repeat prompts), or the saved weights would not fit the model.
RESUME_FIXED = ("train.seed", "train.batch_groups", "train.shuffle", "model.tiny",
                "lora.enabled", "lora.r", "lora.target_modules")
# Settings that change how a run is carried out, never what it computes.
RESUME_FREE = ("train.output_dir", "train.save_every", "train.keep_last", "train.log_every",
               "train.tensorboard", "train.wandb_project", "train.max_bad_steps",
               "train.micro_batch_groups", "train.max_tokens", "train.activation_checkpointing",
               "train.compile", "train.cpu_offload", "train.allow_data_change", "train.lm_head",
               "data.cache_dir", "sample.", "score.", "eval.", "run.")


def config_changes(path: Path, config: dict) -> tuple[list[str], list[str]]:
    """Settings of `config` (Config.to_dict()) that differ from those checkpoint `path` was
    written under, as "key: old -> new" lines: (those RESUME_FIXED forbids, the others that
    change the training trajectory)."""
    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return [], []
    saved = _flatten(yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {})
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
    """Restore model, optimizer (and `frozen` models) in place from a checkpoint that
    `checkpoint_problem` found complete; returns this rank's state: step, skipped_total, rng
    (None when the checkpoint holds no state for this rank) and world_size (the number of ranks
    that wrote it). Raises CheckpointUnreadable (on every rank) when the shards' content is
    damaged after all; the model and optimizer are then partly overwritten, and a complete
    load of another checkpoint restores them fully."""
    manifest = read_manifest(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    state.update({name: get_model_state_dict(m) for name, m in (frozen or {}).items()})
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner())
    except CheckpointException as err:  # gathered from every rank, raised on every rank
        exc, _trace = next(iter(err.failures.values()), (err, None))
        raise CheckpointUnreadable(f"shards: {_reason(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    for name, m in (frozen or {}).items():
        set_model_state_dict(m, state[name])
    own = rank < manifest["world_size"]
    state = _load_trainer_state(path / f"trainer_rank{rank if own else 0}.pt")
    if not own:
        state["rng"] = None
    return {**state, "world_size": manifest["world_size"]}


def full_model_state_dict(model) -> dict:
    """Unsharded weights on CPU (rank 0 gets them; other ranks get an empty dict)."""
    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- the trainer's checkpoints: resume, save, final/ ----------------------------------------------

class Checkpointer:
    """Resume and saving for a `Trainer` (vrpo_fast.train.loop): which checkpoint a run resumes
    from and under which settings, what a checkpoint holds besides the weights and optimizer
    (step, skipped steps, RNG states, the DRO state, the lagged copy of aux.mode lagged, the
    data's fingerprint), and <output_dir>/final/. It reads the trainer's state when called
    (built in the trainer's __init__, before the models), and `resume` writes the restored
    step, counters, DRO state and random streams back into it."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg, self.dist, self.out = trainer.cfg, trainer.dist, trainer.out

    def resume(self) -> None:
        """Resume from the newest checkpoint that is complete and loads, saying on stdout which
        ones were passed over and why; with none at all, start afresh (metrics.jsonl too)."""
        tr = self.trainer
        remove_incomplete(self.out, self.dist.is_main)
        # Rank 0 inspects the folder; every rank then tries the same checkpoints in order.
        found = broadcast_object([(p, checkpoint_problem(p))
                                  for p in checkpoints(self.out)] if self.dist.is_main
                                 else None)
        if not found:
            tr.metrics.truncate_after(0)   # a run killed before its first checkpoint
            return
        passed = []
        for path, problem in found:
            if problem is None:
                self._check_resume_settings(path)
                try:
                    state = load_checkpoint(path, tr.policy, tr.optimizer,
                                            rank=self.dist.rank, frozen=self._frozen_state())
                    break
                except CheckpointUnreadable as err:
                    problem = str(err)
            passed.append(f"{path.name}: {problem}")
            if self.dist.is_main:
                print(f"note: {path} cannot be resumed ({problem}); trying the checkpoint "
                      f"before it")
        else:
            raise UserError(f"train.output_dir: no checkpoint in {checkpoint_root(self.out)} "
                            f"can be resumed ({'; '.join(passed)}); restore one, or move them "
                            f"away to start afresh")
        tr.step = state["step"]
        tr.skipped_total = state["skipped_total"]
        if tr.dro is not None and state.get("dro", {}).get("kind") == tr.dro.kind:
            tr.dro.load_state_dict(state["dro"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        else:  # a rank the checkpoint's run did not have
            seed_everything(hash((self.cfg.train.seed, tr.step, self.dist.rank)) % 2**32)
        tr.metrics.truncate_after(tr.step)
        if self.dist.is_main:
            print(f"resumed from {path} at step {tr.step}")
            if state["world_size"] != self.dist.world_size:
                print(f"note: the checkpoint was written by {state['world_size']} rank(s), this "
                      f"run has {self.dist.world_size}: weights, optimizer, schedule and data "
                      f"order carry over; the trajectory is the same up to the order of "
                      f"gradient reductions")

    def _check_resume_settings(self, path: Path) -> None:
        """Refuse settings or data that would change which rows the remaining steps see (or
        which model the weights fit); note the other changes."""
        fixed, other = config_changes(path, self.cfg.to_dict())
        if fixed:
            raise UserError(f"{fixed[0].split(':')[0]}: {path} was written under other "
                            f"settings that decide which data the remaining steps see or "
                            f"which model the weights fit ({'; '.join(fixed)}); resume with "
                            f"the checkpoint's values, or start a new train.output_dir")
        # Every rank reads the same manifest and holds the same data: the same verdict.
        saved = read_manifest(path).get("data")
        now = self.trainer.groups.fingerprint
        if saved is not None and now is not None and saved != now:
            if not self.cfg.train.allow_data_change:
                raise UserError(f"data.path: {self.cfg.data.path} holds other rows than the "
                                f"data {path} was trained on (their content is compared, not "
                                f"the path): the remaining steps would not see the data the run "
                                f"promised; resume with that data, set "
                                f"train.allow_data_change=true to go on with this one, or start "
                                f"a new train.output_dir")
            if self.dist.is_main:
                print(f"note: resuming {path} on other data than its own "
                      f"(train.allow_data_change): the steps after {path.name} draw from "
                      f"{self.cfg.data.path}")
        if other and self.dist.is_main:
            print(f"note: resuming {path} with settings other than its own ({'; '.join(other)}):"
                  f" the steps after {path.name} follow the new ones")

    def _frozen_state(self) -> dict:
        # The lagged copy is training state: it is not a function of the current weights.
        return {"lagged": self.trainer.aux} if self.cfg.aux.mode == "lagged" else {}

    def save(self) -> None:
        """A checkpoint of the trainer's current step (atomic; see save_checkpoint)."""
        tr = self.trainer
        if not self._weights_finite():
            raise UserError(f"step {tr.step}: weights are not finite; no checkpoint written "
                            f"(the previous one is intact)")
        extra = {"step": tr.step, "skipped_total": tr.skipped_total, "rng": rng_state()}
        if tr.dro is not None:
            extra["dro"] = tr.dro.state_dict()
        save_checkpoint(self.out, tr.step, tr.policy, tr.optimizer, extra,
                        rank=self.dist.rank, world_size=self.dist.world_size,
                        keep_last=self.cfg.train.keep_last, config_yaml=self.cfg.to_yaml(),
                        data=tr.groups.fingerprint, frozen=self._frozen_state())

    def _weights_finite(self) -> bool:
        bad = torch.zeros((), device=self.trainer.device)
        for p in self.trainer.policy.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local.detach())).sum()
        return all_reduce_(bad).item() == 0  # host sync: once per save

    def save_final(self) -> Path:
        """<output_dir>/final/: a Hugging Face model + tokenizer, written atomically; with
        lora.enabled the adapter in peft's format (and with lora.merge_final the merged model
        in final/merged)."""
        tr = self.trainer
        full = full_model_state_dict(tr.policy)
        final = self.out / "final"
        if self.dist.is_main:
            import transformers

            tmp = self.out / "final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            prefix = next(iter(full)).split(".")[0] + "."    # the wrapper's attribute name
            state = {k.removeprefix(prefix): v for k, v in full.items()}
            if self.cfg.lora.enabled:
                save_lora(state, tr.lm.config, self.cfg.lora, tmp,
                          base_path=self.cfg.model.path, merged=self.cfg.lora.merge_final)
            else:
                plain = getattr(transformers, tr.export_class).from_config(tr.lm.config)
                plain.load_state_dict(state)
                plain.save_pretrained(tmp)
            tr.tokenizer.save_pretrained(tmp)
            if self.cfg.lora.enabled and self.cfg.lora.merge_final:
                tr.tokenizer.save_pretrained(tmp / "merged")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        barrier()
        return final
