"""One writer per output folder: <output_dir>/writer.lock holds the writer's process id and host.

Two runs writing one folder would interleave metrics.jsonl and delete each other's saves in
progress. The lock is created atomically (a hard link of a finished file, so a reader never sees
it half-written) and removed when the run ends; a lock left by a killed run is stale when its
process is gone from this host, and is then taken over. A lock from another host cannot be
checked from here: the message says which process to look for.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from vrpo_fast.errors import UserError

LOCK = "writer.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


class Lock:
    """A held lock; `release()` removes it, and the folder when taking the lock created it and
    the run then failed before writing anything else there."""

    def __init__(self, path: Path, created_dir: bool):
        self.path, self.created_dir = path, created_dir

    def release(self) -> None:
        if _holder(self.path) == _me():
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.path.parent.rmdir()   # only if empty
            except OSError:
                pass


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def acquire(out: Path, key: str = "train.output_dir") -> Lock:
    """Take `out`'s lock for this process (creating `out`); UserError naming the holder when a
    live process has it, or when `out` cannot be written."""
    lock = out / LOCK
    me = _me()
    tmp = out / f".{LOCK}.{me['pid']}.tmp"
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(me) + "\n")
        for _attempt in range(2):
            try:
                os.link(tmp, lock)
                return Lock(lock, created)
            except FileExistsError:
                holder = _holder(lock)
                if holder is not None and holder != me and not _stale(holder, me):
                    where = "this host" if holder["host"] == me["host"] else holder["host"]
                    raise UserError(f"{key}: {out} is being written by process "
                                    f"{holder['pid']} on {where} ({lock}); wait for it to end, "
                                    f"or choose another {key}") from None
                if holder is not None and holder != me:
                    print(f"note: {lock} was left by process {holder['pid']}, which is no "
                          f"longer running; taking it over")
                lock.unlink(missing_ok=True)
        raise UserError(f"{key}: could not take {lock}: another run is starting in {out}")
    except OSError as err:
        raise UserError(f"{key}: cannot write to {out}: {err.strerror or err}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _holder(lock: Path) -> dict | None:
    """The lock's {pid, host}, or None for a file that is not a lock (taken over)."""
    try:
        holder = json.loads(lock.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):   # gone, or not a lock
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or \
            not isinstance(holder.get("host"), str):
        return None
    return {"pid": holder["pid"], "host": holder["host"]}


def _stale(holder: dict, me: dict) -> bool:
    return holder["host"] == me["host"] and not _alive(holder["pid"])
