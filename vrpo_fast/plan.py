"""Per-rank memory of a training config before it runs, by component, and the largest packing
budget that fits a GPU.

    vrpo-fast plan --config FILE [--gpus N] [--gpu-memory GB] [--section.key=value ...]

The model's shape comes from a meta-device build of its config (no weights are read): parameter
counts are exact, LoRA adapters included. Each component is the bytes one rank holds at the
step's peak (the end of the backward pass, where every gradient exists and the activations of
the first layer are still alive):

    weights      all parameters / N in model.dtype (FSDP2 shards every tensor over N ranks)
    gradients    trainable parameters / N in model.dtype
    optimizer    AdamW's two moments / N, in the parameters' dtype
    fsdp         unsharded copies in the compute dtype: the root (embedding, final norm, LM
                 head, unsharded for the whole forward and backward) and two decoder layers
                 (the one computing and the one prefetched), their gradients before the reduce-
                 scatter; none on one full-precision process without offload (no FSDP)
    activations  what autograd keeps for backward: per token and layer, the tensors a Llama-style
                 decoder layer saves (ACT_D x hidden + ACT_KV x kv width + ACT_I x intermediate
                 values, listed at ACT_D below); with activation checkpointing one hidden
                 state per token and layer plus one layer's full set (its recomputation)
    lm_head      the fused log-prob kernel's backward: the gathered hidden states (N_tok x D),
                 their float32 gradient, and one vocabulary chunk of dz (<= 64 MiB)
    ref, aux     frozen copies (weights / N in their dtype, their FSDP root when sharded):
                 pi_ref with ref.source = online and no LoRA (LoRA's reference is the base
                 weights), aux models of aux.mode lm, lagged and reward_model
    lora         the adapters' weights, gradients and AdamW moments (then "weights" is the frozen
                 base and gradients/optimizer are zero)

With train.cpu_offload, weights, gradients and optimizer states live in host memory (listed
under "host"); the device holds the FSDP copies, activations and head. Attention without a
T x T mask (FlexAttention, cascade) keeps nothing that grows with the square of the row.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vrpo_fast.config import add_config_arguments, config_from_args
from vrpo_fast.errors import UserError
from vrpo_fast.models import add_lora, tiny_llama_config
from vrpo_fast.train.modules import decoder_layers

# Values per token and decoder layer that a Llama-style layer keeps for backward (autograd's
# saved tensors, in the compute dtype): per RMSNorm its input, the normalised input and the
# weighted output (6 x D for two); q after rotary embedding, k and v repeated to every query
# head (grouped-query attention), the attention output and its contiguous o_proj input
# (5 x D); k after rotary embedding and v at their own width (2 x kv width); gate, silu(gate),
# up and the down-projection input (4 x intermediate).
ACT_D, ACT_KV, ACT_I = 11, 2, 4
DZ_CHUNK_BYTES = 64 * 2**20      # kernels/linear_logprob.py: the backward's vocabulary chunk
GIB = 2**30


@dataclasses.dataclass
class Shape:
    """What the memory model needs of a causal LM, counted on its meta-device build."""
    params: int                 # every parameter (with LoRA: base + adapters)
    trainable: int              # parameters the optimizer steps
    lora: int                   # adapter parameters (0 without LoRA)
    root: int                   # parameters outside the decoder layers (embedding, norm, head)
    layer: int                  # the largest decoder layer's parameters
    layers: int
    hidden: int
    kv_width: int
    intermediate: int
    vocab: int


def _meta_model(config, lora=None):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if lora is not None and lora.enabled:
        model = add_lora(model, lora)
    return model


def model_shape(config, lora=None) -> Shape:
    """The Shape of a transformers config (a LlamaConfig, Qwen2Config, ...), LoRA optional."""
    model = _meta_model(config, lora)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    layers = decoder_layers(model)
    in_layers = sum(p.numel() for p in layers.parameters())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Shape(params=params, trainable=trainable, lora=adapters, root=params - in_layers,
                 layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                 layers=len(layers), hidden=config.hidden_size, kv_width=kv * head_dim,
                 intermediate=config.intermediate_size, vocab=config.vocab_size)


def config_shape(cfg, which: str = "policy"):
    """The transformers config of the policy (or of aux.path: `which="aux"`) of a Config."""
    if which == "policy" and cfg.model.tiny is not None and not cfg.model.path:
        return tiny_llama_config(**cfg.model.tiny)
    from transformers import AutoConfig

    path, key = (cfg.aux.path, "aux.path") if which == "aux" else (cfg.model.path, "model.path")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: cannot read a model config from {path!r}: {first}") from None


@dataclasses.dataclass
class Plan:
    components: dict[str, int]      # bytes per rank on the device, by component
    host: dict[str, int]            # bytes per rank in host memory (CPU offload)
    tokens: int                     # tokens per micro-batch the plan is for

    @property
    def total(self) -> int:
        return sum(self.components.values())


def plan_memory(cfg, *, gpus: int = 1, tokens: int, device: str = "cuda",
                shape: Shape | None = None, aux_shape: Shape | None = None) -> Plan:
    """Per-rank bytes of one training step of `cfg` on `gpus` ranks with `tokens` tokens per
    micro-batch (a packed batch's rows x width). device: "cuda" (train.mixed_precision auto =
    bf16 compute) or "cpu" (float32 compute, as the trainer runs there)."""
    t = cfg.train
    shape = shape or model_shape(config_shape(cfg), cfg.lora)
    wbytes = 2 if cfg.model.dtype == "bfloat16" else 4
    mixed = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and device == "cuda")
    cbytes = 2 if mixed else wbytes
    fsdp = mixed or t.cpu_offload or gpus > 1
    n = gpus
    frozen = shape.params - shape.trainable
    trainable = shape.trainable - shape.lora
    comp = {
        "weights": math.ceil(frozen * wbytes / n) + math.ceil(trainable * wbytes / n),
        "gradients": math.ceil(trainable * wbytes / n),
        "optimizer": math.ceil(2 * trainable * wbytes / n),
        "lora": math.ceil(4 * shape.lora * wbytes / n),
    }
    host = {}
    if t.cpu_offload:
        host = {k: comp.pop(k) for k in ("weights", "gradients", "optimizer", "lora")}
    train_frac = shape.trainable / shape.params
    comp["fsdp"] = round((shape.root + 2 * shape.layer) * cbytes * (1 + train_frac)) \
        if fsdp else 0
    per_layer = cbytes * (ACT_D * shape.hidden + ACT_KV * shape.kv_width
                          + ACT_I * shape.intermediate)
    if t.activation_checkpointing:
        comp["activations"] = tokens * (shape.layers * shape.hidden * cbytes + per_layer)
    else:
        comp["activations"] = tokens * shape.layers * per_layer
    comp["lm_head"] = tokens * shape.hidden * (cbytes + 4) + min(
        DZ_CHUNK_BYTES, tokens * shape.vocab * cbytes)

    def frozen_copy(s: Shape, nbytes: int) -> int:
        return math.ceil(s.params * nbytes / n) + (round(s.root * cbytes) if fsdp else 0)

    comp["ref"] = frozen_copy(shape, wbytes) \
        if cfg.ref.source == "online" and not cfg.lora.enabled else 0
    comp["aux"] = 0
    if cfg.aux.mode == "lagged":
        comp["aux"] = frozen_copy(shape, wbytes)
    elif cfg.aux.mode in ("lm", "reward_model"):
        aux_shape = aux_shape or model_shape(config_shape(cfg, "aux"))
        comp["aux"] = frozen_copy(aux_shape, 4)      # aux models load in float32
    return Plan(comp, host, tokens)


def largest_tokens(cfg, *, gpus: int, budget: int, device: str = "cuda",
                   shape: Shape | None = None) -> int:
    """The most tokens per micro-batch whose plan fits `budget` bytes per rank (0: none)."""
    shape = shape or model_shape(config_shape(cfg), cfg.lora)

    def fits(tokens: int) -> bool:
        return plan_memory(cfg, gpus=gpus, tokens=tokens, device=device,
                           shape=shape).total <= budget

    if not fits(0):
        return 0
    low, high = 0, 1                 # the plan grows with tokens: fits(low), not fits(high)
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def fewest_gpus(cfg, *, budget: int, tokens: int, device: str = "cuda",
                shape: Shape | None = None, most: int = 4096) -> int | None:
    """The fewest ranks whose per-rank plan at `tokens` fits `budget` bytes (None: none up to
    `most`)."""
    shape = shape or model_shape(config_shape(cfg), cfg.lora)
    n = 1
    while n <= most:
        if plan_memory(cfg, gpus=n, tokens=tokens, device=device, shape=shape).total <= budget:
            return n
        n *= 2
    return None


# -- the command -----------------------------------------------------------------------------

def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) the run shards over")
    parser.add_argument("--gpu-memory", type=float, default=80.0,
                        help="memory of one GPU in GiB (default 80)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per micro-batch to plan for (default train.max_tokens, "
                             "else 4096)")
    parser.add_argument("--group-tokens", type=int, default=None,
                        help="tokens of one packed prompt group (its prompt once and its 2 + 2M "
                             "responses, e.g. the data's largest): the plan then also says how "
                             "many groups a micro-batch that fits holds "
                             "(train.micro_batch_groups)")


def run(args) -> int:
    """Print the plan by component, whether it fits, and the largest packing budget that does;
    a plan that does not fit is one error line naming the component that breaks the budget."""
    if args.gpus < 1:
        raise UserError(f"--gpus: must be >= 1, got {args.gpus}")
    if not 0 < args.gpu_memory < math.inf:
        raise UserError(f"--gpu-memory: must be a number of GiB > 0, got {args.gpu_memory}")
    if args.tokens is not None and args.tokens < 1:
        raise UserError(f"--tokens: must be >= 1, got {args.tokens}")
    if args.group_tokens is not None and args.group_tokens < 1:
        raise UserError(f"--group-tokens: must be >= 1, got {args.group_tokens}")
    cfg = config_from_args(args)
    tokens = args.tokens or cfg.train.max_tokens or 4096
    budget = int(args.gpu_memory * GIB)
    shape = model_shape(config_shape(cfg), cfg.lora)
    plan = plan_memory(cfg, gpus=args.gpus, tokens=tokens, shape=shape)
    print(f"plan: {shape.params / 1e9:.3f}B parameters ({shape.trainable / 1e9:.3f}B trained), "
          f"{args.gpus} GPU(s) of {args.gpu_memory:g} GiB, {tokens} tokens per micro-batch")
    for name, nbytes in sorted(plan.components.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<12} {_size(nbytes)}")
    for name, nbytes in plan.host.items():
        print(f"  host:{name:<7} {_size(nbytes)}")
    print(f"  {'total':<12} {_size(plan.total)} per GPU")
    most = largest_tokens(cfg, gpus=args.gpus, budget=budget, shape=shape)
    if plan.total > budget:
        worst = max(plan.components, key=plan.components.get)
        need = fewest_gpus(cfg, budget=budget, tokens=tokens, shape=shape)
        hint = f"{need} GPUs fit it" if need else "no number of GPUs fits it"
        raise UserError(f"--gpu-memory: the plan needs {_size(plan.total).strip()} per GPU, "
                        f"over {args.gpu_memory:g} GiB; the largest component is {worst} "
                        f"({_size(plan.components[worst]).strip()}); {hint}"
                        + (f", or at most {most} tokens per micro-batch" if most else ""))
    print(f"fits; the largest packing budget that fits: {most} tokens per micro-batch "
          f"(train.max_tokens)")
    if args.group_tokens:
        groups = most // args.group_tokens
        mb = cfg.train.micro_batch_groups
        verdict = "fits" if mb <= groups else "is over it"
        print(f"micro-batch: at {args.group_tokens} tokens per prompt group, up to {groups} "
              f"groups (train.micro_batch_groups = {mb} {verdict})" if groups else
              f"micro-batch: a prompt group of {args.group_tokens} tokens does not fit")
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:9.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:9.2f} MiB"
