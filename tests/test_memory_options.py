"""The memory options of a training run change where and in what precision weights live, never
the maths: activation checkpointing and a compiled step give the eager step's gradients, CPU
offload the plain run's trajectory; bf16 weights keep bf16 optimizer states (stated in the
docs) and float32 stays the default; a dtype the device cannot run is one line naming the key."""

import pytest
import torch
from helpers import ROOT, assert_close_verbose

from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.train.metrics import read_metrics

TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
         "intermediate_size: 64}", "--train.batch_groups=4", "--train.micro_batch_groups=2",
         "--train.mixed_precision=fp32"]


def cfg_for(tmp_path, *overrides, name="run"):
    return load_config(TINY, [f"--train.output_dir={tmp_path / name}", *SMALL, *overrides])


def _gradients(tmp_path, name, *overrides) -> dict[str, torch.Tensor]:
    """The gradients of one micro-batch's loss (the first 2 prompt groups) of a fresh trainer."""
    from vrpo_fast.train.loop import Trainer

    trainer = Trainer(cfg_for(tmp_path, *overrides, name=name))
    try:
        trainer.policy.train()
        trainer._label_scale = None
        loss, _, _ = trainer.micro_step(trainer.groups.select([0, 1]))
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in trainer.policy.named_parameters()
                if p.grad is not None}
    finally:
        trainer._release_lock()


def _assert_same_gradients(got, want, atol, rtol):
    assert got.keys() == want.keys() and len(want) > 10
    for name in want:
        assert want[name].abs().max() > 0, name
        assert_close_verbose(got[name], want[name], atol=atol, rtol=rtol, name=name)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    want = _gradients(tmp_path, "eager")
    got = _gradients(tmp_path, "checkpointed", "--train.activation_checkpointing=true")
    _assert_same_gradients(got, want, atol=1e-7, rtol=1e-5)


@pytest.mark.slow
def test_compiled_layers_give_the_same_gradients(tmp_path):
    want = _gradients(tmp_path, "eager")
    got = _gradients(tmp_path, "compiled", "--train.compile=true")
    _assert_same_gradients(got, want, atol=1e-6, rtol=1e-4)


def test_cpu_offload_follows_the_plain_trajectory(tmp_path):
    from vrpo_fast.train.loop import Trainer

    common = ["--train.max_steps=2", "--train.save_every=0", "--train.warmup_steps=0",
              "--train.lr=0.01"]
    plain = cfg_for(tmp_path, *common, name="plain")
    Trainer(plain).fit()
    offload = cfg_for(tmp_path, *common, "--train.cpu_offload=true", name="offload")
    trainer = Trainer(offload)
    # FSDP even on one process (train/modules.py): the parameters are DTensor shards in host
    # memory, the optimizer steps on them there.
    assert all(type(p).__name__ == "DTensor" and p.device.type == "cpu"
               for p in trainer.policy.parameters())
    trainer.fit()
    keys = ["loss", "grad_norm", "tokens", "margin"]
    got = torch.tensor([[r[k] for k in keys] for r in read_metrics(offload.train.output_dir)],
                       dtype=torch.float64)
    want = torch.tensor([[r[k] for k in keys] for r in read_metrics(plain.train.output_dir)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_weights_keep_bf16_optimizer_states_and_float32_is_the_default(tmp_path):
    from vrpo_fast.train.loop import Trainer

    common = ["--train.max_steps=1", "--train.save_every=0", "--train.warmup_steps=0",
              "--train.lr=0.01"]
    f32 = Trainer(cfg_for(tmp_path, *common, name="f32"))
    bf16 = Trainer(cfg_for(tmp_path, *common, "--model.dtype=bfloat16", name="bf16"))
    start16 = [p.detach().clone() for p in bf16.lm.parameters()]
    record32 = f32.train_step()
    record16 = bf16.train_step()
    for trainer, dtype in ((f32, torch.float32), (bf16, torch.bfloat16)):
        assert {p.dtype for p in trainer.policy.parameters()} == {dtype}
        states = [s for s in trainer.optimizer.state.values()]
        assert states and {s["exp_avg"].dtype for s in states} == {dtype}
        assert {s["exp_avg_sq"].dtype for s in states} == {dtype}
        trainer._release_lock()
    # The same start (bf16-rounded weights): the first loss agrees to bf16 precision.
    assert record16["loss"] == pytest.approx(record32["loss"], rel=2e-2)
    # One AdamW step of lr 0.01 moves each weight by ~0.01 (Adam's first step is lr * sign):
    # bf16 holds that change, rounded, where the weight is small enough; a gradient near 0
    # can change sign under bf16 compute, a difference of 2 lr.
    moved = torch.cat([(p != p0).flatten() for p, p0 in zip(bf16.lm.parameters(), start16)])
    assert moved.float().mean() > 0.5
    for (n, p16), p32 in zip(bf16.lm.named_parameters(), f32.lm.parameters()):
        assert_close_verbose(p16.float(), p32, atol=2e-2 + 1e-3, rtol=1e-2, name=n)


def test_a_dtype_the_device_cannot_run_names_the_key(monkeypatch):
    from vrpo_fast.models import check_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match=r"^model\.dtype: bfloat16 is not supported"):
        check_dtype(torch.bfloat16, torch.device("cuda", 0))
    check_dtype(torch.float32, torch.device("cuda", 0))
    check_dtype(torch.bfloat16, torch.device("cpu"))
