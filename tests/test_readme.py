"""The README as a front door: its links resolve, its config is the shipped one, its commands
name real sub-commands (the two set-up commands are run by CI and the fresh-clone check)."""

from __future__ import annotations

import re
import shlex

import yaml
from helpers import ROOT

from vrpo_fast.cli import COMMANDS
from vrpo_fast.config import load_config

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "kernels" / "README.md"]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_links_in_the_readme_and_docs_resolve():
    """Every relative link of the README and docs/ points at a file or folder that exists."""
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                missing.append(f"{doc.relative_to(ROOT)}: {target}")
    assert missing == []


def test_the_readme_config_is_configs_tiny(tmp_path):
    """The YAML block loads, and every key it sets has configs/tiny.yaml's value."""
    (block,) = _blocks("yaml")
    mini = tmp_path / "mini.yaml"
    mini.write_text(block)
    shown = load_config(mini).to_dict()
    shipped = load_config(ROOT / "configs" / "tiny.yaml").to_dict()
    for section, keys in yaml.safe_load(block).items():
        for key in keys:
            assert shown[section][key] == shipped[section][key], f"{section}.{key}"


def test_the_readme_commands_name_real_sub_commands():
    commands = [line.split("#")[0].strip() for block in _blocks("bash")
                for line in block.splitlines()]
    used = []
    for line in filter(None, commands):
        words = shlex.split(line.replace("&&", " && "))
        for i, word in enumerate(words):
            if word.endswith("vrpo-fast") or word == "vrpo_fast.cli":
                used.append(words[i + 1])
    assert used and all(name in COMMANDS for name in used), used
    tests = "bash scripts/install.sh && .venv/bin/python -m pytest -q -n 2 --dist worksteal"
    assert tests in README
