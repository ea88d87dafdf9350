"""Sampler backends: draw n responses per prompt from pi_ref, as token ids.

- `TransformersSampler`: batched `generate` with KV cache and left padding; runs anywhere.
- `VLLMSampler`: `vllm.LLM.generate` with `SamplingParams(n=...)`; GPU machines with vllm.
Both return, per prompt, n lists of response token ids ending with EOS when the model stopped
(no EOS when max_new_tokens cut the response).
"""

from __future__ import annotations

import torch

from vrpo_fast.errors import UserError


def _trim(ids: list[int], eos: int | None) -> list[int]:
    """Cut a generated continuation after its first EOS (generate pads only after EOS; a pad
    id before it is a token the model sampled)."""
    if eos is not None and eos in ids:
        return list(ids[:ids.index(eos) + 1])
    return list(ids)


class TransformersSampler:
    backend = "transformers"

    def __init__(self, model, tokenizer, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 128, batch_size: int = 16):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[list[int]]]:
        """prompt_ids: P lists of ids -> P lists of n responses (ids), reproducible under seed."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        pad = pad if pad is not None else eos
        device = next(self.model.parameters()).device
        out: list[list[list[int]]] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), self.batch_size):
                chunk = prompt_ids[start:start + self.batch_size]
                width = max(map(len, chunk))
                # Left padding: every prompt ends at the same column, where generation starts.
                ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk],
                                   device=device)
                attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                                    device=device)
                gen = self.model.generate(
                    input_ids=ids, attention_mask=attn, do_sample=True,
                    temperature=self.temperature, top_p=self.top_p, top_k=0,
                    max_new_tokens=self.max_new_tokens, num_return_sequences=n,
                    eos_token_id=eos, pad_token_id=pad, use_cache=True)
                cont = gen[:, width:].tolist()
                for i in range(len(chunk)):
                    out.append([_trim(c, eos) for c in cont[i * n:(i + 1) * n]])
        return out


def vllm_requests(prompt_ids: list[list[int]]):
    """Token-id prompts in the form `LLM.generate` takes."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]


def vllm_outputs(outputs, n: int) -> list[list[list[int]]]:
    """RequestOutput list (one per prompt, in order) -> P lists of n token-id lists."""
    result = []
    for request in outputs:
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a prompt, "
                               f"expected {n}")
        result.append([list(c.token_ids) for c in completions])
    return result


class VLLMSampler:
    backend = "vllm"

    def __init__(self, model_path: str, tokenizer, *, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 128, tensor_parallel_size: int = 1,
                 seed: int = 0):
        try:
            from vllm import LLM
        except ImportError:
            raise UserError("sample.backend: vllm is not installed (pip install "
                            "'vrpo-fast[vllm]' on a GPU machine)") from None
        self.llm = LLM(model=model_path, tokenizer=model_path,
                       tensor_parallel_size=tensor_parallel_size, seed=seed)
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def sample(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[list[int]]]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                top_k=-1, max_tokens=self.max_new_tokens, seed=seed)
        outputs = self.llm.generate(vllm_requests(prompt_ids), params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        return [[_trim(c, eos) for c in per] for per in vllm_outputs(outputs, n)]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()
