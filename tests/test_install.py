"""The installed environment as a user's clone sees it.

- From the repository root (the current folder first on sys.path, as `python -m ...`, `python
  -c ...` and pytest put it), a bare `import kernels` finds Hugging Face's package, which
  transformers imports when it loads a model, and a model loads; `vrpo_fast.kernels` is still
  this checkout's kernels/ folder, however Python is started.
- `vrpo_fast.environment.check_environment` turns a package outside its range, or a missing
  one, into one line naming it (checked against the installed metadata, patched).
- The lock is a constraints file install.sh can use: one pinned version per package.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from helpers import ROOT

from vrpo_fast import environment
from vrpo_fast.errors import UserError


def _from_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    """`python [flags] -c code` with the repository root as the current folder: sys.path[0] is
    then '' (the root), as for a user's `python -c` or `python -m` there."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _hf_kernels_required() -> bool:
    return any(r.split(";")[0].strip().startswith("kernels")
               for r in metadata.requires("transformers") or ())


def test_bare_kernels_from_the_root_is_not_the_project_folder():
    """`import kernels` at the root: Hugging Face's package where installed; never this
    repository's kernels/ folder as a regular package (which shadowed it)."""
    out = _from_root("import sys, kernels; print(getattr(kernels, '__file__', None)); "
                     "print(list(kernels.__path__))")
    if _hf_kernels_required():
        assert out.returncode == 0, out.stderr
        where = Path(out.stdout.splitlines()[0]).resolve()
        assert where.parent != (ROOT / "kernels").resolve(), where
        installed = metadata.distribution("kernels").locate_file("kernels/__init__.py")
        assert where == Path(installed).resolve()
    else:
        # No installed `kernels`: the folder is at most a namespace portion, with no code.
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "None"


def test_a_model_loads_through_transformers_from_the_root(tmp_path):
    """The failure seen in a fresh install: transformers' hub-kernels integration imports
    `kernels` when a model loads; from the root that found kernels/ and every load raised
    "cannot import name 'CUDAProperties' from 'kernels'"."""
    code = f"""
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM
cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained({str(tmp_path)!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
ids = torch.tensor([[1, 2, 3]])
print(float(model(ids).logits.sum()))
"""
    out = _from_root(code)
    assert out.returncode == 0, out.stderr[-2000:]
    float(out.stdout.strip())


@pytest.mark.parametrize("flags", [(), ("-P",)], ids=["root-first", "no-root"])
def test_vrpo_fast_kernels_is_this_checkout(flags):
    """The project's kernels import as vrpo_fast.kernels, whether the root is on the path or
    not, and the files are this checkout's kernels/ folder."""
    out = _from_root("import vrpo_fast.kernels.linear_logprob as m, vrpo_fast.kernels.vrpo_loss "
                     "as v, vrpo_fast.kernels.fused_linear_vrpo as f; "
                     "print(m.__file__); print(v.__file__); print(f.__file__)", *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    for line, name in zip(out.stdout.splitlines(), ("linear_logprob", "vrpo_loss",
                                                    "fused_linear_vrpo")):
        assert Path(line).resolve() == (ROOT / "kernels" / f"{name}.py").resolve()


def test_the_cli_runs_from_the_root_as_a_module():
    """`python -m vrpo_fast.cli` at the root checks the environment and runs a command."""
    out = subprocess.run([sys.executable, "-m", "vrpo_fast.cli", "config-doc"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model:" in out.stdout


# ---------------------------------------------------------------------------------------------
# check_environment: the installed metadata, patched


@pytest.fixture
def fake_versions(monkeypatch):
    """Patch the versions check_environment reads: name -> version, or None for missing."""
    real = environment._version
    versions: dict[str, str | None] = {}

    def version(name):
        return versions[name] if name in versions else real(name)

    monkeypatch.setattr(environment, "_version", version)
    environment.check_environment.cache_clear()
    yield versions
    environment.check_environment.cache_clear()


def test_the_installed_environment_passes(fake_versions):
    environment.check_environment()


def test_transformers_outside_its_range_is_one_line(fake_versions):
    fake_versions["transformers"] = "6.1.0"
    with pytest.raises(UserError) as err:
        environment.check_environment()
    text = str(err.value)
    assert "\n" not in text
    assert "transformers 6.1.0 is installed" in text and "transformers<6,>=4.51" in text
    fake_versions["transformers"] = "4.40.0"
    environment.check_environment.cache_clear()
    with pytest.raises(UserError, match="transformers 4.40.0 is installed"):
        environment.check_environment()


@pytest.mark.skipif(not _hf_kernels_required(), reason="this transformers does not need kernels")
def test_a_missing_hub_kernels_is_one_line(fake_versions):
    fake_versions["kernels"] = None
    with pytest.raises(UserError) as err:
        environment.check_environment()
    text = str(err.value)
    assert "\n" not in text and "kernels is not installed" in text
    assert "transformers " + metadata.version("transformers") in text


def test_a_shadowing_kernels_folder_is_named(tmp_path, monkeypatch):
    """A regular package named kernels in the current folder (what kernels/ was) is named."""
    if not _hf_kernels_required():
        pytest.skip("this transformers does not need kernels")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    importlib.invalidate_caches()
    with pytest.raises(UserError, match="import kernels` finds .*shadows it"):
        environment._check_import_location("kernels")


def test_the_cli_prints_the_environment_error(monkeypatch, capsys):
    from vrpo_fast import cli

    def broken():
        raise UserError("environment: transformers 9.0 is installed; vrpo_fast works with x")

    monkeypatch.setattr(cli, "check_environment", broken)
    assert cli.main(["config-doc"]) == 1
    assert capsys.readouterr().err.strip() == (
        "vrpo-fast config-doc: error: environment: transformers 9.0 is installed; vrpo_fast "
        "works with x")


# ---------------------------------------------------------------------------------------------
# The lock


def test_the_lock_pins_each_package_once_and_holds_the_environment():
    """requirements/lock.txt: `name==version` lines, one per package, that this environment
    (installed from it in CI) satisfies for vrpo_fast's own requirements."""
    from packaging.requirements import Requirement

    lines = [line for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    reqs = [Requirement(line) for line in lines]
    names = [r.name.lower().replace("_", "-") for r in reqs]
    assert len(names) == len(set(names))
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs)
    pinned = dict(zip(names, reqs))
    for req in environment._requirements(environment.DISTRIBUTION):
        name = req.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is a requirement but not in the lock"
        version = next(iter(pinned[name].specifier)).version
        assert req.specifier.contains(version, prereleases=True), (name, version)
    assert importlib.util.find_spec("vrpo_fast") is not None
