"""Where a measurement ran: device, library versions, commit; stamped on every benchmark row."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

import vrpo_fast
from vrpo_fast import host_memory

DISTRIBUTIONS = ("vrpo-fast", "torch", "triton", "transformers", "liger-kernel",
                 "cut-cross-entropy")


class Unavailable(Exception):
    """A provider that cannot run here; the message says why (recorded as the row's note)."""


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the processor or machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The GPU's name, or the CPU's model and core count: rows of different machines never
    share a results file (rows recorded before the model was in the name are under
    cpu-<machine>-<n>cores)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{cpu_model()}-{os.cpu_count()}cores"


def device_slug() -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device_name())


def versions() -> dict[str, str | None]:
    out = {}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def commit() -> str | None:
    """$VRPO_BENCH_COMMIT when set (a copy of the tree without its .git, e.g. on a GPU box);
    else, when this package runs from a source checkout (setup.py beside it, at the top of a git
    work tree), `git rev-parse --short HEAD` with `-dirty` when tracked files differ; else None:
    an installed package has no commit, and a git repository that merely encloses
    site-packages (a virtualenv inside a checkout) is not its source."""
    if os.environ.get("VRPO_BENCH_COMMIT"):
        return os.environ["VRPO_BENCH_COMMIT"]
    root = Path(vrpo_fast.__file__).resolve().parents[1]
    if not (root / "setup.py").is_file():
        return None
    try:
        def git(*args):
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def session() -> dict:
    """The fields every row of one run shares (computed once: git and metadata are slow):
    device, versions, threads, and commit where there is one."""
    out = dict(device=device_name(), versions=versions(), threads=torch.get_num_threads())
    if not torch.cuda.is_available():
        out["malloc_kept"] = host_memory.kept()     # vrpo_fast/host_memory.py
    sha = commit()
    if sha is not None:
        out["commit"] = sha
    return out


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
