"""Provenance of sampled data: which policy generated the Monte Carlo responses, and how.

VRPO's unbiasedness rests on the responses being drawn from pi_ref, so the sampling stage
records the reference model (path, revision and a hash of its weights), the tokenizer, the
sampling parameters, seed, backend and library versions in `<data>/provenance.json`; training
checks it against its configured reference model.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from vrpo_fast.errors import UserError

FILENAME = "provenance.json"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, shape, dtype, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    from vrpo_fast.data.tokenize import tokenizer_fingerprint as fp

    return fp(tokenizer)


def build_provenance(model, tokenizer, *, sampling: dict, backend: str) -> dict:
    import transformers

    config = getattr(model, "config", None)
    return {
        "reference_model": {
            "path": getattr(config, "_name_or_path", None) or None,
            "revision": getattr(config, "_commit_hash", None),
            "weights_sha256": weights_fingerprint(model),
        },
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", None),
                      "sha256": tokenizer_fingerprint(tokenizer)},
        "sampling": sampling,
        "backend": backend,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "vrpo_fast": _version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _version() -> str:
    from vrpo_fast import __version__

    return __version__


def write_provenance(directory: str | Path, record: dict) -> Path:
    path = Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path


def read_provenance(directory: str | Path) -> dict | None:
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON") from None


def same_origin(a: dict, b: dict) -> bool:
    """Two records describe samples of the same model, tokenizer and sampling parameters."""
    return (a["reference_model"]["weights_sha256"] == b["reference_model"]["weights_sha256"]
            and a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
            and a["sampling"] == b["sampling"] and a["backend"] == b["backend"])


def check_provenance(directory: str | Path, ref_model, tokenizer) -> None:
    """UserError (one line) when the data was not sampled from `ref_model` with `tokenizer`."""
    record = read_provenance(directory)
    if record is None:
        return
    want = record["reference_model"]["weights_sha256"]
    have = weights_fingerprint(ref_model)
    if want != have:
        raise UserError(f"data.path: the samples in {directory} were drawn from a different "
                        f"reference model ({record['reference_model'].get('path')}, weights "
                        f"{want[:12]}) than the configured one (weights {have[:12]}); VRPO needs "
                        f"samples from pi_ref: set ref.path to that model or re-run "
                        f"`vrpo-fast sample`")
    if record["tokenizer"]["sha256"] != tokenizer_fingerprint(tokenizer):
        raise UserError(f"data.path: the samples in {directory} were tokenized with a different "
                        f"tokenizer ({record['tokenizer'].get('name')}) than model.tokenizer")
