"""The package's layers, read from its source (ast), so a back-edge cannot come back unnoticed.

    drivers   cli, demo, pipeline, rounds (+ label),   run stages; may import anything
              bench.gpu_check
    stages    sample | score | train (train.loop, train.reward, train.rloo) | evaluate
    shared    everything else: config, data, models, passes, samplers, ops, logprobs,
              shards, provenance, train's helpers (data, checkpoint, modules, ...), bench, ...
    maths     objective, packing, chunked, dro, kernels

A module imports only from its own layer or below; a stage never imports another stage (a
train module may import another train module: train-reward and train-rl extend the policy
trainer); the maths layer reads no configs and no files. Every import counts, deferred ones
inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MATHS = ("vrpo_fast.objective", "vrpo_fast.packing", "vrpo_fast.chunked", "vrpo_fast.dro",
         "vrpo_fast.kernels")
STAGES = {"sample": ("vrpo_fast.sample",), "score": ("vrpo_fast.score",),
          "train": ("vrpo_fast.train.loop", "vrpo_fast.train.reward", "vrpo_fast.train.rloo"),
          "evaluate": ("vrpo_fast.evaluate",)}
# rounds drives whole rounds of stages; its labellers (label) judge with eval's judges;
# bench.gpu_check runs the CLI's commands.
DRIVERS = ("vrpo_fast.cli", "vrpo_fast.demo", "vrpo_fast.pipeline", "vrpo_fast.rounds",
           "vrpo_fast.label", "vrpo_fast.bench.gpu_check")
# What reads configs or files: the maths layer imports none of it.
IO = ("vrpo_fast.config", "vrpo_fast.shards", "vrpo_fast.provenance", "vrpo_fast.data",
      "vrpo_fast.models", "yaml", "json", "pathlib", "pyarrow", "datasets", "transformers",
      "safetensors", "pandas")


def _modules() -> dict[str, Path]:
    """Module name -> source file; kernels/ is installed as vrpo_fast.kernels."""
    found = {}
    for base, package in ((ROOT / "vrpo_fast", "vrpo_fast"), (ROOT / "kernels",
                                                                "vrpo_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """The modules `name` imports (`from vrpo_fast import shards` is vrpo_fast.shards)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names
                       if f"{module}.{alias.name}" in MODULES)
    return out


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _stage_of(module: str) -> str | None:
    return next((stage for stage, names in STAGES.items() if module in names), None)


def _layer(module: str) -> str:
    if _within(module, MATHS):
        return "maths"
    if _stage_of(module):
        return "stage"
    if module in DRIVERS:
        return "driver"
    return "shared"


def _own(name: str) -> list[str]:
    """The package modules `name` imports (the package root is only its version string)."""
    return sorted(m for m in _imports(name) if m in MODULES and m != "vrpo_fast")


def test_the_layer_map_names_real_modules():
    """A renamed module must not drop out of the rules unseen."""
    for name in (*MATHS, *DRIVERS, *(m for names in STAGES.values() for m in names)):
        # vrpo_fast.kernels is a namespace package (kernels/ has no __init__.py): its modules
        # are what names it.
        assert name in MODULES or any(m.startswith(name + ".") for m in MODULES), name
    assert "vrpo_fast.shards" in _imports("vrpo_fast.stage")   # `from vrpo_fast import shards`


@pytest.mark.parametrize("name", [m for m in MODULES if _layer(m) == "maths"])
def test_maths_imports_only_maths_and_reads_no_config_or_files(name):
    imports = _imports(name)
    assert [m for m in _own(name) if _layer(m) != "maths"] == [], name
    assert [m for m in imports if _within(m, IO)] == [], name


@pytest.mark.parametrize("name", [m for m in MODULES if _layer(m) == "shared"])
def test_shared_modules_import_no_stage_or_driver(name):
    assert [m for m in _own(name) if _layer(m) in ("stage", "driver")] == [], name


@pytest.mark.parametrize("name", [m for names in STAGES.values() for m in names])
def test_stages_import_no_other_stage_and_no_driver(name):
    own = _stage_of(name)
    bad = [m for m in _own(name)
           if _layer(m) == "driver" or (_layer(m) == "stage" and _stage_of(m) != own)]
    assert bad == [], name


def test_train_and_score_are_apart():
    """The two back-edges this layering removed: train reusing the scoring stage (and the
    evaluation module's sampling helper), and scoring reusing the trainer's modules."""
    for name in MODULES:
        if name.startswith("vrpo_fast.train."):
            assert not any(_within(m, ("vrpo_fast.score", "vrpo_fast.sample",
                                       "vrpo_fast.evaluate")) for m in _imports(name)), name
    assert not any(_within(m, ("vrpo_fast.train",)) for m in _imports("vrpo_fast.score"))


def test_the_rules_catch_a_back_edge(tmp_path, monkeypatch):
    """The checks fail on the imports they forbid (a stage importing another, maths reading a
    config)."""
    fake = tmp_path / "reward.py"
    fake.write_text("from vrpo_fast.score import score_stage\n")
    monkeypatch.setitem(MODULES, "vrpo_fast.train.reward", fake)
    with pytest.raises(AssertionError):
        test_stages_import_no_other_stage_and_no_driver("vrpo_fast.train.reward")
    with pytest.raises(AssertionError):
        test_train_and_score_are_apart()
    maths = tmp_path / "objective.py"
    maths.write_text("def f():\n    from vrpo_fast.config import Config\n")
    monkeypatch.setitem(MODULES, "vrpo_fast.objective", maths)
    with pytest.raises(AssertionError):
        test_maths_imports_only_maths_and_reads_no_config_or_files("vrpo_fast.objective")
