"""CPU training keeps freed host memory for reuse (vrpo_fast/host_memory.py): a block freed and
allocated again is not faulted in from the kernel a second time; the trainer asks for it on
the CPU unless train.keep_host_memory is false."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vrpo_fast import host_memory
from vrpo_fast.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

# Twenty rounds of: a 40 MiB tensor (above glibc's largest automatic mmap threshold, 32 MiB),
# written in full, freed; the minor page faults of the last four rounds. (Kept, glibc's
# aligned allocation settles on a reused block after about eight rounds, the heap grown by
# as many blocks.) A fresh process, since the setting is process-wide.
PROBE = """
import json, resource, sys, torch
from vrpo_fast import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(10 << 20)
    x.fill_(1.0)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(kept=kept, faults=sum(faults[-4:]))))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.glibc_malloc(), reason="malloc is not glibc's here")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 4 * (40 << 20) // 4096          # four rounds of 40 MiB in 4 KiB pages
    kept, system = _probe("keep"), _probe("system")
    assert kept["kept"] and not system["kept"]
    # Kept: the block comes back from malloc's heap, already mapped.
    assert kept["faults"] < pages // 100, kept
    # The system setting maps a fresh block every round (the control: the probe can fail;
    # with transparent huge pages a round faults 2 MiB pages, still far more than none).
    assert system["faults"] > 10 * (kept["faults"] + 1), (system, kept)


def test_keep_freed_memory_is_a_no_op_off_glibc(monkeypatch):
    monkeypatch.setattr(host_memory, "_kept", False)
    monkeypatch.setattr(host_memory, "glibc_malloc", lambda: False)
    assert host_memory.keep_freed_memory() is False
    assert host_memory.kept() is False


@pytest.mark.parametrize("keep", [True, False])
def test_trainer_keeps_host_memory_on_the_cpu_unless_told_not_to(keep, tmp_path, monkeypatch):
    from vrpo_fast.train import loop

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = load_config(TINY, [f"--train.output_dir={tmp_path}",
                             f"--train.keep_host_memory={str(keep).lower()}"])
    assert cfg.train.keep_host_memory is keep
    trainer = loop.Trainer(cfg, quiet=True)
    assert trainer.device.type == "cpu"
    assert calls == ([1] if keep else [])


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("stage", ["sample", "score"])
def test_cpu_stages_keep_host_memory_unless_told_not_to(stage, keep, tmp_path, monkeypatch):
    """sample and score on the CPU apply the same setting as the trainer (their loops allocate
    each batch's logits anew)."""
    import importlib
    import json

    from helpers import TINY_YAML

    module = importlib.import_module(f"vrpo_fast.{stage}")
    calls = []
    monkeypatch.setattr(module, "keep_freed_memory", lambda: calls.append(1) or True)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "ab>", "chosen": "aa", "rejected": "b"}) + "\n")
    cfg = load_config(None, [
        f"--sample.input={rows}", f"--sample.output={tmp_path / 'sampled'}",
        f"--score.input={rows}", f"--score.output={tmp_path / 'scored'}",
        "--sample.num_samples=2", "--sample.max_new_tokens=3", "--model.tokenizer=byte",
        f"--model.tiny={TINY_YAML}", f"--train.keep_host_memory={str(keep).lower()}"])
    getattr(module, f"{stage}_stage")(cfg, progress=False)
    assert calls == ([1] if keep else [])
