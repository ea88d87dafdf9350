"""Evaluation: win rates of a policy under a judge against pi_ref, against a baseline policy and
against the data's chosen responses, one per sampling temperature; the expected reward and a
KL(pi || pi_ref) estimate; each with a 95% confidence interval.

    vrpo-fast eval --config configs/qwen2.5-0.5b-hh.yaml          # the eval section of a config
    vrpo-fast eval --model runs/vrpo/final --ref MODEL --prompts heldout.jsonl \
        [--baseline runs/dpo/final] [--temperatures 0.25,0.5,0.75,1.0] [--output DIR] \
        --judge synthetic                       # the synthetic task's true preference
        --judge reward_model:PATH               # a Hugging Face sequence-classification model
        --judge lm:PATH                         # a pairwise LLM judge, both orders (aux.judge_*)
        --judge python:my_module:my_judge       # judge(prompt, y, y2) -> P(y beats y2) in [0, 1]

Models sit on the GPU in bf16 (float32 on the CPU) and generate in batches through the sampler
backends of `vrpo_fast.samplers` (vLLM wherever it imports, CPU or GPU, when every model is a
path). Prompts may be strings or conversational messages (the chat template applies). At each
temperature the policy and its opponents (pi_ref, the baseline) are sampled at that
temperature; the data's chosen responses are fixed. The KL estimate needs samples from pi
itself: it comes from the temperature-1 samples (none without 1 in the temperatures).

Judges return probabilities, not draws: the win rate is the expected preference, which has the
same mean as counting sampled verdicts and less variance. Intervals are normal-approximation
95% intervals, mean +- 1.96 standard errors, with prompts as the independent units.

Output (eval.output): results.json (every estimate and the settings), report.md (the tables)
and win_rates.png (win rate against temperature, with the intervals).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

from vrpo_fast.config import AuxConfig, add_config_arguments, load_config
from vrpo_fast.data.load import load_preference_data
from vrpo_fast.data.tokenize import tokenize_prompt
from vrpo_fast.dro import describe_domains, domains_of, per_domain
from vrpo_fast.errors import UserError, check_output, renamed
from vrpo_fast.estimate import Estimate
from vrpo_fast.judge import load_judge
from vrpo_fast.logprobs import sequence_logps
from vrpo_fast.models import load_causal_lm, load_tokenizer, model_from_config
from vrpo_fast.samplers import (
    TransformersSampler,
    VLLMSampler,
    device_of_rank,
    draw,
    response_texts,
    vllm_available,
)
from vrpo_fast.synthetic import SyntheticTask


class Judge:
    """preference(prompt, y, y2) -> P(y beats y2); reward(prompt, y) -> float or None."""

    name = "judge"

    def preference(self, prompt: str, y: str, y2: str) -> float:
        raise NotImplementedError

    def reward(self, prompt: str, y: str) -> float | None:
        return None


class SyntheticJudge(Judge):
    name = "synthetic truth"

    def __init__(self, task=None):
        self.task = task or SyntheticTask()

    def preference(self, prompt, y, y2):
        if not isinstance(prompt, str):
            raise UserError("--judge synthetic: the synthetic task's prompts are strings, not "
                            "conversations")
        return self.task.preference(prompt, y, y2)

    def reward(self, prompt, y):
        return self.task.true_reward(prompt, y)


class CallableJudge(Judge):
    def __init__(self, fn, name="python"):
        self.fn, self.name = fn, name

    def preference(self, prompt, y, y2):
        p = float(self.fn(prompt, y, y2))
        if not 0 <= p <= 1:
            raise UserError(f"--judge {self.name}: returned {p}, not a probability in [0, 1]")
        return p


class RewardModelJudge(Judge):
    """A sequence-classification reward model r; P(y beats y2) = sigmoid(r(y) - r(y2)). It sits
    on the evaluation's device (bf16 on a GPU); a text longer than its tokenizer's limit keeps
    its end, where the response is."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise UserError(f"--judge reward_model:{path}: cannot load it: "
                            f"{str(err).splitlines()[0]}") from None
        self.device, dtype = eval_device()
        self.model.to(self.device, dtype)
        self.tokenizer.truncation_side = "left"
        self.name = f"reward model {path}"
        self._torch = torch
        self._cache: dict[tuple[str, str], float] = {}

    def text(self, prompt, y: str) -> str:
        """The judged text: prompt + response, or a conversation rendered by the judge's own
        chat template (role-tagged lines when it has none)."""
        if isinstance(prompt, str):
            return prompt + y
        messages = list(prompt) + [{"role": "assistant", "content": y}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in messages)

    def reward(self, prompt, y):
        key = (str(prompt), y)
        if key not in self._cache:
            ids = self.tokenizer(self.text(prompt, y), return_tensors="pt",
                                 truncation=True).to(self.device)
            with self._torch.no_grad():
                self._cache[key] = self.model(**ids).logits[0, 0].float().item()
        return self._cache[key]

    def preference(self, prompt, y, y2):
        d = self.reward(prompt, y) - self.reward(prompt, y2)
        return 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))


class LMJudge(Judge):
    """An instruction-tuned LM as a pairwise judge (vrpo_fast.judge, the g of aux.mode =
    judge): P(y beats y2) = the mean over both orders of its p(label of y) / (p(A) + p(B)), so a
    head-to-head is judged in both orders and position bias cancels. The template, labels and
    chat setting are aux.judge_*."""

    def __init__(self, path: str, aux=None):
        aux = AuxConfig() if aux is None else aux
        settings = {k: getattr(aux, k) for k in ("judge_template", "judge_labels", "judge_chat",
                                                 "judge_max_tokens")}
        self.judge = load_judge(AuxConfig(path=path, **settings), eval_device()[0],
                                what="--judge lm:PATH")
        self.max_tokens = aux.judge_max_tokens
        self.name = f"LM judge {path}"

    def preference(self, prompt, y, y2):
        return self.judge.preferences([(prompt, [(y, y2)])], self.max_tokens)[0][0]


def make_judge(spec: str, task=None, aux=None) -> Judge:
    """'synthetic' | 'reward_model:PATH' | 'lm:PATH' (a pairwise LLM judge with aux's judge
    settings) | 'python:module:function'."""
    if spec == "synthetic":
        return SyntheticJudge(task)
    if spec.startswith("lm:"):
        return LMJudge(spec.split(":", 1)[1], aux)
    if spec.startswith("reward_model:"):
        return RewardModelJudge(spec.split(":", 1)[1])
    if spec.startswith("python:"):
        target = spec.split(":", 1)[1]
        module, _, fn = target.rpartition(":")
        try:
            return CallableJudge(getattr(importlib.import_module(module), fn), name=spec)
        except (ImportError, AttributeError, ValueError) as err:
            raise UserError(f"--judge {spec}: cannot import {target!r}: {err}") from None
    raise UserError(f"--judge: unknown judge {spec!r}; expected synthetic, reward_model:PATH, "
                    f"lm:PATH or python:module:function")


def win_rate(prompts: list, policy: list[list[str]], baseline: list[list[str]],
             judge: Judge) -> Estimate:
    """Mean P(policy's i-th response beats baseline's i-th) over prompts and samples.

    The CI treats prompts as the independent units (samples of one prompt are averaged first).
    A baseline with one response per prompt (the data's chosen response) plays every sample.
    """
    per_prompt = []
    for prompt, ys, bs in zip(prompts, policy, baseline):
        pairs = list(zip(ys, bs * len(ys) if len(bs) == 1 else bs))
        per_prompt.append(sum(judge.preference(prompt, y, b) for y, b in pairs) / len(pairs))
    return Estimate.of(per_prompt)


def expected_reward(prompts: list[str], responses: list[list[str]], judge: Judge):
    values = []
    for prompt, ys in zip(prompts, responses):
        rs = [judge.reward(prompt, y) for y in ys]
        if any(r is None for r in rs):
            return None
        values.append(sum(rs) / len(rs))
    return Estimate.of(values)


def kl_estimate(policy_logps, ref_logps) -> Estimate:
    """KL(pi || pi_ref) from (G, n) log-probs of responses SAMPLED FROM pi: mean log-ratio."""
    diff = (policy_logps.double() - ref_logps.double())
    return Estimate.of(diff.mean(dim=1).tolist())


@dataclass
class PolicyReport:
    name: str
    win_rate_vs_baseline: Estimate
    true_reward: Estimate | None
    kl: Estimate | None
    by_domain: dict | None = None     # metric -> vrpo_fast.dro.per_domain report


def evaluate_policy(model, baseline, tokenizer, prompts: list[str], judge: Judge, *,
                    ref=None, n: int = 16, seed: int = 0, max_new_tokens: int = 32,
                    name: str = "policy", domains: list | None = None) -> PolicyReport:
    """Win rate against `baseline`, expected true reward and KL(model || ref) on `prompts`
    (models already in memory; the demo's evaluation); with `domains` (one per prompt) the win
    rate and reward of each domain, and the worst."""
    import torch


    ys, prompt_ids, y_ids = draw(model, tokenizer, prompts, n, seed=seed,
                                 max_new_tokens=max_new_tokens)
    bs, _, _ = draw(baseline, tokenizer, prompts, n, seed=seed + 1,
                    max_new_tokens=max_new_tokens)
    kl = None
    if ref is not None:
        with torch.no_grad():
            kl = kl_estimate(sequence_logps(model, prompt_ids, scorable(y_ids, tokenizer)),
                             sequence_logps(ref, prompt_ids, scorable(y_ids, tokenizer)))
    report = PolicyReport(name, win_rate(prompts, ys, bs, judge),
                          expected_reward(prompts, ys, judge), kl)
    if domains is not None:

        report.by_domain = {"win_rate": per_domain(
            domains, lambda p, y, b: win_rate(p, y, b, judge), prompts, ys, bs)}
        if report.true_reward is not None:
            report.by_domain["true_reward"] = per_domain(
                domains, lambda p, y: expected_reward(p, y, judge), prompts, ys)
    return report


def scorable(ids: list[list[list[int]]], tokenizer) -> list[list[list[int]]]:
    """Empty continuations cannot be scored; an immediate EOS is a one-token response."""
    return [[r if r else [tokenizer.eos_token_id] for r in per] for per in ids]


def eval_device():
    """(device, dtype) of the models: the GPU in bf16 when there is one, else float32 on the CPU."""
    import torch


    device = device_of_rank()
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


class Player:
    """A model that plays in the evaluation: where it comes from, and how to load it."""

    def __init__(self, role: str, key: str, path: str | None, load):
        self.role, self.key, self.path, self.load = role, key, path, load


def _players(cfg) -> list[Player]:
    e = cfg.eval
    ref_key = "ref.path" if cfg.ref.path else "model.path"
    players = [Player("policy", "eval.policy", e.policy,
                      lambda dtype: load_causal_lm(e.policy, dtype=dtype, what="eval.policy")),
               Player("pi_ref", ref_key, cfg.ref.path or cfg.model.path,
                      lambda dtype: model_from_config(cfg, "ref", dtype=dtype))]
    if e.baseline:
        players.append(Player("baseline", "eval.baseline", e.baseline,
                              lambda dtype: load_causal_lm(e.baseline, dtype=dtype,
                                                           what="eval.baseline")))
    return players


def _check(e) -> None:
    if not e.prompts:
        raise UserError("eval.prompts: no held-out prompts given")
    if not e.judge:
        raise UserError("eval.judge: no judge given (synthetic, reward_model:PATH or "
                        "python:module:function)")
    for key, value in [("eval.num_samples", e.num_samples),
                       ("eval.max_new_tokens", e.max_new_tokens),
                       ("eval.batch_size", e.batch_size), ("eval.num_prompts", e.num_prompts)]:
        if value is not None and value < 1:
            raise UserError(f"{key}: must be >= 1, got {value}")
    temps = e.temperatures
    if not temps or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and
                            0 < t < float("inf") for t in temps):
        raise UserError(f"eval.temperatures: expected a list of numbers > 0, got {temps}")


def eval_settings(cfg) -> dict:
    """What decides an evaluation's results (a finished one with the same settings is done)."""
    return {"eval": {k: v for k, v in vars(cfg.eval).items() if k not in ("output",
                                                                          "batch_size")},
            "model": {"path": cfg.model.path, "tiny": cfg.model.tiny, "seed": cfg.model.seed,
                      "tokenizer": cfg.model.tokenizer, "dtype": cfg.model.dtype},
            "ref": cfg.ref.path}


def eval_stage(cfg) -> Path | None:
    """Sample every player at every temperature, judge, write the report (when eval.output is
    set); returns eval.output."""
    import gc

    import torch

    e = cfg.eval
    _check(e)
    if e.output:
        check_output(e.output, "eval.output")
    try:
        examples, _ = load_preference_data(e.prompts, on_bad_row=cfg.data.on_bad_row,
                                           split=cfg.data.split, prompts_only=True)
    except UserError as err:
        raise renamed(err, "eval.prompts") from None
    examples = examples[:e.num_prompts]
    if not examples:
        raise UserError(f"eval.prompts: {e.prompts} holds no prompts")
    prompts = [ex.prompt for ex in examples]
    domains = domains_of(examples)
    chosen = [_response_text(ex.chosen) if ex.labelled else None for ex in examples]
    tokenizer = load_tokenizer(cfg.model.tokenizer or e.policy,
                               "model.tokenizer" if cfg.model.tokenizer else "eval.policy")
    judge = make_judge(e.judge, aux=cfg.aux)
    players = _players(cfg)
    backend = e.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() and all(p.path for p in players) else "transformers"
    device, dtype = eval_device()
    prompt_ids = [tokenize_prompt(p, tokenizer) for p in prompts]
    temps = [float(t) for t in e.temperatures]
    texts: dict[str, dict[float, list[list[str]]]] = {}
    policy_ids = None
    logps: dict[str, torch.Tensor] = {}
    for player in players:
        texts[player.role] = {}
        sampler = _sampler(player, backend, tokenizer, e, device, dtype)
        for i, t in enumerate(temps):
            sampler.temperature = t
            # The same seed for every player at a temperature: common random numbers.
            ids = sampler.sample(prompt_ids, e.num_samples, seed=e.seed * 1_000_003 + i)
            texts[player.role][t] = _texts(tokenizer, ids, sampler.stop_ids)
            if player.role == "policy" and t == 1.0:
                policy_ids = scorable(ids, tokenizer)
        model = getattr(sampler, "model", None)
        del sampler
        if policy_ids is not None and player.role in ("policy", "pi_ref"):
            if model is None:      # vLLM held it: the scoring pass needs the torch model
                gc.collect()
                model = player.load(dtype).to(device).eval()
            with torch.no_grad():
                logps[player.role] = sequence_logps(model, prompt_ids, policy_ids).cpu()
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    for t in temps:
        ys = texts["policy"][t]
        row = {"temperature": t, "vs_ref": win_rate(prompts, ys, texts["pi_ref"][t], judge)}
        if "baseline" in texts:
            row["vs_baseline"] = win_rate(prompts, ys, texts["baseline"][t], judge)
        have = [i for i, c in enumerate(chosen) if c is not None]
        if have:
            row["vs_chosen"] = win_rate([prompts[i] for i in have], [ys[i] for i in have],
                                        [[chosen[i]] for i in have], judge)
        row["reward"] = expected_reward(prompts, ys, judge)
        if domains is not None:
            # Robustness to the prompt mix: each domain's win rate against pi_ref (and reward),
            # the worst domain beside the mean over domains.
            row["by_domain"] = {"vs_ref": per_domain(
                domains, lambda p, y, b: win_rate(p, y, b, judge), prompts, ys,
                texts["pi_ref"][t])}
            if row["reward"] is not None:
                row["by_domain"]["reward"] = per_domain(
                    domains, lambda p, y: expected_reward(p, y, judge), prompts, ys)
        rows.append(row)
    kl = kl_estimate(logps["policy"], logps["pi_ref"]) if "policy" in logps else None
    _print(rows, kl, judge, e, len(prompts), backend)
    if not e.output:
        return None
    out = Path(e.output)
    write_report(out, rows, kl, settings=eval_settings(cfg), judge=judge.name,
                 num_prompts=len(prompts), backend=backend)
    return out


def _response_text(response) -> str:
    """A chosen response as text: the assistant's contents of a conversational one."""
    if isinstance(response, str):
        return response
    return "".join(m["content"] for m in response if m.get("role") == "assistant")


def _texts(tokenizer, ids, stop_ids):
    return response_texts(tokenizer, ids, stop_ids)


def _sampler(player: Player, backend: str, tokenizer, e, device, dtype):
    if backend == "vllm":
        if not player.path:
            raise UserError(f"eval.backend: vllm needs a model path for {player.key}, not "
                            f"model.tiny")
        return VLLMSampler(player.path, tokenizer, max_new_tokens=e.max_new_tokens,
                           seed=e.seed, key=player.key, way_out="eval.backend=transformers")
    model = player.load(dtype).to(device).eval()
    return TransformersSampler(model, tokenizer, max_new_tokens=e.max_new_tokens,
                               batch_size=e.batch_size)


def _print(rows, kl, judge, e, num_prompts, backend) -> None:
    print(f"judge: {judge.name}; {num_prompts} prompts x {e.num_samples} samples per model and "
          f"temperature; backend {backend}; 95% confidence intervals")
    for row in rows:
        t = row["temperature"]
        print(f"temperature {t:g}: win rate of {e.policy} vs pi_ref: {row['vs_ref']}")
        if "vs_baseline" in row:
            print(f"temperature {t:g}: win rate of {e.policy} vs {e.baseline}: "
                  f"{row['vs_baseline']}")
        if "vs_chosen" in row:
            print(f"temperature {t:g}: win rate of {e.policy} vs the data's chosen responses: "
                  f"{row['vs_chosen']}")
        if row["reward"] is not None:
            print(f"temperature {t:g}: expected reward: {row['reward']}")
        for metric, by in row.get("by_domain", {}).items():
            print(f"temperature {t:g}: " + describe_domains(by, DOMAIN_METRICS[metric]))
    print(f"KL(policy || ref): {kl if kl is not None else 'not estimated (no temperature 1)'}")


OPPONENTS = {"vs_ref": "pi_ref", "vs_baseline": "baseline", "vs_chosen": "chosen responses"}
DOMAIN_METRICS = {"vs_ref": "win rate vs pi_ref", "reward": "expected reward"}


def write_report(out: Path, rows: list[dict], kl: Estimate | None, *, settings: dict,
                 judge: str, num_prompts: int, backend: str) -> None:
    """results.json, report.md and win_rates.png in `out`, each written whole (a temporary
    name, then renamed; results.json last, so it marks a finished evaluation)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    e = settings["eval"]
    lines = [f"# Evaluation of {e['policy']}", "",
             f"Judge: {judge}. {num_prompts} prompts x {e['num_samples']} samples per model and "
             f"temperature ({backend}). Win rates: mean P(policy's response beats the "
             f"opponent's) with a 95% confidence interval over prompts.", "",
             "| temperature | " + " | ".join(f"vs {OPPONENTS[k]}" for k in OPPONENTS
                                             if k in rows[0]) + " | expected reward |",
             "|---|" + "---|" * (sum(k in rows[0] for k in OPPONENTS) + 1)]
    for row in rows:
        cells = [str(row[k]) for k in OPPONENTS if k in row]
        reward = str(row["reward"]) if row["reward"] is not None else "-"
        lines.append(f"| {row['temperature']:g} | " + " | ".join(cells) + f" | {reward} |")
    for row in rows:
        for metric, by in row.get("by_domain", {}).items():
            lines += ["", f"Temperature {row['temperature']:g}, "
                          + describe_domains(by, DOMAIN_METRICS[metric]) + "."]
    lines += ["", "KL(pi || pi_ref) from the temperature-1 samples: "
                  f"{kl if kl is not None else 'not estimated'}", "",
              "![win rates](win_rates.png)", ""]
    _atomic_write(out / "report.md", "\n".join(lines))
    _plot(rows, out / "win_rates.png", judge)
    record = {"settings": settings, "judge": judge, "num_prompts": num_prompts,
              "backend": backend, "kl": vars(kl) if kl is not None else None,
              "rows": [_jsonable(row) for row in rows]}
    _atomic_write(out / "results.json", json.dumps(record, indent=2) + "\n")


def _jsonable(value):
    """Estimates as their fields, inside any nesting of dicts."""
    if isinstance(value, Estimate):
        return vars(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _plot(rows: list[dict], path: Path, judge: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = [row["temperature"] for row in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.axhline(0.5, ls=":", color="grey")
    for key, label in OPPONENTS.items():
        if key not in rows[0]:
            continue
        est = [row[key] for row in rows]
        ax.errorbar(temps, [x.mean for x in est],
                    yerr=[[x.mean - x.lo for x in est], [x.hi - x.mean for x in est]],
                    marker="o", capsize=3, label=f"vs {label}")
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate (95% CI)")
    ax.set_title(f"judge: {judge}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.description += (". Flags override the config's eval section (and --ref its "
                           "ref.path); without --config, pi_ref is --ref or the baseline.")
    parser.add_argument("--model", help="the policy to evaluate (eval.policy; HF folder)")
    parser.add_argument("--baseline", help="another policy it plays against (eval.baseline)")
    parser.add_argument("--ref", help="pi_ref (ref.path; default without --config: the "
                                      "baseline)")
    parser.add_argument("--prompts", help="held-out prompts, any data format with a prompt "
                                          "column (eval.prompts)")
    parser.add_argument("--judge", help="synthetic | reward_model:PATH | lm:PATH | "
                                        "python:module:function "
                                        "(eval.judge; default without --config: synthetic)")
    parser.add_argument("--num-samples", type=int, help="responses per prompt, model and "
                                                        "temperature (eval.num_samples)")
    parser.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens")
    parser.add_argument("--temperatures", help="comma-separated, e.g. 0.25,0.5,1.0 "
                                               "(eval.temperatures)")
    parser.add_argument("--seed", type=int, help="eval.seed")
    parser.add_argument("--output", help="report folder (eval.output; without --config: none, "
                                         "the results are printed only)")


def config_from_eval_args(args):
    """The Config an `eval` command line describes: the file, its overrides, then the flags."""
    flags = {"eval.policy": args.model, "eval.baseline": args.baseline, "ref.path": args.ref,
             "eval.prompts": args.prompts, "eval.judge": args.judge,
             "eval.num_samples": args.num_samples, "eval.max_new_tokens": args.max_new_tokens,
             "eval.seed": args.seed, "eval.output": args.output}
    if args.temperatures is not None:
        try:
            flags["eval.temperatures"] = [float(t) for t in args.temperatures.split(",")]
        except ValueError:
            raise UserError(f"--temperatures: expected numbers separated by commas, got "
                            f"{args.temperatures!r}") from None
    overrides = list(args.overrides)
    if args.config is None:
        if not (args.ref or args.baseline):
            raise UserError("--ref: give pi_ref (--ref, --baseline or --config)")
        if not args.model:
            raise UserError("--model: give the policy to evaluate (or --config)")
        flags["model.path"] = args.ref or args.baseline
        flags["eval.judge"] = args.judge or "synthetic"
    cfg = load_config(args.config, overrides + [f"--{k}={v}" for k, v in flags.items()
                                                if v is not None and not isinstance(v, list)])
    if "eval.temperatures" in flags:
        cfg.eval.temperatures = flags["eval.temperatures"]
    if args.config is None and args.output is None:
        cfg.eval.output = None
    return cfg


def run(args) -> int:
    out = eval_stage(config_from_eval_args(args))
    if out is not None:
        print(f"eval: wrote {out / 'report.md'}")
    return 0
