"""FSDP2 for the models of a training step: each decoder layer sharded, then the wrapper
(`vrpo_fast.passes.SequenceLogps` / `SequenceRewards`) as the root, so that one root's hooks
unshard the embedding, final norm and LM head for the whole forward, including the head that
runs outside the transformers model's forward.

One process computing in the parameters' own dtype gets no FSDP at all: its unshard, reshard
and gradient reduce would be copies of whole tensors with nothing to gather or reduce. With
mixed precision FSDP stays, because its unshard is the bf16 cast the step computes in (the maths
of one rank and of many must not differ); with CPU offload it stays too, because its unshard is
the host-to-device copy. Checkpoints are the same either way: DCP saves plain
tensors and DTensors under the same names, and reshards between them on load.
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


def needs_fsdp(mixed_precision: bool) -> bool:
    """Whether `shard` wraps in FSDP2 without CPU offload (which always does): several ranks,
    or mixed precision (module docstring)."""
    import torch.distributed as dist

    return mixed_precision or (dist.is_initialized() and dist.get_world_size() > 1)


def shard(wrapper: nn.Module, inner: nn.Module, *, mixed_precision: bool, reshard: bool = True,
          activation_checkpointing: bool = False, compile_layers: bool = False,
          cpu_offload: bool = False) -> nn.Module:
    """FSDP2: fully_shard each decoder layer, then the wrapper as the root; the wrapper as it
    is when `needs_fsdp` says no. Activation checkpointing and layer compilation either way.

    cpu_offload: FSDP2's CPUOffloadPolicy: the sharded parameters, their gradients and hence
    the optimizer states stay in pinned host memory (on a GPU); each layer is copied to the
    device for its forward and backward, and the optimizer steps on the host."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

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
    fsdp = cpu_offload or needs_fsdp(mixed_precision)
    extra = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} \
        if cpu_offload else {}
    for layer in decoder_layers(inner):
        if compile_layers:
            layer.compile()
        if fsdp:
            fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard, **extra)
    if fsdp:
        fully_shard(wrapper, mp_policy=mp, reshard_after_forward=reshard, **extra)
    return wrapper
