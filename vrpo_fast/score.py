"""`vrpo-fast score --config X.yaml`: reference log-probs and g for every response.

One no-grad packed pass per group through pi_ref gives `ref_logps` (2 + 2M: chosen, rejected,
a_1 .. a_2M); g (`aux_prefs`, 1 + M) comes from the auxiliary model: `given` keeps the data's,
`lm` is an auxiliary causal LM's implicit preference sigmoid(aux.beta * h_aux), `reward_model`
is sigmoid(r(y) - r(y')) of a sequence-classification model; `lagged` is a training-time mode
and leaves g as the data has it. Groups are batched by score.max_tokens; output in resumable
Parquet shards with the input's provenance.json copied beside them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vrpo_fast import shards
from vrpo_fast.errors import UserError


def token_batches(groups: list[tuple[list[int], list[list[int]]]], max_tokens: int):
    """Consecutive index ranges whose groups fit the budget together (a lone group may exceed
    it: it then gets a batch of its own)."""
    start, used = 0, 0
    for i, (prompt, responses) in enumerate(groups):
        size = len(prompt) + sum(map(len, responses))
        if i > start and used + size > max_tokens:
            yield start, i
            start, used = i, 0
        used += size
    if start < len(groups):
        yield start, len(groups)


@torch.no_grad()
def packed_scores(module_fn, groups, max_tokens: int) -> list[list[float]]:
    """Apply `module_fn(prompt_ids, response_ids, budget) -> (G, K)` over token batches."""
    out: list[list[float]] = []
    for a, b in token_batches(groups, max_tokens):
        chunk = groups[a:b]
        budget = max(max_tokens, max(len(p) + sum(map(len, r)) for p, r in chunk))
        out.extend(module_fn([p for p, _ in chunk], [r for _, r in chunk], budget).tolist())
    return out


def reward_scores(classifier, prompt_ids, response_ids, max_tokens) -> torch.Tensor:
    """(G, K) scores of a sequence-classification model at each response's last token."""
    from vrpo_fast.packing import pack_groups
    from vrpo_fast.train.modules import SequenceRewards

    device = next(classifier.parameters()).device
    batch = pack_groups(prompt_ids, response_ids, max_tokens=max_tokens).to(device)
    return SequenceRewards(classifier)(batch)


def score_stage(cfg, *, progress: bool = True) -> Path:
    """Run (or resume) scoring; returns the output folder."""
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_example
    from vrpo_fast.logprobs import sequence_logps
    from vrpo_fast.models import model_from_config, tokenizer_from_config
    from vrpo_fast.objective import implicit_preference, reward_preference

    sc = cfg.score
    source = sc.input or cfg.sample.output or cfg.data.path
    if not source:
        raise UserError("score.input: nothing to score (set score.input or sample.output)")
    if not sc.output:
        raise UserError("score.output: no output folder given")
    out = Path(sc.output)
    tokenizer = tokenizer_from_config(cfg)
    examples, report = load_preference_data(str(source), on_bad_row=cfg.data.on_bad_row,
                                             split=cfg.data.split)
    if report.skipped:
        print(f"score: skipped {report.skipped} bad rows (data.on_bad_row = skip)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = model_from_config(cfg, "ref").to(device).eval()
    from vrpo_fast.provenance import check_provenance

    src_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    check_provenance(src_dir, ref, tokenizer)
    aux_mode, aux = cfg.aux.mode, None
    if aux_mode == "lm":
        from vrpo_fast.models import load_causal_lm

        aux = load_causal_lm(cfg.aux.path, what="aux.path").to(device).eval()
    elif aux_mode == "reward_model":
        from transformers import AutoModelForSequenceClassification

        try:
            aux = AutoModelForSequenceClassification.from_pretrained(cfg.aux.path)
        except (OSError, ValueError) as err:
            raise UserError(f"aux.path: cannot load a reward model from {cfg.aux.path!r}: "
                            f"{str(err).splitlines()[0]}") from None
        aux = aux.to(device).eval()

    rank, world = shards.rank_and_world()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if (src_dir / "provenance.json").is_file():
            shutil.copyfile(src_dir / "provenance.json", out / "provenance.json")
    num_shards = -(-len(examples) // sc.shard_size)
    todo = shards.pending_shards(out, num_shards, rank, world)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(len(examples[i * sc.shard_size:(i + 1) * sc.shard_size]) for i in todo)
        bar = tqdm(total=total, desc="score", unit="group", dynamic_ncols=True)

    def logps_of(model):
        return lambda p, r, budget: sequence_logps(model, p, r, max_tokens=budget)

    for index in todo:
        chunk = examples[index * sc.shard_size:(index + 1) * sc.shard_size]
        tok = [tokenize_example(ex, tokenizer) for ex in chunk]
        groups = [(t.prompt_ids, t.response_ids) for t in tok]
        ref_lp = packed_scores(logps_of(ref), groups, sc.max_tokens)
        g = [ex.aux_prefs for ex in chunk]
        if aux_mode == "lm":
            aux_lp = packed_scores(logps_of(aux), groups, sc.max_tokens)
            g = _labelled_g(implicit_preference(torch.tensor(aux_lp), torch.tensor(ref_lp),
                                                cfg.aux.beta), tok)
        elif aux_mode == "reward_model":
            rewards = packed_scores(lambda p, r, b: reward_scores(aux, p, r, b), groups,
                                    sc.max_tokens)
            g = _labelled_g(reward_preference(torch.tensor(rewards)), tok)
        rows = []
        for ex, lp, gi in zip(chunk, ref_lp, g):
            row = {"prompt": ex.prompt}
            if ex.labelled:
                row["chosen"], row["rejected"] = ex.chosen, ex.rejected
            row["samples"] = ex.samples
            if ex.sample_ids is not None:
                row["sample_ids"] = ex.sample_ids
            row["ref_logps"] = lp
            if gi is not None:
                row["aux_prefs"] = [float(v) for v in gi]
            rows.append(row)
        shards.write_shard(out, index, rows)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def _labelled_g(g: torch.Tensor, tok) -> list[list[float]]:
    """Unlabelled rows have no (chosen, rejected) pair: their g starts at the first MC pair,
    and the stored list keeps the 1 + M layout with 0.5 for the missing labelled pair."""
    out = []
    for row, t in zip(g.tolist(), tok):
        out.append(row if t.labelled else [0.5] + row)
    return out


# `vrpo-fast <command> --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = score_stage
