"""Shapes of popular models, so that a benchmark runs at a real model's LM head (hidden size D,
vocabulary V) or builds a randomly initialised model of its architecture for the step
benchmark, without downloading anything. Numbers from each model's published config.json."""

from __future__ import annotations

from dataclasses import dataclass

from vrpo_fast.errors import UserError


@dataclass(frozen=True)
class Preset:
    """One model's shape: LM head (hidden, vocab) and decoder (layers, heads, kv_heads,
    intermediate, arch, tie = input embedding tied to the LM head)."""

    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    arch: str = "llama"
    tie: bool = False


PRESETS: dict[str, Preset] = {
    "llama3-8b": Preset(4096, 128256, 32, 32, 8, 14336),
    "llama3.1-8b": Preset(4096, 128256, 32, 32, 8, 14336),
    "llama3.1-70b": Preset(8192, 128256, 80, 64, 8, 28672),
    "llama3.2-1b": Preset(2048, 128256, 16, 32, 8, 8192, tie=True),
    "llama3.2-3b": Preset(3072, 128256, 28, 24, 8, 8192, tie=True),
    "mistral-7b-v0.3": Preset(4096, 32768, 32, 32, 8, 14336),
    "qwen2.5-0.5b": Preset(896, 151936, 24, 14, 2, 4864, arch="qwen2", tie=True),
    "qwen2.5-1.5b": Preset(1536, 151936, 28, 12, 2, 8960, arch="qwen2", tie=True),
    "qwen2.5-3b": Preset(2048, 151936, 36, 16, 2, 11008, arch="qwen2", tie=True),
    "qwen2.5-7b": Preset(3584, 152064, 28, 28, 4, 18944, arch="qwen2"),
    "qwen2.5-14b": Preset(5120, 152064, 48, 40, 8, 13824, arch="qwen2"),
}


def preset(name: str, what: str = "--preset") -> Preset:
    if name not in PRESETS:
        raise UserError(f"{what}: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def describe() -> str:
    """One line per preset, for --help."""
    return "\n".join(f"  {name:<16} D={p.hidden:<5} V={p.vocab:<6} {p.layers} layers, "
                     f"{p.heads}/{p.kv_heads} heads, {p.arch}" for name, p in PRESETS.items())


def tiny_config(name: str, layers: int | None = None, max_positions: int = 32768) -> dict:
    """A preset as `model.tiny` keys (vrpo_fast.models.tiny_llama_config): a config that says
    `model.tiny: <this>` (and `model.tokenizer: byte`) trains a randomly initialised model of the
    preset's shape, `layers` decoder layers deep (default all), where the real model cannot be
    downloaded (scripts/gpu_check.sh). Rotary and norm constants stay the defaults: they
    change no shape and no cost."""
    p = preset(name)
    return dict(arch=p.arch, vocab_size=p.vocab, hidden_size=p.hidden,
                num_layers=layers or p.layers, num_heads=p.heads, num_kv_heads=p.kv_heads,
                intermediate_size=p.intermediate, tie_word_embeddings=p.tie,
                max_position_embeddings=max_positions)
