"""The GPU proof in one run: every measurement the trainer's speed claims rest on, each section
in its own process under its own time cap, one JSON and one markdown table at the end.

    scripts/gpu_check.sh OUT [--dry-run] [--only SECTION,...] [--budget-s 440]
    python -m vrpo_fast.bench.gpu_check OUT [...]        # what the script runs

Sections (each row of the report carries its status: measured, failed: why, skipped: why):

  env        the device, versions, commit and the bf16 matmul rate (8192^3)
  kernels    (dry run only) the heads' Triton kernels in Triton's interpreter against float64:
             on the CPU the head sections' "ours" is the chunked PyTorch reference
  sweep_a/b  the one-sweep LM head + VRPO loss (`vrpo-fast bench fused-vrpo`) beside eager,
             torch.compile, Liger / Cut Cross-Entropy as the LM head and the two-pass head, at
             N = 8192, D = 4096, V = 128256 and N = 16384, D = 4096, V = 151936 (bf16)
  logprob_a/b  the fused log-prob head (`vrpo-fast bench linear-logprob`), forward + backward
             and the scoring sweep (no grad), the same providers and shapes
  step_m2/m8 one training step of a randomly initialised Qwen2.5-0.5B-shaped model at HH
             lengths, 16 groups (the recipe's micro-batch), M = 2 and 8 (`vrpo-fast bench
             step`): the one-sweep and two-pass heads with the cached reference, FlexAttention
             and flash-attn's varlen path with the online one; tokens/s, MFU, the arithmetic
             bound, peak memory, torch.compile's graph count (FlexAttention, block masks)
  lora       LoRA on a Llama-3.1-8B-shaped model (random bf16 weights, --lora-layers decoder
             layers) at the packing budget `vrpo-fast plan` says fits this GPU, through `vrpo-fast
             train`: the plan's predicted peak beside the measured one
  train      configs/qwen2.5-0.5b-hh.yaml's score and train stages through the CLI (50 steps),
             the model swapped for its random same-shape copy (model.tiny from the preset),
             the byte tokenizer, g from the data (aux.mode given), on data drawn at HH lengths

No model is downloaded: the shapes are the presets' (vrpo_fast/bench/presets.py, from each
model's config.json). `--dry-run` runs every section at tiny shapes on the CPU (what CI runs,
tests/test_gpu_check.py), so the script cannot rot between GPU runs; the targets are then not
evaluated. Outputs, in OUT (the GPU tool brings back only a few files): results.json,
results.md and gpu_check.log (every section's output). Nothing here asserts a speed: targets
are reported as met / not met.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from vrpo_fast.errors import UserError, check_output

RECIPES = {"qwen": "qwen2.5-0.5b-hh.yaml", "llama": "llama3-8b-hh.yaml"}   # in --configs
HEADS = {"a": dict(N=8192, D=4096, V=128256), "b": dict(N=16384, D=4096, V=151936)}
DRY_HEAD = dict(N=600, D=32, V=1000)
HEAD_PROVIDERS = ("ours", "eager", "liger", "cce", "compile")
SWEEP_PROVIDERS = ("ours", "eager", "two_pass", "liger", "cce", "compile")
STEP_PROVIDERS = ("vrpo_fast_one_sweep", "vrpo_fast", "vrpo_fast_online",
                  "vrpo_fast_online_flash")
# model.tiny of the dry run's models (the GPU run's come from the presets)
DRY_QWEN = dict(arch="qwen2", vocab_size=1000, hidden_size=32, num_layers=1, num_heads=2,
                num_kv_heads=1, intermediate_size=64, tie_word_embeddings=True)
DRY_LLAMA = dict(arch="llama", vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                 num_kv_heads=2, intermediate_size=128)
GIB = 2**30


@dataclass
class Section:
    """One step of the run: `commands` are `vrpo-fast` argument lists run one after the other
    in the section's process (one provider each where a provider can fail alone), or `inner`
    names a function of this module that measures and returns rows."""

    name: str
    title: str
    cap_s: int                           # the section's time cap on a GPU (the dry run: 120)
    commands: list = field(default_factory=list)
    inner: str | None = None
    expected: list = field(default_factory=list)     # (provider, pass) of every row it owes
    skipped: dict = field(default_factory=dict)      # provider -> why it is not run
    env: dict = field(default_factory=dict)          # set in the section's process


def sections(dry: bool, lora_layers: int) -> list[Section]:
    """The run's sections in order, at the GPU's shapes or (dry) tiny CPU ones."""
    out = [Section("env", "device, versions, commit, bf16 matmul rate", 20, inner="env",
                   expected=[("env", "matmul")])]
    kernels = [("linear_logprob", "interpreted"), ("fused_vrpo", "interpreted")]
    if dry:
        out.append(Section("kernels", "the Triton kernels of the heads in Triton's interpreter "
                                      "against float64", 0, inner="kernels", expected=kernels,
                           env={"TRITON_INTERPRET": "1"}))
    else:
        on_gpu = "a GPU run: the head sections time the compiled kernels (ours)"
        out.append(Section("kernels", "the Triton kernels in Triton's interpreter (dry run "
                                      "only)", 0, expected=kernels,
                           skipped={p: on_gpu for p, _ in kernels}))
    rep = ["--rep-ms", "1", "--rounds", "1", "--warmup", "0"] if dry else ["--rep-ms", "100"]
    no_compile = {"compile": "dry run: torch.compile of the full-logit head takes minutes on "
                             "2 CPU cores"} if dry else {}
    for key in "ab":
        shape = DRY_HEAD if dry else HEADS[key]
        if dry and key == "b":
            same = "dry run: the b shape is the a shape's tiny copy (measured in the a section)"
            out += [Section("sweep_b", "one-sweep LM head + VRPO loss (dry run: see sweep_a)", 0,
                            expected=[(p, "full") for p in SWEEP_PROVIDERS],
                            skipped={p: same for p in SWEEP_PROVIDERS}),
                    Section("logprob_b", "fused log-prob head (dry run: see logprob_a)", 0,
                            expected=[(p, d) for p in HEAD_PROVIDERS for d in ("full", "score")
                                      if not (p == "compile" and d == "score")],
                            skipped={p: same for p in HEAD_PROVIDERS})]
            continue
        flags = ["--tokens", str(shape["N"]), "--hidden", str(shape["D"]), "--vocab",
                 str(shape["V"]), "--dtype", "fp32" if dry else "bf16"]
        text = f"N={shape['N']}, D={shape['D']}, V={shape['V']}"
        out.append(Section(
            f"sweep_{key}", f"one-sweep LM head + VRPO loss (M = 2), {text}", 45 + 5 * (key == "b"),
            commands=[["bench", "fused-vrpo", *flags, "--pairs", "2", "--providers", p, *rep]
                      for p in SWEEP_PROVIDERS if p not in no_compile],
            expected=[(p, "full") for p in SWEEP_PROVIDERS], skipped=no_compile))
        out.append(Section(
            f"logprob_{key}", f"fused log-prob head, {text}", 50 + 5 * (key == "b"),
            commands=[["bench", "linear-logprob", *flags, "--providers", p, "--passes",
                       "full" if p == "compile" else "full,score", *rep]
                      for p in HEAD_PROVIDERS if p not in no_compile],
            expected=[(p, d) for p in HEAD_PROVIDERS for d in ("full", "score")
                      if not (p == "compile" and d == "score")], skipped=no_compile))
    model = ["--layers", "1", "--hidden", "32", "--vocab", "500", "--groups", "2", "--cap",
             "24,12"] if dry else \
        ["--model", "qwen2.5-0.5b", "--groups", "16", "--cap", "512,256"]
    for M in (2, 8):
        if dry and M == 2:
            same = "dry run: the step's paths at M = 2 are step_m8's (measured there)"
            out.append(Section("step_m2", "training step, M = 2 (dry run: see step_m8)", 0,
                               expected=[(p, None) for p in STEP_PROVIDERS],
                               skipped={p: same for p in STEP_PROVIDERS}))
            continue
        out.append(Section(
            f"step_m{M}", f"training step, {'tiny model' if dry else 'Qwen2.5-0.5B shape'}, "
                          f"HH lengths, M = {M}", 50 + 5 * (M == 8),
            commands=[["bench", "step", *model, "--M", str(M), "--lengths", "hh",
                       "--providers", ",".join(STEP_PROVIDERS),
                       *(rep if dry else ["--rep-ms", "1000"])]],
            expected=[(p, None) for p in STEP_PROVIDERS]))
    out.append(Section("lora", f"LoRA, {'tiny Llama' if dry else 'Llama-3.1-8B'} shape "
                               f"({lora_layers if not dry else DRY_LLAMA['num_layers']} layers), "
                               f"at the budget `vrpo-fast plan` says fits", 100, inner="lora",
                       expected=[("lora_train", "plan_vs_measured")]))
    out.append(Section("train", f"`vrpo-fast score` + `train` of configs/{RECIPES['qwen']}, "
                                f"random same-shape model", 90, inner="train",
                       expected=[("score", "stage"), ("train", "stage")]))
    first = [s for s in out if not s.name.endswith("_b")]
    return first + [s for s in out if s.name.endswith("_b")]


# --- the sections measured in Python (env, lora, train) ---------------------------------------

def _cli(argv: list[str]) -> tuple[int, str]:
    """`vrpo-fast ARGV` in this process (the same `main` the console script runs) -> (exit
    status, what it printed); the output also goes to this process's stdout (the log)."""
    from vrpo_fast.cli import main

    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            buf.write(s)
            return sys.__stdout__.write(s)

        def flush(self):
            sys.__stdout__.flush()
    print("$ vrpo-fast " + " ".join(argv), flush=True)
    with contextlib.redirect_stdout(Tee()):
        rc = main(argv)
    return rc, buf.getvalue()


def _config(argv: list[str]):
    """The Config a stage's `--config FILE --key=value ...` builds, as `vrpo-fast` builds it."""
    from vrpo_fast.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    args.overrides = list(args.overrides) + extra
    return config_from_args(args)


def write_hh_data(path: Path, rows: int, seed: int = 0, fixed: tuple | None = None) -> int:
    """`rows` preference rows (chosen, rejected, 4 samples: M = 2, g given) whose texts have
    HH-RLHF's prompt and response lengths in tokens (vrpo_fast/bench/hh_lengths.json) as
    characters: under the byte tokenizer one character is one token. fixed = (P, R): every
    prompt P characters and every response R instead (micro-batches that fill a budget).
    Returns at least the most tokens a group holds (its prompt once and its 6 responses, two
    special tokens counted for each)."""
    from vrpo_fast.bench.layouts import hh_lengths

    prompts, responses = ([fixed[0]], [fixed[1]]) if fixed else hh_lengths()
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "

    def text(n):
        return "".join(rng.choice(letters) for _ in range(n)).strip() or "a"
    largest = 0
    with open(path, "w") as f:
        for _ in range(rows):
            row = dict(prompt=text(rng.choice(prompts)), chosen=text(rng.choice(responses)),
                       rejected=text(rng.choice(responses)),
                       samples=[text(rng.choice(responses)) for _ in range(4)],
                       aux_prefs=[rng.random() for _ in range(3)])
            texts = [row["prompt"], row["chosen"], row["rejected"], *row["samples"]]
            largest = max(largest, sum(len(t) + 2 for t in texts))
            f.write(json.dumps(row) + "\n")
    return largest


def _peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak() -> dict:
    """The run's peak: CUDA's allocator maximum on a GPU; on the CPU the process's peak resident
    set (ru_maxrss: interpreter and libraries included, so no plan is held to it)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return dict(peak_bytes=torch.cuda.max_memory_allocated(), peak_kind="cuda allocated")
    return dict(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                peak_kind="cpu max resident set")


def _compiled_graphs() -> int:
    from vrpo_fast.bench.step import compiled_graphs

    return compiled_graphs()


def _metrics(run_dir: Path, skip: int) -> dict:
    """Medians of the trainer's metrics.jsonl after the first `skip` steps (compilation)."""
    import statistics

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    if not records:
        raise RuntimeError(f"{run_dir}/metrics.jsonl has no step")
    steady = records[skip:] or records[-1:]
    out = dict(steps=len(records), final_loss=records[-1]["loss"],
               tokens_per_step=statistics.median(r["tokens"] for r in steady),
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
               skipped_steps=records[-1]["skipped_total"])
    if all("mfu" in r for r in steady):
        out["mfu_trainer"] = statistics.median(r["mfu"] for r in steady)
    return out


def run_env(ctx) -> list[dict]:
    import torch

    from vrpo_fast.bench.env import session
    from vrpo_fast.bench.step import matmul_rate

    row = dict(provider="env", direction="matmul", **session())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(gpu_memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count)
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        row["nvidia_smi"] = smi.stdout.strip()
        rate = matmul_rate(1.0, torch.bfloat16)
        row.update(matmul_dtype="bf16", matmul_n=8192)
    else:
        rate = matmul_rate(0.2, torch.float32)
        row.update(matmul_dtype="fp32", matmul_n=1024)
    row["matmul_tflops"] = rate / 1e12
    return [row]


def run_lora(ctx) -> list[dict]:
    """The plan's budget for this GPU, then `vrpo-fast train` at it (batch = one micro-batch of
    as many groups as the budget holds), measured peak beside the plan's."""
    import torch

    from vrpo_fast.bench.presets import tiny_config
    from vrpo_fast.plan import GIB as PLAN_GIB
    from vrpo_fast.plan import plan_memory

    work = Path(ctx.work) / "lora"
    work.mkdir(parents=True, exist_ok=True)
    dry = ctx.dry_run
    tiny = DRY_LLAMA if dry else tiny_config("llama3.1-8b", ctx.lora_layers)
    if torch.cuda.is_available():
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / PLAN_GIB
    else:
        gpu_gib = ctx.cpu_memory_gib
    data = work / "data.jsonl"
    # Groups of one size, HH's mean prompt and response: a micro-batch of budget // size groups
    # fills the budget (one row), which is what the plan is for.
    lengths = (121, 47)
    largest = write_hh_data(data, rows=8, seed=1, fixed=lengths)
    base = ["--config", str(Path(ctx.configs) / RECIPES["llama"]), "--model.path=",
            f"--model.tiny={json.dumps(tiny)}",
            "--model.tokenizer=byte", f"--model.dtype={'float32' if dry else 'bfloat16'}",
            "--lora.enabled=true", "--ref.source=online", "--aux.mode=given",
            f"--data.path={data}",
            f"--train.mixed_precision={'auto' if dry else 'bf16'}"]
    memory = ["--gpu-memory", f"{gpu_gib:.3f}"]
    # Planned at one token (the recipe's own train.max_tokens need not fit this GPU), the plan
    # says the largest budget that fits; then the plan at that budget, as a user would read it.
    rc, text = _cli(["plan", *base, *memory, "--tokens", "1"])
    found = re.search(r"largest packing budget that fits: (\d+) tokens", text)
    if rc != 0 or not found:
        raise RuntimeError(f"vrpo-fast plan: exit status {rc}, no budget in its output")
    budget = int(found.group(1))
    rc, _ = _cli(["plan", *base, *memory, "--tokens", str(budget), "--group-tokens",
                  str(largest)])
    if rc != 0:
        raise RuntimeError(f"vrpo-fast plan --tokens {budget}: exit status {rc}")
    groups = budget // largest
    if groups < 1:
        raise RuntimeError(f"the plan's budget ({budget} tokens) holds no group of {largest}")
    steps = 2
    write_hh_data(data, rows=groups * steps, seed=1, fixed=lengths)
    budget_flags = [f"--train.max_tokens={budget}", f"--train.micro_batch_groups={groups}",
                    f"--train.batch_groups={groups}"]
    cfg = _config([*base, *budget_flags])
    predicted = plan_memory(cfg, gpus=1, tokens=budget)    # as `vrpo-fast plan` counts it
    out_dir = work / "run"
    _peak_reset()
    graphs = _compiled_graphs()
    start = time.perf_counter()
    rc, _ = _cli(["train", *base, *budget_flags, f"--train.output_dir={out_dir}",
                  f"--train.max_steps={steps}", "--train.save_every=100000",
                  "--train.warmup_steps=1"])
    wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"vrpo-fast train: exit status {rc}")
    peak = _peak()
    row = dict(provider="lora_train", direction="plan_vs_measured", model=tiny,
               gpu_memory_gib=gpu_gib, budget_tokens=budget, group_tokens=largest,
               micro_batch_groups=groups, predicted_bytes=predicted.total,
               predicted_components=predicted.components, wall_s=wall,
               compiled_graphs=_compiled_graphs() - graphs, **peak,
               **_metrics(out_dir, skip=1),
               command="vrpo-fast plan " + " ".join(base + memory) + " --tokens 1; "
                       "vrpo-fast train (the same flags) " + " ".join(budget_flags))
    row["plan_error"] = (predicted.total - row["peak_bytes"]) / row["peak_bytes"]
    return [row]


def run_train(ctx) -> list[dict]:
    """The recipe's score and train stages, the model swapped for its random same-shape copy:
    the rows say how long each stage took, the trainer's tokens/s and MFU, the loss."""
    from vrpo_fast.bench.presets import tiny_config

    work = Path(ctx.work) / "train"
    work.mkdir(parents=True, exist_ok=True)
    dry = ctx.dry_run
    tiny = DRY_QWEN if dry else tiny_config("qwen2.5-0.5b")
    data = work / "data.jsonl"
    write_hh_data(data, rows=16 if dry else 512, seed=2)
    base = ["--config", str(Path(ctx.configs) / RECIPES["qwen"]), "--model.path=",
            f"--model.tiny={json.dumps(tiny)}",
            "--model.tokenizer=byte", "--aux.mode=given", f"--score.input={data}",
            f"--score.output={work / 'scored'}"]
    rows = []
    start = time.perf_counter()
    rc, _ = _cli(["score", *base])
    rows.append(dict(provider="score", direction="stage", groups=16 if dry else 512,
                     wall_s=time.perf_counter() - start, rc=rc,
                     command="vrpo-fast score " + " ".join(base),
                     **({"error": f"exit status {rc}"} if rc else {})))
    if rc:
        rows.append(dict(provider="train", direction="stage", error="not run: score failed"))
        return rows
    steps = 3 if dry else 50
    flags = [f"--train.output_dir={work / 'run'}", f"--train.max_steps={steps}",
             "--train.save_every=100000"]
    if dry:
        flags += ["--train.batch_groups=8", "--train.micro_batch_groups=4"]
    _peak_reset()
    graphs = _compiled_graphs()
    start = time.perf_counter()
    rc, _ = _cli(["train", *base, *flags])
    row = dict(provider="train", direction="stage", wall_s=time.perf_counter() - start, rc=rc,
               command="vrpo-fast train " + " ".join(base + flags))
    if rc:
        row["error"] = f"exit status {rc}"
    else:
        row.update(_peak(), compiled_graphs=_compiled_graphs() - graphs,
                   **_metrics(work / "run", skip=3 if steps > 5 else 1))
        import math

        if not math.isfinite(row["final_loss"]):
            row["error"] = f"final loss {row['final_loss']}"
    rows.append(row)
    return rows


def run_kernels(ctx) -> list[dict]:
    """The dry run's Triton path (on the CPU the head sections' "ours" is the chunked PyTorch
    reference): the fused log-prob kernel and the one sweep's Triton steps in the interpreter
    (TRITON_INTERPRET=1, set for this section's process), values and gradients against
    float64, never timed."""
    from vrpo_fast.bench import fused_vrpo, linear_logprob
    from vrpo_fast.ops import FusedLinearVRPOLoss, linear_logprobs

    rows = []
    start = time.perf_counter()
    h, w, t, grad = linear_logprob.make_inputs(96, 16, 64, "fp32")
    check = linear_logprob.check(lambda h, w, t: linear_logprobs(h, w, t, impl="triton"),
                                 h, w, t, grad, "fp32")
    rows.append(dict(provider="linear_logprob", direction="interpreted", check=check,
                     shape=dict(N=96, D=16, V=64), wall_s=time.perf_counter() - start))
    start = time.perf_counter()
    d = fused_vrpo.make_inputs(300, 16, 64, "fp32", M=1)
    sweep = FusedLinearVRPOLoss(beta=fused_vrpo.BETA, impl="triton", check_inputs=False)
    check = fused_vrpo.check(lambda h, w, t, seg, G, K, ref, g: sweep(h, w, t, seg, G, K, ref,
                                                                        g)[0], d, "fp32")
    rows.append(dict(provider="fused_vrpo", direction="interpreted", check=check,
                     shape=dict(N=300, D=16, V=64, M=1), wall_s=time.perf_counter() - start))
    for r in rows:
        if not r["check"]["ok"]:
            r["error"] = "correctness check failed against float64"
    return rows


INNER = {"env": run_env, "kernels": run_kernels, "lora": run_lora, "train": run_train}


def inner_main(name: str, ctx) -> int:
    """One section in this process: its commands (each one's rows in WORK/NAME.<i>.jsonl, its
    exit status in WORK/NAME.status.jsonl) or its Python measurement."""
    section = next(s for s in sections(ctx.dry_run, ctx.lora_layers) if s.name == name)
    work = Path(ctx.work)
    status = work / f"{name}.status.jsonl"
    if section.inner:
        try:
            rows = INNER[section.inner](ctx)
            entry = dict(rc=0)
        except Exception as err:         # recorded as the section's failure; the run goes on
            traceback.print_exc()
            rows, entry = [], dict(rc=1, error=f"{type(err).__name__}: {err}"[:300])
        from vrpo_fast.bench.env import timestamp

        with open(work / f"{name}.0.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(dict(r, timestamp=timestamp()), default=str) + "\n")
        with open(status, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return entry["rc"]
    from vrpo_fast.cli import main

    worst = 0
    for i, argv in enumerate(section.commands):
        rows_file = work / f"{name}.{i}.jsonl"
        print("$ vrpo-fast " + " ".join(argv), flush=True)
        start = time.perf_counter()
        try:
            rc, error = main([*argv, "--json", str(rows_file)]), None
        except Exception as err:        # one provider's crash (out of memory in its check...)
            traceback.print_exc()
            rc, error = 1, f"{type(err).__name__}: {err}"[:300]
        with open(status, "a") as f:
            f.write(json.dumps(dict(command=i, argv=argv, rc=rc, error=error,
                                    wall_s=time.perf_counter() - start)) + "\n")
        worst = max(worst, rc)
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return worst


# --- the run: sections in subprocesses, then the report ---------------------------------------

def _run_section(section: Section, args, cap: float, log) -> dict:
    """The section in a child process under `cap` seconds -> {status, reason, wall_s}."""
    cmd = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m",
           "vrpo_fast.bench.gpu_check", "--inner", section.name, "--work", str(args.work),
           "--lora-layers", str(args.lora_layers), "--cpu-memory-gib", str(args.cpu_memory_gib),
           "--configs", str(args.configs), args.out] + (["--dry-run"] if args.dry_run else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", **section.env)
    log.write(f"\n===== {section.name}: {section.title} (cap {cap:.0f} s)\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=cap)
        reason = None if rc == 0 else f"exit status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)         # the section and anything it started
        proc.wait()
        rc, reason = None, f"timed out after {cap:.0f} s"
    wall = time.perf_counter() - start
    log.write(f"===== {section.name}: {reason or 'done'} in {wall:.1f} s\n")
    log.flush()
    return dict(rc=rc, reason=reason, wall_s=wall)


def _load_rows(work: Path, name: str) -> tuple[list[dict], list[dict]]:
    rows, statuses = [], []
    for path in sorted(work.glob(f"{name}.*.jsonl"), key=lambda p: p.name):
        lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        (statuses if path.name.endswith(".status.jsonl") else rows).extend(lines)
    return rows, statuses


def row_status(row: dict) -> str:
    if row.get("error"):
        return f"failed: {row['error']}"
    if row.get("note"):
        return f"skipped: {row['note']}"
    return "measured"


def collect(section: Section, result: dict, work: Path) -> list[dict]:
    """Every row the section owes, each with a status: its measured rows, the providers it
    skipped, and a failed row (with the section's or its command's reason) for each one that
    did not come back."""
    rows, statuses = _load_rows(work, section.name)
    by = {}
    for r in rows:
        by.setdefault((r.get("provider"), r.get("direction")), r)
        if r.get("direction") is None and r.get("op") != "train_step":
            # a provider skipped or refused before its passes: it owes every pass the same way
            for p, d in section.expected:
                if p == r.get("provider"):
                    by.setdefault((p, d), dict(r, direction=d))
    command_errors = {}
    for s in statuses:
        if s.get("rc"):
            argv = s.get("argv") or []
            provider = argv[argv.index("--providers") + 1] if "--providers" in argv else None
            command_errors[provider] = s.get("error") or f"exit status {s['rc']}"
    out = []
    for provider, direction in section.expected:
        r = by.get((provider, direction))
        if r is None and provider in section.skipped:
            r = dict(provider=provider, direction=direction, note=section.skipped[provider])
        if r is None and (result.get("reason") or "").startswith("skipped: "):
            r = dict(provider=provider, direction=direction,
                     note=result["reason"][len("skipped: "):])
        if r is None:
            why = result.get("reason") or command_errors.get(provider) or \
                command_errors.get(",".join(STEP_PROVIDERS)) or command_errors.get(None) or \
                "no row came back"
            r = dict(provider=provider, direction=direction, error=f"no row ({why})")
        out.append(dict(r, section=section.name, status=row_status(r)))
    return out


def _ms(r) -> str:
    return f"{r['median_s'] * 1e3:.2f}" if r.get("median_s") is not None else "-"


def _mib(nbytes) -> str:
    return f"{nbytes / 2**20:,.0f}" if nbytes is not None else "-"


def _rate(r) -> str:
    if r.get("tflops") is not None:
        return f"{r['tflops']:.3g} TFLOP/s"
    if r.get("useful_tokens_per_s") is not None:
        return f"{r['useful_tokens_per_s']:,.0f} tok/s"
    if r.get("tokens_per_s") is not None:
        return f"{r['tokens_per_s']:,.0f} tok/s"
    if r.get("matmul_tflops") is not None:
        return f"{r['matmul_tflops']:.3g} TFLOP/s ({r['matmul_dtype']} matmul)"
    return "-"


def _detail(r) -> str:
    """What else a row says: the step's bound and graphs, the plan's prediction, a stage's wall
    time, the check."""
    bits = []
    if r.get("bound_ratio") is not None:
        bits.append(f"{r['bound_ratio']:.2f}x its bound")
    if r.get("compiled_graphs") is not None:
        bits.append(f"{r['compiled_graphs']} graphs compiled")
    if r.get("predicted_bytes") is not None:
        bits.append(f"plan {_mib(r['predicted_bytes'])} MiB at {r['budget_tokens']} tokens "
                    f"({r['plan_error']:+.1%} vs measured {r['peak_kind']})")
    if r.get("wall_s") is not None and r.get("provider") in ("score", "train", "lora_train"):
        bits.append(f"{r['wall_s']:.1f} s wall")
    if r.get("steps") is not None:
        bits.append(f"{r['steps']} steps, loss {r['final_loss']:.4f}")
    if r.get("check"):
        c = r["check"]
        worst = max(c["rel_err"], key=c["rel_err"].get)
        bits.append(f"check {'ok' if c['ok'] else 'FAILED'} ({worst} {c['rel_err'][worst]:.1e})")
    return "; ".join(bits) or "-"


def targets(rows: list[dict], dry: bool, device: str) -> list[dict]:
    """The issue's targets against the measured rows: met / not met / not measured. Never an
    assertion: a report."""
    get = {(r["section"], r["provider"], r["direction"]): r for r in rows}
    out = []

    def add(name, value, ok, why=None):
        out.append(dict(target=name, value=value,
                        verdict=("not evaluated: dry run (CPU, tiny shapes)" if dry else
                                 why if why else "met" if ok else "not met")))
    ours, eager = get.get(("sweep_a", "ours", "full")), get.get(("sweep_a", "eager", "full"))
    both = ours and eager and ours["status"] == eager["status"] == "measured"
    missing = "not measured (sweep_a: ours or eager has no measured row)"
    add("one-sweep head <= eager's time (sweep_a)",
        f"{ours['median_s'] / eager['median_s']:.2f}x eager" if both else "-",
        both and ours["median_s"] <= eager["median_s"], None if both else missing)
    peaks = both and ours.get("peak_bytes") and eager.get("peak_bytes")
    add("one-sweep head peak <= 1.1x eager's (sweep_a)",
        f"{ours['peak_bytes'] / eager['peak_bytes']:.2f}x eager" if peaks else "-",
        peaks and ours["peak_bytes"] <= 1.1 * eager["peak_bytes"], None if peaks else missing)
    fast = ours and ours["status"] == "measured"
    h100 = "" if "H100" in device else f" (the target is an H100's; this is {device})"
    add("one-sweep head < 40 ms at N=8192, D=4096, V=128256 on an H100",
        f"{ours['median_s'] * 1e3:.1f} ms{h100}" if fast else "-",
        fast and ours["median_s"] < 0.040, None if fast else missing)
    for variant in ("vrpo_fast_one_sweep", "vrpo_fast_online"):
        r = get.get(("step_m8", variant, None))
        ok = r and r["status"] == "measured" and r.get("mfu") is not None
        why = "no row" if r is None else r["status"] if r["status"] != "measured" else \
            "no MFU: the device is not in vrpo_fast.train.metrics.PEAK_FLOPS"
        add(f"training step MFU >= 45 % at M = 8 ({variant})",
            f"{r['mfu']:.1%} MFU" if ok else "-", ok and r["mfu"] >= 0.45,
            None if ok else f"not measured (step_m8 {variant}: {why})")
    r = get.get(("lora", "lora_train", "plan_vs_measured"))
    ok = r and r["status"] == "measured"
    add("`plan` within 15 % of the measured peak (lora)",
        f"{r['plan_error']:+.1%}" if ok else "-", ok and abs(r["plan_error"]) <= 0.15,
        None if ok else f"not measured (lora: {r['status'] if r else 'no row'})")
    return out


def markdown(report: dict) -> str:
    env = report["env"]
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    lines = [f"# GPU check{' (dry run: CPU, tiny shapes)' if report['dry_run'] else ''}", "",
             f"- device: {env.get('device', 'unknown')}",
             f"- commit: {env.get('commit', 'unknown')}",
             f"- versions: {versions or 'unknown'}",
             f"- started {report['started']}, {report['wall_s']:.0f} s in all "
             f"(budget {report['budget_s']} s)", "",
             "| section | row | status | median ms | rate | MFU | peak MiB | detail |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        row = f"{r['provider']}" + (f" {r['direction']}" if r.get("direction") else "")
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else \
            f"{r['mfu_trainer']:.1%} (6N)" if r.get("mfu_trainer") is not None else "-"
        status = r["status"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['section']} | {row} | {status} | {_ms(r)} | {_rate(r)} | {mfu} | "
                     f"{_mib(r.get('peak_bytes'))} | {_detail(r)} |")
    lines += ["", "| target | value | verdict |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {t['verdict']} |" for t in report["targets"]]
    lines += ["", "| section | status | wall s | commands |", "|---|---|---|---|"]
    for s in report["sections"]:
        cmds = "<br>".join(f"`{c}`" for c in s["commands"]) or "-"
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {cmds} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="gpu_check", description="the GPU proof in one run (scripts/gpu_check.sh)")
    parser.add_argument("out", help="output folder: results.json, results.md, gpu_check.log")
    parser.add_argument("--dry-run", action="store_true",
                        help="every section at tiny shapes on the CPU (CI)")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections (default all; env always runs)")
    parser.add_argument("--budget-s", type=float, default=440,
                        help="the whole run's time; a section starts only with >= 10 s left "
                             "and gets min(its cap, what is left) (default 440: with the "
                             "installs before it, ~8 minutes)")
    parser.add_argument("--lora-layers", type=int, default=8,
                        help="decoder layers of the Llama-3.1-8B-shaped LoRA model (default 8)")
    parser.add_argument("--cpu-memory-gib", type=float, default=0.02,
                        help="the dry run's 'GPU memory' that the LoRA plan budgets for")
    parser.add_argument("--configs", default="configs",
                        help=f"the folder of the recipes ({', '.join(RECIPES.values())}); "
                             f"default ./configs")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary "
                                                     "one, removed after the run)")
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.inner:
        return inner_main(args.inner, args)
    try:
        return run(args)
    except UserError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 1


def run(args) -> int:
    all_sections = sections(args.dry_run, args.lora_layers)
    names = [s.name for s in all_sections]
    if args.only is not None:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        bad = [n for n in only if n not in names]
        if bad or not only:
            raise UserError(f"--only: unknown section {', '.join(bad) or '(empty list)'} "
                            f"(known: {', '.join(names)})")
        all_sections = [s for s in all_sections if s.name in only or s.name == "env"]
    if not args.budget_s > 0:
        raise UserError(f"--budget-s: must be > 0, got {args.budget_s}")
    if args.lora_layers < 1:
        raise UserError(f"--lora-layers: must be >= 1, got {args.lora_layers}")
    missing = [n for n in RECIPES.values() if not (Path(args.configs) / n).is_file()]
    if missing:
        raise UserError(f"--configs: no {', '.join(missing)} in {args.configs} (the recipes of "
                        f"a source checkout's configs/)")
    args.configs = str(Path(args.configs).resolve())
    check_output(args.out, "OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = None
    if args.work is None:
        scratch = tempfile.TemporaryDirectory(prefix="gpu-check-")
        args.work = scratch.name
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.perf_counter()
    results, rows = [], []
    with open(out / "gpu_check.log", "w") as log:
        for section in all_sections:
            left = args.budget_s - (time.perf_counter() - t0)
            cap = min(120 if args.dry_run else section.cap_s, left)
            if not section.commands and not section.inner:
                result = dict(rc=0, reason=None, wall_s=0.0)
            elif cap < 10:
                result = dict(rc=None, reason=f"skipped: out of time ({left:.0f} s of the "
                                              f"run's {args.budget_s:g} s left)", wall_s=0.0)
            else:
                result = _run_section(section, args, cap, log)
            reason = result["reason"]
            status = "done" if reason is None else reason if reason.startswith("skipped") \
                else f"failed: {reason}"
            print(f"gpu_check: {section.name:<10} {status} ({result['wall_s']:.1f} s)",
                  flush=True)
            section_rows = collect(section, dict(result, reason=reason), work)
            rows += section_rows
            cmds = [" ".join(["vrpo-fast", *c]) for c in section.commands] or \
                sorted({r["command"] for r in section_rows if r.get("command")})
            results.append(dict(name=section.name, title=section.title, status=status,
                                wall_s=result["wall_s"], commands=cmds))
    env = next((r for r in rows if r["section"] == "env" and r["status"] == "measured"), {})
    report = dict(dry_run=args.dry_run, started=started, budget_s=args.budget_s,
                  wall_s=time.perf_counter() - t0,
                  env={k: env.get(k) for k in ("device", "commit", "versions", "threads",
                                                "nvidia_smi", "gpu_memory_bytes",
                                                "matmul_tflops")},
                  sections=results, rows=rows,
                  targets=targets(rows, args.dry_run, env.get("device") or "unknown"))
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    (out / "results.md").write_text(text)
    print("\n" + text)
    if scratch is not None:
        scratch.cleanup()
    failed = [r for r in rows if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
