"""aux.mode = judge: the pairwise LLM judge's g against one unpacked float64 forward per context,
its exact symmetry, its label and template errors, and the judge in score (provenance) and
train."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY, capture_g

from vrpo_fast.config import JUDGE_TEMPLATE
from vrpo_fast.errors import UserError
from vrpo_fast.judge import PairJudge
from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer

T1 = "Q: {prompt}\nA) {response_a}\nB) {response_b}\nBest:"


def judge_model(seed, scale=1.0, dtype=torch.float32):
    """A tiny random LM that judges with some conviction: larger initial weights (a random
    model's last-token state barely depends on the content otherwise) and its label rows scaled
    by `scale`."""
    model = build_tiny_causal_lm(seed=seed, initializer_range=0.3, **TINY)
    tok = byte_tokenizer()
    ids = [tok(s, add_special_tokens=False)["input_ids"][0] for s in "AB"]
    with torch.no_grad():
        model.lm_head.weight[ids] *= scale
    return model.to(dtype)


def naive_g(model64, tokenizer, template, prompt, y, y2, chat=True, labels=("A", "B")):
    """(p_A(y, y2) + p_B(y2, y)) / 2 from one unpadded float64 forward per order, full softmax."""
    a_id, b_id = (tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in labels)

    def p_a(first, second):
        text = template.replace("{prompt}", prompt).replace("{response_a}", first) \
            .replace("{response_b}", second)
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        with torch.no_grad():
            p = torch.softmax(model64(torch.tensor([ids])).logits[0, -1].double(), -1)
        return (p[a_id] / (p[a_id] + p[b_id])).item()

    return (p_a(y, y2) + 1 - p_a(y2, y)) / 2


@pytest.mark.parametrize("chat,template,scale", [(True, JUDGE_TEMPLATE, 1.0), (False, T1, 3.0)])
def test_judge_g_equals_one_float64_forward_per_pair_and_order(chat, template, scale):
    tok = byte_tokenizer()
    judge = PairJudge(judge_model(3, scale), tok, template=template, chat=chat)
    model64 = judge_model(3, scale, torch.float64)
    items = [("ab>", [("aab", "b"), ("c", "dd"), ("b", "aab")]),
             ("Say hi.", [("hi", "hello there"), ("x", "x")])]
    # A small budget: the groups are packed across several passes.
    got = judge.preferences(items, max_tokens=600)
    for (prompt, pairs), values in zip(items, got):
        for (y, y2), g in zip(pairs, values):
            want = 0.5 if y == y2 else naive_g(model64, tok, template, prompt, y, y2, chat)
            assert g == pytest.approx(want, abs=2e-5), (prompt, y, y2)
    assert got[1][1] == 0.5
    assert max(abs(g - 0.5) for g in got[0]) > 2e-3          # power: 100 x the tolerance


def test_judge_is_exactly_symmetric_and_position_bias_cancels():
    judge = PairJudge(build_tiny_causal_lm(seed=1, **TINY), byte_tokenizer(),
                      template="{prompt}|{response_a}|{response_b}|", chat=False)
    pairs = [("a", "bc"), ("bc", "a"), ("dd", "c"), ("c", "dd"), ("abcd", "b"), ("b", "abcd")]
    g = judge.preferences([("ab>", pairs)])[0]
    for i in range(0, len(pairs), 2):
        assert g[i] + g[i + 1] == 1.0                     # bit for bit, in float64
    # A judge that always prefers the first position by the same margin gives g = 1/2.
    judge.label_margins = lambda groups, budget: [[2.5] * len(r) for _, r in groups]
    assert judge.preferences([("ab>", pairs)])[0] == [0.5] * len(pairs)


def test_judge_refuses_bad_labels_and_templates():
    tok, model = byte_tokenizer(), build_tiny_causal_lm(seed=0, **TINY)
    with pytest.raises(UserError, match="judge_labels.*share their first token"):
        PairJudge(model, tok, labels=["Yes", "Yikes"])
    with pytest.raises(UserError, match=r"judge_template.*\{response_b\} missing"):
        PairJudge(model, tok, template="{prompt} {response_a}")
    with pytest.raises(UserError, match="judge_labels: expected two"):
        PairJudge(model, tok, labels=["A"])
    # Multi-token labels: the first token is scored.
    judge = PairJudge(model, tok, labels=["Alpha", "Beta"])
    assert judge.label_ids == [tok("A", add_special_tokens=False)["input_ids"][0],
                               tok("B", add_special_tokens=False)["input_ids"][0]]
    assert not math.isnan(judge.preferences([("p", [("x", "y")])])[0][0])


def test_judge_refuses_a_context_longer_than_its_positions():
    """A judging context past the judge's max_position_embeddings is one UserError naming the
    lengths and the prompt; a context of exactly that length is judged (float64 reference)."""
    tok = byte_tokenizer()
    template = "{prompt}|{response_a}|{response_b}|"
    fits = ("p>", [("abc", "de")])         # 10 bytes a context, and the tokenizer's BOS
    length = len(tok(template.replace("{prompt}", "p>").replace("{response_a}", "abc")
                     .replace("{response_b}", "de"))["input_ids"])
    model = build_tiny_causal_lm(seed=2, max_position_embeddings=length, **TINY)
    judge = PairJudge(model, tok, template=template, chat=False, source="aux.path")
    model64 = build_tiny_causal_lm(seed=2, max_position_embeddings=length, dtype=torch.float64,
                                   **TINY)
    assert judge.preferences([fits])[0][0] == pytest.approx(
        naive_g(model64, tok, template, "p>", "abc", "de", chat=False), abs=2e-5)
    with pytest.raises(UserError, match=rf"^aux\.path: a judging context of {length + 1} tokens "
                       rf".* max_position_embeddings = {length}, for the prompt starting "
                       rf"'q>'"):
        judge.preferences([fits, ("q>", [("abc", "d"), ("abcd", "de")])])   # one byte more


def judge_folder(tmp_path, seed=5):
    path = tmp_path / "judge"
    judge_model(seed, 3.0).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


ROWS = [{"prompt": "ab>", "chosen": "aa", "rejected": "b", "samples": ["ab", "c", "a", "a"]},
        {"prompt": "cd>", "samples": ["dc", "d", "cc", "b"]},
        {"prompt": "ba>", "chosen": "a", "rejected": "bba", "samples": ["b", "ab", "d", "c"]}]


def score_config(tmp_path, **extra):
    from vrpo_fast.config import load_config

    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    over = [f"--score.input={data}", f"--score.output={tmp_path / 'scored'}",
            "--score.shard_size=2", "--model.tokenizer=byte",
            "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
            "intermediate_size: 64}"]
    return load_config(None, over + [f"--{k}={v}" for k, v in extra.items()])


def test_score_with_a_judge_records_it_and_refuses_another_template(tmp_path):
    from vrpo_fast import shards
    from vrpo_fast.score import score_stage

    path = judge_folder(tmp_path)
    cfg = score_config(tmp_path, **{"aux.mode": "judge", "aux.path": path,
                                    "aux.judge_template": T1, "aux.judge_chat": "false"})
    out = score_stage(cfg, progress=False)
    record = json.loads((out / "provenance.json").read_text())
    judged = record["scoring"]["aux_judge"]
    assert judged["template"] == cfg.aux.judge_template and judged["labels"] == ["A", "B"]
    assert judged["chat"] is False
    rows = shards.read_shards(out)
    tok = byte_tokenizer()
    model64 = judge_model(5, 3.0, torch.float64)
    spread = 0.0
    for row, given in zip(rows, ROWS):
        responses = ([given["chosen"], given["rejected"]] if "chosen" in given else
                     ["", ""]) + given["samples"]
        for p, (y, y2) in enumerate(zip(responses[0::2], responses[1::2])):
            want = 0.5 if y == y2 else naive_g(model64, tok, T1, given["prompt"], y, y2,
                                               chat=False)
            assert row["aux_prefs"][p] == pytest.approx(want, abs=2e-5), (row, p)
            spread = max(spread, abs(want - 0.5))
    assert spread > 2e-3
    # The same folder judged with another template (or another judge) is refused.
    cfg.aux.judge_template = T1 + " "
    with pytest.raises(UserError, match="judged with another judge or template"):
        score_stage(cfg, progress=False)
    cfg.aux.judge_template = judged["template"]
    cfg.aux.path = str(judge_folder(tmp_path / "other", seed=6))
    with pytest.raises(UserError, match="judged with another judge or template"):
        score_stage(cfg, progress=False)
    cfg.aux.path = str(path)
    assert score_stage(cfg, progress=False) == out          # the same judge resumes


def test_score_refused_before_its_first_shard_leaves_the_folder_open(tmp_path):
    """A judge whose context is too short for the data stops `score` at the first shard (one
    UserError, no shard written); the same output folder then takes another judge: the record
    of a run that computed nothing does not hold the folder."""
    from vrpo_fast import shards
    from vrpo_fast.score import score_stage

    short = tmp_path / "short"
    build_tiny_causal_lm(seed=5, max_position_embeddings=8, **TINY).save_pretrained(short)
    byte_tokenizer().save_pretrained(short)
    cfg = score_config(tmp_path, **{"aux.mode": "judge", "aux.path": short,
                                    "aux.judge_template": T1, "aux.judge_chat": "false"})
    with pytest.raises(UserError, match=r"^aux\.path: a judging context of \d+ tokens .* "
                       r"max_position_embeddings = 8"):
        score_stage(cfg, progress=False)
    out = tmp_path / "scored"
    assert (out / "provenance.json").is_file() and not shards.read_shards(out)
    cfg.aux.path = str(judge_folder(tmp_path))
    assert score_stage(cfg, progress=False) == out
    record = json.loads((out / "provenance.json").read_text())
    assert record["scoring"]["aux_path"] == cfg.aux.path
    assert len(shards.read_shards(out)) == len(ROWS)


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_train_with_a_judge_gives_the_loss_the_judges_g(tmp_path, monkeypatch, attention):
    """Online g: for every micro-batch, the g the loss receives (the one-sweep LM head's, g
    its 8th argument, or the two-pass loss's) is the judge's g of the micro-batch's decoded
    texts, from one float64 forward per pair and order; the judge attends as train.attention
    says."""
    import vrpo_fast.train.loop as loop
    from vrpo_fast.config import load_config

    seen = capture_g(monkeypatch)
    path = judge_folder(tmp_path, seed=7)
    template = T1
    cfg = load_config(loop.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", [
        f"--train.output_dir={tmp_path / 'run'}", "--train.max_steps=1", "--train.save_every=0",
        "--train.batch_groups=4", "--train.micro_batch_groups=2", "--aux.mode=judge",
        f"--aux.path={path}", f"--aux.judge_template={template}", "--aux.judge_chat=false",
        "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
        "intermediate_size: 64}", f"--train.attention={attention}"])
    trainer = loop.Trainer(cfg, quiet=True)
    trainer.fit()
    impl = {"auto": "vrpo_cascade", "sdpa": "sdpa"}[attention]
    assert trainer.aux.model.config._attn_implementation == impl
    assert len(seen) == 2
    tok = byte_tokenizer()
    model64 = judge_model(7, 3.0, torch.float64)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)   # noqa: E731
    for entry in seen:
        groups = entry["groups"]
        want = []
        for p, rs in zip(groups.prompt_ids, groups.response_ids):
            texts = [decode(r) for r in rs]
            want.append([0.5 if a == b else naive_g(model64, tok, template, decode(p), a, b,
                                                              chat=False)
                         for a, b in zip(texts[0::2], texts[1::2])])
        torch.testing.assert_close(entry["g"], torch.tensor(want, dtype=torch.float64),
                                   atol=2e-5, rtol=0)
        assert (entry["g"] - 0.5).abs().max() > 1e-3


def test_eval_lm_judge_is_the_pairwise_judge_in_both_orders(tmp_path):
    from vrpo_fast.config import AuxConfig
    from vrpo_fast.evaluate import make_judge

    path = judge_folder(tmp_path, seed=4)
    judge = make_judge(f"lm:{path}", aux=AuxConfig(judge_template=T1, judge_chat=False))
    model64 = judge_model(4, 3.0, torch.float64)
    tok = byte_tokenizer()
    got = [judge.preference("ab>", y, y2) for y, y2 in [("aab", "b"), ("c", "dd")]]
    want = [naive_g(model64, tok, T1, "ab>", y, y2, chat=False)
            for y, y2 in [("aab", "b"), ("c", "dd")]]
    assert got == pytest.approx(want, abs=2e-5)
    assert max(abs(v - 0.5) for v in want) > 2e-3
    assert judge.preference("ab>", "b", "aab") + got[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(UserError, match="lm:PATH"):
        make_judge(f"lm:{tmp_path / 'missing'}")
