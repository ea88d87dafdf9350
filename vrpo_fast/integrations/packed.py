"""The packed log-prob pass as a model forward.

Wrappers that act in a module's forward see only what runs inside it: DDP prepares its gradient
reduction there, FSDP2 unshards the root's parameters (embeddings, final norm, LM head) in its
pre-forward hook, DeepSpeed ZeRO-3 gathers partitioned weights. A trainer that calls the body
and then multiplies by `lm_head.weight` outside would miss them. `add_packed_forward` patches a
transformers causal LM so that `model(vrpo_batch=batch)` returns the (G, K) sequence log-probs of
a `PackedBatch` from inside the forward (body on the packed rows, the fused log-prob operation on
the response positions only), and any wrapper around the model covers it. Called without
`vrpo_batch` the forward is the original one (generation, TRL's own calls).
"""

from __future__ import annotations

import functools
import types

from torch import nn

from vrpo_fast.logprobs import _body, lm_head_weight, packed_logps


def add_packed_forward(model: nn.Module, temperature: float = 1.0) -> nn.Module:
    """Patch `model.forward` in place (idempotent); returns the model.

    ValueError, before any forward, when the packed path cannot run the model: no `.model`
    body, no linear LM head, a head with a bias or a logit softcap.
    """
    _body(model)
    lm_head_weight(model)
    if getattr(model, "_vrpo_packed_forward", None) == temperature:
        return model
    original = getattr(model, "_vrpo_original_forward", model.forward)

    # functools.wraps keeps the signature: transformers' Trainer inspects it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, vrpo_batch=None, **kwargs):
        if vrpo_batch is None:
            return original(*args, **kwargs)
        # A fresh tensor, not a view: FSDP2's pre-backward hook must not sit on a view.
        return packed_logps(self, vrpo_batch, temperature).clone()

    model._vrpo_original_forward = original
    model._vrpo_packed_forward = temperature
    model.forward = types.MethodType(forward, model)
    return model
