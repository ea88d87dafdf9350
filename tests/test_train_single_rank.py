"""One process in full precision trains unsharded (no FSDP2 copies), with fused AdamW, and its
steps are those of the same run through FSDP2 on that one rank."""

from pathlib import Path

import torch

from vrpo_fast.config import load_config
from vrpo_fast.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
         "intermediate_size: 64}", "--train.batch_groups=4", "--train.micro_batch_groups=2",
         "--train.max_steps=3", "--train.save_every=2", "--aux.mode=lagged",
         "--aux.refresh_every=2"]


def test_single_rank_runs_unsharded_with_the_fsdp_steps(tmp_path, monkeypatch):
    from torch.distributed.fsdp import FSDPModule

    from vrpo_fast.train import modules
    from vrpo_fast.train.loop import Trainer

    def run(name):
        cfg = load_config(TINY, [f"--train.output_dir={tmp_path / name}", *SMALL])
        trainer = Trainer(cfg, quiet=True)
        sharded = [isinstance(m, FSDPModule) for m in (trainer.policy, trainer.ref, trainer.aux)]
        assert trainer.optimizer.defaults["fused"]
        final = trainer.fit()
        return sharded, read_metrics(cfg.train.output_dir), final

    sharded, plain, final_plain = run("plain")
    assert sharded == [False, False, False]
    monkeypatch.setattr(modules, "needs_fsdp", lambda mixed_precision: True)
    sharded, fsdp, final_fsdp = run("fsdp")
    assert sharded == [True, True, True]
    keys = ["loss", "grad_norm", "tokens", "accuracy", "margin", "lr"]
    assert [r["step"] for r in plain] == [r["step"] for r in fsdp] == [1, 2, 3]
    torch.testing.assert_close(
        torch.tensor([[r[k] for k in keys] for r in plain], dtype=torch.float64),
        torch.tensor([[r[k] for k in keys] for r in fsdp], dtype=torch.float64),
        rtol=1e-6, atol=1e-7, msg=lambda m: f"{keys}: {m}")
    # The final Hugging Face save holds the same weights.
    from safetensors.torch import load_file

    a = load_file(Path(final_plain) / "model.safetensors")
    b = load_file(Path(final_fsdp) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
