"""`vrpo-fast score --config X.yaml [--section.key=value ...]`: reference log-probs and g for
every response.

One no-grad packed pass per batch of prompt groups (each prompt once, its responses behind it;
groups batched up to score.max_tokens tokens) through pi_ref gives `ref_logps` (2 + 2M: chosen,
rejected, a_1 .. a_2M; 2M for an unlabelled row). g (`aux_prefs`, 1 + M: the labelled pair, then
the Monte Carlo pairs (a_1, a_2), (a_3, a_4), ...) depends on aux.mode:

    given         the data's aux_prefs, passed through unchanged
    lm            an auxiliary causal LM's implicit preference sigmoid(aux.beta * h_aux), h_aux
                  its log-ratio margin against pi_ref (`objective.implicit_preference`)
    reward_model  sigmoid(r(y) - r(y')) of a sequence-classification model scored at each
                  response's last token, in the same packed layout (`objective.reward_preference`)
    judge         an instruction-tuned LM judging each pair in both orders, g = the mean of its
                  p(A) / (p(A) + p(B)) over the two orders (`vrpo_fast.judge`); the judge reads
                  the data's texts, untruncated, and its template is recorded in provenance
    lagged, none  nothing to compute offline (lagged g comes from the policy during training);
                  the data's aux_prefs, if any, pass through
Unlabelled rows have no labelled pair: their stored g starts with a placeholder 0.5.

Responses are tokenized exactly as training tokenizes them (sample_ids when present, the data
section's truncation), so the cached ref_logps match the policy's log-probs token for token.
Output: resumable Parquet shards in score.output/ and provenance.json (the input's record, checked
against pi_ref, plus a `scoring` section).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.tokenize import tokenize_example
from vrpo_fast.errors import UserError, check_output, renamed
from vrpo_fast.host_memory import keep_freed_memory
from vrpo_fast.judge import load_judge, pairs_of
from vrpo_fast.logprobs import sequence_logps
from vrpo_fast.models import (
    load_causal_lm,
    load_reward_model,
    model_from_config,
    tokenizer_from_config,
)
from vrpo_fast.objective import implicit_preference, reward_preference
from vrpo_fast.passes import packed_scores, reward_scores
from vrpo_fast.provenance import (
    build_provenance,
    check_provenance,
    ids_fingerprint,
    library_versions,
    weights_fingerprint,
)
from vrpo_fast.stage import run_sharded_stage, shard_count, started_record


def stored_g(g_row: list[float], labelled: bool) -> list[float]:
    """g as stored (1 + M): an unlabelled row's values cover its M Monte Carlo pairs only, so a
    placeholder 0.5 stands for the missing labelled pair."""
    return [float(v) for v in g_row] if labelled else [0.5] + [float(v) for v in g_row]


def _device():
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _example_key(ex) -> list:
    pair = [ex.pair_ids] if ex.pair_ids is not None else []
    return [ex.prompt, ex.chosen, ex.rejected, ex.samples, ex.sample_ids, ex.aux_prefs, *pair]


def score_stage(cfg, *, progress: bool = True) -> Path:
    """Run (or resume) scoring; returns the output folder. The resumable skeleton (provenance
    check, pending shards, progress, atomic writes) is `stage.run_sharded_stage`; this supplies
    the record and the scores of each shard."""
    sc, d, aux_cfg = cfg.score, cfg.data, cfg.aux
    source = sc.input or cfg.sample.output
    if not source:
        raise UserError("score.input: nothing to score (set score.input, or sample.output for "
                        "score to read what sample writes)")
    if not sc.output:
        raise UserError("score.output: no output folder given")
    out = Path(sc.output)
    check_output(out, "score.output")
    src_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    if out.resolve() == src_dir.resolve():
        raise UserError(f"score.output: {out} is the input's folder; scored shards need a "
                        f"folder of their own")
    tokenizer = tokenizer_from_config(cfg)
    try:
        examples, report = load_preference_data(str(source), on_bad_row=d.on_bad_row,
                                                split=d.split)
    except UserError as err:
        raise renamed(err, "score.input") from None
    if report.skipped:
        print(f"score: skipped {report.skipped} bad rows (data.on_bad_row = skip)")
    if not examples:
        raise UserError(f"score.input: {source} holds no rows")
    ref = model_from_config(cfg, "ref")
    input_record = check_provenance(src_dir, ref, tokenizer, what="score.input")

    mode, aux, judge = aux_cfg.mode, None, None
    if mode == "judge":
        judge = load_judge(aux_cfg, _device())
        aux = judge.model
    elif mode == "lm":
        aux = load_causal_lm(aux_cfg.path, what="aux.path")
    elif mode == "reward_model":
        aux = load_reward_model(aux_cfg.path, what="aux.path")
    num_shards = shard_count(len(examples), sc.shard_size)
    scoring = {
        "aux_mode": mode,
        "aux_path": aux_cfg.path if aux is not None else None,
        "aux_weights_sha256": weights_fingerprint(aux) if aux is not None else None,
        "aux_beta": aux_cfg.beta if mode == "lm" else None,
        "aux_judge": judge.identity() if judge is not None else None,
        "max_prompt_length": d.max_prompt_length,
        "max_response_length": d.max_response_length,
        "input_sha256": ids_fingerprint(_example_key(ex) for ex in examples),
    }
    shard_info = {"count": num_shards, "size": sc.shard_size}
    if input_record is not None:
        record = {**input_record, "scoring": scoring, "shards": shard_info}
    else:
        # Samples of unknown origin: the record names the model the log-probs come from.
        record = {**build_provenance(ref, tokenizer, sampling=None, prompts=None,
                                     shards=shard_info), "scoring": scoring}
    # Not part of the identity: the input may move, a resumed run may use another budget.
    record["scoring_run"] = {"input": str(source), "rows": len(examples),
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "versions": library_versions(), "max_tokens": sc.max_tokens}
    existing = started_record(out)
    if existing is not None and existing.get("scoring", {}).get("aux_judge") is not None and (
            existing["scoring"]["aux_judge"] != scoring["aux_judge"]
            or existing["scoring"]["aux_weights_sha256"] != scoring["aux_weights_sha256"]):
        raise UserError(f"score.output: {out} was judged with another judge or template "
                        f"({existing['scoring']['aux_path']}); choose a new score.output, "
                        f"or delete the folder to start over")

    def announce(done: int, mine: int) -> None:
        print(f"score: {len(examples)} groups, {num_shards} shards of {sc.shard_size} "
              f"({done} of this rank's {mine} done), aux.mode {mode}, token budget "
              f"{sc.max_tokens}")

    def logps_of(model):
        return lambda p, r, budget: sequence_logps(model, p, r, max_tokens=budget)

    def aux_scores(fn, groups):
        try:
            return packed_scores(fn, groups, sc.max_tokens)
        except ValueError as err:   # e.g. a token id outside the auxiliary model's vocabulary
            raise UserError(f"aux.path: cannot score the data with {aux_cfg.path}: {err}") \
                from None

    def score_shard(index: int, lo: int, hi: int) -> list[dict]:
        chunk = examples[lo:hi]
        tok = [tokenize_example(ex, tokenizer, max_prompt_length=d.max_prompt_length,
                                max_response_length=d.max_response_length) for ex in chunk]
        groups = [(t.prompt_ids, t.response_ids) for t in tok]
        ref_lp = packed_scores(logps_of(ref), groups, sc.max_tokens)
        g = [ex.aux_prefs for ex in chunk]
        if mode == "lm":
            aux_lp = aux_scores(logps_of(aux), groups)
            g = [stored_g(implicit_preference(torch.tensor([a]), torch.tensor([r]),
                                              aux_cfg.beta)[0].tolist(), t.labelled)
                 for a, r, t in zip(aux_lp, ref_lp, tok)]
        elif mode == "reward_model":
            rewards = aux_scores(lambda p, r, b: reward_scores(aux, p, r, b), groups)
            g = [stored_g(reward_preference(torch.tensor([w]))[0].tolist(), t.labelled)
                 for w, t in zip(rewards, tok)]
        elif mode == "judge":
            judged = judge.preferences([(ex.prompt, pairs_of(ex.responses)) for ex in chunk],
                                       sc.max_tokens)
            g = [stored_g(v, ex.labelled) for v, ex in zip(judged, chunk)]
        rows = []
        for ex, lp, gi in zip(chunk, ref_lp, g):
            row = {"prompt": ex.prompt}
            if ex.labelled:
                row["chosen"], row["rejected"] = ex.chosen, ex.rejected
            row["samples"] = list(ex.samples)
            if ex.sample_ids is not None:
                row["sample_ids"] = ex.sample_ids
            if ex.pair_ids is not None:
                row["pair_ids"] = ex.pair_ids
            row["ref_logps"] = [float(v) for v in lp]
            if gi is not None:
                row["aux_prefs"] = [float(v) for v in gi]
            if ex.domain is not None:
                row["domain"] = ex.domain
            rows.append(row)
        return rows

    def setup():
        nonlocal ref, aux
        device = _device()
        if device.type == "cpu" and cfg.train.keep_host_memory:
            keep_freed_memory()     # vrpo_fast/host_memory.py: each batch's logits reuse memory
        ref = ref.to(device).eval()
        if aux is not None and judge is None:     # the judge placed its model itself
            aux = aux.to(device).eval()
        return score_shard

    return run_sharded_stage(
        out, record, num_items=len(examples), shard_size=sc.shard_size, key="score.output",
        holds="scores", differs_hint="other input, model or settings", announce=announce,
        setup=setup, progress=progress, desc="score", unit="group")


# `vrpo-fast <command> --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = score_stage
