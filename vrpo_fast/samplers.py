"""Sampler backends: draw n responses per prompt from pi_ref, as token ids.

- `TransformersSampler`: batched `generate` with KV cache and left padding; runs anywhere
  (through flash-attn's kernels on a GPU when the `[flash]` extra is installed).
- `VLLMSampler`: `vllm.LLM.generate` with `SamplingParams(n=...)`, one seed per prompt; GPU
  machines with vllm installed (imported only when this backend is built).

Both return, per prompt, n lists of response token ids. A response that stopped ends with its
stop token (EOS, or another end-of-turn id from the model's generation config); one cut by
max_new_tokens has no stop token. Both sample from the model's own distribution, rescaled only
by temperature and top_p: sampling defaults shipped in a checkpoint's generation_config.json
(repetition penalty, top_k, ...) are ignored, because VRPO needs samples FROM pi_ref.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from vrpo_fast.data.tokenize import tokenize_prompt
from vrpo_fast.errors import UserError


def device_of_rank() -> torch.device:
    """This process's device: under torchrun each rank takes its own GPU (LOCAL_RANK); the CPU
    when there is none."""
    import os

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokenizer's EOS plus the generation config's eos ids (chat models list their
    end-of-turn token there), in first-seen order. vLLM stops at the same union."""
    ids: list[int] = []
    extra = getattr(generation_config, "eos_token_id", None)
    extra = extra if isinstance(extra, (list, tuple)) else [extra]
    for t in [tokenizer.eos_token_id, *extra]:
        if t is not None and int(t) not in ids:
            ids.append(int(t))
    return ids


def trim_at_stop(ids: list[int], stop_ids) -> list[int]:
    """Cut a generated continuation after its first stop token (what follows is padding)."""
    stop = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stop:
            return list(ids[:i + 1])
    return list(ids)


def generate_attention(device: torch.device, dtype: torch.dtype, flash_installed: bool
                       ) -> str | None:
    """The attention implementation `generate` should switch a model to, or None to keep its
    own: flash-attn's on a GPU in fp16 / bf16 when it is installed (left-padded batches run
    unpadded there, no padded query-key pairs), SDPA everywhere else."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_installed:
        return "flash_attention_2"
    return None


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


class TransformersSampler:
    """Batched `generate` sampling. Under one seed the draws are reproducible for the same
    prompts and batch_size (a batch shares one random stream)."""

    backend = "transformers"

    def __init__(self, model, tokenizer, *, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 128, batch_size: int = 16):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.temperature, self.top_p = temperature, top_p
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        weight = next(model.parameters(), None)
        impl = weight is not None and generate_attention(weight.device, weight.dtype,
                                                         flash_attn_installed())
        if impl and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)

    @contextlib.contextmanager
    def _plain_generation_config(self, pad: int):
        """generate() merges the model's generation_config into every call, so a checkpoint's
        sampling defaults would change the distribution; swap in one that holds ids only."""
        from transformers import GenerationConfig

        saved = getattr(self.model, "generation_config", None)
        if saved is None:      # a stand-in model with a generate() of its own
            yield
            return
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.stop_ids, pad_token_id=pad,
            bos_token_id=getattr(saved, "bos_token_id", None))
        try:
            yield
        finally:
            self.model.generation_config = saved

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[list[int]]]:
        """prompt_ids: P lists of ids -> P lists of n responses (ids), reproducible under seed."""
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.stop_ids[0]
        device = next(self.model.parameters()).device
        # Prompts of similar length share a batch (less padding); results go back in order.
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        out: list[list[list[int]] | None] = [None] * len(prompt_ids)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                self._plain_generation_config(pad):
            torch.manual_seed(seed)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                width = max(len(prompt_ids[i]) for i in chunk)
                # Left padding: every prompt ends at the same column, where generation starts;
                # generate() derives position ids from the attention mask.
                ids = torch.tensor([[pad] * (width - len(prompt_ids[i])) + list(prompt_ids[i])
                                    for i in chunk], device=device)
                attn = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i])
                                     for i in chunk], device=device)
                gen = self.model.generate(
                    input_ids=ids, attention_mask=attn, do_sample=True,
                    temperature=self.temperature, top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens, num_return_sequences=n, use_cache=True)
                cont = gen[:, width:].tolist()     # host sync: one per batch
                for j, i in enumerate(chunk):
                    out[i] = [trim_at_stop(c, self.stop_ids) for c in cont[j * n:(j + 1) * n]]
        return out


def prompt_seed(seed: int, index: int) -> int:
    """A per-prompt seed (63 bits) from the call's seed and the prompt's index. Hashed rather
    than seed + index: vLLM seeds the j-th of n samples with seed + j, so neighbouring prompts
    must not get neighbouring seeds."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def vllm_requests(prompt_ids: list[list[int]]) -> list[dict]:
    """Token-id prompts in the form `LLM.generate` takes (vllm.inputs.TokensPrompt is this
    TypedDict)."""
    return [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]


def vllm_outputs(outputs, n: int, stop_ids) -> list[list[list[int]]]:
    """RequestOutput list (one per prompt, in request order) -> P lists of n token-id lists."""
    result = []
    for request in outputs:
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a prompt, "
                               f"expected {n}")
        result.append([trim_at_stop(list(c.token_ids), stop_ids) for c in completions])
    return result


class VLLMSampler:
    """vLLM sampling: each prompt gets its own seed (`prompt_seed(seed, index)`), so its draws
    do not depend on which other prompts share the call (up to vLLM's kernels, which are not
    bitwise batch-invariant)."""

    backend = "vllm"

    def __init__(self, model_path: str, tokenizer, *, tokenizer_path: str | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
                 tensor_parallel_size: int = 1, seed: int = 0):
        try:
            import vllm
        except ImportError:
            raise UserError("sample.backend: vllm is not installed (pip install "
                            "'vrpo-fast[vllm]' on a GPU machine)") from None
        self.llm = vllm.LLM(model=model_path, tokenizer=tokenizer_path or model_path,
                            tensor_parallel_size=tensor_parallel_size, seed=seed)
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop_ids = stop_token_ids(tokenizer, _generation_config(model_path))

    def sample(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[list[int]]]:
        """prompt_ids: P lists of ids -> P lists of n responses (ids)."""
        from vllm import SamplingParams

        # Explicit parameters: vLLM then ignores the checkpoint's sampling defaults. top_k,
        # min_p and the penalties keep their neutral defaults.
        params = [SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                 max_tokens=self.max_new_tokens, seed=prompt_seed(seed, i))
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate(prompts=vllm_requests(prompt_ids), sampling_params=params,
                                    use_tqdm=False)
        return vllm_outputs(outputs, n, self.stop_ids)


def _generation_config(path: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):  # a checkpoint without generation_config.json
        return None


def vllm_available() -> bool:
    """vllm is installed and a GPU is present (without importing vllm, which is slow)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def response_texts(tokenizer, ids: list[list[list[int]]], stop_ids) -> list[list[str]]:
    """Decoded responses (P, n), each without its final stop token."""
    stop = set(stop_ids)
    return [[tokenizer.decode(r[:-1] if r and r[-1] in stop else r) for r in per] for per in ids]


def draw(model, tokenizer, prompts: list, n: int, *, seed: int, max_new_tokens: int,
         temperature: float = 1.0, batch_size: int = 8):
    """n samples per prompt (strings or messages) from `model` -> (texts (P, n), prompt ids (P,),
    response ids (P, n)): the sampling helper of evaluation, best-of-n and the demo."""
    prompt_ids = [tokenize_prompt(p, tokenizer) for p in prompts]
    sampler = TransformersSampler(model, tokenizer, temperature=temperature,
                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
    ids = sampler.sample(prompt_ids, n, seed=seed)
    return response_texts(tokenizer, ids, sampler.stop_ids), prompt_ids, ids
