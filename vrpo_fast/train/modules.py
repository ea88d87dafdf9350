"""FSDP2 for the models of a training step: each decoder layer sharded, then the wrapper
(`vrpo_fast.passes.SequenceLogps` / `SequenceRewards`) as the root, so that one root's hooks
unshard the embedding, final norm and LM head for the whole forward, including the head that
runs outside the transformers model's forward.
"""

from __future__ import annotations

import torch
from torch import nn


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
