"""train.attention: the packed attention every model of a training step uses (an operational
setting: the same maths each way), and the choices that cannot train here refused in one line
before anything is written."""

from pathlib import Path

import pytest
import torch

from vrpo_fast.cli import main as cli_main
from vrpo_fast.config import load_config
from vrpo_fast.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 4, num_kv_heads: 2, "
         "intermediate_size: 64}", "--train.batch_groups=4", "--train.micro_batch_groups=2",
         "--train.max_steps=3", "--train.save_every=0", "--aux.mode=lagged",
         "--aux.refresh_every=2"]


def test_cascade_and_dense_mask_train_the_same_steps(tmp_path):
    """The cascade (the CPU default) and the dense mask: the same losses, gradient norms and
    final weights, and every model of the step (policy, pi_ref, the lagged g) on the choice."""
    from vrpo_fast.train.loop import Trainer

    def run(attention):
        cfg = load_config(TINY, [f"--train.output_dir={tmp_path / attention}", *SMALL,
                                 f"--train.attention={attention}"])
        trainer = Trainer(cfg, quiet=True)
        assert [m.attention for m in (trainer.policy, trainer.ref, trainer.aux)] == [attention] * 3
        trainer.fit()
        impls = {m.lm.config._attn_implementation for m in (trainer.policy, trainer.ref,
                                                            trainer.aux)}
        weights = {n: p.detach().clone() for n, p in trainer.lm.named_parameters()}
        return read_metrics(cfg.train.output_dir), impls, weights

    cascade, impls_cascade, w_cascade = run("cascade")
    dense, impls_dense, w_dense = run("sdpa")
    assert impls_cascade == {"vrpo_cascade"} and impls_dense == {"sdpa"}
    assert [r["step"] for r in cascade] == [r["step"] for r in dense] == [1, 2, 3]
    for key in ("loss", "grad_norm", "margin"):
        torch.testing.assert_close([r[key] for r in cascade], [r[key] for r in dense],
                                   rtol=1e-5, atol=1e-6, msg=key)
    for name, w in w_dense.items():
        torch.testing.assert_close(w_cascade[name], w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention, why", [
    ("flex", "train.attention: flex has no backward on the CPU"),
    ("flash", "train.attention: flash runs flash-attn's CUDA kernels; this run is on cpu"),
])
def test_attention_that_cannot_train_here_is_one_line(tmp_path, capsys, attention, why):
    out = tmp_path / "run"
    rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={out}",
                   f"--train.attention={attention}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert why in err
    assert not out.exists()


def test_flash_needs_bf16_and_flash_attn(monkeypatch):
    """On a GPU: fp32 compute, then a missing flash-attn, each named (checked without one)."""
    import sys

    import vrpo_fast.attention
    from vrpo_fast.errors import UserError
    from vrpo_fast.train.loop import check_attention

    cuda = torch.device("cuda")
    with pytest.raises(UserError, match="flash computes in bf16 only; set train.mixed_precision"):
        check_attention("flash", cuda, bf16=False)
    monkeypatch.setitem(sys.modules, "flash_attn", None)      # import flash_attn fails
    with pytest.raises(UserError, match=r"train.attention: attention='flash' needs flash-attn "
                                        r".*pip install -e '\.\[flash\]' \(or use auto\)"):
        check_attention("flash", cuda, bf16=True)
    monkeypatch.setattr(vrpo_fast.attention, "flash_varlen_func", lambda: object())
    check_attention("flash", cuda, bf16=True)          # installed: accepted
    check_attention("flex", cuda, bf16=False)
