"""Sampling from pi_ref and scoring: counts, EOS, seeds, the distribution sampled, resume,
provenance, and the vLLM request/output mapping."""

import json
import sys
import types

import pytest
import torch

from vrpo_fast import shards
from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.logprobs import sequence_logps
from vrpo_fast.models import build_tiny_causal_lm
from vrpo_fast.samplers import TransformersSampler, VLLMSampler

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def sampler(tokenizer, **kw):
    model = build_tiny_causal_lm(seed=0, **TINY)
    return TransformersSampler(model, tokenizer, **{"max_new_tokens": 6, "batch_size": 3, **kw})


class SmallVocab:
    """Token ids 0..11 with EOS = 1: EOS is sampled often enough to see both endings."""
    eos_token_id, pad_token_id = 1, 2


def test_counts_eos_and_max_new_tokens():
    model = build_tiny_causal_lm(seed=0, vocab_size=12, **TINY)
    s = TransformersSampler(model, SmallVocab(), max_new_tokens=6, batch_size=3)
    prompts = [[0, 5, 6], [0, 7, 8, 9, 10, 11, 3]] * 2                # batched with padding
    out = s.sample(prompts, 5, seed=1)
    assert len(out) == 4 and all(len(per) == 5 for per in out)
    eos = 1
    for per in out:
        for ids in per:
            assert 1 <= len(ids) <= 6
            assert eos not in ids[:-1]                   # cut after the first EOS
            assert ids[-1] == eos or len(ids) == 6        # stopped, or hit max_new_tokens
    assert any(ids[-1] == eos for per in out for ids in per)  # some stop before the limit


def test_seed_determinism_and_batch_independence(tokenizer):
    s = sampler(tokenizer)
    prompts = [tokenizer(p)["input_ids"] for p in ("ab>", "cd>", "bd>")]
    a = s.sample(prompts, 4, seed=7)
    assert a == s.sample(prompts, 4, seed=7)
    assert a != s.sample(prompts, 4, seed=8)


def test_first_tokens_follow_the_model_softmax(tokenizer):
    """Chi-square goodness of fit of first sampled tokens to softmax(logits) at temperature 1."""
    model = build_tiny_causal_lm(seed=0, vocab_size=12, **TINY)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)                  # a far-from-uniform distribution
    prompt = [0, 5, 6, 7]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)

    s = TransformersSampler(model, SmallVocab(), max_new_tokens=1, batch_size=1)
    n = 4000
    (draws,) = s.sample([prompt], n, seed=3)
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=12).double()
    expected = probs * n
    keep = expected >= 5                                 # pool the rare tokens into one bin
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    dof = len(obs) - 1
    # The 99.99% quantile of chi-square is below dof + 6 sqrt(2 dof) + 10 for these dof.
    assert chi2 < dof + 6 * (2 * dof) ** 0.5 + 10, (chi2, dof)
    # And the test has power: a sharpened sampler (temperature 0.5) fails it.
    s_cold = TransformersSampler(model, SmallVocab(), max_new_tokens=1, batch_size=1,
                                 temperature=0.5)
    (cold,) = s_cold.sample([prompt], n, seed=3)
    cc = torch.bincount(torch.tensor([d[0] for d in cold]), minlength=12).double()
    obs_c = torch.cat([cc[keep], cc[~keep].sum(0, keepdim=True)])[:len(exp)]
    assert ((obs_c - exp) ** 2 / exp).sum().item() > 5 * (dof + 6 * (2 * dof) ** 0.5 + 10)


def _pipeline_config(tmp_path, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p, "chosen": "aa", "rejected": "b"} for p in
            ("ab>", "cd>", "ba>", "dc>", "ac>")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"--data.path={prompts}", f"--sample.output={tmp_path / 'sampled'}",
                 f"--score.output={tmp_path / 'scored'}", "--sample.num_samples=4",
                 "--sample.max_new_tokens=5", "--sample.shard_size=2", "--score.shard_size=2",
                 "--score.max_tokens=40", "--model.tokenizer=byte",
                 "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
                 "intermediate_size: 64}"]
    overrides += [f"--{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_sample_resume_after_a_crash_equals_uninterrupted(tmp_path, monkeypatch):
    from vrpo_fast.sample import sample_stage

    straight = sample_stage(_pipeline_config(tmp_path / "a"), progress=False)
    cfg = _pipeline_config(tmp_path / "b")
    real = shards.write_shard
    calls = {"n": 0}

    def crash_on_second(directory, index, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(directory, index, rows)

    monkeypatch.setattr(shards, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        sample_stage(cfg, progress=False)
    assert len(list((tmp_path / "b" / "sampled").glob("shard_*.parquet"))) == 1
    monkeypatch.setattr(shards, "write_shard", real)
    resumed = sample_stage(cfg, progress=False)
    a, b = shards.read_shards(straight), shards.read_shards(resumed)
    assert len(b) == 5 and a == b                      # nothing lost, nothing duplicated
    assert all(len(r["samples"]) == 4 == len(r["sample_ids"]) for r in b)


def test_score_equals_sequence_logps_and_resumes(tmp_path, monkeypatch, tokenizer):
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_example
    from vrpo_fast.models import model_from_config
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.score import score_stage

    aux_path = tmp_path / "aux"
    build_tiny_causal_lm(seed=9, **TINY).save_pretrained(aux_path)
    cfg = _pipeline_config(tmp_path, **{"aux.mode": "lm", "aux.path": str(aux_path),
                                        "aux.beta": 0.5})
    sample_stage(cfg, progress=False)
    real = shards.write_shard
    monkeypatch.setattr(shards, "write_shard", lambda d, i, r: (_ for _ in ()).throw(
        KeyboardInterrupt()) if i == 1 else real(d, i, r))
    with pytest.raises(KeyboardInterrupt):
        score_stage(cfg, progress=False)
    monkeypatch.setattr(shards, "write_shard", real)
    out = score_stage(cfg, progress=False)
    rows = shards.read_shards(out)
    assert len(rows) == 5
    examples, _ = load_preference_data(str(out))
    ref = model_from_config(cfg, "ref")
    aux = build_tiny_causal_lm(seed=9, **TINY)
    for ex, row in zip(examples, rows):
        t = tokenize_example(ex, tokenizer)
        assert t.response_ids[2:] == [ids + ([1] if ids[-1] != 1 else []) for ids in
                                      row["sample_ids"]]
        naive = sequence_logps(ref, [t.prompt_ids], [t.response_ids], impl="naive")[0]
        torch.testing.assert_close(torch.tensor(row["ref_logps"]), naive, atol=1e-4, rtol=0)
        h = sequence_logps(aux, [t.prompt_ids], [t.response_ids], impl="naive")[0] - naive
        g = torch.sigmoid(0.5 * (h[0::2] - h[1::2]))
        torch.testing.assert_close(torch.tensor(row["aux_prefs"]), g, atol=1e-4, rtol=0)
    assert (out / "provenance.json").is_file()


def test_provenance_mismatch_is_detected(tmp_path):
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.train.loop import Trainer

    cfg = _pipeline_config(tmp_path)
    out = sample_stage(cfg, progress=False)
    record = json.loads((out / "provenance.json").read_text())
    assert record["sampling"]["temperature"] == 1.0 and record["backend"] == "transformers"
    assert len(record["reference_model"]["weights_sha256"]) == 64
    # Another reference model (another init seed) must not train on these samples.
    other = load_config(None, [f"--data.path={out}", "--model.tokenizer=byte",
                               "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, "
                               "num_kv_heads: 1, intermediate_size: 64}", "--model.seed=1",
                               "--ref.source=online", "--loss.estimator=dpo",
                               f"--train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="drawn from a different reference model"):
        Trainer(other)
    # Sampling into the same folder with other settings is refused too.
    with pytest.raises(UserError, match="already holds samples"):
        sample_stage(_pipeline_config(tmp_path, **{"sample.temperature": 0.7}), progress=False)


def test_vllm_backend_maps_requests_and_outputs(monkeypatch, tokenizer):
    """The vLLM sampler against a stand-in module with vLLM's API shapes."""
    seen = {}

    class TokensPrompt(dict):
        def __init__(self, prompt_token_ids):
            super().__init__(prompt_token_ids=prompt_token_ids)

    class SamplingParams:
        def __init__(self, **kw):
            seen["params"] = kw

    class Completion:
        def __init__(self, index, token_ids):
            self.index, self.token_ids = index, token_ids

    class RequestOutput:
        def __init__(self, outputs):
            self.outputs = outputs

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def generate(self, prompts, params, use_tqdm=False):
            seen["prompts"] = prompts
            n = seen["params"]["n"]
            # completions come back out of order; the sampler sorts them by index
            return [RequestOutput([Completion(j, [10 + j, len(p["prompt_token_ids"]), 1, 5])
                                   for j in reversed(range(n))]) for p in prompts]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    vllm.inputs = types.ModuleType("vllm.inputs")
    vllm.inputs.TokensPrompt = TokensPrompt
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", vllm.inputs)
    s = VLLMSampler("some/model", tokenizer, temperature=1.0, top_p=0.9, max_new_tokens=7,
                    tensor_parallel_size=2, seed=3)
    out = s.sample([[0, 5], [0, 6, 7]], 3, seed=11)
    assert seen["llm"]["tensor_parallel_size"] == 2 and seen["llm"]["model"] == "some/model"
    assert seen["params"] == dict(n=3, temperature=1.0, top_p=0.9, top_k=-1, max_tokens=7,
                                  seed=11)
    assert [p["prompt_token_ids"] for p in seen["prompts"]] == [[0, 5], [0, 6, 7]]
    assert out == [[[10, 2, 1], [11, 2, 1], [12, 2, 1]], [[10, 3, 1], [11, 3, 1], [12, 3, 1]]]


@pytest.mark.skipif("vllm" not in sys.modules and not torch.cuda.is_available(),
                    reason="vllm and a GPU are needed for the real vLLM backend")
def test_real_vllm_backend(tmp_path, tokenizer):
    pytest.importorskip("vllm")
    model_dir = tmp_path / "m"
    build_tiny_causal_lm(seed=0, **TINY).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    s = VLLMSampler(str(model_dir), tokenizer, max_new_tokens=4)
    out = s.sample([tokenizer("ab>")["input_ids"]], 4, seed=0)
    assert len(out[0]) == 4 and all(1 <= len(ids) <= 4 for ids in out[0])
