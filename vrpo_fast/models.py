"""Tiny models and a byte-level tokenizer built from a config: no hub download needed.

Used by the tests, `configs/tiny.yaml` and `vrpo-fast demo`. Real runs load a model path instead
(`load_causal_lm`), or, for a model FSDP2 will shard, build it empty (`empty=True`: parameters
on the meta device) so that each rank fills only its own shard from the weight files
(`weight_files`, `vrpo_fast.train.modules.shard_empty`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from vrpo_fast.environment import check_environment
from vrpo_fast.errors import UserError

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# A minimal chat template in the common role-tagged style; `add_generation_prompt` opens an
# assistant turn so that sampled responses continue the prompt exactly.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer(add_bos: bool = True):
    """A byte-level BPE tokenizer with no merges (vocab = 256 bytes + <s>, </s>, <pad>).

    Every string round-trips exactly; ids 0..2 are the special tokens. With `add_bos` the
    tokenizer prepends <s> like Llama's does, which the data code must not duplicate.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 0)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        add_bos_token=add_bos,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int = 259, hidden_size: int = 64, num_layers: int = 2,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                      max_position_embeddings: int = 1024, tie_word_embeddings: bool = False,
                      arch: str = "llama", **extra):
    """A transformers config for a tiny Llama-style (or Qwen2-style, `arch="qwen2"`) model."""
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    if cls is None:
        raise UserError(f"model.arch: unknown architecture {arch!r} (expected llama or qwen2)")
    return cls(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        **extra,
    )


def build_tiny_causal_lm(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised tiny causal LM (deterministic under `seed`)."""
    check_environment()
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config(**config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype)


def check_weight_files(path: str, what: str = "model.path") -> None:
    """A local model folder's safetensors files must hold every byte their header points to: a
    file cut short (an interrupted copy or download) is one line naming it, not a traceback
    from deep inside the loader. Reads only the headers."""
    folder = Path(path)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                size = file.stat().st_size
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError(f"{size} bytes, too short for its header")
                header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items()
                       if k != "__metadata__"), default=0)
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise UserError(f"{what}: {file} is damaged ({err})") from None
        if 8 + n + end > size:
            raise UserError(f"{what}: {file} is cut short: {size} bytes, its header needs "
                            f"{8 + n + end} (an interrupted copy or download?)")


# Files one of which a tokenizer folder holds (AutoTokenizer reads one of these kinds).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tekken.json")


def check_model_path(path: str, what: str = "model.path") -> None:
    """A path that cannot be a model is one line naming `what` before any loader sees it: a
    regular file, or a missing path that looks local (absolute, starting with . or ~, or not of
    the hub's `name` / `namespace/name` form). The loaders would try the hub with it, with
    retries, and then say the hub name is malformed or the config is not JSON. A hub name is
    left to the loaders."""
    p = Path(path)
    if p.is_dir():
        return
    if p.exists():
        raise UserError(f"{what}: {path} is a file, not a model folder")
    if _looks_local(str(path)):
        hint = " (a ~ is not expanded: write the full path)" if str(path).startswith("~") else ""
        raise UserError(f"{what}: no such folder {str(path)!r}{hint}")


def _looks_local(path: str) -> bool:
    if path.startswith((".", "~")) or os.path.isabs(path) or path.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in path:
        return True
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(path)
    except ImportError:
        return False
    except ValueError:   # HFValidationError: a name the hub cannot hold
        return True
    return False


def _reason(err: BaseException) -> str:
    """An exception's text on one line (a loader's message often spans several)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def _missing_head(model, loaded: set[str] | None, missing=()) -> list[str]:
    """The parameters of `model`'s head (those outside its base model: lm_head, score) that its
    weights lack: `missing` (loading info) or, for an empty model, the ones not among the
    `loaded` tensor names (None: names unknown, nothing checked). Buffers do not count, nor a
    head tied to the embeddings (one parameter, named in the body)."""
    prefix = model.base_model_prefix + "."
    head = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
    if loaded is not None:
        return [n for n in head if n not in loaded]
    return [n for n in head if n in set(missing)]


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def weight_files(path: str | None) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of a local model folder (one `model.safetensors`, or the
    shards of `model.safetensors.index.json`); None for anything else (a hub name, .bin
    weights), which only the full loaders read."""
    if not path or not Path(path).is_dir():
        return None
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{index}: not a safetensors index ({err})") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (shape and dtype, no
    memory, no initialisation) and their buffers real: buffers a model computes from its config
    (the rotary inverse frequencies) are not in weight files, so they must be built here."""
    real = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        real(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = real


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, what: str = "model.path", *,
                   empty: bool = False):
    """Load a causal LM from a local path or hub name, with one clear error if it cannot be.

    empty: only its config is read and the model built with parameters on the meta device
    (`parameters_on_meta`), in eval mode as a loaded one is; the caller fills them
    (`vrpo_fast.train.modules.shard_empty`)."""
    check_environment()
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_path(path, what)
    check_weight_files(path, what)
    try:
        if empty:
            config = AutoConfig.from_pretrained(path)
            with parameters_on_meta():
                model = AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation="sdpa").eval()
            files = weight_files(path)
            missing = _missing_head(model, None if files is None else set(files))
        else:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa", output_loading_info=True)
            missing = _missing_head(model, None, info.get("missing_keys", ()))
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: cannot load a causal LM from {path!r}: {_reason(err)}") from None
    # A reward model's folder (a score head, no lm_head) would load with a random LM head.
    if missing:
        raise UserError(f"{what}: {path} is not a causal LM (its weights lack {_few(missing)})")
    return model


def load_reward_model(path: str, what: str = "aux.path", *, new_head: bool = False,
                      empty: bool = False):
    """A sequence-classification reward model (one output, num_labels = 1) from a local path or
    hub name, with one clear error naming `what` if it cannot be loaded.

    new_head: the start of reward-model training, where `path` may be a causal LM whose body
    gets a fresh one-output head; otherwise the checkpoint must already be a one-output model.
    empty: as in `load_causal_lm` (not with new_head: a fresh head is not in the files).
    """
    check_environment()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_path(path, what)
    check_weight_files(path, what)
    extra = {"num_labels": 1} if new_head else {}
    try:
        if empty and not new_head:
            config = AutoConfig.from_pretrained(path)
            with parameters_on_meta():
                model = AutoModelForSequenceClassification.from_config(
                    config, attn_implementation="sdpa").eval()
            files = weight_files(path)
            missing = _missing_head(model, None if files is None else set(files))
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, attn_implementation="sdpa", output_loading_info=True, **extra)
            missing = _missing_head(model, None, info.get("missing_keys", ()))
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: cannot load a reward model from {path!r}: "
                        f"{_reason(err)}") from None
    # A causal LM's folder (no score head) would load with a random head, unless new_head asks
    # for exactly that.
    if missing and not new_head:
        raise UserError(f"{what}: {path} is not a reward model (its weights lack the score "
                        f"head: {_few(missing)})")
    if model.config.num_labels != 1:
        raise UserError(f"{what}: a reward model has one output (num_labels = 1); {path} has "
                        f"{model.config.num_labels}")
    return model


def context_length(cfg) -> int | None:
    """The longest sequence (prompt + one response) the policy and pi_ref take: the smaller
    max_position_embeddings of the two models' configs (None when a config does not say, or
    cannot be read here: loading the model reports that)."""
    if cfg.model.tiny is not None and not cfg.model.path:
        return _positions(tiny_llama_config(**cfg.model.tiny))
    sizes = []
    for path in {p for p in (cfg.model.path, cfg.ref.path) if p}:
        try:
            sizes.append(model_context(path))
        except UserError:
            pass
    return min((n for n in sizes if n is not None), default=None)


def model_context(path: str, what: str = "model.path") -> int | None:
    """max_position_embeddings of the model at `path` (its config only is read)."""
    from transformers import AutoConfig

    check_model_path(path, what)
    try:
        return _positions(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: cannot read a model config from {path!r}: "
                        f"{_reason(err)}") from None


def _positions(config) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def load_tokenizer(name: str | None, what: str = "model.tokenizer"):
    """'byte' (or None with a tiny model) gives the built-in tokenizer; else AutoTokenizer."""
    if name in (None, "byte"):
        return byte_tokenizer()
    check_environment()
    from transformers import AutoTokenizer

    check_model_path(name, what)
    folder = Path(name)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{what}: {name} holds no tokenizer files (tokenizer.json, "
                        f"tokenizer_config.json, ...)")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"{what}: cannot load a tokenizer from {name!r}: {_reason(err)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_path(cfg, which: str = "policy") -> str | None:
    """The weights `model_from_config` loads: ref.path for pi_ref when set, else model.path
    (None for a tiny model built from model.tiny)."""
    return (cfg.ref.path if which == "ref" and cfg.ref.path else cfg.model.path) or None


def model_from_config(cfg, which: str = "policy", dtype: torch.dtype | None = None, *,
                      empty: bool = False):
    """The policy's starting point (`which="policy"`) or pi_ref (`which="ref"`) of a Config,
    in `dtype` (default: model.dtype).

    pi_ref is ref.path when set, otherwise the same weights as the policy's starting point.
    empty: parameters on the meta device, as in `load_causal_lm` (a model path only).
    """
    if dtype is None:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    path = cfg.ref.path if which == "ref" and cfg.ref.path else cfg.model.path
    what = "ref.path" if which == "ref" and cfg.ref.path else "model.path"
    if path:
        return load_causal_lm(path, dtype=dtype, what=what, empty=empty)
    if empty:
        raise ValueError("empty=True needs a model path: a tiny model has no weight files")
    return build_tiny_causal_lm(seed=cfg.model.seed, dtype=dtype, **(cfg.model.tiny or {}))


def tokenizer_from_config(cfg):
    return load_tokenizer(cfg.model.tokenizer or cfg.model.path, "model.tokenizer")


# -- LoRA ------------------------------------------------------------------------------------

def lora_config(lora, base_path: str | None = None):
    """peft's LoraConfig of a `lora:` config section (vrpo_fast.config.LoraConfig)."""
    try:
        import peft
    except ImportError:
        raise UserError("lora.enabled: LoRA needs peft (pip install 'vrpo-fast[lora]')") from None
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), bias="none",
                           task_type="CAUSAL_LM", base_model_name_or_path=base_path)


def add_lora(model: torch.nn.Module, lora, base_path: str | None = None, *,
             seed: int = 0) -> torch.nn.Module:
    """Inject peft LoRA adapters into `model` in place and freeze everything else; their
    initial values are `lora_initial_value(name, shape, seed)` (left on the meta device for an
    empty model, whose filler draws the same values).

    The model stays the transformers model it was (no PeftModel wrapper), so the packed passes,
    FSDP's per-layer sharding and the fused LM head see the same module tree; parameter names
    are peft's (`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`), those of a
    PeftModel's `base_model.model`, so `save_lora` can hand them to peft unchanged. Every entry
    of lora.target_modules must name at least one module (peft only refuses a list that matches
    nothing at all).
    """
    config = lora_config(lora, base_path)
    names = [name for name, _ in model.named_modules()]
    for target in lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise UserError(f"lora.target_modules: {target!r} matches no module of the model "
                            f"(its linear layers are named e.g. "
                            f"{', '.join(_linear_names(model)[:8])})")
    import peft

    model = peft.inject_adapter_in_model(config, model)
    if not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(lora_initial_value(name, param.shape, seed))
    return model


def lora_initial_value(name: str, shape, seed: int) -> torch.Tensor:
    """The initial value of the LoRA parameter `name`: peft's default (lora_A uniform in
    +-1 / sqrt(fan_in), as kaiming_uniform(a=sqrt(5)) draws it; lora_B zero, so training
    starts at the base model), drawn from a generator seeded by (seed, name). It depends on
    nothing else: a model built whole and one built empty and filled shard by shard per rank
    (`vrpo_fast.train.modules.shard_empty`) start from the same adapters."""
    import zlib

    if ".lora_B." in name:
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _linear_names(model) -> list[str]:
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


class adapters_off:
    """Context: `model`'s LoRA adapters switched off, the base weights alone (pi_ref of a LoRA
    run); on exit they are back on and trainable. The same switch as peft's
    `PeftModel.disable_adapter()`, on a model without the PeftModel wrapper."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def __enter__(self):
        for layer in self.layers:
            layer.enable_adapters(False)

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.enable_adapters(True)


def save_lora(state: dict, hf_config, lora, folder, *, base_path: str | None = None,
              merged: bool = False) -> None:
    """Write a LoRA run's final weights: the adapter in peft's format to `folder` (loadable with
    `PeftModel.from_pretrained(base, folder)`), and with `merged` the base + adapter model as a
    plain Hugging Face model to `folder`/merged.

    state: the full state dict of the model `add_lora` returned (peft's parameter names).
    """
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_config(hf_config)
    model = peft.get_peft_model(base, lora_config(lora, base_path))
    model.base_model.model.load_state_dict(state)
    model.save_pretrained(folder)
    if merged:
        model.merge_and_unload().save_pretrained(f"{folder}/merged")


def check_dtype(dtype: torch.dtype, device: torch.device, key: str = "model.dtype") -> None:
    """A weight dtype the device cannot compute in is one line naming `key`."""
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{key}: bfloat16 is not supported by this GPU ({device}); use "
                        f"float32")
