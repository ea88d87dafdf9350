"""`vrpo-fast sample --config X.yaml`: draw 2M responses per prompt from pi_ref.

Reads prompts (and labelled pairs, when present) from data.path, writes sample.output/ as Parquet
shards with the columns of the input plus `samples` (text) and `sample_ids` (the exact sampled
token ids, which training uses so that no re-tokenization drift creeps in), and
provenance.json. Killed and re-run with the same command, it continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from vrpo_fast import shards
from vrpo_fast.errors import UserError


def choose_backend(cfg) -> str:
    from vrpo_fast.samplers import vllm_available

    backend = cfg.sample.backend
    if backend == "auto":
        return "vllm" if vllm_available() and (cfg.ref.path or cfg.model.path) else "transformers"
    return backend


def make_sampler(cfg, tokenizer, backend: str):
    from vrpo_fast.samplers import TransformersSampler, VLLMSampler

    s = cfg.sample
    if backend == "vllm":
        path = cfg.ref.path or cfg.model.path
        if not path:
            raise UserError("sample.backend: vllm needs a model path (ref.path or model.path)")
        return VLLMSampler(path, tokenizer, temperature=s.temperature, top_p=s.top_p,
                           max_new_tokens=s.max_new_tokens,
                           tensor_parallel_size=s.tensor_parallel_size, seed=s.seed)
    import torch

    from vrpo_fast.models import model_from_config

    model = model_from_config(cfg, "ref")
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16)
    return TransformersSampler(model, tokenizer, temperature=s.temperature, top_p=s.top_p,
                               max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)


def sampling_record(cfg, backend: str) -> dict:
    s = cfg.sample
    return {"num_samples": s.num_samples, "temperature": s.temperature, "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens, "seed": s.seed, "shard_size": s.shard_size,
            "backend": backend}


def sample_stage(cfg, *, progress: bool = True) -> Path:
    """Run (or resume) sampling; returns the output folder."""
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.data.tokenize import tokenize_prompt
    from vrpo_fast.models import model_from_config, tokenizer_from_config
    from vrpo_fast.provenance import (
        build_provenance,
        read_provenance,
        same_origin,
        write_provenance,
    )

    s = cfg.sample
    if not s.output:
        raise UserError("sample.output: no output folder given")
    if not cfg.data.path:
        raise UserError("data.path: no prompts given")
    out = Path(s.output)
    tokenizer = tokenizer_from_config(cfg)
    examples, report = load_preference_data(cfg.data.path, on_bad_row=cfg.data.on_bad_row,
                                            split=cfg.data.split, prompts_only=True)
    if report.skipped:
        print(f"sample: skipped {report.skipped} bad rows (data.on_bad_row = skip)")
    backend = choose_backend(cfg)
    sampler = make_sampler(cfg, tokenizer, backend)
    ref_model = getattr(sampler, "model", None) or model_from_config(cfg, "ref")
    record = build_provenance(ref_model, tokenizer, sampling=sampling_record(cfg, backend),
                              backend=backend)
    existing = read_provenance(out)
    if existing is not None and not same_origin(existing, record):
        raise UserError(f"sample.output: {out} already holds samples from another reference "
                        f"model or other sampling settings; choose a new sample.output")
    rank, world = shards.rank_and_world()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_provenance(out, record)
    num_shards = -(-len(examples) // s.shard_size)
    todo = shards.pending_shards(out, num_shards, rank, world)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done = (num_shards - len(todo)) * s.shard_size if world == 1 else 0
        bar = tqdm(total=len(examples) if world == 1 else len(todo) * s.shard_size,
                   initial=min(done, len(examples)), desc=f"sample ({backend})", unit="prompt",
                   dynamic_ncols=True)
    for index in todo:
        chunk = examples[index * s.shard_size:(index + 1) * s.shard_size]
        prompt_ids = [tokenize_prompt(ex.prompt, tokenizer) for ex in chunk]
        # One seed per shard: a resumed run draws exactly what an uninterrupted one would.
        drawn = sampler.sample(prompt_ids, s.num_samples, seed=s.seed * 1_000_003 + index)
        rows = [_row(ex, ids, tokenizer) for ex, ids in zip(chunk, drawn)]
        shards.write_shard(out, index, rows)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out


def _row(ex, sample_ids, tokenizer) -> dict:
    eos = tokenizer.eos_token_id
    texts = [tokenizer.decode([t for t in ids if t != eos]) for ids in sample_ids]
    row = {"prompt": ex.prompt}
    if ex.labelled:
        row["chosen"], row["rejected"] = ex.chosen, ex.rejected
    row["samples"] = texts
    row["sample_ids"] = [list(map(int, ids)) for ids in sample_ids]
    return row


# `vrpo-fast <command> --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = sample_stage
