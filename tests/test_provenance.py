"""Provenance: what the record holds, the weights fingerprint, and the checks that refuse data
sampled from another reference model or tokenizer, unfinished runs and other truncation."""

import hashlib
import json
import re
import shutil

import pytest
import torch
from helpers import TINY, TINY_YAML

from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer, load_causal_lm
from vrpo_fast.provenance import check_provenance, read_provenance, weights_fingerprint


def sample(tmp_path, *extra):
    from vrpo_fast.sample import sample_stage

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("ab>", "cd>", "e>")))
    cfg = load_config(None, [f"--sample.input={prompts}", f"--sample.output={tmp_path / 'sampled'}",
                             "--sample.num_samples=2", "--sample.max_new_tokens=3",
                             "--sample.shard_size=1", "--sample.seed=5",
                             "--model.tokenizer=byte", *extra])
    return sample_stage(cfg, progress=False)


def test_record_names_model_tokenizer_sampling_and_versions(tmp_path):
    ref_dir = tmp_path / "ref"
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(ref_dir)
    out = sample(tmp_path, f"--model.path={ref_dir}")
    record = read_provenance(out)
    model = record["reference_model"]
    assert model["path"] == str(ref_dir) and re.fullmatch(r"[0-9a-f]{64}",
                                                          model["weights_sha256"])
    assert model["weights_sha256"] == weights_fingerprint(load_causal_lm(str(ref_dir)))
    assert model["files_sha256"] == hashlib.sha256(
        b"model.safetensors|%d|" % (ref_dir / "model.safetensors").stat().st_size
        + (ref_dir / "model.safetensors").read_bytes()).hexdigest()
    assert "revision" in model                     # the hub commit; None for a local folder
    assert re.fullmatch(r"[0-9a-f]{64}", record["tokenizer"]["sha256"])
    assert record["sampling"] == {"num_samples": 2, "temperature": 1.0, "top_p": 1.0,
                                  "max_new_tokens": 3, "seed": 5, "backend": "transformers",
                                  "stop_token_ids": [1]}
    assert record["prompts"]["count"] == 3 and record["shards"] == {"count": 3, "size": 1}
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["python"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["created"])
    assert record["runtime"]["batch_size"] == 16 and record["runtime"]["device"] == "cpu"


def test_weights_fingerprint_identifies_the_weights_not_their_container(tmp_path):
    a = build_tiny_causal_lm(seed=0, **TINY)
    assert weights_fingerprint(a) == weights_fingerprint(build_tiny_causal_lm(seed=0, **TINY))
    assert weights_fingerprint(a) != weights_fingerprint(build_tiny_causal_lm(seed=1, **TINY))
    a.save_pretrained(tmp_path / "a")                   # what training loads from a path
    assert weights_fingerprint(load_causal_lm(str(tmp_path / "a"))) == weights_fingerprint(a)

    b = build_tiny_causal_lm(seed=0, **TINY)
    with torch.no_grad():
        w = b.model.layers[0].mlp.up_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))   # one ulp
    assert weights_fingerprint(b) != weights_fingerprint(a)

    # A bf16 copy hashes like its exact float32 upcast, and unlike the float32 original.
    half = build_tiny_causal_lm(seed=0, **TINY).to(torch.bfloat16)
    upcast = build_tiny_causal_lm(seed=0, **TINY).to(torch.bfloat16).to(torch.float32)
    assert weights_fingerprint(half) == weights_fingerprint(upcast) != weights_fingerprint(a)


def test_check_accepts_the_same_model_and_refuses_another_or_another_tokenizer(tmp_path):
    out = sample(tmp_path, f"--model.tiny={TINY_YAML}")
    ref = build_tiny_causal_lm(seed=0, **TINY)
    assert check_provenance(out, ref, byte_tokenizer())["sampling"]["seed"] == 5
    assert check_provenance(tmp_path / "nowhere", ref, byte_tokenizer()) is None

    with pytest.raises(UserError, match="drawn from a different reference model") as err:
        check_provenance(out, build_tiny_causal_lm(seed=1, **TINY), byte_tokenizer())
    assert "\n" not in str(err.value) and str(err.value).startswith("data.path: ")
    with pytest.raises(UserError, match="different tokenizer"):
        check_provenance(out, ref, byte_tokenizer(add_bos=False))


def test_check_refuses_an_unfinished_folder_but_not_a_copied_record(tmp_path):
    out = sample(tmp_path, f"--model.tiny={TINY_YAML}")
    ref = build_tiny_causal_lm(seed=0, **TINY)
    (tmp_path / "copy").mkdir()
    shutil.copyfile(out / "provenance.json", tmp_path / "copy" / "provenance.json")
    assert check_provenance(tmp_path / "copy", ref, byte_tokenizer()) is not None
    (out / "shard_00002.parquet").unlink()
    with pytest.raises(UserError, match="holds 2 of 3 shards \\(shard 2 missing\\)"):
        check_provenance(out, ref, byte_tokenizer())


def test_check_refuses_scores_of_another_truncation_and_warns_on_reshaped_sampling(
        tmp_path, capsys):
    out = sample(tmp_path, f"--model.tiny={TINY_YAML}", "--sample.temperature=0.8")
    ref = build_tiny_causal_lm(seed=0, **TINY)
    check_provenance(out, ref, byte_tokenizer())
    assert "temperature 0.8" in capsys.readouterr().err
    record = read_provenance(out)
    record["scoring"] = {"max_prompt_length": None, "max_response_length": 64}
    (out / "provenance.json").write_text(json.dumps(record))
    same = {"max_prompt_length": None, "max_response_length": 64}
    check_provenance(out, ref, byte_tokenizer(), truncation=same)
    with pytest.raises(UserError, match="^data.max_response_length: .* computed with "
                                        "max_response_length = 64, this run uses 32"):
        check_provenance(out, ref, byte_tokenizer(),
                         truncation={"max_prompt_length": None, "max_response_length": 32})
    (out / "provenance.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        check_provenance(out, ref, byte_tokenizer())


def test_training_refuses_samples_of_another_reference_model(tmp_path):
    from vrpo_fast.train.loop import Trainer

    out = sample(tmp_path, f"--model.tiny={TINY_YAML}")
    other = load_config(None, [f"--data.path={out}", "--model.tokenizer=byte",
                               f"--model.tiny={TINY_YAML}", "--model.seed=1",
                               "--ref.source=online", "--loss.estimator=dpo",
                               f"--train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="drawn from a different reference model"):
        Trainer(other)


def test_training_on_cached_ref_logps_refuses_another_truncation(tmp_path):
    from vrpo_fast.score import score_stage
    from vrpo_fast.train.loop import Trainer

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "ab>", "chosen": "aaaa", "rejected": "b", "samples": ["xyz", "q"],
         "aux_prefs": [0.9, 0.25]},
        {"prompt": "b>", "chosen": "bb", "rejected": "cccc", "samples": ["zz", "qqqq"],
         "aux_prefs": [0.5, 0.75]}]))
    model = ["--model.tokenizer=byte", f"--model.tiny={TINY_YAML}", "--aux.mode=given"]
    scored = score_stage(load_config(None, [
        f"--score.input={data}", f"--score.output={tmp_path / 'scored'}", *model,
        "--data.max_response_length=3"]), progress=False)
    train = [f"--data.path={scored}", *model, "--ref.source=cache",
             f"--train.output_dir={tmp_path / 'run'}"]
    with pytest.raises(UserError, match="^data.max_response_length: .* computed with "
                                        "max_response_length = 3, this run uses None"):
        Trainer(load_config(None, train))
    Trainer(load_config(None, train + ["--data.max_response_length=3"]))   # same truncation


def test_training_recognises_pi_ref_by_its_files_and_loads_it_only_when_they_differ(
        tmp_path, monkeypatch):
    import vrpo_fast.train.data
    from vrpo_fast.train.data import _check_provenance

    ref_dir = tmp_path / "ref"
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(ref_dir)
    out = sample(tmp_path, f"--model.path={ref_dir}")
    loads = []
    real = vrpo_fast.train.data.model_from_config
    monkeypatch.setattr(vrpo_fast.train.data, "model_from_config",
                        lambda cfg, which="policy": loads.append(which) or real(cfg, which))
    cfg = load_config(None, [f"--data.path={out}", f"--model.path={ref_dir}",
                             "--model.tokenizer=byte"])
    _check_provenance(cfg, out, byte_tokenizer())
    assert loads == []                                   # same files: pi_ref, nothing loaded
    # The same weights in other files (sharded): the files differ, so the weights decide, and
    # they are equal.
    copy = tmp_path / "copy"
    load_causal_lm(str(ref_dir)).save_pretrained(copy, max_shard_size="20KB")
    assert len(list(copy.glob("*.safetensors"))) > 1
    _check_provenance(load_config(None, [f"--data.path={out}", f"--model.path={copy}",
                                         "--model.tokenizer=byte"]), out, byte_tokenizer())
    assert loads == ["ref"]
    # Other weights in the recorded folder: loaded, compared, refused.
    build_tiny_causal_lm(seed=1, **TINY).save_pretrained(ref_dir)
    with pytest.raises(UserError, match="drawn from a different reference model"):
        _check_provenance(cfg, out, byte_tokenizer())
    assert loads == ["ref", "ref"]


def test_files_fingerprint_finds_a_hub_model_in_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from vrpo_fast.provenance import files_fingerprint

    local = tmp_path / "local"
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(local)
    # The hub cache layout: refs/main names the snapshot folder of the main revision.
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("c0" * 20)
    shutil.copytree(local, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0" * 20)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    want = files_fingerprint(local)
    assert want is not None and files_fingerprint("acme/tiny") == want
    assert files_fingerprint("acme/absent") is None                    # not cached: None
    assert files_fingerprint("not//a hub name") is None
    (snapshot / "model.safetensors").write_bytes(b"other bytes")
    assert files_fingerprint("acme/tiny") not in (None, want)


CHECK_ON_TWO_RANKS = """
import json, os, sys
import vrpo_fast.train.data
from vrpo_fast.config import load_config
from vrpo_fast.models import byte_tokenizer
from vrpo_fast.train.data import _check_provenance
from vrpo_fast.train.distributed import init_distributed

out, ref, result = sys.argv[1:]
dist = init_distributed()
loads = []
real = vrpo_fast.train.data.model_from_config
vrpo_fast.train.data.model_from_config = lambda cfg, which="policy": loads.append(which) or real(
    cfg, which)
cfg = load_config(None, [f"--data.path={out}", f"--model.path={ref}", "--model.tokenizer=byte"])
try:
    _check_provenance(cfg, out, byte_tokenizer(), dist)
    error = None
except Exception as err:
    error = f"{type(err).__name__}: {err}"
with open(f"{result}.{dist.rank}", "w") as f:
    json.dump({"loads": loads, "error": error}, f)
# Skip the interpreter's teardown: a worker thread torch leaves behind has aborted a process
# at exit ("terminate called without an active exception") after its work was done.
os._exit(0)
"""


@pytest.mark.slow
def test_training_ranks_take_rank_0s_provenance_verdict(tmp_path):
    """Two gloo ranks: only rank 0 loads pi_ref (its files differ from the record's), and both
    refuse data drawn from another model with rank 0's message."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ref_dir = tmp_path / "ref"
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(ref_dir)
    out = sample(tmp_path, f"--model.path={ref_dir}")
    script = tmp_path / "check.py"
    script.write_text(CHECK_ON_TWO_RANKS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "CUDA_VISIBLE_DEVICES": ""}

    def run(model_dir):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                            "--standalone", str(script), str(out), str(model_dir),
                            str(tmp_path / "result")], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads((tmp_path / f"result.{rank}").read_text()) for rank in (0, 1)]

    copy = tmp_path / "copy"                  # the same weights in other (sharded) files
    load_causal_lm(str(ref_dir)).save_pretrained(copy, max_shard_size="20KB")
    assert run(copy) == [{"loads": ["ref"], "error": None}, {"loads": [], "error": None}]
    other = tmp_path / "other"
    build_tiny_causal_lm(seed=1, **TINY).save_pretrained(other)
    rank0, rank1 = run(other)
    assert rank0["loads"] == ["ref"] and rank1["loads"] == []
    assert rank0["error"] == rank1["error"]
    assert rank0["error"].startswith("UserError: data.path: the samples in")
    assert "different reference model" in rank0["error"]
