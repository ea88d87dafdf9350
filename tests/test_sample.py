"""Sampling from pi_ref: counts, stop tokens, seeds, the distribution sampled (chi-square against
the model's softmax), left padding, the sample stage's output, kill-and-resume, ranks, and the
vLLM backend's request/output mapping and guards (the backend itself, against real vLLM:
tests/test_vllm.py)."""

import json
import math
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, TINY_YAML

from vrpo_fast import shards
from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.samplers import (
    TransformersSampler,
    prompt_seed,
    stop_token_ids,
    trim_at_stop,
    vllm_outputs,
    vllm_requests,
)


class SmallVocab:
    """Token ids 0..11, EOS = 1: a stop is sampled often enough to see both endings."""
    eos_token_id, pad_token_id = 1, 2


def small_model(seed=0, sharpen=1.0):
    model = build_tiny_causal_lm(seed=seed, vocab_size=12, **TINY)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def chi2_bound(dof: int, z: float = 3.72) -> float:
    """The 1 - 1e-4 quantile of chi-square(dof) (Wilson-Hilferty; z = 3.72 is the normal's)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic with the bins of expected count < 5 pooled."""
    expected = probs * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    return ((obs - exp) ** 2 / exp).sum().item(), len(obs) - 1


# --- the transformers sampler -----------------------------------------------------------------

def test_counts_stop_tokens_and_max_new_tokens():
    model = small_model()
    model.generation_config.eos_token_id = [1, 7]        # a chat model's extra end-of-turn id
    s = TransformersSampler(model, SmallVocab(), max_new_tokens=6, batch_size=3)
    assert s.stop_ids == [1, 7]
    prompts = [[0, 5, 6], [0, 7, 8, 9, 10, 11, 3], [0, 4], [0, 9, 9, 9]]   # padded batches
    out = s.sample(prompts, 5, seed=1)
    assert len(out) == 4 and all(len(per) == 5 for per in out)
    ends = []
    for per in out:
        for ids in per:
            assert 1 <= len(ids) <= 6 and all(0 <= t < 12 for t in ids)
            assert not {1, 7} & set(ids[:-1])             # cut after the first stop token
            assert ids[-1] in (1, 7) or len(ids) == 6      # stopped, or hit max_new_tokens
            ends.append(ids[-1] if ids[-1] in (1, 7) else "cut")
    assert {1, 7, "cut"} <= set(ends)                      # every ending was seen


def test_same_seed_same_draws_other_seed_other_draws(tokenizer):
    s = TransformersSampler(build_tiny_causal_lm(seed=0, **TINY), tokenizer, max_new_tokens=6,
                            batch_size=2)
    prompts = [tokenizer(p)["input_ids"] for p in ("ab>", "cd>", "bdd>")]
    a = s.sample(prompts, 4, seed=7)
    assert a == s.sample(prompts, 4, seed=7)
    assert a != s.sample(prompts, 4, seed=8)
    assert len({tuple(map(tuple, per)) for per in a}) == 3   # prompts do not share draws


def test_first_tokens_follow_the_model_softmax_despite_checkpoint_defaults():
    """Chi-square goodness of fit of the first sampled token to softmax(logits) at temperature
    1, for a prompt left-padded beside a longer one, with a generation_config that carries
    sampling defaults (a real checkpoint's generation_config.json may): they must not apply."""
    model = small_model(sharpen=8.0)                       # a far-from-uniform distribution
    gc = model.generation_config
    gc.repetition_penalty, gc.top_k, gc.no_repeat_ngram_size, gc.temperature = 3.0, 2, 1, 0.3
    prompt, longer = [0, 5, 6, 7], [0, 3, 4, 8, 9, 10, 11]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    probs = torch.softmax(logits, -1)
    assert probs[5:8].sum() > 0.05        # a repetition penalty would visibly move these

    n = 4000
    s = TransformersSampler(model, SmallVocab(), max_new_tokens=1, batch_size=2)
    draws, _ = s.sample([prompt, longer], n, seed=3)
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=12).double()
    stat, dof = chi2(counts, probs, n)
    assert stat < chi2_bound(dof), (stat, dof)
    assert model.generation_config is gc and gc.repetition_penalty == 3.0   # restored

    # The test has power: a sharpened sampler (temperature 0.5) fails it by far.
    cold, _ = TransformersSampler(model, SmallVocab(), max_new_tokens=1, batch_size=2,
                                  temperature=0.5).sample([prompt, longer], n, seed=3)
    cc = torch.bincount(torch.tensor([d[0] for d in cold]), minlength=12).double()
    assert chi2(cc, probs, n)[0] > 5 * chi2_bound(dof)


def _greedy(model, prompt, steps, eos):
    """Argmax decoding one unpadded forward at a time, and the smallest top-1 / top-2 gap."""
    ids, gap = list(prompt), float("inf")
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].double()
            top = logits.topk(2).values
            gap = min(gap, (top[0] - top[1]).item())
            ids.append(int(logits.argmax()))
            if ids[-1] == eos:
                break
    return ids[len(prompt):], gap


def test_left_padding_keeps_every_position_of_the_distribution():
    """At a tiny temperature the sampler follows the argmax path; in a left-padded batch it must
    be the path of the unpadded model at EVERY step (positions and masking right)."""
    model = small_model(sharpen=4.0)
    prompts = [[0, 5], [0, 3, 4, 8, 9, 10, 11, 6], [0, 9, 4, 4]]
    expected = []
    for p in prompts:
        path, gap = _greedy(model, p, 6, eos=1)
        assert gap > 0.02, "choose a model with clear argmax steps"
        expected.append(path)
    s = TransformersSampler(model, SmallVocab(), max_new_tokens=6, batch_size=3,
                            temperature=1e-3)
    out = s.sample(prompts, 3, seed=0)
    assert out == [[path] * 3 for path in expected]


def test_generate_attention_uses_flash_attn_only_on_a_gpu_in_half_precision(monkeypatch):
    import vrpo_fast.samplers as samplers
    from vrpo_fast.samplers import generate_attention

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert generate_attention(cuda, torch.bfloat16, True) == "flash_attention_2"
    assert generate_attention(cuda, torch.float16, True) == "flash_attention_2"
    assert generate_attention(cuda, torch.float32, True) is None     # flash-attn: half only
    assert generate_attention(cuda, torch.bfloat16, False) is None   # not installed
    assert generate_attention(cpu, torch.bfloat16, True) is None
    # The sampler applies the choice to its model: on this CPU, the model keeps SDPA even
    # with flash-attn "installed"; a chosen implementation is set on the model.
    monkeypatch.setattr(samplers, "flash_attn_installed", lambda: True)
    model = small_model()
    TransformersSampler(model, SmallVocab())
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(samplers, "generate_attention", lambda device, dtype, flash: "eager")
    TransformersSampler(model, SmallVocab())
    assert model.config._attn_implementation == "eager"


def test_trim_and_stop_ids(tokenizer):
    assert trim_at_stop([5, 6, 1, 2, 2], [1]) == [5, 6, 1]
    assert trim_at_stop([5, 7, 3, 1], [1, 7]) == [5, 7]
    assert trim_at_stop([5, 6], [1]) == [5, 6]
    gc = types.SimpleNamespace(eos_token_id=[1, 9])
    assert stop_token_ids(tokenizer, gc) == [1, 9]
    assert stop_token_ids(tokenizer, types.SimpleNamespace(eos_token_id=1)) == [1]
    assert stop_token_ids(tokenizer, None) == [1]


# --- the sample stage -------------------------------------------------------------------------

PROMPTS = [{"prompt": "ab>"}, {"prompt": "cd>", "chosen": "aa", "rejected": "b"},
           {"prompt": "ba>", "chosen": "a", "rejected": "bb"}, {"prompt": "dc>"},
           {"prompt": "ac>", "chosen": "c", "rejected": "d"}]


def write_prompts(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return path


def overrides(root: Path, **extra) -> list[str]:
    out = [f"--sample.input={write_prompts(root / 'prompts.jsonl')}",
           f"--sample.output={root / 'sampled'}", "--sample.num_samples=4",
           "--sample.max_new_tokens=5", "--sample.shard_size=2", "--sample.batch_size=2",
           "--model.tokenizer=byte", f"--model.tiny={TINY_YAML}"]
    return out + [f"--{k}={v}" for k, v in extra.items()]


def config(root: Path, **extra):
    return load_config(None, overrides(root, **extra))


def test_sample_stage_output_is_training_data(tmp_path, tokenizer):
    """Every prompt once, in order, with 2M samples whose ids tokenization keeps exactly; the
    labelled pairs survive (also after an unlabelled first row of a shard)."""
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_example, tokenize_prompt
    from vrpo_fast.sample import sample_stage

    out = sample_stage(config(tmp_path), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "provenance.json", "shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    examples, report = load_preference_data(str(out))
    assert report.bad_rows == 0 and len(examples) == len(PROMPTS)
    for ex, src in zip(examples, PROMPTS):
        assert ex.prompt == src["prompt"] and ex.chosen == src.get("chosen")
        assert ex.rejected == src.get("rejected")
        assert len(ex.samples) == 4 == len(ex.sample_ids)
        t = tokenize_example(ex, tokenizer)
        assert t.prompt_ids == tokenize_prompt(src["prompt"], tokenizer)
        samples = t.response_ids[2:] if ex.labelled else t.response_ids
        for ids, text, got in zip(ex.sample_ids, ex.samples, samples):
            assert 1 <= len(ids) <= 5
            if ids[-1] == 1:                      # stopped: the ids are used as they are
                assert got == ids
                body = ids[:-1]
                assert text == (tokenizer.decode(body) if body else tokenizer.eos_token)
            else:
                assert len(ids) == 5 and text == tokenizer.decode(ids)


def test_sample_row_text_of_stopped_cut_and_empty_responses(tokenizer):
    from vrpo_fast.data.schema import PreferenceExample
    from vrpo_fast.sample import sample_row

    ex = PreferenceExample(prompt="p", chosen=None, rejected=None)
    a = tokenizer("hi", add_special_tokens=False)["input_ids"]
    row = sample_row(ex, [a + [1], [1], a], tokenizer, [1], "</s>")
    assert row == {"prompt": "p", "samples": ["hi", "</s>", "hi"],
                   "sample_ids": [a + [1], [1], a]}


def test_seeds_per_shard_and_per_prompt_are_distinct():
    from vrpo_fast.sample import shard_seed

    assert len({shard_seed(s, i) for s in range(5) for i in range(100)}) == 500
    seeds = sorted(prompt_seed(3, i) for i in range(2000))
    # vLLM seeds the j-th of n samples with seed + j: neighbouring prompts stay far apart.
    assert min(b - a for a, b in zip(seeds, seeds[1:])) > 1000
    assert all(0 <= s < 2 ** 63 for s in seeds)


def test_resume_refuses_other_settings_or_prompts(tmp_path):
    from vrpo_fast.sample import sample_stage

    sample_stage(config(tmp_path), progress=False)
    with pytest.raises(UserError, match="another sampling"):
        sample_stage(config(tmp_path, **{"sample.temperature": 0.7}), progress=False)
    with pytest.raises(UserError, match="another shards"):
        sample_stage(config(tmp_path, **{"sample.shard_size": 3}), progress=False)
    PROMPTS.append({"prompt": "zz>"})
    try:
        with pytest.raises(UserError, match="another prompts"):
            sample_stage(config(tmp_path), progress=False)
    finally:
        PROMPTS.pop()
    # Neither batch_size nor where the prompts file lives is part of the identity: a run
    # resumed with a smaller batch, or after moving the prompts, is accepted.
    moved = write_prompts(tmp_path / "moved.jsonl")
    cfg = config(tmp_path, **{"sample.batch_size": 1})
    cfg.sample.input = str(moved)
    sample_stage(cfg, progress=False)


KILLER = """
import os, signal, sys
from vrpo_fast import shards

real = shards.write_shard


def dying(directory, index, rows):
    if index == 2:
        # SIGKILL halfway through writing shard 2: its temporary file is on disk, unrenamed.
        tmp = shards.shard_path(directory, index).with_name(".shard_00002.parquet.tmp")
        tmp.write_bytes(b"PAR1 half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(directory, index, rows)


shards.write_shard = dying
from vrpo_fast.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_killed_with_sigkill_then_rerun_equals_uninterrupted(tmp_path, capsys):
    """A real process killed mid-shard; the same command run again completes the data set, which
    equals an uninterrupted run's: no prompt lost or duplicated, the same samples."""
    import yaml

    from vrpo_fast.cli import main
    from vrpo_fast.sample import sample_stage

    PROMPTS.extend([{"prompt": "aa>"}, {"prompt": "bb>", "chosen": "x", "rejected": "y"}])
    try:
        write_prompts(tmp_path / "prompts.jsonl")
        cfg_path = tmp_path / "sample.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "model": {"tiny": yaml.safe_load(TINY_YAML), "tokenizer": "byte"},
            "sample": {"input": str(tmp_path / "prompts.jsonl"),
                       "output": str(tmp_path / "killed"), "num_samples": 4,
                       "max_new_tokens": 5, "shard_size": 2, "batch_size": 2}}))
        (tmp_path / "killer.py").write_text(KILLER)
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        proc = subprocess.run([sys.executable, str(tmp_path / "killer.py"), "sample",
                               "--config", str(cfg_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        killed = tmp_path / "killed"
        assert sorted(p.name for p in killed.glob("shard_*")) == ["shard_00000.parquet",
                                                                  "shard_00001.parquet"]
        assert (killed / ".shard_00002.parquet.tmp").is_file()

        assert main(["sample", "--config", str(cfg_path)]) == 0         # the same command
        assert "2 of this rank's 4 done" in capsys.readouterr().out
        straight = sample_stage(load_config(cfg_path, [
            f"--sample.output={tmp_path / 'straight'}"]), progress=False)
        resumed = shards.read_shards(killed)
        assert len(resumed) == len(PROMPTS)
        assert [r["prompt"] for r in resumed] == [p["prompt"] for p in PROMPTS]
        assert resumed == shards.read_shards(straight)
    finally:
        del PROMPTS[-2:]


def test_ranks_split_the_shards_and_together_equal_one_process(tmp_path, monkeypatch):
    from vrpo_fast.sample import sample_stage

    single = shards.read_shards(sample_stage(config(tmp_path / "one"), progress=False))
    cfg = config(tmp_path / "two")
    out = Path(cfg.sample.output)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    sample_stage(cfg, progress=False)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00001.parquet"]
    monkeypatch.setenv("RANK", "0")
    sample_stage(cfg, progress=False)
    assert shards.read_shards(out) == single


def test_stage_errors_name_the_key(tmp_path):
    from vrpo_fast.sample import sample_stage

    with pytest.raises(UserError, match="^sample.output"):
        sample_stage(config(tmp_path, **{"sample.output": "null"}), progress=False)
    with pytest.raises(UserError, match="sample.shard_size"):
        sample_stage(config(tmp_path, **{"sample.shard_size": 0}), progress=False)


# --- the vLLM backend's mapping (real vLLM: tests/test_vllm.py) --------------------------------

def completion(index, token_ids, logprobs=None):
    """A vLLM CompletionOutput's fields the sampler reads; logprobs: one {token: Logprob} per
    step, as SamplingParams(logprobs=0) returns them."""
    steps = None if logprobs is None else [
        {t: types.SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, logprobs)]
    return types.SimpleNamespace(index=index, token_ids=token_ids, logprobs=steps)


def test_vllm_requests_and_outputs_map_ids_order_and_log_probs():
    assert vllm_requests([[0, 5], [0, 6, 7]]) == [{"prompt_token_ids": [0, 5]},
                                                  {"prompt_token_ids": [0, 6, 7]}]
    outputs = [types.SimpleNamespace(outputs=[   # out of index order: the sampler sorts
        completion(1, [4, 1, 9], [-1.0, -0.5, -8.0]), completion(0, [3, 3], [-2.0, -0.25])]),
        types.SimpleNamespace(outputs=[completion(0, [7]), completion(1, [1])])]
    ids, logps = vllm_outputs(outputs, 2, stop_ids=[1])
    # cut after the stop token; the log-prob sums the kept tokens only
    assert ids == [[[3, 3], [4, 1]], [[7], [1]]]
    assert logps[0] == [-2.25, -1.5]
    assert all(math.isnan(v) for v in logps[1])        # no log-probs requested
    with pytest.raises(RuntimeError, match="1 completions for a prompt, expected 2"):
        vllm_outputs([types.SimpleNamespace(outputs=[completion(0, [4, 1])])], 2, [1])


def test_backend_choice_and_vllm_guards(monkeypatch, tmp_path):
    import vrpo_fast.samplers as samplers
    from vrpo_fast import sample as sample_module
    from vrpo_fast.sample import backend_choice, choose_backend, vllm_args

    with_path = load_config(None, [f"--model.path={tmp_path}", "--model.tokenizer=byte"])
    tiny = load_config(None, [f"--model.tiny={TINY_YAML}"])
    monkeypatch.setattr(sample_module, "vllm_problem", lambda: None)
    where = "a GPU" if torch.cuda.is_available() else "the CPU"
    assert backend_choice(with_path) == ("vllm", f"auto: vllm imports, {where}")
    assert choose_backend(with_path) == "vllm"
    assert backend_choice(tiny) == ("transformers", "auto: the reference model is model.tiny, "
                                                    "which vLLM cannot load")
    monkeypatch.setattr(sample_module, "vllm_problem", lambda: "vllm is not installed")
    assert backend_choice(with_path) == ("transformers", "auto: vllm is not installed")
    forced = load_config(None, [f"--model.path={tmp_path}", "--sample.backend=vllm"])
    assert backend_choice(forced) == ("vllm", "sample.backend")
    with pytest.raises(UserError, match="needs a model path"):
        vllm_args(load_config(None, [f"--model.tiny={TINY_YAML}", "--sample.backend=vllm"]))
    # sample.backend=vllm where vllm does not import: one line, the way out named.
    monkeypatch.setattr(samplers, "vllm_problem", lambda: "vllm is not installed")
    with pytest.raises(UserError, match=r"^sample.backend: vllm cannot be used here \(vllm is "
                                        r"not installed; .*sample.backend=transformers"):
        vllm_args(forced)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="under torchrun"):
        vllm_args(forced)


def test_sample_with_backend_vllm_where_vllm_does_not_import_writes_nothing(tmp_path, capsys,
                                                                            monkeypatch):
    import vrpo_fast.samplers as samplers
    from vrpo_fast.cli import main

    monkeypatch.setattr(samplers, "vllm_problem", lambda: "vllm is not installed")
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(tmp_path / "m")
    args = [a for a in overrides(tmp_path) if not a.startswith("--model.tiny")]
    capsys.readouterr()                                 # saving the model printed a bar
    assert main(["sample", *args, f"--model.path={tmp_path / 'm'}",
                 "--sample.backend=vllm"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vllm cannot be used here" in err, err
    assert not (tmp_path / "sampled").exists()
