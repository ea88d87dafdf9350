"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

import os
from pathlib import Path


class UserError(Exception):
    """A mistake in something the user gave (config, data, path, flag), naming what and where."""


def renamed(err: UserError, key: str, default: str = "data.path") -> UserError:
    """`err` with its leading key `default` replaced by `key`: a stage that reads data through
    the loader (whose errors name data.path) under a key of its own, e.g. sample.input."""
    text = str(err)
    prefix = f"{default}: "
    return UserError(f"{key}: {text[len(prefix):]}") if text.startswith(prefix) else err


def check_output(path, key: str, *, folder: bool = True) -> None:
    """Before any work: the output `path` (a folder, or a file with folder=False) named by
    `key` can be written: it is not a file where a folder goes (nor a folder where a file goes),
    no folder above it is a file, and the nearest existing one is writable. Else one UserError
    naming the key, instead of a traceback after the work is done."""
    p = Path(path).expanduser()
    if p.exists() and p.is_dir() != folder:
        kind = "a file, not a folder" if folder else "a folder, not a file"
        raise UserError(f"{key}: cannot write to {path}: it is {kind}")
    for parent in p.parents:                    # the nearest first
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{key}: cannot write to {path}: {parent} is a file")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{key}: cannot write to {path}: {parent} is not writable")
            return
