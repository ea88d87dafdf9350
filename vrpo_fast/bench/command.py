"""`vrpo-fast bench`: the kernels and one training step at any shape, providers side by side.

    vrpo-fast bench [--quick]                      # all three at default (or tiny) shapes
    vrpo-fast bench linear-logprob --tokens 8192 --preset llama3-8b --dtype bf16
    vrpo-fast bench vrpo-loss --groups 64 --pairs 2
    vrpo-fast bench fused-vrpo --tokens 8192 --hidden 4096 --vocab 128256 --dtype bf16
    vrpo-fast bench step --model qwen2.5-0.5b --M 2 --lengths hh
    vrpo-fast bench suite [--quick] --dir benchmarks   # the pytest suites of a source checkout

Everything but `suite` runs from the installed package alone (the HH-RLHF length table ships
inside it). Rows go to the terminal as a table, to --json as one JSON object per line, and to
--plot as bars.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vrpo_fast import host_memory
from vrpo_fast.bench import fused_vrpo, linear_logprob, presets, report, step, vrpo_loss
from vrpo_fast.bench.env import Unavailable, device, session, timestamp
from vrpo_fast.bench.layouts import parse_lengths
from vrpo_fast.bench.memory import peak_memory
from vrpo_fast.bench.timing import summary, time_calls
from vrpo_fast.errors import UserError, check_output

METHOD = """\
method:
  correctness  before timing, each provider's output and gradients are compared with a
               float64 reference (the kernels: full-logit / formula maths on the first 64
               rows; the step: (c) against the naive layout (a)); a provider that fails is
               reported and not timed (exit status 1)
  timing       GPU: triton.testing.do_bench, 25 ms of warm-up, then --rep-ms of calls, each
               between CUDA events with the L2 cache flushed before it (the backward alone:
               the same by hand, an untimed forward before each flush); CPU: perf_counter
               around each call after --warmup untimed ones, at least --rounds calls and
               --rep-ms of them. Reported: the median (min-max) per call, and the speed-up
               over eager (the step: over (a))
  TFLOP/s      useful work only: 2NDV forward, 4NDV backward, 6NDV both; logits a kernel
               recomputes in its backward are not counted. The step reports useful tokens/s
               (each prompt once + every response)
  bound        the step: its useful FLOPs over the matmul rate in the model's dtype (1024^3
               on the CPU, 8192^3 on a GPU) measured in the same run (CPU: between the
               timed steps) -> bound_s, and
               bound_ratio = time / bound
  memory       peak tensor memory of one call after a warm-up call: GPU
               torch.cuda.max_memory_allocated (less what was allocated before the probe);
               CPU the PyTorch profiler's allocation events (live inputs + the highest running
               sum of allocations minus frees). The lower bound: inputs + output (+ gradients
               with a backward), nothing of size N x V
  providers    eager PyTorch, torch.compile of it, Liger-Kernel and Cut Cross-Entropy (Triton:
               GPU only; skipped with a note on the CPU or when not installed), ours. On the
               CPU "ours" is the chunked PyTorch reference of the kernel (the Triton
               interpreter is never timed) and the fused VRPO loss is the eager formula

presets (--preset, or step --model):
""" + presets.describe()

QUICK = {"linear-logprob": dict(N=64, D=32, V=1000), "vrpo-loss": dict(B=8, M=1),
         "step": dict(G=2, M=1, lengths="hh", cap=[24, 12], hidden=32, layers=1, vocab=500)}
DEFAULT_TOKENS = {"cpu": 1024, "cuda": 8192}
DEFAULT_HEAD = {"cpu": dict(D=512, V=32000), "cuda": dict(D=4096, V=128256)}
DEFAULT_STEP = {"cpu": dict(G=4, cap=[256, 128], hidden=256, layers=4, vocab=32000),
                "cuda": dict(G=8, cap=[512, 256], hidden=1024, layers=8, vocab=128256)}


SYSTEM_MALLOC = ("CPU: leave malloc as the system sets it (default: freed blocks kept for "
                 "reuse, as `vrpo-fast train` does: train.keep_host_memory)")


def _common(parser, sub: bool = False) -> None:
    """The options every measuring sub-command takes. On a sub-command (`sub`) they default to
    nothing, so that one given before the sub-command's name (`bench --providers x step`) is
    kept, not reset by the sub-command's default."""
    def add(*flags, default=None, **kw):
        parser.add_argument(*flags, default=argparse.SUPPRESS if sub else default, **kw)

    add("--providers", help="comma-separated subset (linear-logprob: eager, compile, liger, "
                            "cce, ours; vrpo-loss: eager, compile, ours; step: "
                            "reference_layout, dpo_naive, vrpo_fast, ...); default: all")
    add("--passes", help="comma-separated subset of fwd, bwd, full, and score (the forward "
                         "without gradient; linear-logprob only) (kernels; default all)")
    add("--rounds", help="the fewest timed calls (default 5; the step 3)")
    add("--warmup", default="1", help="untimed calls first on the CPU")
    add("--rep-ms", help="the least time of timed calls, ms (default 500; the step 3000; "
                         "--quick 50)")
    add("--no-memory", default=False, action="store_true",
        help="skip the peak-memory probes")
    add("--system-malloc", default=False, action="store_true", help=SYSTEM_MALLOC)
    add("--json", metavar="FILE",
        help="write the rows as JSON lines to FILE ('-': stdout, no table)")
    add("--plot", metavar="FILE.png",
        help="bar chart: time and peak memory per provider and pass")


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("benchmark the fused kernels and one training step at any shape:\n"
                          "eager, torch.compile, Liger-Kernel and Cut Cross-Entropy beside "
                          "ours.\nWithout a sub-command: all three at default shapes (options "
                          "go before or after a sub-command's name).")
    parser.epilog = METHOD
    parser.add_argument("--quick", action="store_true",
                        help="(without a sub-command) tiny shapes, seconds on a CPU")
    _common(parser)
    sub = parser.add_subparsers(dest="what",
                                metavar="{linear-logprob,vrpo-loss,fused-vrpo,step,suite}")
    kw = dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=METHOD)
    p = sub.add_parser("linear-logprob", help="fused LM-head log-prob (N, D) x (V, D)", **kw)
    p.add_argument("--tokens", "-N", default=None, help="N (default: 1024 CPU, 8192 GPU)")
    p.add_argument("--hidden", "-D", default=None, help="D (default: the preset's, or 512 CPU, "
                                                        "4096 GPU)")
    p.add_argument("--vocab", "-V", default=None, help="V (default: the preset's, or 32000 "
                                                       "CPU, 128256 GPU)")
    p.add_argument("--preset", default=None, help="a model whose D and V to use (see below)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 GPU, "
                                                 "fp32 CPU)")
    p.add_argument("--temperature", default="1.0", help="logits are divided by it")
    _common(p, sub=True)
    p = sub.add_parser("vrpo-loss", help="VRPO loss on (B, 2 + 2M) log-probs", **kw)
    p.add_argument("--groups", "-B", default="64", help="B prompts (default 64)")
    p.add_argument("--pairs", "--M", dest="M", default="2", help="M Monte Carlo pairs "
                                                                 "(default 2)")
    _common(p, sub=True)
    p = sub.add_parser("fused-vrpo", help="LM head + VRPO loss from (N, D) hidden states, "
                                          "forward + backward: eager, Liger, two-pass, one "
                                          "sweep", **kw)
    p.add_argument("--tokens", "-N", default=None, help="N (default: 1024 CPU, 8192 GPU)")
    p.add_argument("--hidden", "-D", default=None, help="D (default: 512 CPU, 4096 GPU)")
    p.add_argument("--vocab", "-V", default=None, help="V (default: 32000 CPU, 128256 GPU)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 GPU, "
                                                 "fp32 CPU)")
    p.add_argument("--pairs", "--M", dest="M", default="2", help="M Monte Carlo pairs: "
                                                                 "K = 2 + 2M responses a group")
    _common(p, sub=True)
    p = sub.add_parser("step", help="one optimizer step: reference layout, naive DPO, ours",
                       **kw)
    p.add_argument("--model", default=None,
                   help="a preset (random weights of its shape) or a local model folder "
                        "(default: a small Llama-style model)")
    p.add_argument("--layers", default=None, help="fewer decoder layers than the preset's")
    p.add_argument("--hidden", default=None, help="the default model's hidden size (default "
                                                  "256 CPU, 1024 GPU; not with --model)")
    p.add_argument("--vocab", default=None, help="the default model's vocabulary (default "
                                                 "32000 CPU, 128256 GPU; not with --model)")
    p.add_argument("--M", "--pairs", dest="M", default="2", help="Monte Carlo pairs "
                                                                 "(default 2)")
    p.add_argument("--groups", "-G", default=None, help="prompts per step (default 4 CPU, "
                                                        "8 GPU)")
    p.add_argument("--lengths", default="hh",
                   help="hh (HH-RLHF prompt / response lengths, shipped with the package), "
                        "long (160 / 60-120) or P,R (fixed)")
    p.add_argument("--cap", default=None, help="P,R: the most tokens of an hh prompt / "
                                               "response (default 256,128 CPU, 512,256 GPU)")
    _common(p, sub=True)
    p = sub.add_parser("suite", help="the pytest-benchmark suites of a source checkout")
    p.add_argument("--quick", action="store_true", default=argparse.SUPPRESS,
                   help="smoke mode: tiny shapes, one round, nothing recorded")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help="one benchmark file, e.g. train_step, linear_logprob, vrpo_loss, "
                        "packing (repeatable; default: all)")
    p.add_argument("--dir", default="benchmarks",
                   help="the suites' folder (default: ./benchmarks)")
    p.add_argument("--results-dir", default=None,
                   help="where the rows go (default: DIR/results; --quick: nowhere)")
    p.add_argument("--system-malloc", action="store_true", default=argparse.SUPPRESS,
                   help=SYSTEM_MALLOC)


# --- argument checks: one line each -------------------------------------------------------------

def _int(value, flag: str, minimum: int = 1) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag}: expected an integer, got {value!r}") from None
    if n < minimum:
        raise UserError(f"{flag}: must be >= {minimum}, got {n}")
    return n


def _subset(value, flag: str, known) -> list[str]:
    if value is None:
        return list(known)
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise UserError(f"{flag}: unknown {', '.join(bad) or 'empty list'} (known: "
                        f"{', '.join(known)})")
    return names


def _progress(op: str, shape: dict) -> None:
    print(f"measuring {op} {report.shape_text(shape)} ...", file=sys.stderr, flush=True)


def _timing(args, rounds: int, rep_ms: int) -> dict:
    return dict(rounds=_int(args.rounds or rounds, "--rounds"),
                warmup=_int(args.warmup, "--warmup", 0),
                rep_ms=_int(args.rep_ms or rep_ms, "--rep-ms"))


# --- one op ---------------------------------------------------------------------------------

def _measure(module, fn, inputs, direction, timing, probe_kwargs, memory) -> dict:
    """Times of one pass and its peak memory (not probed for the backward alone, which
    allocates what the full pass does)."""
    op, setup = module.make_op(fn, *inputs, direction)
    try:
        out = summary(time_calls(op, setup=setup, **timing))
        if memory and direction != "bwd":
            out.update(peak_memory(f"{module.__name__}:probe", fresh_process=False,
                                   direction=direction, **probe_kwargs))
    except torch.cuda.OutOfMemoryError:
        out = {"error": "out of memory"}
    return out


def bench_linear_logprob(args, quick: bool = False) -> list[dict]:
    dtype = getattr(args, "dtype", None) or linear_logprob.default_dtype()
    if dtype not in linear_logprob.DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(linear_logprob.DTYPES)}, got "
                        f"{dtype!r}")
    if quick:
        shape = dict(QUICK["linear-logprob"])
    else:
        head = dict(DEFAULT_HEAD[device()])
        given = {k: getattr(args, k, None) for k in ("tokens", "hidden", "vocab", "preset")}
        if given["preset"]:
            if given["hidden"] or given["vocab"]:
                raise UserError("--preset: sets --hidden and --vocab; give one or the other")
            p = presets.preset(given["preset"])
            head = dict(D=p.hidden, V=p.vocab)
        shape = dict(N=_int(given["tokens"] or DEFAULT_TOKENS[device()], "--tokens"),
                     D=_int(given["hidden"] or head["D"], "--hidden"),
                     V=_int(given["vocab"] or head["V"], "--vocab", 2))
    try:
        temperature = float(getattr(args, "temperature", None) or 1.0)
    except ValueError:
        raise UserError(f"--temperature: expected a number, got {args.temperature!r}") from None
    if not temperature > 0:
        raise UserError(f"--temperature: must be > 0, got {temperature}")
    providers = _subset(args.providers, "--providers", linear_logprob.PROVIDERS)
    passes = _subset(args.passes, "--passes", linear_logprob.DIRECTIONS)
    timing = _timing(args, rounds=1 if quick else 5, rep_ms=50 if quick else 500)
    N, D, V = shape["N"], shape["D"], shape["V"]
    _progress("linear_logprob", shape)
    common = dict(op="linear_logprob", shape=shape, dtype=dtype, temperature=temperature)
    rows = []
    for provider in providers:
        try:
            fn = linear_logprob.provider_fn(provider, temperature)
        except Unavailable as why:
            rows.append(dict(common, provider=provider, direction=None, note=str(why)))
            continue
        inputs = linear_logprob.make_inputs(N, D, V, dtype)
        check = linear_logprob.check(fn, *inputs, dtype, temperature)
        if not check["ok"]:
            rows.append(dict(common, provider=provider, direction=None, check=check,
                             error="correctness check failed: not timed"))
            continue
        for direction in passes:
            out = _measure(linear_logprob, fn, inputs, direction, timing,
                           dict(provider=provider, dtype=dtype, temperature=temperature,
                                **shape), not args.no_memory)
            if "median_s" in out:
                out["tflops"] = linear_logprob.tflops(direction, N, D, V, out["median_s"])
            rows.append(dict(common, provider=provider, direction=direction, check=check,
                             lower_bound_bytes=linear_logprob.lower_bound_bytes(
                                 N, D, V, dtype, direction), **out))
    flags = f"--tokens {N} --hidden {D} --vocab {V} --dtype {dtype}" + \
        (f" --temperature {temperature:g}" if temperature != 1.0 else "")
    return [dict(r, command=f"vrpo-fast bench linear-logprob {flags}") for r in rows]


def bench_vrpo_loss(args, quick: bool = False) -> list[dict]:
    shape = dict(QUICK["vrpo-loss"]) if quick else dict(
        B=_int(getattr(args, "groups", None) or 64, "--groups"),
        M=_int(getattr(args, "M", None) or 2, "--pairs"))
    providers = _subset(args.providers, "--providers", vrpo_loss.PROVIDERS)
    passes = _subset(args.passes, "--passes", vrpo_loss.DIRECTIONS)
    timing = _timing(args, rounds=1 if quick else 5, rep_ms=50 if quick else 500)
    _progress("vrpo_loss", shape)
    rows = []
    for provider in providers:
        try:
            fn = vrpo_loss.provider_fn(provider)
        except Unavailable as why:
            rows.append(dict(op="vrpo_loss", shape=shape, provider=provider, direction=None,
                             note=str(why)))
            continue
        inputs = vrpo_loss.make_inputs(**shape)
        check = vrpo_loss.check(fn, *inputs)
        if not check["ok"]:
            rows.append(dict(op="vrpo_loss", shape=shape, provider=provider, direction=None,
                             check=check, error="correctness check failed: not timed"))
            continue
        for direction in passes:
            out = _measure(vrpo_loss, fn, inputs, direction, timing,
                           dict(provider=provider, **shape), not args.no_memory)
            rows.append(dict(op="vrpo_loss", shape=shape, provider=provider,
                             direction=direction, check=check, lower_bound_bytes=vrpo_loss.
                             lower_bound_bytes(shape["B"], shape["M"], direction), **out))
    command = f"vrpo-fast bench vrpo-loss --groups {shape['B']} --pairs {shape['M']}"
    return [dict(r, command=command) for r in rows]


def bench_fused_vrpo(args, quick: bool = False) -> list[dict]:
    """The one-sweep LM head + VRPO loss beside eager, torch.compile, Liger / CCE as the LM
    head and the two-pass head (vrpo_fast/bench/fused_vrpo.py), forward + backward."""
    dtype = getattr(args, "dtype", None) or linear_logprob.default_dtype()
    if dtype not in linear_logprob.DTYPES:
        raise UserError(f"--dtype: expected one of {', '.join(linear_logprob.DTYPES)}, got "
                        f"{dtype!r}")
    head = DEFAULT_HEAD[device()]
    shape = dict(N=_int(getattr(args, "tokens", None) or DEFAULT_TOKENS[device()], "--tokens"),
                 D=_int(getattr(args, "hidden", None) or head["D"], "--hidden"),
                 V=_int(getattr(args, "vocab", None) or head["V"], "--vocab", 2),
                 M=_int(getattr(args, "M", None) or 2, "--pairs"))
    providers = _subset(args.providers, "--providers", fused_vrpo.PROVIDERS)
    passes = _subset(args.passes, "--passes", fused_vrpo.DIRECTIONS)
    timing = _timing(args, rounds=5, rep_ms=500)
    N, D, V = shape["N"], shape["D"], shape["V"]
    _progress("fused_vrpo", shape)
    common = dict(op="fused_vrpo", shape=shape, dtype=dtype)
    rows = []
    for provider in providers:
        try:
            fn = fused_vrpo.provider_fn(provider)
        except Unavailable as why:
            rows.append(dict(common, provider=provider, direction=None, note=str(why)))
            continue
        inputs = fused_vrpo.make_inputs(N, D, V, dtype, shape["M"])
        check = fused_vrpo.check(fn, inputs, dtype)
        if not check["ok"]:
            rows.append(dict(common, provider=provider, direction=None, check=check,
                             error="correctness check failed: not timed"))
            continue
        for direction in passes:
            out = _measure(fused_vrpo, fn, (inputs,), direction, timing,
                           dict(provider=provider, dtype=dtype, **shape), not args.no_memory)
            if "median_s" in out:
                out["tflops"] = fused_vrpo.tflops(N, D, V, out["median_s"])
            rows.append(dict(common, provider=provider, direction=direction, check=check,
                             groups=inputs["G"], lower_bound_bytes=fused_vrpo.
                             lower_bound_bytes(N, D, V, dtype), **out))
        del inputs
    command = (f"vrpo-fast bench fused-vrpo --tokens {N} --hidden {D} --vocab {V} "
               f"--dtype {dtype} --pairs {shape['M']}")
    return [dict(r, command=command) for r in rows]


def _step_shape(args, quick: bool) -> dict:
    if quick:
        return dict(QUICK["step"], budget=None)
    dev = DEFAULT_STEP[device()]
    shape = dict(G=_int(getattr(args, "groups", None) or dev["G"], "--groups"),
                 M=_int(getattr(args, "M", None) or 2, "--M"),
                 lengths=getattr(args, "lengths", None) or "hh", budget=None)
    parse_lengths(shape["lengths"])
    cap = getattr(args, "cap", None)
    if cap:
        try:
            shape["cap"] = [int(x) for x in cap.split(",")]
            assert len(shape["cap"]) == 2 and min(shape["cap"]) >= 1
        except (ValueError, AssertionError):
            raise UserError(f"--cap: expected P,R (two token counts >= 1), got {cap!r}") from None
    else:
        shape["cap"] = dev["cap"]
    model = getattr(args, "model", None)
    layers = getattr(args, "layers", None)
    sizes = {k: getattr(args, k, None) for k in ("hidden", "vocab")}
    if model is not None and any(sizes.values()):
        flag = "--hidden" if sizes["hidden"] else "--vocab"
        raise UserError(f"{flag}: only for the default model (--model {model} has its own)")
    if model is None:
        shape.update(hidden=_int(sizes["hidden"] or dev["hidden"], "--hidden", 2),
                     layers=_int(layers or dev["layers"], "--layers"),
                     vocab=_int(sizes["vocab"] or dev["vocab"], "--vocab", 4))
    elif model in presets.PRESETS:
        shape.update(preset=model, layers=_int(layers, "--layers") if layers else None)
    elif Path(model).is_dir():
        if layers:
            raise UserError("--layers: only with a preset or the default model (a model "
                            "folder keeps its own layers)")
        shape["path"] = str(Path(model).resolve())
    else:
        raise UserError(f"--model: {model!r} is neither a preset ({', '.join(presets.PRESETS)})"
                        f" nor a model folder")
    return shape


def bench_step(args, quick: bool = False) -> list[dict]:
    shape = _step_shape(args, quick)
    providers = _subset(args.providers, "--providers", step.VARIANTS)
    timing = _timing(args, rounds=1 if quick else 3, rep_ms=50 if quick else 3000)
    _progress("train_step", shape)
    check = step.check_same_maths(shape)
    rows = []
    for variant in providers:
        row = dict(op="train_step", shape=shape, provider=variant, direction=None)
        try:
            if variant == "trl_dpo":
                row["check"] = step.check_trl_loss(shape)
            elif variant in step.CACHED_REF:
                row["check"] = check
            if "check" in row and not row["check"]["ok"]:
                rows.append(dict(row, error="correctness check failed: not timed"))
                continue
            graphs = step.compiled_graphs()
            fn, state = step.make_step(shape, variant)
            probe = step.rate_probe(state)
            out = summary(time_calls(fn, setup=probe, **timing))
            out["compiled_graphs"] = step.compiled_graphs() - graphs
            out.update(step.bound(variant, state, out["median_s"],
                                  probe.rate() if probe else None))
            loss = fn()
            if not torch.isfinite(loss):      # a host sync, outside the timed calls
                out["error"] = f"loss {loss.item()} after the timed steps"
            if not args.no_memory:
                out.update(peak_memory("vrpo_fast.bench.step:probe", fresh_process=False,
                                       variant=variant, **shape))
        except Unavailable as why:
            rows.append(dict(row, note=str(why)))
            continue
        except torch.cuda.OutOfMemoryError:
            rows.append(dict(row, error="out of memory"))
            continue
        counts = step.token_counts(variant, state)
        rows.append(dict(row, **counts, **out,
                         useful_tokens_per_s=counts["useful_tokens"] / out["median_s"]))
        del fn, state
    model = (f"--model {shape['preset']}" + (f" --layers {shape['layers']}"
                                              if shape["layers"] else "")
             if shape.get("preset") else f"--model {shape['path']}" if shape.get("path")
             else f"--layers {shape['layers']} --hidden {shape['hidden']} "
                  f"--vocab {shape['vocab']}")
    command = (f"vrpo-fast bench step {model} --M {shape['M']} --groups {shape['G']} "
               f"--lengths {shape['lengths']} --cap {shape['cap'][0]},{shape['cap'][1]}")
    return [dict(r, command=command) for r in rows]


OPS = {"linear-logprob": bench_linear_logprob, "vrpo-loss": bench_vrpo_loss,
       "step": bench_step}
SUB_COMMANDS = dict(OPS, **{"fused-vrpo": bench_fused_vrpo})   # OPS: what a bare `bench` runs


# --- the command ------------------------------------------------------------------------------

SUITE_IGNORES = ("providers", "passes", "rounds", "rep_ms", "no_memory", "json", "plot")


def run(args) -> int:
    if args.what == "suite":
        given = [name for name in SUITE_IGNORES
                 if getattr(args, name) not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"{flag}: not an option of `bench suite` (it runs the pytest "
                            f"suites at their own settings)")
        return run_suite(args)
    if args.quick and args.what is not None:
        raise UserError(f"--quick: the tiny shapes of a run without a sub-command (or `suite "
                        f"--quick`); `{args.what}` takes its shape from its own flags")
    if args.plot and not args.plot.endswith(".png"):
        raise UserError(f"--plot: expected a .png file name, got {args.plot!r}")
    to_stdout = args.json == "-"
    # Checked before the benchmark runs, not when its results are written.
    if args.json and not to_stdout:
        check_output(args.json, "--json", folder=False)
    if args.plot:
        check_output(args.plot, "--plot", folder=False)
    if args.what is None:
        todo = [(fn, args.quick) for fn in OPS.values()]
        if args.providers:
            raise UserError("--providers: give it with a sub-command (each has its own "
                            "providers)")
    else:
        todo = [(SUB_COMMANDS[args.what], False)]
    if not args.system_malloc and device() == "cpu":
        # Every provider runs in this process with the CPU trainer's allocator setting (no page
        # faults on each call's fresh outputs): the comparison is like for like.
        host_memory.keep_freed_memory()
    rows = []
    for fn, quick in todo:
        rows += fn(args, quick)
    shared = session()
    rows = [dict(r, mode="quick" if args.what is None and args.quick else "cli", **shared,
                 timestamp=timestamp()) for r in rows]
    if args.json:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if to_stdout:
            sys.stdout.write(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
    if not to_stdout:
        print(f"\n{shared['device']}; " + ", ".join(f"{k} {v}" for k, v in
                                                    shared["versions"].items() if v)
              + (f"; commit {shared['commit']}" if "commit" in shared else "") + "\n")
        print(report.run_table(rows))
    if args.plot:
        report.run_chart(rows, Path(args.plot))
    failed = sorted({r["provider"] for r in rows if r.get("check", {}).get("ok") is False})
    if failed:
        print(f"correctness check failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def run_suite(args) -> int:
    """The pytest-benchmark suites of a source checkout, then the table of this run. A full
    run appends its rows to DIR/results/<device>.jsonl and regenerates DIR/RESULTS.md and the
    step chart (DIR/report.py); --quick runs the smoke mode (tiny shapes, one round, no memory
    probes) and records nothing unless --results-dir is given."""
    bench_dir = Path(args.dir)
    if not (bench_dir / "conftest.py").is_file():
        raise UserError(f"--dir: no benchmark suite in {bench_dir} (the pytest suites live in "
                        f"a source checkout's benchmarks/; `vrpo-fast bench linear-logprob | "
                        f"vrpo-loss | step` run anywhere)")
    targets = []
    for name in args.only or []:
        path = bench_dir / f"bench_{name}.py"
        if not path.is_file():
            known = sorted(p.stem[len("bench_"):] for p in bench_dir.glob("bench_*.py"))
            raise UserError(f"--only: no benchmark file {path.name} (known: "
                            f"{', '.join(known)})")
        targets.append(path.name)
    with tempfile.TemporaryDirectory() as tmp:
        # Rows of this run land in their own folder first, so the printed table is this run's.
        run_dir = Path(tmp)
        cmd = [sys.executable, "-m", "pytest", *(targets or ["."]), "-q",
               "-p", "no:cacheprovider", f"--results-dir={run_dir}",
               "--benchmark-columns=median,min,max,rounds"]
        if args.quick:
            cmd.append("--smoke")
        if args.system_malloc:
            cmd.append("--system-malloc")
        print("running:", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=bench_dir)
        rows = report.load_rows(run_dir)
        for dev, device_rows in report.latest(rows, include_smoke=True).items():
            print(f"\n## {dev}\n\n{report.tables(device_rows)}")
        keep = args.results_dir or (None if args.quick else bench_dir / "results")
        if keep is not None and rows:
            keep = Path(keep)
            keep.mkdir(parents=True, exist_ok=True)
            for path in run_dir.glob("*.jsonl"):
                with open(keep / path.name, "a") as f:
                    f.write(path.read_text())
            if not args.quick and keep.resolve() == (bench_dir / "results").resolve():
                subprocess.call([sys.executable, "report.py", str(keep.resolve())],
                                cwd=bench_dir)
    return rc
