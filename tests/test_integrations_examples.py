"""The examples under examples/ run end to end on a tiny model, as a user would run them.

Both train the same policy on the same rows with AdamW at the same constant learning rate (and
no clipping at these gradient norms), one through a plain loop and one through the Hugging Face
Trainer: their per-step losses must agree. The first step's loss is log 2 (the policy is pi_ref:
every margin is zero, whatever g), and the loss falls as training goes.
"""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def _run(script, *extra):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--tiny",
                        f"--steps={STEPS}", *extra], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+ loss ([-\d.e]+)", r.stdout, re.M)]
    assert len(losses) == STEPS, r.stdout
    return losses


@pytest.mark.slow
def test_plain_loop_and_hf_trainer_examples_train_alike(tmp_path):
    plain = _run("plain_loop.py")
    trainer = _run("hf_trainer.py", f"--output-dir={tmp_path}")
    assert plain[0] == pytest.approx(math.log(2), abs=1e-5)
    assert plain == pytest.approx(trainer, rel=1e-4)
    assert all(b < a for a, b in zip(plain, plain[1:]))
