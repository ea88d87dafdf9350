"""Loading without a full copy per rank: a model FSDP2 shards, from a local safetensors folder,
is built on the meta device and each rank reads only its own rows of every tensor
(vrpo_fast.train.modules.shard_empty). On two gloo ranks the policy, pi_ref and the auxiliary
model hold exactly the weights the full loader gives, no rank ever calls the full loader, and
each rank reads only its shard's bytes; a LoRA run loaded this way trains as one process that
loads the model whole does."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from vrpo_fast.config import load_config
from vrpo_fast.models import build_tiny_causal_lm, load_causal_lm, weight_files
from vrpo_fast.train.metrics import read_metrics

TINY = ROOT / "configs" / "tiny.yaml"
SHAPE = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)

# Runs on each of two ranks: builds a trainer per config (the full loaders refuse to run),
# gathers every weight of its models and records the rows each rank read from the files.
CHECK = """
import json, os, sys, torch
import transformers
import vrpo_fast.train.modules as modules
from vrpo_fast.config import load_config
from vrpo_fast.train.loop import Trainer

config, out, result = sys.argv[1:4]
overrides = json.loads(sys.argv[4])
read = [0]
real_rows = modules._read_rows
def counted(piece, start, stop):
    rows = real_rows(piece, start, stop)
    read[0] += rows.numel()
    return rows
modules._read_rows = counted

def refuse(*args, **kwargs):
    raise AssertionError("a full load on a sharded path")
for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
    cls.from_pretrained = refuse

results = {}
for name, extra in overrides.items():
    read[0] = 0
    cfg = load_config(config, [f"--train.output_dir={out}/{name}", *extra])
    trainer = Trainer(cfg, quiet=True)
    models = {"policy": trainer.policy, "ref": trainer.ref, "aux": trainer.aux}
    full = {}
    local = 0
    for which, module in models.items():
        if module is None or not hasattr(module, "named_parameters"):
            continue
        for key, p in module.named_parameters():
            local += p.to_local().numel()
            full[f"{which}/{key}"] = p.full_tensor().detach()
        for key, b in module.named_buffers():
            full[f"{which}/{key}"] = b.detach()
    if trainer.dist.is_main:
        torch.save(full, f"{result}.{name}.pt")
    with open(f"{result}.{name}.{trainer.dist.rank}.json", "w") as f:
        json.dump({"read": read[0], "local": local}, f)
    trainer._release_lock()
# Skip the interpreter's teardown: a worker thread torch leaves behind has aborted a process
# at exit ("terminate called without an active exception") after its work was done.
os._exit(0)
"""


def _save(model, folder, dtype, shards: bool):
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": "20KB"} if shards else {}))
    return folder


def _expected(folder, cls):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    loader = {"lm": AutoModelForCausalLM, "rm": AutoModelForSequenceClassification}[cls]
    model = loader.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _run(tmp_path, overrides):
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "--standalone", str(script), str(TINY), str(tmp_path / "runs"),
                        str(tmp_path / "result"), json.dumps(overrides)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_fill_their_shards_from_the_files_and_equal_the_full_load(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.models import tiny_llama_config

    policy = _save(build_tiny_causal_lm(seed=0, **SHAPE), tmp_path / "policy", torch.float32,
                   shards=True)
    ref = _save(build_tiny_causal_lm(seed=1, **SHAPE), tmp_path / "ref", torch.bfloat16,
                shards=False)                        # bf16 files, cast on load as the loader does
    aux = _save(build_tiny_causal_lm(seed=2, arch="qwen2", tie_word_embeddings=True, **SHAPE),
                tmp_path / "aux", torch.float32, shards=True)
    torch.manual_seed(3)
    rm_config = tiny_llama_config(**SHAPE)
    rm_config.num_labels = 1
    rm = _save(AutoModelForSequenceClassification.from_config(rm_config), tmp_path / "rm",
               torch.float32, shards=True)
    common = [f"--model.path={policy}", "--model.tokenizer=byte", "--model.tiny=null",
              "--train.batch_groups=4", "--train.micro_batch_groups=2"]
    _run(tmp_path, {
        "lm": [*common, f"--ref.path={ref}", "--aux.mode=lm", f"--aux.path={aux}"],
        "rm": [*common, "--aux.mode=reward_model", f"--aux.path={rm}"],
    })

    expected = {"lm": {"policy": _expected(policy, "lm"), "ref": _expected(ref, "lm"),
                       "aux": _expected(aux, "lm")},
                "rm": {"policy": _expected(policy, "lm"), "ref": _expected(policy, "lm"),
                       "aux": _expected(rm, "rm")}}
    for name, want in expected.items():
        got = torch.load(tmp_path / f"result.{name}.pt")
        n_want = 0
        for which, tensors in want.items():
            inner = "classifier" if which == "aux" and name == "rm" else "lm"
            for key, value in tensors.items():
                n_want += 1
                assert torch.equal(got[f"{which}/{inner}.{key}"], value), (name, which, key)
        assert len(got) == n_want, sorted(set(got) - {f"{w}/{k}" for w in want for k in want[w]})
        # Each rank read exactly its own shards' rows; together, each file tensor once.
        ranks = [json.loads((tmp_path / f"result.{name}.{r}.json").read_text()) for r in (0, 1)]
        files_total = sum(p.numel() for t in want.values() for k, p in t.items()
                          if isinstance(p, torch.nn.Parameter))
        assert [r["read"] for r in ranks] == [r["local"] for r in ranks]
        assert sum(r["read"] for r in ranks) == files_total
        assert all(r["read"] < 0.6 * files_total for r in ranks)


@pytest.mark.slow
def test_lora_from_a_model_folder_on_two_ranks_trains_as_one_full_load(tmp_path):
    """LoRA adapters keep the initial values drawn when they are injected into the empty base:
    two ranks loading shard by shard give the trajectory of one process loading it whole."""
    base = _save(build_tiny_causal_lm(seed=0, **SHAPE), tmp_path / "base", torch.float32,
                 shards=True)
    common = [f"--model.path={base}", "--model.tokenizer=byte", "--model.tiny=null",
              "--train.batch_groups=4", "--train.micro_batch_groups=2", "--lora.enabled=true",
              "--lora.r=4", "--lora.alpha=8", "--lora.target_modules=[q_proj, v_proj, down_proj]",
              "--train.mixed_precision=fp32", "--train.max_steps=3", "--train.save_every=0",
              "--train.warmup_steps=0", "--train.lr=0.02"]
    from vrpo_fast.train.loop import Trainer

    Trainer(load_config(TINY, [f"--train.output_dir={tmp_path / 'one'}", *common])).fit()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        "--standalone", "-m", "vrpo_fast.cli", "train", "--config", str(TINY),
                        f"--train.output_dir={tmp_path / 'two'}", *common],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    keys = ["loss", "grad_norm", "margin", "accuracy"]
    torch.testing.assert_close(
        torch.tensor([[g[k] for k in keys] for g in got], dtype=torch.float64),
        torch.tensor([[w[k] for k in keys] for w in want], dtype=torch.float64),
        rtol=1e-4, atol=1e-5)


def test_weight_files_maps_every_tensor_of_a_folder(tmp_path):
    model = build_tiny_causal_lm(seed=0, **SHAPE)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    names = set(model.state_dict())
    single = weight_files(str(tmp_path / "one"))
    assert set(single) == names and set(single.values()) == {tmp_path / "one" /
                                                             "model.safetensors"}
    many = weight_files(str(tmp_path / "many"))
    assert set(many) == names and len(set(many.values())) > 1
    assert weight_files(None) is None and weight_files("org/hub-name") is None


def test_an_empty_model_filled_from_its_files_equals_the_loaded_one(tmp_path):
    """One process, no FSDP: the empty build has no parameter memory, real buffers, and
    `shard_empty` fills it to the full loader's values; a tensor missing from the files or of
    another shape is one line naming the key."""
    from vrpo_fast.errors import UserError
    from vrpo_fast.passes import SequenceLogps
    from vrpo_fast.train.modules import shard_empty

    build_tiny_causal_lm(seed=0, **SHAPE).save_pretrained(tmp_path / "m", max_shard_size="20KB")
    folder = str(tmp_path / "m")
    empty = load_causal_lm(folder, empty=True)
    assert all(p.is_meta for p in empty.parameters())
    assert not any(b.is_meta for b in empty.buffers())
    wrapper = shard_empty(SequenceLogps(empty), empty, device=torch.device("cpu"),
                          files=weight_files(folder), what="model.path", mixed_precision=False)
    full = load_causal_lm(folder)
    want = {**dict(full.named_parameters()), **dict(full.named_buffers())}
    got = {**dict(empty.named_parameters()), **dict(empty.named_buffers())}
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert wrapper.lm is empty

    files = weight_files(folder)
    del files["model.norm.weight"]
    with pytest.raises(UserError, match="^model.path: the weight files have no tensor "
                                        "'model.norm.weight'"):
        e = load_causal_lm(folder, empty=True)
        shard_empty(SequenceLogps(e), e, device=torch.device("cpu"), files=files,
                    what="model.path", mixed_precision=False)
    wide = dict(SHAPE, intermediate_size=96)
    build_tiny_causal_lm(seed=0, **wide).save_pretrained(tmp_path / "wide")
    e = load_causal_lm(folder, empty=True)
    with pytest.raises(UserError, match=r"^ref.path: model.safetensors holds "
                                        r"'model.layers.0.mlp.gate_proj.weight' with shape "
                                        r"\[96, 32\]; the model's config asks for \[64, 32\]$"):
        shard_empty(SequenceLogps(e), e, device=torch.device("cpu"),
                    files=weight_files(str(tmp_path / "wide")), what="ref.path",
                    mixed_precision=False)


def test_one_process_with_cpu_offload_fills_the_policy_from_its_files(tmp_path):
    """CPU offload keeps FSDP2 on one process, so the policy is built empty there too; it
    trains from the full loader's weights (the step-1 loss of a run loaded whole)."""
    from vrpo_fast.train.loop import Trainer

    folder = tmp_path / "m"
    build_tiny_causal_lm(seed=0, **SHAPE).save_pretrained(folder, max_shard_size="20KB")
    common = [f"--model.path={folder}", "--model.tokenizer=byte", "--model.tiny=null",
              "--train.batch_groups=4", "--train.micro_batch_groups=4", "--train.max_steps=1",
              "--train.save_every=0", "--train.mixed_precision=fp32"]
    offload = Trainer(load_config(TINY, [f"--train.output_dir={tmp_path / 'a'}", *common,
                                         "--train.cpu_offload=true"]), quiet=True)
    assert offload._empty_policy
    want = load_causal_lm(str(folder)).state_dict()
    got = {k.removeprefix("lm."): v.full_tensor() for k, v in offload.policy.state_dict().items()}
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    whole = Trainer(load_config(TINY, [f"--train.output_dir={tmp_path / 'b'}", *common]),
                    quiet=True)
    assert not whole._empty_policy
    a, b = offload.train_step(), whole.train_step()
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=1e-7)
    offload._release_lock()
    whole._release_lock()
