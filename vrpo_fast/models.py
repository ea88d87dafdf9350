"""Tiny models and a byte-level tokenizer built from a config: no hub download needed.

Used by the tests, `configs/tiny.yaml` and `vrpo-fast demo`. Real runs load a model path instead
(`load_causal_lm`).
"""

from __future__ import annotations

import torch

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
    import json
    from pathlib import Path

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


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, what: str = "model.path"):
    """Load a causal LM from a local path or hub name, with one clear error if it cannot be."""
    from transformers import AutoModelForCausalLM

    check_weight_files(path, what)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what}: cannot load a causal LM from {path!r}: {first}") from None


def load_reward_model(path: str, what: str = "aux.path", *, new_head: bool = False):
    """A sequence-classification reward model (one output, num_labels = 1) from a local path or
    hub name, with one clear error naming `what` if it cannot be loaded.

    new_head: the start of reward-model training, where `path` may be a causal LM whose body
    gets a fresh one-output head; otherwise the checkpoint must already be a one-output model.
    """
    from transformers import AutoModelForSequenceClassification

    check_weight_files(path, what)
    extra = {"num_labels": 1} if new_head else {}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation="sdpa", **extra)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what}: cannot load a reward model from {path!r}: {first}") from None
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

    try:
        return _positions(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what}: cannot read a model config from {path!r}: {first}") from None


def _positions(config) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def load_tokenizer(name: str | None, what: str = "model.tokenizer"):
    """'byte' (or None with a tiny model) gives the built-in tokenizer; else AutoTokenizer."""
    if name in (None, "byte"):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what}: cannot load a tokenizer from {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_from_config(cfg, which: str = "policy", dtype: torch.dtype | None = None):
    """The policy's starting point (`which="policy"`) or pi_ref (`which="ref"`) of a Config,
    in `dtype` (default: model.dtype).

    pi_ref is ref.path when set, otherwise the same weights as the policy's starting point.
    """
    if dtype is None:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    path = cfg.ref.path if which == "ref" and cfg.ref.path else cfg.model.path
    what = "ref.path" if which == "ref" and cfg.ref.path else "model.path"
    if path:
        return load_causal_lm(path, dtype=dtype, what=what)
    return build_tiny_causal_lm(seed=cfg.model.seed, dtype=dtype, **(cfg.model.tiny or {}))


def tokenizer_from_config(cfg):
    return load_tokenizer(cfg.model.tokenizer or cfg.model.path, "model.tokenizer")
