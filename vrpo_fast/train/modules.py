"""The models of a training step, each wrapped so that ONE FSDP root covers its body and head.

`SequenceLogps` turns a causal LM into packed batch -> (G, K) sequence log-probs (body on the
packed rows, LM head only on response positions, fused log-prob kernel); `SequenceRewards`
turns a sequence-classification model into packed batch -> (G, K) scores at each response's last
token. Wrapping matters for FSDP2: the root's hooks unshard the embedding, final norm and LM head
for the whole forward, including the head that runs outside the transformers model's forward.
"""

from __future__ import annotations

import torch
from torch import nn

from vrpo_fast.logprobs import packed_body, packed_logps


class SequenceLogps(nn.Module):
    def __init__(self, lm: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.temperature = temperature

    def forward(self, batch) -> torch.Tensor:
        """batch: PackedBatch of G groups x K responses -> (G, K) float32 log p(y | x)."""
        # A fresh tensor, not a view: FSDP2's pre-backward hook must not sit on a view.
        return packed_logps(self.lm, batch, self.temperature).clone()


class SequenceRewards(nn.Module):
    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, batch) -> torch.Tensor:
        """batch: PackedBatch -> (G, K) float32 scalar rewards at each response's last token."""
        hidden = packed_body(self.classifier, batch)              # (R, T, D)
        last = hidden.flatten(0, 1)[batch.last_index]             # (G*K, D)
        scores = self.classifier.score(last).squeeze(-1)
        return scores.float().reshape(batch.num_groups, batch.group_size).clone()


def decoder_layers(model: nn.Module):
    """The ModuleList of transformer blocks of a transformers causal LM or classifier."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (expected "
                     f"model.model.layers as in Llama/Qwen2/Mistral)")


def shard(wrapper: nn.Module, inner: nn.Module, *, mixed_precision: bool, reshard: bool = True,
          activation_checkpointing: bool = False, compile_layers: bool = False) -> nn.Module:
    """FSDP2: fully_shard each decoder layer, then the wrapper as the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The inputs are a PackedBatch of token ids and positions: nothing to cast (and FSDP's cast
    # rebuilds dataclass inputs with dataclasses.replace, which a PackedBatch's mask cache, an
    # init=False field, refuses).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                              cast_forward_inputs=False) \
        if mixed_precision else MixedPrecisionPolicy(cast_forward_inputs=False)
    if activation_checkpointing:
        # transformers' own wrapper keeps parameter names, so checkpoints and the final
        # Hugging Face save are unchanged.
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(inner):
        if compile_layers:
            layer.compile()
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(wrapper, mp_policy=mp, reshard_after_forward=reshard)
    return wrapper
