"""vrpo_fast: a high-throughput trainer for Variance-Reduced Preference Optimization.

Public API (imported lazily so that `import vrpo_fast` stays cheap):

    vrpo_loss, vrpo_reward_loss, pairwise_loss      the objective (vrpo_fast.objective)
    sequence_logps                                  packed / naive sequence log-probs
    pack_groups                                     shared-prefix packing
    linear_logprobs, FusedLinearVRPOLoss            fused LM-head log-probs and loss
"""

__version__ = "0.1.0"

_EXPORTS = {
    "vrpo_loss": "vrpo_fast.objective",
    "vrpo_reward_loss": "vrpo_fast.objective",
    "pairwise_loss": "vrpo_fast.objective",
    "LOSS_TYPES": "vrpo_fast.objective",
    "ESTIMATORS": "vrpo_fast.objective",
    "sequence_logps": "vrpo_fast.logprobs",
    "chunked_linear_logprobs": "vrpo_fast.chunked",
    "pack_groups": "vrpo_fast.packing",
    "PackedBatch": "vrpo_fast.packing",
    "linear_logprobs": "vrpo_fast.ops",
    "FusedLinearVRPOLoss": "vrpo_fast.ops",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vrpo_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
