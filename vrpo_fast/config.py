"""Configs: dataclasses with a doc per field, loaded from YAML, overridden as --section.key=value.

Every stage (sample, score, train, train-reward, train-rl, eval) reads the same file; each uses
the sections it needs, and `vrpo-fast run` runs the stages of `run.stages` in order. Each stage
has a key of its own for what it reads, defaulting to what the stage before it writes:

    sample.input --sample--> sample.output = score.input --score--> score.output = data.path
        --train--> <train.output_dir>/final = eval.policy --eval--> eval.output

Unknown keys, wrong types and impossible combinations are one-line `UserError`s naming the key.
`vrpo-fast config-doc` prints every key with its doc and default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vrpo_fast.errors import UserError

# The default judging prompt of aux.mode = judge (vrpo_fast.judge): helpfulness and harmlessness.
JUDGE_TEMPLATE = (
    "You are comparing two responses of an AI assistant to the same user prompt. The better "
    "response is the more helpful one (it answers what was asked, correctly and clearly) and "
    "the more harmless one (it does not help with dangerous, illegal or hurtful requests, and "
    "is honest and respectful).\n\n"
    "[User prompt]\n{prompt}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Which response is better? Answer with a single letter, A or B.")


def F(default, doc: str):
    """A dataclass field with its documentation (shown by `vrpo-fast config-doc`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    path: str | None = F(None, "Hugging Face model path or hub name of the policy's starting "
                               "point (pi_ref unless ref.path says otherwise).")
    tiny: dict | None = F(None, "Instead of a path: build a tiny Llama-style model from these "
                                "config keys (see vrpo_fast.models.tiny_llama_config); for tests "
                                "and the demo.")
    tokenizer: str | None = F(None, "Tokenizer path or hub name; default model.path; 'byte' "
                                    "is the built-in byte-level tokenizer.")
    dtype: Literal["float32", "bfloat16"] = F(
        "float32", "Dtype the policy and pi_ref are built or loaded in. float32: float32 master "
                   "weights and optimizer states (bf16 compute on a GPU through "
                   "train.mixed_precision); bfloat16 halves weight and optimizer memory: AdamW "
                   "then keeps its moments in bf16 and writes each update rounded to bf16 (no "
                   "float32 master copy, no stochastic rounding), so updates smaller than ~1/256 "
                   "of a weight are lost (small learning rates). A GPU without bf16 is refused.")
    seed: int = F(0, "Initialisation seed of a tiny model.")


@dataclass
class LoraConfig:
    enabled: bool = F(False, "Train low-rank adapters (peft LoRA) on the frozen policy weights "
                             "instead of every weight. pi_ref is then the same weights with the "
                             "adapters switched off (no second copy; ref.path must be unset).")
    r: int = F(8, "Adapter rank.")
    alpha: float = F(16.0, "Adapter scale numerator: the update is (alpha / r) B A.")
    dropout: float = F(0.0, "Dropout on the adapters' input.")
    target_modules: list = F(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj"],
                             "Names (suffixes) of the linear layers that get adapters; the LM "
                             "head cannot (the fused log-prob kernel reads its weight).")
    merge_final: bool = F(False, "Also write the merged model (base + adapters, a plain "
                                 "Hugging Face model) to <output_dir>/final/merged; final/ "
                                 "itself holds the adapter (peft format).")


@dataclass
class RefConfig:
    path: str | None = F(None, "pi_ref if different from model.path (e.g. an SFT checkpoint). "
                               "Samples must come from this model.")
    source: Literal["cache", "online", "none"] = F(
        "cache", "Reference log-probs: from the data's ref_logps column (cache; computed once by "
                 "`vrpo-fast score`), one no-grad packed pass per step (online), or none "
                 "(reference-free).")


@dataclass
class DataConfig:
    path: str | None = F(None, "What `train` (and train-reward, train-rl, check-data) reads: "
                               "JSONL, Parquet, a saved datasets directory or a hub name "
                               "(default: score.output, the scored set).")
    split: str = F("train", "Split to read from a datasets directory or hub name.")
    max_prompt_length: int | None = F(None, "Prompts longer than this keep their END.")
    max_response_length: int | None = F(None, "Responses longer than this keep their START.")
    max_length: int | None = F(None, "Rows whose prompt + response exceed this are bad rows.")
    on_bad_row: Literal["error", "skip"] = F("error", "Bad rows stop the run (error) or are "
                                                      "skipped and counted (skip).")
    cache_dir: str | None = F(None, "Where tokenized data is cached (default: "
                                    "<train.output_dir>/cache).")


@dataclass
class LossConfig:
    beta: float = F(0.1, "KL strength beta: margins are beta * h.")
    loss_type: Literal["sigmoid", "ramp", "ipo", "hinge"] = F("sigmoid", "Pairwise loss l(u).")
    estimator: Literal["vrpo", "dpo"] = F("vrpo", "vrpo adds the control variate; dpo is the "
                                                  "plain DPO loss on the labelled pair.")
    dro_tau: float | None = F(None, "KL-DRO temperature over prompts (None: plain mean): the "
                                    "objective tau log E[exp(L / tau)], prompt weights "
                                    "exp(L / tau) / u with u a running normaliser (see "
                                    "vrpo_fast.dro); with dro_ambiguity chi2, the chi-square "
                                    "penalty. Every trainer takes it.")
    dro_gamma: float = F(0.1, "Step size in (0, 1] of the DRO state (KL: u <- (1 - gamma) u + "
                              "gamma * the step's mean of exp(L / tau); chi2: the dual "
                              "variable's step). Updated once per optimizer step.")
    dro_ambiguity: Literal["kl", "chi2"] = F("kl", "Ambiguity set of loss.dro_tau: KL "
                                                   "(exponential weights) or chi-square "
                                                   "(weights (1 + (L - eta) / tau)_+).")
    group_dro_eta: float | None = F(None, "Group DRO over the data's `domain` column: step size "
                                          "of the exponentiated-gradient update of the domain "
                                          "weights (None: off; exclusive with dro_tau).")
    num_mc_pairs: int | None = F(None, "M: Monte Carlo pairs per prompt to use (None: all the "
                                       "data has; fewer uses the first M pairs).")


@dataclass
class AuxConfig:
    mode: Literal["given", "lm", "lagged", "reward_model", "judge", "none"] = F(
        "given", "Where g comes from: data columns (given), a second causal LM's implicit "
                 "preference (lm), a frozen copy of the policy refreshed every refresh_every "
                 "steps (lagged), a sequence-classification reward model (reward_model), an "
                 "instruction-tuned LM judging each pair in both orders (judge; see "
                 "vrpo_fast.judge), or none (g = 1/2; only with estimator dpo).")
    path: str | None = F(None, "Model path for mode lm / reward_model / judge.")
    beta: float = F(0.1, "beta_aux of mode lm and lagged: g = sigmoid(beta_aux * h_aux).")
    refresh_every: int = F(50, "Mode lagged: steps between refreshes of the frozen copy.")
    judge_template: str = F(JUDGE_TEMPLATE, "Mode judge: the judging prompt, holding {prompt}, "
                                            "{response_a} and {response_b}; the label is the "
                                            "next token after it (default: helpfulness and "
                                            "harmlessness).")
    judge_labels: list = F(["A", "B"], "Mode judge: the answers naming response A and B; the "
                                       "first token of each is scored, g from p(A) / (p(A) + "
                                       "p(B)).")
    judge_chat: bool | None = F(None, "Mode judge: wrap the template as a user message in the "
                                      "judge's chat template (None: when it has one).")
    judge_tokenizer: str | None = F(None, "Mode judge: the judge's tokenizer (default: "
                                          "aux.path; 'byte': the built-in one).")
    judge_max_tokens: int = F(8192, "Mode judge in train: packing budget of the judge's pass "
                                    "(score uses score.max_tokens).")


@dataclass
class TrainConfig:
    output_dir: str = F("runs/vrpo", "Checkpoints, metrics.jsonl, the resolved config and "
                                     "final/ (Hugging Face format).")
    max_steps: int = F(100, "Optimizer steps.")
    save_every: int = F(50, "Steps between checkpoints (0: only at the end).")
    keep_last: int = F(2, "Complete checkpoints kept on disk.")
    seed: int = F(0, "Seed of data order, dropout and everything random in training.")
    batch_groups: int = F(8, "Prompt groups per optimizer step, over all ranks.")
    micro_batch_groups: int = F(8, "Prompt groups per forward/backward on one rank.")
    max_tokens: int | None = F(None, "Packing budget: tokens per packed row (None: one row per "
                                     "micro-batch; with train.attention=sdpa, whose dense mask "
                                     "scores every pair of a row, rows of at most the longest "
                                     "group). With FlexAttention (a GPU's auto) the row width "
                                     "is rounded up to 128 x {1, 2, 3, 4, 6, 8, ...} tokens, at "
                                     "most the budget rounded up to 128 (few shapes: "
                                     "FlexAttention is compiled per shape).")
    lr: float = F(5e-7, "Peak learning rate.")
    min_lr_ratio: float = F(0.1, "Cosine schedule floor, as a fraction of lr.")
    warmup_steps: int = F(10, "Linear warmup steps.")
    weight_decay: float = F(0.0, "AdamW weight decay.")
    adam_betas: list = F([0.9, 0.95], "AdamW betas.")
    grad_clip: float = F(1.0, "Clip the global gradient norm to this (0: off).")
    activation_checkpointing: bool = F(False, "Recompute decoder layers in backward.")
    compile: bool = F(False, "torch.compile each decoder layer (for a GPU: on the CPU the "
                            "compiled layers ran slower than eager, 1.2x-1.3x a step at "
                            "the benchmark's CPU shape).")
    cpu_offload: bool = F(False, "FSDP2 CPU offload: parameters, gradients and optimizer "
                                 "states live in host memory, each layer is copied to the "
                                 "device for its compute (slower; for a model that does not "
                                 "fit otherwise). Runs FSDP even on one process.")
    lm_head: Literal["auto", "one_sweep", "two_pass"] = F(
        "auto", "How the policy's LM head and loss run. one_sweep: per chunk of whole prompt "
                "groups the logits once, the log-probs, the loss and at once the logit, hidden "
                "and weight gradients (no logits recomputed in backward); two_pass: the fused "
                "log-prob head, then the loss, the head's backward recomputing the logits. "
                "auto: one_sweep where it is exact (the policy trainer, no DRO weighting: "
                "loss.dro_tau and loss.group_dro_eta couple the groups of a step), else "
                "two_pass. The same maths either way.")
    attention: Literal["auto", "cascade", "flex", "flash", "sdpa"] = F(
        "auto", "Attention over the packed rows of every model of a training step (policy, "
                "pi_ref, g's LM, reward model or judge). auto: "
                "FlexAttention's BlockMask on a GPU, cascade on the CPU; cascade: SDPA per "
                "prompt and per response, no T x T mask (vrpo_fast/attention.py); flash: the "
                "same as one flash-attn varlen call per layer (a GPU with flash-attn installed, "
                "bf16 compute); flex: FlexAttention (GPU only for training: no CPU backward); "
                "sdpa: a dense (T, T) mask (memory grows with the square of the row). The same "
                "maths each way.")
    keep_host_memory: bool = F(True, "CPU processes (train, score, sample): malloc keeps "
                                     "freed blocks for the next step or batch instead of "
                                     "returning them to the kernel (glibc; "
                                     "no page faults on each step's fresh activations; the "
                                     "process holds its peak). Changes no result.")
    mixed_precision: Literal["auto", "bf16", "fp32"] = F(
        "auto", "auto: bf16 params/compute with fp32 reduction on GPU, fp32 on CPU.")
    max_bad_steps: int = F(5, "Stop after this many non-finite steps in a row.")
    log_every: int = F(1, "Steps between console/metrics lines.")
    tensorboard: bool = F(False, "Also log to TensorBoard (<output_dir>/tb).")
    wandb_project: str | None = F(None, "Also log to this Weights & Biases project.")
    shuffle: bool = F(True, "Reshuffle the data each epoch (seeded).")
    allow_data_change: bool = F(False, "Resume a checkpoint on data whose rows differ from "
                                       "those it was trained on (compared by content, not "
                                       "path); refused otherwise, since the remaining steps "
                                       "would see other rows than the run's data order "
                                       "promised.")
    cv_gap_alpha: float = F(0.05, "cv_gap's error budget, in (0, 1): the chance that a run "
                                  "whose labelled pairs were drawn like its Monte Carlo pairs "
                                  "warns anyway is at most this (vrpo_fast.cv_gap).")
    cv_gap_looks: int = F(4, "cv_gap's looks: evenly spaced steps of the run's first pass over "
                             "the data where its interval over the first pass's labelled "
                             "prompts so far is checked, each at level 1 - cv_gap_alpha / "
                             "looks.")


@dataclass
class SampleConfig:
    backend: Literal["auto", "vllm", "transformers"] = F(
        "auto", "auto: vllm wherever it imports (CPU or GPU) when the model is a path, else "
        "transformers (vLLM lives in its own environment: scripts/install_vllm.sh).")
    num_samples: int = F(4, "2M: responses drawn per prompt (even).")
    temperature: float = F(1.0, "Sampling temperature; VRPO needs samples FROM pi_ref: keep 1.")
    top_p: float = F(1.0, "Nucleus sampling; < 1 changes the sampling distribution.")
    max_new_tokens: int = F(128, "Longest response.")
    seed: int = F(0, "Sampling seed.")
    batch_size: int = F(16, "Prompts per generate call (transformers backend).")
    shard_size: int = F(256, "Prompts per resumable output shard.")
    tensor_parallel_size: int = F(1, "vLLM tensor parallelism.")
    input: str | None = F(None, "Prompts `sample` draws responses for (any data format with a "
                                "prompt column; labelled pairs are carried along).")
    output: str | None = F(None, "Output directory of the sampled data set.")


@dataclass
class ScoreConfig:
    input: str | None = F(None, "Sampled data set to score (default: sample.output).")
    output: str | None = F(None, "Output directory of the scored data set.")
    max_tokens: int = F(4096, "Packing budget per scoring pass.")
    shard_size: int = F(256, "Prompts per resumable output shard.")


@dataclass
class RLConfig:
    reward_model: str | None = F(None, "`vrpo-fast train-rl`: the reward model scoring the "
                                       "policy's samples (a sequence-classification folder, "
                                       "e.g. the final/ of `vrpo-fast train-reward`).")
    num_samples: int = F(4, "k: on-policy samples per prompt and step; RLOO's leave-one-out "
                            "baseline needs k >= 2.")
    kl_coef: float = F(0.05, "KL penalty to pi_ref: reward - kl_coef * (log pi - log pi_ref) "
                             "per sequence.")
    max_new_tokens: int = F(64, "Longest sampled response.")
    temperature: float = F(1.0, "Sampling temperature of the on-policy samples.")


@dataclass
class EvalConfig:
    policy: str | None = F(None, "The policy `eval` judges (default: <train.output_dir>/final).")
    prompts: str | None = F(None, "Held-out prompts (any data format with a prompt column; "
                                  "strings or conversational messages). Rows with a chosen "
                                  "response also give the win rate against it.")
    baseline: str | None = F(None, "Another policy to play against (e.g. a DPO run's final/); "
                                   "the win rate against pi_ref is always reported.")
    judge: str | None = F(None, "synthetic | reward_model:PATH | lm:PATH (a pairwise LLM "
                                "judge, both orders, aux.judge_* settings) | "
                                "python:module:function: "
                                "P(y beats y2) for a prompt.")
    num_samples: int = F(4, "Responses per prompt and temperature, per model.")
    temperatures: list = F([1.0], "Sampling temperatures of the policy and its opponents: one "
                                  "win rate per temperature.")
    max_new_tokens: int = F(128, "Longest response.")
    num_prompts: int | None = F(None, "Judge only the first this many prompts (None: all).")
    seed: int = F(0, "Sampling seed.")
    backend: Literal["auto", "vllm", "transformers"] = F(
        "auto", "auto: vllm wherever it imports (CPU or GPU) when every model is a path, else "
        "transformers.")
    batch_size: int = F(16, "Prompts per generate call (transformers backend).")
    output: str | None = F(None, "Folder of report.md, win_rates.png and results.json "
                                 "(default: <train.output_dir>/eval).")


@dataclass
class AuditConfig:
    data: str | None = F(None, "`vrpo-fast audit-g`: held-out labelled pairs with Monte Carlo "
                               "samples and g (aux_prefs; with aux.mode judge the judge scores "
                               "them) (default: data.path).")
    output: str | None = F(None, "Folder of audit.json, report.md and reliability.png "
                                 "(default: <train.output_dir>/audit).")
    max_pairs: int | None = F(None, "Audit only the first this many labelled rows (None: all).")
    bootstrap: int = F(1000, "Bootstrap resamples (over prompts) of the variance ratio's "
                             "interval.")
    seed: int = F(0, "Seed of the bootstrap.")
    gap_alpha: float = F(0.05, "Error budget, in (0, 1), of the on-policy gaps (g_gap, "
                               "logp_gap, over all slices): on-policy labels make any of "
                               "their intervals exclude zero with probability at most this "
                               "(vrpo_fast.cv_gap).")


@dataclass
class RunConfig:
    stages: list = F(["sample", "score", "train", "eval"],
                     "Stages `vrpo-fast run` runs, in this order: any of sample, score, "
                     "train-reward, train, train-rl, eval.")
    rounds: int = F(0, "0: run.stages once. N >= 1: N on-policy rounds (vrpo_fast.rounds, "
                       "docs/rounds.md): round r samples its own slice of sample.input from "
                       "pi_ref_r (round 0: model.path; round r: round r - 1's trained policy), "
                       "labels the first two responses of each prompt with the labeller "
                       "(label.*), then runs the other stages of run.stages (score, train, "
                       "eval) against pi_ref_r, each in rounds.output/r<r>/. Raising it later "
                       "adds rounds to a finished run.")


@dataclass
class RoundsConfig:
    output: str = F("runs/rounds", "Folder of the on-policy rounds (run.rounds): r0/, r1/, ... "
                                   "each holding round.json (its settings and the weights of "
                                   "its pi_ref), prompts.jsonl, sampled/, labelled/, scored/, "
                                   "train/ and eval/.")
    prompts_per_round: int | None = F(None, "Prompts of each round: round r takes the r-th "
                                            "slice of this many prompts of sample.input (in "
                                            "order, or shuffled by rounds.seed), no prompt in "
                                            "two rounds (None: the prompts split evenly over "
                                            "run.rounds).")
    shuffle: bool = F(False, "Shuffle the prompt set (seeded by rounds.seed) before slicing it.")
    seed: int = F(0, "Seed of the shuffle; each round's sampling seed is derived from "
                     "sample.seed and the round.")


@dataclass
class LabelConfig:
    mode: Literal["truth", "python", "judge", "reward"] = F(
        "truth", "Who labels each round's pair (vrpo_fast.label): the synthetic task's true "
                 "preference (truth), a Python function (python: label.function), a pairwise "
                 "LLM judge in both orders (judge: label.path, aux.judge_* template and "
                 "labels), or a reward model, p = sigmoid(r(y) - r(y')) (reward: label.path). "
                 "The labeller answers P(first preferred) or a hard label; one Bernoulli draw "
                 "per pair makes the label. With aux.mode = given, g is the labeller's own p on "
                 "every pair.")
    function: str | None = F(None, "label.mode python: module:function, called as "
                                   "function(prompt, y, y2) -> P(y preferred) in [0, 1], or "
                                   "1 / True (y) / 0 / False (y2).")
    path: str | None = F(None, "label.mode judge / reward: the labelling model's path.")
    g_function: str | None = F(None, "With aux.mode given in rounds: g of every pair from this "
                                     "Python function (module:function, the labeller's "
                                     "contract), e.g. a cheaper judge than the labeller "
                                     "(None: g is the labeller's own p).")
    seed: int = F(0, "Seed of the label draws: one per pair, from (label.seed, round, prompt "
                     "id), so a resumed round draws the same labels.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    label: LabelConfig = field(default_factory=LabelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats belong."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-3" (no dot) as a string; it is a number here.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    if tp in (dict, list):
        if not isinstance(value, tp):
            raise UserError(f"{key}: expected a {'mapping' if tp is dict else 'list'}, "
                            f"got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _build(cls, raw: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = _closest(key, names)
            hint = f" (did you mean {prefix}{close}?)" if close else ""
            raise UserError(f"{prefix}{key}: unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _closest(key, names):
    import difflib

    match = difflib.get_close_matches(key, sorted(names), n=1)
    return match[0] if match else None


def parse_overrides(overrides: list[str]) -> dict:
    """['--train.max_steps=10', 'loss.beta=0.2'] -> {'train': {'max_steps': 10}, ...}."""
    tree: dict = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text or "." not in text.split("=", 1)[0]:
            raise UserError(f"{item}: overrides are written --section.key=value")
        dotted, value = text.split("=", 1)
        section, key = dotted.split(".", 1)
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        tree.setdefault(section, {})[key] = parsed
    return tree


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int):
        super().__init__(f"duplicate key {key!r} (line {line})")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping (plain YAML keeps the last one, so
    a second `train:` section would silently drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # `<<: *anchor` may repeat
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:                 # an unhashable key: SafeLoader reports it
                pass
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides, check every key and type, chain each stage's input
    to the previous stage's output where it is not given, then check the combinations."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--config: no such file {str(p)!r}")
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as err:
            raise UserError(f"--config: {p}: {err}") from None
        except UnicodeDecodeError as err:
            raise UserError(f"--config: {p} is not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise UserError(f"--config: cannot read {p}: {err.strerror or err}") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise UserError(f"--config: {p} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise UserError(f"--config: {p} must hold a mapping of sections")
    for section, values in parse_overrides(overrides or []).items():
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"{section}: expected a mapping")
        raw[section].update(values)
    classes = _section_classes()
    kwargs = {}
    for section, values in raw.items():
        if section not in classes:
            close = _closest(section, classes)
            hint = f" (did you mean {close}?)" if close else ""
            raise UserError(f"{section}: unknown section{hint}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise UserError(f"{section}: expected a mapping of keys, got {values!r}")
        kwargs[section] = _build(classes[section], values, f"{section}.")
    cfg = Config(**kwargs)
    chain_defaults(cfg)
    validate(cfg)
    return cfg


def _non_finite(value, key: str) -> tuple[str, float] | None:
    """The first NaN or infinity in a setting (a number, or one inside a list or mapping) with
    its key; None when there is none."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    return next((bad for k, v in items if (bad := _non_finite(v, f"{key}.{k}"))), None)


def chain_defaults(cfg: Config) -> None:
    """Each stage reads what the stage before it writes unless its input key is set:
    score.input = sample.output, data.path = score.output, eval.policy =
    <train.output_dir>/final, eval.output = <train.output_dir>/eval."""
    if cfg.score.input is None:
        cfg.score.input = cfg.sample.output
    if cfg.data.path is None:
        cfg.data.path = cfg.score.output
    out = Path(cfg.train.output_dir)
    if cfg.eval.policy is None:
        cfg.eval.policy = str(out / "final")
    if cfg.eval.output is None:
        cfg.eval.output = str(out / "eval")


def validate(cfg: Config) -> None:
    """Impossible values and combinations, each named by the key to change."""
    # Every number of every section, including keys added later: NaN and infinity pass every
    # range comparison below (nan < 0 is False) and would surface as a traceback mid-run.
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            if (bad := _non_finite(getattr(values, f.name), f"{section.name}.{f.name}")):
                raise UserError(f"{bad[0]}: must be a finite number, got {bad[1]}")
    # An empty path would silently be the current directory.
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and not value.strip():
            raise UserError(f"{key}: empty path")
    t, loss, aux = cfg.train, cfg.loss, cfg.aux
    d, s, sc, rl = cfg.data, cfg.sample, cfg.score, cfg.rl
    for key, value in [("train.max_steps", t.max_steps), ("train.batch_groups", t.batch_groups),
                       ("train.micro_batch_groups", t.micro_batch_groups),
                       ("train.keep_last", t.keep_last), ("train.max_bad_steps", t.max_bad_steps),
                       ("train.log_every", t.log_every), ("sample.num_samples", s.num_samples),
                       ("train.cv_gap_looks", t.cv_gap_looks),
                       ("sample.batch_size", s.batch_size), ("sample.shard_size", s.shard_size),
                       ("sample.tensor_parallel_size", s.tensor_parallel_size),
                       ("score.shard_size", sc.shard_size),
                       ("audit.bootstrap", cfg.audit.bootstrap),
                       ("audit.max_pairs", cfg.audit.max_pairs),
                       ("aux.judge_max_tokens", aux.judge_max_tokens),
                       ("data.max_prompt_length", d.max_prompt_length),
                       ("data.max_response_length", d.max_response_length),
                       ("eval.num_samples", cfg.eval.num_samples),
                       ("eval.max_new_tokens", cfg.eval.max_new_tokens),
                       ("eval.batch_size", cfg.eval.batch_size),
                       ("eval.num_prompts", cfg.eval.num_prompts)]:
        if value is not None and value < 1:
            raise UserError(f"{key}: must be >= 1, got {value}")
    for key, value in [("train.save_every", t.save_every), ("train.warmup_steps", t.warmup_steps),
                       ("train.lr", t.lr), ("train.weight_decay", t.weight_decay),
                       ("train.grad_clip", t.grad_clip), ("rl.kl_coef", rl.kl_coef)]:
        if value < 0:
            raise UserError(f"{key}: must be >= 0, got {value}")
    for key, value in [("aux.beta", aux.beta), ("sample.temperature", s.temperature),
                       ("rl.temperature", rl.temperature)]:
        if value <= 0:
            raise UserError(f"{key}: must be > 0, got {value}")
    for key, value in [("train.seed", t.seed), ("model.seed", cfg.model.seed),
                       ("sample.seed", s.seed), ("eval.seed", cfg.eval.seed),
                       ("audit.seed", cfg.audit.seed)]:
        if not 0 <= value < 2**32:   # numpy's seed range
            raise UserError(f"{key}: must be in [0, 2**32), got {value}")
    for key, value in [("data.max_length", d.max_length), ("score.max_tokens", sc.max_tokens)]:
        if value is not None and value < 2:   # a prompt token and a response token
            raise UserError(f"{key}: must be >= 2, got {value}")
    for key, value in [("train.cv_gap_alpha", t.cv_gap_alpha),
                       ("audit.gap_alpha", cfg.audit.gap_alpha)]:
        if not 0 < value < 1:
            raise UserError(f"{key}: must be in (0, 1), got {value}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise UserError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if len(t.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1
                                         for b in t.adam_betas):
        raise UserError(f"train.adam_betas: expected two numbers in [0, 1), got {t.adam_betas}")
    if t.batch_groups % t.micro_batch_groups:
        raise UserError(f"train.micro_batch_groups: {t.micro_batch_groups} does not divide "
                        f"train.batch_groups = {t.batch_groups}")
    if t.max_tokens is not None and t.max_tokens < 2:
        raise UserError(f"train.max_tokens: must be >= 2, got {t.max_tokens}")
    if loss.beta <= 0:
        raise UserError(f"loss.beta: must be > 0, got {loss.beta}")
    if loss.dro_tau is not None and loss.dro_tau <= 0:
        raise UserError(f"loss.dro_tau: must be > 0, got {loss.dro_tau}")
    if not 0 < loss.dro_gamma <= 1:
        raise UserError(f"loss.dro_gamma: must be in (0, 1], got {loss.dro_gamma}")
    if loss.group_dro_eta is not None and loss.group_dro_eta <= 0:
        raise UserError(f"loss.group_dro_eta: must be > 0, got {loss.group_dro_eta}")
    if loss.group_dro_eta is not None and loss.dro_tau is not None:
        raise UserError("loss.group_dro_eta: group DRO over domains and loss.dro_tau (DRO over "
                        "prompts) are exclusive; set one of them")
    if loss.num_mc_pairs is not None and loss.num_mc_pairs < 0:
        raise UserError(f"loss.num_mc_pairs: must be >= 0, got {loss.num_mc_pairs}")
    if aux.mode in ("lm", "reward_model", "judge") and not aux.path:
        raise UserError(f"aux.path: required with aux.mode = {aux.mode}")
    if aux.mode == "lagged" and aux.refresh_every < 1:
        raise UserError(f"aux.refresh_every: must be >= 1 with aux.mode = lagged, got "
                        f"{aux.refresh_every}")
    if aux.mode == "none" and loss.estimator == "vrpo" and loss.num_mc_pairs != 0:
        raise UserError("aux.mode: 'none' gives no g; use loss.estimator = dpo, "
                        "loss.num_mc_pairs = 0, or an auxiliary model")
    if aux.mode == "lm" and cfg.ref.source == "none":
        raise UserError("aux.mode: 'lm' measures its implicit preference against pi_ref; "
                        "ref.source = none gives no reference")
    if model_missing(cfg):
        raise UserError("model.path: set a model path (or model.tiny for a tiny test model)")
    if cfg.model.path and cfg.model.tiny:
        raise UserError("model.tiny: give either model.path or model.tiny, not both")
    if s.num_samples % 2:
        raise UserError(f"sample.num_samples: must be even (2M), got {s.num_samples}")
    if not 0 < s.top_p <= 1:
        raise UserError(f"sample.top_p: must be in (0, 1], got {s.top_p}")
    if s.max_new_tokens < 1:
        raise UserError(f"sample.max_new_tokens: must be >= 1, got {s.max_new_tokens}")
    unknown = [st for st in cfg.run.stages if st not in STAGES]
    if unknown:
        raise UserError(f"run.stages: unknown stage {unknown[0]!r} (expected some of "
                        f"{', '.join(STAGES)})")
    if sorted(cfg.run.stages, key=STAGES.index) != list(cfg.run.stages) or \
            len(set(cfg.run.stages)) != len(cfg.run.stages):
        raise UserError(f"run.stages: {cfg.run.stages} must follow the pipeline order "
                        f"{', '.join(STAGES)}, each stage once")
    trainers = [st for st in cfg.run.stages if st in ("train-reward", "train", "train-rl")]
    if len(trainers) > 1:
        raise UserError(f"run.stages: {' and '.join(trainers)} both write train.output_dir; run "
                        f"them from configs of their own")
    if rl.num_samples < 2:
        raise UserError(f"rl.num_samples: RLOO needs k >= 2 samples per prompt, got "
                        f"{rl.num_samples}")
    if rl.max_new_tokens < 1:
        raise UserError(f"rl.max_new_tokens: must be >= 1, got {rl.max_new_tokens}")
    _validate_eval(cfg)
    _validate_tiny(cfg)
    _validate_lora(cfg)
    _validate_rounds(cfg)


# Keys naming a file, folder or hub model, in pipeline order (a stage's input defaults to the
# output before it: an empty output is named, not the input it was copied to).
PATH_KEYS = ("model.path", "model.tokenizer", "ref.path", "aux.path", "aux.judge_tokenizer",
             "sample.input", "sample.output", "score.input", "score.output", "data.path",
             "data.cache_dir", "train.output_dir", "rl.reward_model", "eval.policy",
             "eval.prompts", "eval.baseline", "eval.output", "audit.data", "audit.output",
             "rounds.output", "label.path")


def _validate_eval(cfg: Config) -> None:
    """What the eval stage would refuse only after the stages before it ran."""
    e = cfg.eval
    temps = e.temperatures
    if not temps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0
                            for t in temps):
        raise UserError(f"eval.temperatures: expected a list of numbers > 0, got {temps}")
    # The specs vrpo_fast.evaluate.make_judge builds; a python: judge is imported only then.
    prefixes = ("reward_model:", "lm:", "python:")
    if e.judge is not None and e.judge != "synthetic" and \
            not any(e.judge.startswith(p) and e.judge[len(p):].strip() for p in prefixes):
        raise UserError(f"eval.judge: unknown judge {e.judge!r}; expected synthetic, "
                        f"reward_model:PATH, lm:PATH or python:module:function")


# model.tiny: the integer sizes of vrpo_fast.models.tiny_llama_config, the transformers config
# class of each arch, and the keys tiny_llama_config sets itself (with the model.tiny key that
# sets them, if any).
TINY_SIZES = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "intermediate_size", "max_position_embeddings")
TINY_ARCHS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}
TINY_FIXED = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
              "num_key_value_heads": "num_kv_heads", "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None}
BYTE_VOCAB = 259   # the byte tokenizer: 256 bytes + <s>, </s>, <pad>


@functools.cache
def _tiny_keys(arch: str) -> tuple[frozenset, dict]:
    """The keys model.tiny may hold with `arch` (tiny_llama_config's parameters and what its
    transformers config class takes: __init__'s parameters, a default config's attributes,
    settable properties) and tiny_llama_config's defaults."""
    import inspect

    import transformers

    from vrpo_fast.models import tiny_llama_config

    params = inspect.signature(tiny_llama_config).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is not p.VAR_KEYWORD}
    cls = getattr(transformers, TINY_ARCHS[arch])
    keys = set(defaults) | set(vars(cls())) | set(getattr(cls, "attribute_map", {}))
    for c in cls.__mro__:
        if "__init__" in vars(c):
            keys |= {p.name for p in inspect.signature(c.__init__).parameters.values()
                     if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        keys |= {k for k, v in vars(c).items() if isinstance(v, property) and v.fset}
    keys.add("rope_theta")   # transformers >= 5 takes it into rope_parameters
    return frozenset(k for k in keys if not k.startswith("_") and k != "self"), defaults


def _validate_tiny(cfg: Config) -> None:
    """model.tiny's keys and sizes, before tiny_llama_config (or the model) fails on them."""
    tiny = cfg.model.tiny
    if tiny is None:
        return
    if not isinstance(tiny, dict):
        raise UserError(f"model.tiny: expected a mapping of model config keys, got {tiny!r}")
    arch = tiny.get("arch", "llama")
    if not isinstance(arch, str) or arch not in TINY_ARCHS:
        raise UserError(f"model.tiny.arch: unknown architecture {arch!r} (expected "
                        f"{' or '.join(TINY_ARCHS)})")
    known, defaults = _tiny_keys(arch)
    for key in tiny:
        if key in TINY_FIXED:
            use = f"; use model.tiny.{TINY_FIXED[key]}" if TINY_FIXED[key] else ""
            raise UserError(f"model.tiny.{key}: set by tiny_llama_config itself{use}")
        if key not in known:
            close = _closest(str(key), known)
            hint = f" (did you mean model.tiny.{close}?)" if close else ""
            raise UserError(f"model.tiny.{key}: unknown key for arch {arch}{hint}")
    for key in TINY_SIZES:
        value = tiny.get(key, defaults[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"model.tiny.{key}: expected a positive integer, got {value!r}")
    if not isinstance(tiny.get("tie_word_embeddings", False), bool):
        raise UserError(f"model.tiny.tie_word_embeddings: expected true or false, got "
                        f"{tiny['tie_word_embeddings']!r}")
    size = {k: tiny.get(k, defaults[k]) for k in TINY_SIZES}
    hidden, heads, kv = size["hidden_size"], size["num_heads"], size["num_kv_heads"]
    # Name the key the user gave (the other may be the default).
    key = "num_heads" if "num_heads" in tiny and "hidden_size" not in tiny else "hidden_size"
    if hidden % heads:
        raise UserError(f"model.tiny.{key}: hidden_size = {hidden} is not a multiple of "
                        f"num_heads = {heads}")
    if "head_dim" not in tiny and (hidden // heads) % 2:   # RoPE rotates pairs of dimensions
        raise UserError(f"model.tiny.{key}: hidden_size / num_heads = {hidden // heads} "
                        f"per head; RoPE needs an even head size")
    if heads % kv:
        raise UserError(f"model.tiny.num_kv_heads: {kv} does not divide num_heads = {heads}")
    if cfg.model.tokenizer in (None, "byte") and size["vocab_size"] < BYTE_VOCAB:
        raise UserError(f"model.tiny.vocab_size: must be >= {BYTE_VOCAB} (the byte "
                        f"tokenizer's tokens), got {size['vocab_size']}")


def _validate_lora(cfg: Config) -> None:
    lo = cfg.lora
    if not lo.enabled:
        return
    if lo.r < 1:
        raise UserError(f"lora.r: must be >= 1, got {lo.r}")
    if lo.alpha <= 0:
        raise UserError(f"lora.alpha: must be > 0, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        raise UserError(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if not lo.target_modules or not all(isinstance(m, str) and m for m in lo.target_modules):
        raise UserError(f"lora.target_modules: expected a list of module names, got "
                        f"{lo.target_modules!r}")
    if "lm_head" in lo.target_modules:
        raise UserError("lora.target_modules: lm_head cannot take an adapter (the fused "
                        "log-prob kernel reads the head's weight directly)")
    if cfg.ref.path:
        raise UserError("ref.path: with lora.enabled pi_ref is the policy's own base weights "
                        "(adapters off); unset ref.path or lora.enabled")


def _validate_rounds(cfg: Config) -> None:
    """run.rounds and the rounds / label sections (the prompt count is checked when the rounds
    start: it needs the prompt file)."""
    r, lab, n = cfg.rounds, cfg.label, cfg.run.rounds
    if n < 0:
        raise UserError(f"run.rounds: must be >= 0, got {n}")
    if r.prompts_per_round is not None and r.prompts_per_round < 1:
        raise UserError(f"rounds.prompts_per_round: must be >= 1, got {r.prompts_per_round}")
    for key, value in [("rounds.seed", r.seed), ("label.seed", lab.seed)]:
        if not 0 <= value < 2**32:
            raise UserError(f"{key}: must be in [0, 2**32), got {value}")
    if lab.mode == "python" and not (lab.function and ":" in lab.function):
        raise UserError(f"label.function: label.mode python needs module:function, got "
                        f"{lab.function!r}")
    if lab.g_function is not None and ":" not in lab.g_function:
        raise UserError(f"label.g_function: expected module:function, got {lab.g_function!r}")
    if lab.mode in ("judge", "reward") and not lab.path:
        raise UserError(f"label.path: required with label.mode = {lab.mode}")
    if n == 0:
        return
    stages = cfg.run.stages
    for needed in ("sample", "train"):
        if needed not in stages:
            raise UserError(f"run.stages: rounds (run.rounds = {n}) sample and train in every "
                            f"round; {stages} has no {needed}")
    other = [st for st in stages if st in ("train-reward", "train-rl")]
    if other:
        raise UserError(f"run.stages: rounds train the policy (train); {other[0]} has no "
                        f"round of its own")
    if cfg.ref.path:
        raise UserError("ref.path: in rounds pi_ref is model.path (round 0), then each round's "
                        "trained policy; unset ref.path")
    if cfg.lora.enabled:
        raise UserError("lora.enabled: a round's pi_ref is the previous round's whole model; "
                        "LoRA's final/ holds an adapter only (unset lora.enabled)")
    if cfg.ref.source == "cache" and "score" not in stages:
        raise UserError("ref.source: 'cache' reads the ref_logps the score stage writes; add "
                        "score to run.stages or set ref.source = online")


def model_missing(cfg: Config) -> bool:
    return not cfg.model.path and not cfg.model.tiny


# The stages `vrpo-fast run` knows, in pipeline order.
STAGES = ("sample", "score", "train-reward", "train", "train-rl", "eval")


def describe(sections: list[str] | None = None) -> str:
    """Every key (of `sections`, default all) with its type, default and doc, as YAML comments
    (for `vrpo-fast config-doc`): the output is itself a valid config of the defaults."""
    lines = []
    for section, cls in _section_classes().items():
        if sections is not None and section not in sections:
            continue
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = hints[f.name]
            tp = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            lines.append(f"  # {f.metadata.get('doc', '')} [{tp}]")
            lines.append(f"  {f.name}: {yaml.safe_dump(default, default_flow_style=True).strip()}"
                         .replace("\n...", ""))
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    """`vrpo-fast config-doc [SECTION ...]`."""
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"only these sections (of {', '.join(_section_classes())})")


def run(args) -> int:
    """Print every key (of the chosen sections) with its doc, type and default, as YAML."""
    known = _section_classes()
    for name in args.sections:
        if name not in known:
            raise UserError(f"SECTION: unknown section {name!r} (expected one of "
                            f"{', '.join(known)})")
    print(describe(args.sections or None))
    return 0


def add_config_arguments(parser) -> None:
    """--config FILE plus any number of --section.key=value overrides (the CLI hands every
    argument it does not know to `overrides`)."""
    parser.add_argument("--config", help="YAML config file (see configs/); any "
                                         "--section.key=value after it overrides the file")
    parser.set_defaults(overrides=[])
    parser.epilog = ("Every config key can be given as --section.key=value (e.g. "
                     "--train.max_steps=10). `vrpo-fast config-doc` prints every key with its "
                     "doc and default.")


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)
