"""Scoring: ref_logps against sequence_logps and a float64 forward per response, g of every aux
mode against its formula on independent forwards, token-budget batching with mixed K,
resume after a crash, and the input checks (provenance, completeness)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, TINY_YAML, float64_logps

from vrpo_fast import shards
from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError
from vrpo_fast.logprobs import sequence_logps
from vrpo_fast.models import build_tiny_causal_lm, tiny_llama_config

PROMPTS = [{"prompt": "ab>", "chosen": "aa", "rejected": "b"}, {"prompt": "cd>"},
           {"prompt": "ba>", "chosen": "a", "rejected": "bba"}, {"prompt": "dcc>"},
           {"prompt": "ac>", "chosen": "c", "rejected": "d"}]


def config(root: Path, **extra):
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    over = [f"--sample.input={prompts}", f"--sample.output={root / 'sampled'}",
            f"--score.output={root / 'scored'}", "--sample.num_samples=4",
            "--sample.max_new_tokens=5", "--sample.shard_size=2", "--score.shard_size=2",
            "--score.max_tokens=40", "--model.tokenizer=byte", f"--model.tiny={TINY_YAML}"]
    return load_config(None, over + [f"--{k}={v}" for k, v in extra.items()])


def scored_groups(out, tokenizer, **kw):
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_example

    examples, report = load_preference_data(str(out))
    assert report.bad_rows == 0
    return [(ex, tokenize_example(ex, tokenizer, **kw)) for ex in examples]


def test_ref_logps_and_lm_g_match_sequence_logps_and_float64_forwards(tmp_path, tokenizer):
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.score import score_stage

    aux_path = tmp_path / "aux"
    build_tiny_causal_lm(seed=9, **TINY).save_pretrained(aux_path)
    # A budget of 40 tokens puts the groups of a shard into several packed passes.
    cfg = config(tmp_path, **{"aux.mode": "lm", "aux.path": aux_path, "aux.beta": 0.5})
    sample_stage(cfg, progress=False)
    out = score_stage(cfg, progress=False)
    rows = scored_groups(out, tokenizer)
    assert [ex.prompt for ex, _ in rows] == [p["prompt"] for p in PROMPTS]

    ref = build_tiny_causal_lm(seed=0, **TINY)
    ref64 = build_tiny_causal_lm(seed=0, dtype=torch.float64, **TINY)
    aux64 = build_tiny_causal_lm(seed=9, dtype=torch.float64, **TINY)
    for ex, t in rows:
        K = 6 if ex.labelled else 4
        assert len(t.response_ids) == len(ex.ref_logps) == K and len(ex.aux_prefs) == 3
        got = torch.tensor(ex.ref_logps, dtype=torch.float64)
        packed = sequence_logps(ref, [t.prompt_ids], [t.response_ids])[0].double()
        torch.testing.assert_close(got, packed, atol=1e-5, rtol=0)
        naive = torch.tensor([float64_logps(ref64, t.prompt_ids, r) for r in t.response_ids],
                             dtype=torch.float64)
        torch.testing.assert_close(got, naive, atol=1e-4, rtol=0)
        h = torch.tensor([float64_logps(aux64, t.prompt_ids, r) for r in t.response_ids],
                         dtype=torch.float64) - naive
        g = torch.sigmoid(0.5 * (h[0::2] - h[1::2]))
        if not ex.labelled:
            g = torch.cat([torch.tensor([0.5], dtype=torch.float64), g])
        torch.testing.assert_close(torch.tensor(ex.aux_prefs, dtype=torch.float64), g,
                                   atol=1e-5, rtol=0)
    record = json.loads((out / "provenance.json").read_text())
    assert record["sampling"]["num_samples"] == 4                 # the samples' origin, kept
    assert record["scoring"]["aux_mode"] == "lm" and record["scoring"]["aux_beta"] == 0.5
    assert record["shards"] == {"count": 3, "size": 2}


def test_reward_model_g_is_sigmoid_of_score_differences(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.sample import sample_stage
    from vrpo_fast.score import score_stage

    torch.manual_seed(4)
    rm = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=1, **TINY))
    with torch.no_grad():
        rm.score.weight.mul_(20.0)                     # rewards far enough apart to matter
    rm.save_pretrained(tmp_path / "rm")
    cfg = config(tmp_path, **{"aux.mode": "reward_model", "aux.path": tmp_path / "rm"})
    sample_stage(cfg, progress=False)
    out = score_stage(cfg, progress=False)
    rm64 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm",
                                                              dtype=torch.float64).eval()
    spread = []
    for ex, t in scored_groups(out, tokenizer):
        with torch.no_grad():      # HF's own forward: the score at the last (non-pad) token
            r = torch.stack([rm64(torch.tensor([t.prompt_ids + y])).logits[0, 0]
                             for y in t.response_ids])
        g = torch.sigmoid(r[0::2] - r[1::2])
        if not ex.labelled:
            g = torch.cat([torch.tensor([0.5], dtype=torch.float64), g])
        torch.testing.assert_close(torch.tensor(ex.aux_prefs, dtype=torch.float64), g,
                                   atol=1e-5, rtol=0)
        spread.append(g.std().item())
    assert max(spread) > 0.05                          # the check is not on constant g


def test_reward_model_with_several_outputs_is_refused(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.models import load_reward_model

    AutoModelForSequenceClassification.from_config(
        tiny_llama_config(num_labels=2, **TINY)).save_pretrained(tmp_path / "rm2")
    with pytest.raises(UserError, match="num_labels = 1"):
        load_reward_model(str(tmp_path / "rm2"))


@pytest.mark.parametrize("mode", ["given", "lagged"])
def test_given_and_lagged_pass_g_through_and_truncation_is_applied(tmp_path, tokenizer, mode):
    from vrpo_fast.data.tokenize import tokenize_example
    from vrpo_fast.score import score_stage

    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "ab>", "chosen": "aaaa", "rejected": "b", "samples": ["xyz", "q"],
             "aux_prefs": [0.9, 0.25]},
            {"prompt": "b>", "samples": ["zz", "qqqq"], "aux_prefs": [0.5, 0.75]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, **{"score.input": data, "aux.mode": mode,
                              "data.max_response_length": 3})
    out = score_stage(cfg, progress=False)
    ref = build_tiny_causal_lm(seed=0, **TINY)
    got = shards.read_shards(out)
    assert [r["aux_prefs"] for r in got] == [r["aux_prefs"] for r in rows]
    for ex, _ in scored_groups(out, tokenizer):
        want = tokenize_example(ex, tokenizer, max_response_length=3)
        assert max(map(len, want.response_ids)) == 3                   # truncation bites
        lp = sequence_logps(ref, [want.prompt_ids], [want.response_ids])[0]
        torch.testing.assert_close(torch.tensor(ex.ref_logps), lp, atol=1e-5, rtol=0)
    record = json.loads((out / "provenance.json").read_text())
    assert record["sampling"] is None                    # samples of unknown origin
    assert record["scoring"]["max_response_length"] == 3


def test_packed_scores_batches_by_budget_one_k_per_batch_in_order():
    from vrpo_fast.passes import packed_scores

    groups = [([0, 1, 2], [[3], [4, 4]]), ([5], [[6, 6, 6], [7], [8], [9]]),
              ([1] * 9, [[2] * 9, [3]]), ([4], [[5], [6]]), ([7, 7], [[8], [9], [1], [2]])]
    calls = []

    def fn(prompts, responses, budget):
        calls.append((len({len(r) for r in responses}), sum(
            len(p) + sum(map(len, r)) for p, r in zip(prompts, responses)), budget))
        return torch.tensor([[float(sum(p) * 100 + sum(y)) for y in r]
                             for p, r in zip(prompts, responses)])

    out = packed_scores(fn, groups, max_tokens=10)
    assert out == [[float(sum(p) * 100 + sum(y)) for y in r] for p, r in groups]
    assert all(k == 1 for k, _, _ in calls)                   # one K per packed batch
    # within the budget, except a lone group over it, which gets that group's size
    assert all(size <= budget and (size <= 10 or budget == size) for _, size, budget in calls)
    assert len(calls) == 5      # K=2: {0}, {2} (over the budget), {3}; K=4: {1}, {4}


def test_score_resume_after_a_crash_equals_uninterrupted(tmp_path, monkeypatch):
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.score import score_stage

    cfg = config(tmp_path)
    sample_stage(cfg, progress=False)
    straight = shards.read_shards(score_stage(
        config(tmp_path, **{"score.output": tmp_path / "straight"}), progress=False))
    real = shards.write_shard

    def crash_at_shard_1(directory, index, rows):
        if index == 1:
            raise KeyboardInterrupt("killed")
        return real(directory, index, rows)

    monkeypatch.setattr(shards, "write_shard", crash_at_shard_1)
    with pytest.raises(KeyboardInterrupt):
        score_stage(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "scored").glob("shard_*")) == [
        "shard_00000.parquet"]
    monkeypatch.setattr(shards, "write_shard", real)
    resumed = shards.read_shards(score_stage(cfg, progress=False))
    assert len(resumed) == len(PROMPTS) and resumed == straight


def test_score_refuses_other_reference_incomplete_samples_and_its_own_input(tmp_path):
    from vrpo_fast.sample import sample_stage
    from vrpo_fast.score import score_stage

    cfg = config(tmp_path)
    sampled = sample_stage(cfg, progress=False)
    with pytest.raises(UserError, match="score.input: .*different reference model"):
        score_stage(config(tmp_path, **{"model.seed": 1}), progress=False)
    with pytest.raises(UserError, match="score.output: .* is the input's folder"):
        score_stage(config(tmp_path, **{"score.output": sampled}), progress=False)
    (sampled / "shard_00001.parquet").unlink()         # as if the sampling run were cut short
    with pytest.raises(UserError, match="holds 2 of 3 shards"):
        score_stage(cfg, progress=False)
    assert not (tmp_path / "scored").exists()
