"""On-policy rounds (vrpo_fast.rounds, vrpo_fast.label): two tiny rounds on the synthetic task
end to end, checked against independent references (a float64 naive forward of the previous
round's saved policy for the scored ref_logps, the task's true preference and the documented
seed for each label); a run crashed in each stage in turn, and one SIGKILLed mid-training,
re-run to the same weights and results as an uninterrupted run, with no finished file
rewritten; and the one-line refusals: a labeller's bad answer, prompt slices that run out,
a round folder written under other settings, impossible combinations."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, TINY_YAML, float64_logps

from vrpo_fast.config import load_config
from vrpo_fast.errors import UserError

PROMPTS = ["ab>", "ca>", "db>", "ac>", "bd>", "cd>", "ba>", "dc>",
           "ad>", "bc>", "da>", "cb>", "ab>", "ca>", "db>", "ac>"]
PER_ROUND = 8


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def settings(tmp: Path, out: Path, **extra) -> dict:
    """The tiny two-round recipe as {dotted key: value}."""
    prompts = write_prompts(tmp / "prompts.jsonl")
    return {"model.tiny": TINY_YAML, "model.tokenizer": "byte", "ref.source": "cache",
            "aux.mode": "given", "loss.beta": 0.1, "label.mode": "truth", "label.seed": 3,
            "sample.input": str(prompts), "sample.num_samples": 4, "sample.max_new_tokens": 6,
            "sample.shard_size": 4, "sample.batch_size": 4, "score.shard_size": 4,
            "rounds.output": str(out), "rounds.prompts_per_round": PER_ROUND,
            "train.max_steps": 4, "train.save_every": 2, "train.batch_groups": 4,
            "train.micro_batch_groups": 4, "train.lr": 3e-3, "train.warmup_steps": 1,
            "eval.prompts": str(prompts), "eval.judge": "synthetic", "eval.num_prompts": 4,
            "eval.num_samples": 2, "eval.max_new_tokens": 6, "run.rounds": 2,
            "run.stages": "[sample, score, train, eval]", **extra}


def config(tmp: Path, out: Path, **extra):
    return load_config(None, [f"--{k}={v}" for k, v in settings(tmp, out, **extra).items()])


def run(cfg):
    from vrpo_fast.pipeline import run_pipeline

    return run_pipeline(cfg, progress=False)


def read(folder: Path) -> list[dict]:
    from vrpo_fast.shards import read_shards

    return read_shards(folder)


def final_weights(out: Path, r: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / f"r{r}" / "train" / "final" / "model.safetensors"))


def eval_rows(out: Path, r: int) -> list:
    return json.loads((out / f"r{r}" / "eval" / "results.json").read_text())["rows"]


def stamps(out: Path) -> dict:
    """mtime of every finished file a resumed run must keep: shards, records, final models,
    eval results (not logs or checkpoints, which a trainer prunes)."""
    keep = [p for p in out.rglob("*") if p.is_file() and (
        p.suffix == ".parquet" or p.name in ("round.json", "provenance.json", "prompts.jsonl",
                                              "results.json") or "final" in p.parts)
        and "cache" not in p.parts]
    return {p: p.stat().st_mtime_ns for p in keep}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two rounds, uninterrupted."""
    tmp = tmp_path_factory.mktemp("rounds")
    out = tmp / "reference"
    cfg = config(tmp, out)
    first = run(cfg)
    return {"tmp": tmp, "out": out, "cfg": cfg, "first": first}


def test_two_rounds_end_to_end(reference):
    out = reference["out"]
    assert [name for name, _ in reference["first"]] == [
        f"r{r}/{s}" for r in range(2) for s in ("sample", "label", "score", "train", "eval")]
    for r in range(2):
        folder = out / f"r{r}"
        # each round's prompts: the r-th slice of the prompt set, in order, no overlap
        record = json.loads((folder / "round.json").read_text())
        assert record["prompts"]["ids"] == list(range(r * PER_ROUND, (r + 1) * PER_ROUND))
        sampled, labelled = read(folder / "sampled"), read(folder / "labelled")
        assert [row["prompt"] for row in labelled] == PROMPTS[r * PER_ROUND:(r + 1) * PER_ROUND]
        assert len(list((folder / "sampled").glob("shard_*"))) == 2
        for pid, s, lab in zip(record["prompts"]["ids"], sampled, labelled):
            # one call drew 2 + 2M = 6: the first two are the labelled pair, the rest the MC
            assert len(s["samples"]) == len(s["sample_ids"]) == 6
            assert lab["samples"] == s["samples"][2:] and lab["sample_ids"] == s["sample_ids"][2:]
            y1, y2 = s["samples"][:2]
            assert {lab["chosen"], lab["rejected"]} == {y1, y2}
            # the label: one draw u < P*(y1 > y2), u from the seed of (label.seed, round, id)
            from vrpo_fast.synthetic import SyntheticTask

            task = SyntheticTask()
            p = 0.5 if y1 == y2 else task.preference(lab["prompt"], y1, y2)
            digest = hashlib.sha256(f"label:3:{r}:{pid}".encode()).digest()
            u = random.Random(int.from_bytes(digest[:8], "little") >> 1).random()
            assert (lab["chosen"], lab["rejected"]) == ((y1, y2) if u < p else (y2, y1))
            # the pair keeps its sampled ids (a cut response is scored without an EOS)
            ids1, ids2 = s["sample_ids"][:2]
            assert lab["pair_ids"] == ([ids1, ids2] if u < p else [ids2, ids1])
            # g with aux.mode given: the labeller's own probability on every pair
            pairs = [(lab["chosen"], lab["rejected"])] + list(zip(lab["samples"][0::2],
                                                                 lab["samples"][1::2]))
            want = [0.5 if a == b else task.preference(lab["prompt"], a, b) for a, b in pairs]
            assert lab["aux_prefs"] == pytest.approx(want, abs=1e-12)
        results = json.loads((folder / "eval" / "results.json").read_text())
        assert results["settings"]["model"]["path"] == (None if r == 0 else
                                                        str(out / "r0" / "train" / "final"))
    # round 1's pi_ref is round 0's trained policy: its record names those weights, and the
    # scored ref_logps are that model's log-probs by a float64 naive forward
    r1 = json.loads((out / "r1" / "round.json").read_text())
    assert r1["pi_ref"]["path"] == str(out / "r0" / "train" / "final")
    h = hashlib.sha256()
    for f in sorted((out / "r0" / "train" / "final").glob("*.safetensors")):
        h.update(f"{f.name}|{f.stat().st_size}|".encode())
        h.update(f.read_bytes())
    assert r1["pi_ref"]["files_sha256"] == h.hexdigest()
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_example
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer, load_causal_lm

    tok = byte_tokenizer()
    trained = load_causal_lm(str(out / "r0" / "train" / "final"), dtype=torch.float64).eval()
    start = build_tiny_causal_lm(seed=0, dtype=torch.float64, **yaml.safe_load(TINY_YAML)).eval()
    for r, model64 in ((1, trained), (0, start)):
        examples, _ = load_preference_data(str(out / f"r{r}" / "scored"))
        for ex in examples[:3]:
            t = tokenize_example(ex, tok)
            want = [float64_logps(model64, t.prompt_ids, resp) for resp in t.response_ids]
            assert ex.ref_logps == pytest.approx(want, abs=2e-4)
    examples, _ = load_preference_data(str(out / "r1" / "scored"))
    t = tokenize_example(examples[0], tok)
    assert examples[0].ref_logps != pytest.approx(   # not the tiny starting model's
        [float64_logps(start, t.prompt_ids, resp) for resp in t.response_ids], abs=2e-4)
    # the same command again: everything done, nothing rewritten
    before = stamps(out)
    again = dict(run(config(reference["tmp"], out)))
    assert again["r1/train"] is None and again["r1/eval"] is None
    assert stamps(out) == before


@pytest.mark.slow
def test_crashed_in_each_stage_in_turn_resumes_to_the_uninterrupted_result(reference,
                                                                          monkeypatch):
    """Round 1 crashes in its sampling (after shard 0), labelling, scoring, training (after a
    checkpoint) and evaluation, one after the other; each re-run keeps every finished file
    and the last one ends where the uninterrupted run did."""
    import vrpo_fast.evaluate as evaluate
    import vrpo_fast.shards as shards
    from vrpo_fast.train.loop import Trainer

    tmp, out = reference["tmp"], reference["tmp"] / "crashed"

    class Crash(Exception):
        pass

    real_write, real_save = shards.write_shard, Trainer.save

    def shard_crash(stage):
        def write_shard(directory, index, rows):
            if Path(directory) == out / "r1" / stage and index == 1:
                raise Crash(stage)
            return real_write(directory, index, rows)
        return write_shard

    def train_crash(self):
        if self.step == 4 and "r1" in str(self.out):
            raise Crash("train")
        return real_save(self)

    def eval_crash(path, *args, **kwargs):
        raise Crash("eval")

    crashes = [(shards, "write_shard", shard_crash("sampled")),
               (shards, "write_shard", shard_crash("labelled")),
               (shards, "write_shard", shard_crash("scored")),
               (Trainer, "save", train_crash), (evaluate, "write_report", eval_crash)]
    before: dict = {}
    for owner, name, patch in crashes:
        with monkeypatch.context() as m:
            m.setattr(owner, name, patch)
            with pytest.raises(Crash):
                run(config(tmp, out))
        now = stamps(out)
        assert {p: t for p, t in now.items() if p in before} == before   # nothing rewritten
        before = now
    assert (out / "r1" / "train" / "checkpoints" / "step_00000002").is_dir()
    run(config(tmp, out))
    assert {p: t for p, t in stamps(out).items() if p in before} == before
    ref = reference["out"]
    for r in range(2):
        got, want = final_weights(out, r), final_weights(ref, r)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert eval_rows(out, r) == eval_rows(ref, r)
        for stage in ("sampled", "labelled", "scored"):
            assert read(out / f"r{r}" / stage) == read(ref / f"r{r}" / stage)


KILLER = """
import os, signal, sys
from vrpo_fast.train.loop import Trainer

real = Trainer.train_step


def dying(self):
    if self.step == 3 and "r1" in str(self.out):     # after the step-2 checkpoint of round 1
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self)


Trainer.train_step = dying
from vrpo_fast.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkilled_mid_training_then_rerun_equals_uninterrupted(reference, capsys):
    from vrpo_fast.cli import main

    tmp, out = reference["tmp"], reference["tmp"] / "killed"
    raw = settings(tmp, out)
    tree: dict = {}
    for key, value in raw.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value) if isinstance(value, str) \
            else value
    cfg_path = tmp / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    (tmp / "killer.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-P", str(tmp / "killer.py"), "run", "--config",
                           str(cfg_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "r0" / "eval" / "results.json").is_file()
    assert not (out / "r1" / "train" / "final").exists()
    before = stamps(out)
    assert main(["run", "--config", str(cfg_path)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert {p: t for p, t in stamps(out).items() if p in before} == before
    got, want = final_weights(out, 1), final_weights(reference["out"], 1)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert eval_rows(out, 1) == eval_rows(reference["out"], 1)


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, key", [({"loss.beta": 0.2}, "loss.beta"),
                                        ({"label.seed": 4}, "label.seed"),
                                        ({"sample.max_new_tokens": 5}, "sample.max_new_tokens")])
def test_a_round_folder_written_under_other_settings_is_refused(reference, extra, key):
    out = reference["out"]
    before = stamps(out)
    with pytest.raises(UserError, match=rf"^rounds\.output: .*r0 was written with {key} = "
                                        rf".*, this config has ") as err:
        run(config(reference["tmp"], out, **extra))
    assert "\n" not in str(err.value)
    assert stamps(out) == before


def test_other_prompts_in_the_prompt_file_are_refused(reference, tmp_path):
    other = write_prompts(tmp_path / "other.jsonl", list(reversed(PROMPTS)))
    with pytest.raises(UserError, match=r"^sample\.input: round 0's slice of .*other\.jsonl "
                                        r"holds other prompts"):
        run(config(reference["tmp"], reference["out"], **{"sample.input": str(other)}))


def test_missing_eval_prompts_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^eval\.prompts: .*nope\.jsonl does not exist$"):
        run(config(tmp_path, out, **{"eval.prompts": str(tmp_path / "nope.jsonl")}))
    assert not out.exists()


def test_prompt_slices_that_run_out_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^rounds\.prompts_per_round: 3 rounds x 8 prompts "
                                        r"need 24 prompts, sample\.input holds 16 "):
        run(config(tmp_path, out, **{"run.rounds": 3}))
    assert not out.exists()


BAD_LABELLERS = """
def text(prompt, y, y2):
    return "the first"

def two(prompt, y, y2):
    return 2.0

def nan(prompt, y, y2):
    return float("nan")

def hard(prompt, y, y2):
    return len(y) >= len(y2)
"""


@pytest.mark.parametrize("fn, shown", [("text", "'the first'"), ("two", "2.0"),
                                       ("nan", "nan")])
def test_a_labeller_that_answers_no_probability_is_one_line_and_writes_no_labels(
        tmp_path, monkeypatch, fn, shown):
    (tmp_path / "bad_labellers.py").write_text(BAD_LABELLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    cfg = config(tmp_path, out, **{"label.mode": "python",
                                   "label.function": f"bad_labellers:{fn}",
                                   "run.rounds": 1, "sample.max_new_tokens": 2})
    with pytest.raises(UserError, match=rf"^label\.function: returned {shown} for a pair of the "
                                        rf"prompt 'ab>', not a probability in \[0, 1\]") as err:
        run(cfg)
    assert "\n" not in str(err.value)
    assert not (out / "r0" / "labelled").exists()


def test_labeller_contract_hard_labels_ties_and_equal_responses(tmp_path, monkeypatch):
    import numpy as np

    from vrpo_fast.label import FunctionLabeller, as_probability, draw_label

    for value, p in [(True, 1.0), (False, 0.0), (1, 1.0), (0, 0.0), (0.25, 0.25),
                     (np.float32(0.5), 0.5), (torch.tensor(0.75), 0.75)]:
        assert as_probability(value, "label.function", "ab>") == p
    for value in [None, "1", -0.1, 1.5, float("inf"), [0.5], torch.tensor([0.1, 0.2])]:
        with pytest.raises(UserError, match=r"^label\.function: returned "):
            as_probability(value, "label.function", "ab>")
    (tmp_path / "bad_labellers.py").write_text(BAD_LABELLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    labeller = FunctionLabeller("bad_labellers:hard")
    calls = []
    labeller.probabilities = lambda items: calls.append(items) or [1.0] * len(items)
    # equal responses are not shown to the labeller: p = 1/2
    assert labeller.ask([("ab>", "a", "a"), ("ab>", "aa", "b")]) == [0.5, 1.0]
    assert calls == [[("ab>", "aa", "b")]]
    # a hard label fixes the draw; p = 1/2 is a fair coin
    assert all(draw_label(1.0, s) for s in range(200))
    assert not any(draw_label(0.0, s) for s in range(200))
    heads = sum(draw_label(0.5, s) for s in range(2000))
    assert 900 < heads < 1100          # Binomial(2000, 1/2): 4.5 standard deviations
    with pytest.raises(UserError, match=r"^label\.function: cannot import 'nosuch:fn'"):
        FunctionLabeller("nosuch:fn")


@pytest.mark.parametrize("extra, match", [
    ({"run.stages": "[train, eval]"}, r"^run\.stages: rounds .* has no sample"),
    ({"ref.path": "somewhere"}, r"^ref\.path: in rounds pi_ref is model\.path"),
    ({"run.stages": "[sample, train]"}, r"^ref\.source: 'cache' reads the ref_logps"),
    ({"label.mode": "judge"}, r"^label\.path: required with label\.mode = judge"),
    ({"label.mode": "python"}, r"^label\.function: label\.mode python needs module:function"),
    ({"rounds.prompts_per_round": 0}, r"^rounds\.prompts_per_round: must be >= 1"),
    ({"run.rounds": -1}, r"^run\.rounds: must be >= 0"),
])
def test_impossible_round_settings_are_refused_at_config_load(tmp_path, extra, match):
    with pytest.raises(UserError, match=match):
        config(tmp_path, tmp_path / "out", **extra)


def test_an_engine_that_stays_up_gets_each_rounds_weights_in_place(monkeypatch):
    import vrpo_fast.rounds as rounds

    class Live:
        backend = "vllm"

        def __init__(self):
            self.updates = []

        def update_weights(self, model):
            self.updates.append(model)

    class Fresh:
        backend = "transformers"

    built = []
    monkeypatch.setattr(rounds, "make_sampler",
                        lambda cfg, tok, backend, model: built.append(model) or
                        (Live() if backend == "vllm" else Fresh()))
    engine = rounds.Engine()
    first = engine.for_round(None, None, "vllm", "pi_ref_0")
    assert engine.for_round(None, None, "vllm", "pi_ref_1") is first
    assert built == ["pi_ref_0"] and first.updates == ["pi_ref_1"]
    engine = rounds.Engine()
    a = engine.for_round(None, None, "transformers", "pi_ref_0")
    b = engine.for_round(None, None, "transformers", "pi_ref_1")
    assert a is not b and built[-2:] == ["pi_ref_0", "pi_ref_1"]


def test_dpo_rounds_draw_the_labelled_pair_only(tmp_path):
    """(and pi_ref_r's log-probs computed in the trainer: ref.source online, no score stage)"""
    out = tmp_path / "dpo"
    run(config(tmp_path, out, **{"loss.estimator": "dpo", "run.rounds": 1,
                                 "run.stages": "[sample, train]", "ref.source": "online",
                                 "train.max_steps": 1, "sample.max_new_tokens": 3}))
    assert all(len(row["samples"]) == 2 for row in read(out / "r0" / "sampled"))
    rows = read(out / "r0" / "labelled")
    assert all(row["samples"] == [] and row.get("aux_prefs") is None for row in rows)
    assert (out / "r0" / "train" / "final" / "model.safetensors").is_file()


def test_g_from_label_g_function_with_the_truths_labels(tmp_path, monkeypatch):
    """label.g_function gives g on every pair (the labelled pair in chosen-rejected order);
    the labels are still the labeller's (the truth's) draws."""
    from vrpo_fast.synthetic import SyntheticTask

    (tmp_path / "quarter.py").write_text("def g(prompt, y, y2):\n    return 0.25\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "g"
    run(config(tmp_path, out, **{"label.g_function": "quarter:g", "run.rounds": 1,
                                 "run.stages": "[sample, score, train]", "train.max_steps": 1,
                                 "sample.max_new_tokens": 3}))
    task = SyntheticTask()
    for pid, (s, lab) in enumerate(zip(read(out / "r0" / "sampled"),
                                       read(out / "r0" / "labelled"))):
        y1, y2 = s["samples"][:2]
        digest = hashlib.sha256(f"label:3:0:{pid}".encode()).digest()
        u = random.Random(int.from_bytes(digest[:8], "little") >> 1).random()
        p = 0.5 if y1 == y2 else task.preference(lab["prompt"], y1, y2)
        assert (lab["chosen"], lab["rejected"]) == ((y1, y2) if u < p else (y2, y1))
        g_pair = 0.5 if y1 == y2 else (0.25 if lab["chosen"] == y1 else 0.75)
        mc = [0.5 if a == b else 0.25 for a, b in zip(lab["samples"][0::2],
                                                      lab["samples"][1::2])]
        assert lab["aux_prefs"] == [g_pair, *mc]


def truth_free_labels_hold(out: Path, r: int, p_of) -> None:
    """Every labelled pair of round r is the documented draw from p_of(prompt, y1, y2)."""
    for pid, (s, lab) in enumerate(zip(read(out / f"r{r}" / "sampled"),
                                       read(out / f"r{r}" / "labelled"))):
        y1, y2 = s["samples"][:2]
        p = 0.5 if y1 == y2 else p_of(lab["prompt"], y1, y2)
        digest = hashlib.sha256(f"label:3:{r}:{pid + r * PER_ROUND}".encode()).digest()
        u = random.Random(int.from_bytes(digest[:8], "little") >> 1).random()
        assert (lab["chosen"], lab["rejected"]) == ((y1, y2) if u < p else (y2, y1))


def test_a_reward_model_labels_with_sigmoid_of_its_reward_difference(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from vrpo_fast.models import byte_tokenizer, tiny_llama_config

    torch.manual_seed(1)
    conf = tiny_llama_config(**yaml.safe_load(TINY_YAML), num_labels=1, initializer_range=0.5)
    AutoModelForSequenceClassification.from_config(conf).save_pretrained(tmp_path / "rm")
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path / "rm")
    rm64 = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").double().eval()

    def p_of(prompt, y, y2):        # a float64 naive forward of prompt + response each
        def r(text):
            with torch.no_grad():
                return rm64(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0, 0]
        return torch.sigmoid(r(prompt + y) - r(prompt + y2)).item()

    out = tmp_path / "rm-rounds"
    run(config(tmp_path, out, **{"label.mode": "reward", "label.path": str(tmp_path / "rm"),
                                 "run.rounds": 1, "run.stages": "[sample, score, train]",
                                 "train.max_steps": 1, "sample.max_new_tokens": 3}))
    labelled = read(out / "r0" / "labelled")
    assert any(row["aux_prefs"][0] not in (0.5,) for row in labelled)
    for row in labelled:      # g = the labeller's p, which the naive forward reproduces
        assert row["aux_prefs"][0] == pytest.approx(
            p_of(row["prompt"], row["chosen"], row["rejected"]), abs=1e-4)
    truth_free_labels_hold(out, 0, p_of)


def test_a_judge_labels_with_its_both_orders_preference(tmp_path):
    from vrpo_fast.judge import PairJudge
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer, load_causal_lm

    template = "Q: {prompt}\nA) {response_a}\nB) {response_b}\nBest:"
    build_tiny_causal_lm(seed=5, initializer_range=0.3, **yaml.safe_load(TINY_YAML)) \
        .save_pretrained(tmp_path / "judge")
    byte_tokenizer().save_pretrained(tmp_path / "judge")
    judge = PairJudge(load_causal_lm(str(tmp_path / "judge")).eval(), byte_tokenizer(),
                      template=template, chat=False)

    def p_of(prompt, y, y2):
        return judge.preferences([(prompt, [(y, y2)])])[0][0]

    out = tmp_path / "judged"
    run(config(tmp_path, out, **{"label.mode": "judge", "label.path": str(tmp_path / "judge"),
                                 "aux.judge_template": template, "aux.judge_chat": False,
                                 "run.rounds": 1, "run.stages": "[sample, score, train]",
                                 "train.max_steps": 1, "sample.max_new_tokens": 3}))
    truth_free_labels_hold(out, 0, p_of)
    record = json.loads((out / "r0" / "labelled" / "provenance.json").read_text())
    assert record["labelling"]["labeller"]["judge"]["template"] == template


def test_the_shipped_rounds_config_runs_every_round(tmp_path, monkeypatch):
    """configs/rounds/tiny-rounds.yaml as shipped, smaller: every round writes its stages."""
    monkeypatch.chdir(ROOT)          # the config's relative paths are the repository's
    out = tmp_path / "shipped"
    cfg = load_config(ROOT / "configs" / "rounds" / "tiny-rounds.yaml", [
        f"--rounds.output={out}", "--rounds.prompts_per_round=8", "--train.max_steps=2",
        "--eval.num_prompts=4", "--eval.num_samples=2"])
    done = dict(run(cfg))
    for r in range(cfg.run.rounds):
        assert done[f"r{r}/eval"] == out / f"r{r}" / "eval"
        assert (out / f"r{r}" / "eval" / "results.json").is_file()
    assert json.loads((out / "r1" / "round.json").read_text())["pi_ref"]["path"] == \
        str(out / "r0" / "train" / "final")


def test_pair_ids_are_the_labelled_pairs_tokens_exactly(tokenizer, tmp_path):
    """A sampled pair's ids are scored and trained as they are (no EOS appended to a response
    cut at max_new_tokens); malformed pair_ids are a row's problem."""
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_example

    cut = tokenizer("aaaa", add_special_tokens=False)["input_ids"]        # no EOS: cut short
    stopped = tokenizer("b", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = [{"prompt": "ab>", "chosen": "aaaa", "rejected": "b", "samples": ["c", "d"],
             "pair_ids": [cut, stopped]},
            {"prompt": "ab>", "chosen": "aaaa", "rejected": "b", "samples": ["c", "d"]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (with_ids, plain), _ = load_preference_data(str(path))
    assert tokenize_example(with_ids, tokenizer).response_ids[:2] == [cut, stopped]
    assert tokenize_example(plain, tokenizer).response_ids[0] == cut + [tokenizer.eos_token_id]
    path.write_text(json.dumps({**rows[0], "pair_ids": [cut]}) + "\n")
    with pytest.raises(UserError, match=r"line 1: field 'pair_ids': expected one token-id list per "
                                        r"response \(2\)"):
        load_preference_data(str(path))
