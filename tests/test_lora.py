"""LoRA (the `lora:` section) against peft itself: the policy's packed log-probs equal a peft
model's float64 forward, pi_ref (the same weights with the adapters off) equals the base model's,
final/ reloads with peft (and final/merged with transformers) to the trained policy, resume is
exact, and two FSDP2 processes compute what one does. Bad settings are one line naming the key."""

import copy
import random
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, assert_close_verbose, float64_logps, random_groups

from vrpo_fast.cli import main as cli_main
from vrpo_fast.config import load_config
from vrpo_fast.train.metrics import read_metrics

peft = pytest.importorskip("peft")

TINY = ROOT / "configs" / "tiny.yaml"
LORA = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
        "intermediate_size: 64}", "--train.batch_groups=4", "--train.micro_batch_groups=2",
        "--lora.enabled=true", "--lora.r=4", "--lora.alpha=8",
        "--lora.target_modules=[q_proj, v_proj, down_proj]", "--train.mixed_precision=fp32"]


def cfg_for(tmp_path, *overrides, name="run"):
    return load_config(TINY, [f"--train.output_dir={tmp_path / name}", *LORA, *overrides])


def _batch(seed=0):
    from vrpo_fast.packing import pack_groups, row_padding

    prompts, responses = random_groups(3, 4, random.Random(seed))
    batch = pack_groups(prompts, responses, max_tokens=200, **row_padding(torch.device("cpu")))
    return batch, prompts, responses


def _float64_table(model64, prompts, responses):
    return torch.tensor([[float64_logps(model64, p, r) for r in rs]
                         for p, rs in zip(prompts, responses)], dtype=torch.float64)


def _peft_model(cfg, state):
    """A peft PeftModel (float64) of the config's base weights, with the LoRA weights of
    `state` (a state dict with peft's names)."""
    from vrpo_fast.models import lora_config, model_from_config

    model = peft.get_peft_model(model_from_config(cfg, "policy", torch.float64),
                                lora_config(cfg.lora))
    lora = {k: v.double() for k, v in state.items() if "lora_" in k}
    missing = model.base_model.model.load_state_dict(lora, strict=False)
    assert not missing.unexpected_keys and lora
    return model.eval()


def test_policy_equals_peft_and_reference_is_the_base_model(tmp_path):
    from vrpo_fast.models import model_from_config
    from vrpo_fast.train.loop import Trainer

    trainer = Trainer(cfg_for(tmp_path))
    try:
        trainable = [n for n, p in trainer.lm.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        with torch.no_grad():          # B = 0 at initialisation: make the adapters matter
            for n, p in trainer.lm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)
        batch, prompts, responses = _batch()
        with torch.no_grad():
            policy, ref = trainer.policy(batch), trainer.ref(batch)
        want_policy = _float64_table(_peft_model(trainer.cfg, trainer.lm.state_dict()),
                                     prompts, responses)
        base64 = model_from_config(trainer.cfg, "policy", torch.float64).eval()
        want_ref = _float64_table(base64, prompts, responses)
        assert (want_policy - want_ref).abs().max() > 1e-2     # the adapters change the model
        assert_close_verbose(policy, want_policy, atol=2e-4, rtol=1e-5, name="policy vs peft")
        assert_close_verbose(ref, want_ref, atol=2e-4, rtol=1e-5, name="adapters off vs base")
        # The adapters are back on (and trainable) after the reference pass.
        with torch.no_grad():
            assert_close_verbose(trainer.policy(batch), policy, atol=0, rtol=0, name="again")
        assert [n for n, p in trainer.lm.named_parameters() if p.requires_grad] == trainable
    finally:
        trainer._release_lock()


def test_final_adapter_reloads_with_peft_and_merged_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from vrpo_fast.models import model_from_config
    from vrpo_fast.train.loop import Trainer

    cfg = cfg_for(tmp_path, "--train.max_steps=3", "--train.save_every=0",
                  "--train.warmup_steps=0", "--train.lr=0.02", "--lora.merge_final=true")
    trainer = Trainer(cfg)
    final = trainer.fit()
    batch, prompts, responses = _batch(1)
    with torch.no_grad():
        got, ref = trainer.policy(batch), trainer.ref(batch)
    assert (got - ref).abs().max() > 1e-3                      # training moved the adapters
    loaded = peft.PeftModel.from_pretrained(model_from_config(cfg, "policy", torch.float64),
                                            final).double().eval()
    assert_close_verbose(got, _float64_table(loaded, prompts, responses), atol=2e-4, rtol=1e-5,
                         name="final/ adapter via peft")
    merged = AutoModelForCausalLM.from_pretrained(final / "merged", dtype=torch.float64).eval()
    assert_close_verbose(got, _float64_table(merged, prompts, responses), atol=2e-4, rtol=1e-5,
                         name="final/merged")
    # The base weights did not move: pi_ref is still the starting point.
    base64 = model_from_config(cfg, "policy", torch.float64).eval()
    assert_close_verbose(ref, _float64_table(base64, prompts, responses), atol=2e-4, rtol=1e-5,
                         name="reference after training")


def test_resume_is_exact(tmp_path, monkeypatch):
    from vrpo_fast.train.loop import Trainer

    common = ["--train.max_steps=4", "--train.save_every=2", "--lora.dropout=0.3"]
    straight = cfg_for(tmp_path, *common, name="straight")
    Trainer(straight).fit()
    cfg = cfg_for(tmp_path, *common, name="stopped")
    original = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: (_ for _ in ()).throw(
        RuntimeError("crash")) if self.step == 3 else original(self))
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(cfg).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer(cfg).fit()                                   # resumes from step 2
    got, want = read_metrics(cfg.train.output_dir), read_metrics(straight.train.output_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]   # bitwise on one process
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]


@pytest.mark.slow
def test_two_fsdp_processes_compute_what_one_does(tmp_path):
    import os

    from vrpo_fast.train.loop import Trainer

    common = ["--train.max_steps=3", "--train.save_every=0", "--train.warmup_steps=0",
              "--train.lr=0.02"]
    one = cfg_for(tmp_path, *common, name="one")
    Trainer(one).fit()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "--standalone", "-m", "vrpo_fast.cli", "train", "--config", str(TINY),
                        f"--train.output_dir={tmp_path / 'two'}", *LORA, *common],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = read_metrics(one.train.output_dir), read_metrics(tmp_path / "two")
    keys = ["loss", "grad_norm", "tokens", "margin", "accuracy"]
    torch.testing.assert_close(
        torch.tensor([[g[k] for k in keys] for g in got], dtype=torch.float64),
        torch.tensor([[w[k] for k in keys] for w in want], dtype=torch.float64),
        rtol=1e-4, atol=1e-5)
    a = peft.load_peft_weights(str(tmp_path / "two" / "final"))
    b = peft.load_peft_weights(str(one.train.output_dir) + "/final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=lambda m, k=k: k + m)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["--lora.target_modules=[q_proj, qkv]"], "lora.target_modules: 'qkv' matches no module"),
        (["--lora.target_modules=[lm_head]"], "lora.target_modules: lm_head"),
        (["--ref.path=/some/model"], "ref.path"),
        (["--lora.r=0"], "lora.r"),
    ],
)
def test_bad_lora_settings_fail_with_the_key_named(tmp_path, capsys, overrides, match):
    out = tmp_path / "bad"
    rc = cli_main(["train", "--config", str(TINY), f"--train.output_dir={out}", *LORA,
                   *overrides])
    err = capsys.readouterr().err
    assert rc == 1 and match in err and "Traceback" not in err, err
    assert err.count("\n") == 1
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def test_peft_reference_sanity():
    """The peft switch the trainer's reference relies on: peft's own disable_adapter() gives
    the base model (so comparing with peft above compares with the right thing)."""
    from vrpo_fast.models import build_tiny_causal_lm

    base = build_tiny_causal_lm(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                intermediate_size=64, dtype=torch.float64).eval()
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights=False)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
