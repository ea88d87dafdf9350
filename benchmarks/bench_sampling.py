"""Sampling throughput (responses per second) of each sampler backend on the same prompts:
batched transformers `generate` everywhere, vLLM where it imports and a GPU is present.

    python -m pytest benchmarks/bench_sampling.py -q [--smoke]
"""

import pytest
import torch
from _suite import timed

SHAPES = {
    "smoke": [dict(prompts=4, n=2, max_new_tokens=4, hidden=32, layers=1)],
    "cpu": [dict(prompts=16, n=4, max_new_tokens=32, hidden=256, layers=4)],
    "gpu": [dict(prompts=128, n=4, max_new_tokens=128, hidden=1024, layers=8)],
}


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def bench_sampling(benchmark, record, mode, backend, shape, tmp_path):
    from vrpo_fast.models import build_tiny_causal_lm, byte_tokenizer
    from vrpo_fast.samplers import TransformersSampler, VLLMSampler, vllm_available

    tok = byte_tokenizer()
    model = build_tiny_causal_lm(hidden_size=shape["hidden"], num_layers=shape["layers"],
                                 num_heads=max(2, shape["hidden"] // 64),
                                 num_kv_heads=max(1, shape["hidden"] // 128),
                                 intermediate_size=3 * shape["hidden"])
    if backend == "vllm":
        if not vllm_available():
            pytest.skip("vLLM needs the vllm package and a GPU")
        model.save_pretrained(tmp_path / "m")
        tok.save_pretrained(tmp_path / "m")
        sampler = VLLMSampler(str(tmp_path / "m"), tok, max_new_tokens=shape["max_new_tokens"])
    else:
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            model = model.cuda().to(torch.bfloat16)
        # 16 prompts x n per generate call on the CPU; 64 on a GPU (at 16 per call, 256
        # prompts did not finish their rounds within 77 s on an H100).
        sampler = TransformersSampler(model, tok, max_new_tokens=shape["max_new_tokens"],
                                      batch_size=64 if on_gpu else 16)
    # Prompts of varied length, so batches are left-padded as in real data.
    prompts = [tok(f"prompt {i}: " + "x" * (i % 7))["input_ids"] for i in range(shape["prompts"])]
    out = sampler.sample(prompts, shape["n"], seed=0)
    assert len(out) == len(prompts) and all(len(per) == shape["n"] for per in out)
    assert all(1 <= len(ids) <= shape["max_new_tokens"] for per in out for ids in per)
    benchmark.group = f"sampling {shape}"
    seconds = timed(benchmark, lambda: sampler.sample(prompts, shape["n"], seed=1),
                    rounds=1 if mode == "smoke" else 3)
    responses = shape["prompts"] * shape["n"]
    record("sampling", backend, shape, seconds,
           responses_per_s=responses / sorted(seconds)[len(seconds) // 2])
