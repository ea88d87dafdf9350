"""Is the installed environment one vrpo_fast works in? One line naming the package if not.

What it checks, before a command runs and before a model loads:
- vrpo_fast's own requirements, read from its installed metadata (setup.py stays the one place
  where the working versions are written): each is installed, at a version inside its range;
- what transformers itself needs when it loads a model: since 5.2x it imports Hugging Face's
  `kernels` package (a hard requirement of its own), so that package is installed, at a version
  transformers accepts, and a bare `import kernels` finds it (not a `kernels/` folder of the
  current directory, which Python searches first).
A mismatch is a `UserError` naming the package, what is installed and what works, instead of a
traceback from inside transformers. Without vrpo_fast's metadata (the source run uninstalled)
there is nothing to check against and nothing is checked.
"""

from __future__ import annotations

import functools
import importlib.util
from importlib import metadata
from pathlib import Path

from vrpo_fast.errors import UserError

DISTRIBUTION = "vrpo-fast"
FIX = "scripts/install.sh installs the tested set"


def _requirements(dist: str) -> list:
    """`dist`'s unconditional requirements for this machine (extras left out)."""
    from packaging.requirements import Requirement

    out = []
    for text in metadata.requires(dist) or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _check(req, needed_by: str) -> None:
    """One requirement: installed, and its version inside the range."""
    want = f"{req.name}{req.specifier}" if str(req.specifier) else req.name
    have = _version(req.name)
    if have is None:
        raise UserError(f"environment: {req.name} is not installed; {needed_by} needs {want} "
                        f"({FIX})")
    # Pre-releases count as inside the range: a nightly torch is a user's choice.
    if str(req.specifier) and not req.specifier.contains(have, prereleases=True):
        raise UserError(f"environment: {req.name} {have} is installed; {needed_by} works with "
                        f"{want} ({FIX}; `scripts/install.sh --newest` for the newest allowed)")


def _check_import_location(name: str) -> None:
    """A bare `import name` finds the installed distribution `name`, not a folder of the same
    name in the current directory (Python searches that first): a regular package there would
    shadow it."""
    spec = importlib.util.find_spec(name)
    files = metadata.distribution(name).files or ()
    home = next((f.locate() for f in files if f.parts[-1] == "__init__.py" and len(f.parts) == 2
                 and f.parts[0] == name), None)
    if spec is None or spec.origin is None or home is None:
        return
    if Path(spec.origin).resolve() != Path(home).resolve():
        raise UserError(f"environment: `import {name}` finds {spec.origin}, not the installed "
                        f"{name} {_version(name)} that transformers imports: a folder named "
                        f"{name!r} with an __init__.py shadows it; run from another folder or "
                        f"rename that one")


@functools.cache
def check_environment() -> None:
    """Raise one UserError if the environment lacks what vrpo_fast (and transformers, when it
    loads a model) needs. Cached: a process checks once."""
    try:
        ours = _requirements(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return
    for req in ours:
        _check(req, "vrpo_fast")
    if _version("transformers") is None:
        return
    for req in _requirements("transformers"):
        if req.name == "kernels":
            _check(req, f"transformers {_version('transformers')}")
            _check_import_location("kernels")
