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

A model that FSDP2 will shard is never whole in any rank's memory when it comes from a local
safetensors folder: it is built empty (parameters on the meta device), sharded, and each rank
allocates and reads only its own rows of every tensor (`shard_empty`).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from vrpo_fast.errors import UserError


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


def shard_empty(wrapper: nn.Module, inner: nn.Module, *, device: torch.device,
                files: dict[str, Path] | None, what: str, initial=None,
                **shard_kwargs) -> nn.Module:
    """`shard` for a model built empty (`vrpo_fast.models.parameters_on_meta`), then its
    memory and values: `to_empty` allocates each rank's own shards only, and each parameter's
    local rows are read from the safetensors `files` (tensor name -> file,
    `vrpo_fast.models.weight_files`), so no rank holds more than its shard of the model in host
    or device memory. Every rank reads its own part: the files must be visible to every rank
    (one node, or a shared file system).

    Tensors the empty model already held for real keep their values (buffers computed from
    the config: rotary frequencies). Parameters that are in no file take
    `initial(name, shape)` (a full tensor, of which each rank keeps its rows: the LoRA
    adapters' initial values; base weights are read under their checkpoint names, without
    peft's `.base_layer`). files None: parameters left uninitialised for the caller to fill
    (the lagged copy of aux.mode lagged, from the policy).
    `what` names the config key in errors (a tensor the files lack, a shape that differs).
    """
    kept = {name: t.detach().clone()
            for name, t in chain(inner.named_parameters(), inner.named_buffers()) if not t.is_meta}
    wrapper = shard(wrapper, inner, **shard_kwargs)
    wrapper.to_empty(device=device)
    by_file: dict[Path, list] = defaultdict(list)
    with torch.no_grad():
        for name, buf in inner.named_buffers():
            buf.copy_(kept[name])
        for name, param in inner.named_parameters():
            local, start, stop = _local_rows(param)
            key = name.replace(".base_layer.", ".")
            value = kept.get(name)
            if value is None and initial is not None and (files is None or key not in files):
                value = initial(name, param.shape)
            if value is not None:
                local.copy_(value[start:stop] if local.dim() else value)
            elif files is not None:
                if key not in files:
                    raise UserError(f"{what}: the weight files have no tensor {key!r} (the "
                                    f"model's config asks for one)")
                by_file[files[key]].append((key, param, local, start, stop))
        for file, params in by_file.items():
            _fill_from(file, params, what)
    return wrapper


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, first row, end row) of a parameter: FSDP2 shards dim 0 in
    torch.chunk pieces of ceil(n / world) rows; a plain tensor is all its rows."""
    from torch.distributed.tensor import DTensor

    n = param.shape[0] if param.dim() else 1
    if not isinstance(param, DTensor) or not any(p.is_shard() for p in param.placements):
        return (param.to_local() if isinstance(param, DTensor) else param), 0, n
    (placement,) = param.placements
    assert placement.is_shard(0), placement
    mesh = param.device_mesh
    chunk = -(-n // mesh.size())
    start = min(mesh.get_local_rank() * chunk, n)
    stop = min(start + chunk, n)
    local = param.to_local()
    assert local.shape[0] == stop - start, (local.shape, start, stop)
    return local, start, stop


def _fill_from(file: Path, params: list, what: str) -> None:
    from safetensors import safe_open

    with safe_open(file, framework="pt", device="cpu") as f:
        for key, param, local, start, stop in params:
            piece = f.get_slice(key)
            shape = tuple(piece.get_shape())
            if shape != tuple(param.shape):
                raise UserError(f"{what}: {file.name} holds {key!r} with shape {list(shape)}; "
                                f"the model's config asks for {list(param.shape)}")
            local.copy_(_read_rows(piece, start, stop) if local.dim() else piece[:])


def _read_rows(piece, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a safetensors tensor slice: only those bytes are read."""
    return piece[start:stop]
