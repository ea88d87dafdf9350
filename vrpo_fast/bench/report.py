"""Tables and charts from benchmark rows (dicts with op, provider, shape, direction, times,
memory, device, versions): the suite tables of benchmarks/RESULTS.md, and the table and chart
of one `vrpo-fast bench` run."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

STEP_VARIANTS = ("reference_layout", "dpo_naive", "vrpo_fast")
TARGET_A_OVER_C, TARGET_C_OVER_B = 3.0, 1.3


def load_rows(results_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _key(row):
    return (row["op"], row["provider"], json.dumps(row["shape"], sort_keys=True),
            row.get("direction"))


def device_label(row: dict) -> str:
    """The row's device, with ", system malloc" for a CPU run that left malloc as the system
    sets it (`--system-malloc`): its rows are another table, not newer rows of the same."""
    return row["device"] + (", system malloc" if row.get("malloc_kept") is False else "")


def latest(rows: list[dict], include_smoke: bool = False) -> dict[str, list[dict]]:
    """device label (`device_label`) -> its latest row per (op, provider, shape, direction)."""
    by_device = defaultdict(dict)
    for row in rows:
        if row.get("mode") == "smoke" and not include_smoke:
            continue
        device = device_label(row)
        prev = by_device[device].get(_key(row))
        if prev is None or row["timestamp"] >= prev["timestamp"]:
            by_device[device][_key(row)] = row
    return {d: list(r.values()) for d, r in by_device.items()}


# --- formatting --------------------------------------------------------------------------------

def _t(row, unit="ms"):
    if row is None:
        return "-"
    if row.get("median_s") is None:
        return row.get("error", "n/a")
    k = {"ms": 1e3, "us": 1e6, "s": 1}[unit]
    return (f"{row['median_s'] * k:.3g} ({row['min_s'] * k:.3g}-{row['max_s'] * k:.3g})"
            if row.get("rounds", 1) > 1 else f"{row['median_s'] * k:.3g}")


def _mib(row):
    n = None if row is None else row.get("peak_bytes")
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f}" if n >= 10 * 2**20 else f"{n / 2**20:.2g}"


def _ratio(num, den, fmt="{:.2f}x"):
    if num is None or den is None or num.get("median_s") is None or \
            den.get("median_s") is None:
        return "-"
    return fmt.format(num["median_s"] / den["median_s"])


def shape_text(shape: dict, skip=()) -> str:
    return ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in shape.items()
                     if k not in skip)


def _groups(rows, op):
    out = defaultdict(dict)
    for r in rows:
        if r["op"] == op:
            out[json.dumps(r["shape"], sort_keys=True)][(r["provider"], r.get("direction"))] = r
    return [(json.loads(s), out[s]) for s in sorted(out, key=lambda s: (len(s), s))]


# --- one section per op ----------------------------------------------------------------------

def train_step_table(rows):
    every = _groups(rows, "train_step")
    if not every:
        return []
    out = ["### Training step", ""]
    groups = [(shape, by) for shape, by in every if any((v, None) in by for v in STEP_VARIANTS)]
    if groups:
        out += _layout_table(groups) + [""]
    online = [(shape, by) for shape, by in every
              if ("vrpo_fast_online", None) in by or ("trl_dpo", None) in by]
    if online:
        out += _bound_table(online)
    model = every[0][0]
    out += ["", f"Model: Llama-style, hidden {model['hidden']}, {model['layers']} layers, "
                f"vocab {model['vocab']}; lengths capped at {tuple(model['cap'])} tokens "
                f"(prompt, response).", ""]
    return out


def _bound_table(groups):
    """vrpo_fast_online (the packed step with its reference forward) and TRL's DPOTrainer step
    on the same model and prompts: each time beside its arithmetic bound (useful FLOPs at the
    matmul rate probed in the same run) and the ratio of the two steps' times."""
    out = ["The step with its reference forward (vrpo_fast_online) and TRL's DPOTrainer step "
               "(chosen and rejected only) on the same model and prompts; bound: the step's "
               "useful FLOPs at the matmul rate probed in the same run.", "",
           "| lengths | M | G | vrpo_fast_online ms | bound ms (GFLOP/s) | time / bound | "
           "trl_dpo ms | trl_dpo time / bound | online / TRL |",
           "|---|---|---|---|---|---|---|---|---|"]

    def bound(r):
        if r is None or r.get("bound_s") is None:
            return "-"
        return f"{r['bound_s'] * 1e3:,.0f} ({r['matmul_flops_per_s'] / 1e9:.0f})"

    def ratio(r):
        return "-" if r is None or r.get("bound_ratio") is None else f"{r['bound_ratio']:.2f}x"
    for shape, by in groups:
        v, t = by.get(("vrpo_fast_online", None)), by.get(("trl_dpo", None))
        out.append(f"| {shape['lengths']} | {shape['M']} | {shape['G']} | {_t(v)} | {bound(v)} "
                   f"| {ratio(v)} | {_t(t)} | {ratio(t)} | {_ratio(v, t)} |")
    return out


def _layout_table(groups):
    out = ["(a) reference layout, (b) plain DPO in the naive layout, (c) vrpo_fast. Time per "
            "optimizer step, median (min-max) in ms; (a)/(c) is the throughput ratio (same "
            f"groups and M; target >= {TARGET_A_OVER_C:g}), (c)/(b) the time ratio (target <= "
            f"{TARGET_C_OVER_B:g}). Tokens: positions through the model forwards (padding and "
            "the reference forward included) / useful tokens (each prompt once + every "
            "response).", "",
            "| lengths | M | G | prompt / response mean | (a) ms | (b) ms | (c) ms | (a)/(c) | "
            "(c)/(b) | peak MiB (a) / (b) / (c) | model tokens (a) / (b) / (c) | useful tokens "
            "(c) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, by in groups:
        a, b, c = (by.get((v, None)) for v in STEP_VARIANTS)
        lens = f"{c['prompt_mean']:.0f} / {c['response_mean']:.0f}" if c else "-"
        ac = _ratio(a, c)
        cb = _ratio(c, b)
        out.append(f"| {shape['lengths']} | {shape['M']} | {shape['G']} | {lens} | {_t(a)} | "
                   f"{_t(b)} | {_t(c)} | {ac} | {cb} | {_mib(a)} / {_mib(b)} / {_mib(c)} | "
                   + " / ".join(str(r.get("model_tokens", "-")) if r else "-"
                                for r in (a, b, c))
                   + f" | {c['useful_tokens'] if c else '-'} |")
    return out


def linear_logprob_tables(rows):
    groups = _groups(rows, "linear_logprob")
    if not groups:
        return []
    out = ["### Fused linear log-prob", "",
           "TFLOP/s count useful work (2NDV forward, 4NDV backward, 6NDV both, 2NDV score: the "
           "forward without gradient); peak memory includes the inputs; the lower bound is "
           "inputs + output (+ gradients).", ""]
    for shape, by in groups:
        dtype = next(iter(by.values())).get("dtype", "")
        out += [f"#### N={shape['N']}, D={shape['D']}, V={shape['V']} ({dtype})", "",
                "| provider | pass | ms, median (min-max) | vs eager | TFLOP/s | peak MiB | "
                "peak / lower bound |", "|---|---|---|---|---|---|---|"]
        for (prov, direction), r in sorted(by.items(), key=lambda kv: (
                ("fwd", "bwd", "full", "score").index(kv[0][1]), kv[0][0])):
            eager = by.get(("eager", direction))
            tf = "-" if r.get("tflops") is None else f"{r['tflops']:.3g}"
            bound = "-" if r.get("peak_bytes") is None else \
                f"{r['peak_bytes'] / r['lower_bound_bytes']:.2f}"
            out.append(f"| {prov} | {direction} | {_t(r)} | {_ratio(eager, r)} | {tf} | "
                       f"{_mib(r)} | {bound} |")
        out.append("")
    return out


def vrpo_loss_table(rows):
    groups = _groups(rows, "vrpo_loss")
    if not groups:
        return []
    out = ["### VRPO loss on (B, 2 + 2M) log-probs", "",
           "Microseconds per call, median (min-max); ours = the fused Triton kernel (CUDA "
           "only: on the CPU the dispatch runs the eager formula, so there is no separate "
           "row).", "",
           "| B | M | pass | eager us | compile us | ours us | ours vs eager |",
           "|---|---|---|---|---|---|---|"]
    for shape, by in groups:
        for direction in ("fwd", "full"):
            e, c, o = (by.get((p, direction)) for p in ("eager", "compile", "ours"))
            out.append(f"| {shape['B']} | {shape['M']} | {direction} | {_t(e, 'us')} | "
                       f"{_t(c, 'us')} | {_t(o, 'us')} | {_ratio(e, o)} |")
    return out + [""]


def fused_dpo_tables(rows):
    groups = _groups(rows, "fused_linear_dpo")
    if not groups:
        return []
    out = ["### Fused linear DPO loss, 2 responses (LM-head inputs -> loss, forward + "
           "backward)", "",
           "Reference-free so every provider does the same maths (Liger's API cannot take "
           "cached reference log-probs). eager and liger get padded (2B, R, D) response "
           "hidden states; ours gets the packed response tokens.", "",
           "| shape | provider | ms, median (min-max) | vs eager | peak MiB | tokens |",
           "|---|---|---|---|---|---|"]
    for shape, by in groups:
        for prov in ("eager", "liger", "ours"):
            r = by.get((prov, "full"))
            if r:
                out.append(f"| {shape_text(shape)} | {prov} | {_t(r)} | "
                           f"{_ratio(by.get(('eager', 'full')), r)} | {_mib(r)} | "
                           f"{r.get('tokens', '-')} |")
    return out + [""]


def packing_tables(rows):
    groups = _groups(rows, "sequence_logps")
    if not groups:
        return []
    out = ["### Sequence log-probs, packed vs naive", "",
           "score = no-grad forward; train = forward + backward. naive/packed is the time "
           "ratio; the token ratio (P + KR) / (K(P + R)) is the packed share of the unpadded "
           "naive tokens (the expected speed-up is at least its inverse).", "",
           "| shape | pass | naive ms | packed ms | naive / packed | 1 / token ratio | ms per "
           "group (packed) | peak MiB naive / packed | model tokens naive / packed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for shape, by in groups:
        for direction in ("score", "train"):
            n, p = by.get(("naive", direction)), by.get(("packed", direction))
            if not (n or p):
                continue
            ref = p or n
            per_group = "-" if not p or p.get("median_s") is None else \
                f"{p['median_s'] * 1e3 / p['groups']:.3g}"
            out.append(f"| {shape_text(shape, skip=('hidden', 'layers', 'vocab', 'budget'))} | "
                       f"{direction} | {_t(n)} | {_t(p)} | {_ratio(n, p)} | "
                       f"{1 / ref['token_ratio']:.2f}x | {per_group} | {_mib(n)} / {_mib(p)} | "
                       f"{n.get('model_tokens', '-') if n else '-'} / "
                       f"{p.get('model_tokens', '-') if p else '-'} |")
    return out + [""]


def generic_tables(rows, op):
    groups = _groups(rows, op)
    if not groups:
        return []
    out = [f"### {op}", "", "| shape | provider | ms, median (min-max) | extra |",
           "|---|---|---|---|"]
    for shape, by in groups:
        for (prov, direction), r in sorted(by.items()):
            extra = "; ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in r.items() if k.endswith("_per_s"))
            name = prov if direction is None else f"{prov} {direction}"
            out.append(f"| {shape_text(shape)} | {name} | {_t(r)} | {extra} |")
    return out + [""]


KNOWN = ("train_step", "linear_logprob", "vrpo_loss", "fused_linear_dpo", "sequence_logps")


def tables(rows: list[dict]) -> str:
    out = (train_step_table(rows) + linear_logprob_tables(rows) + vrpo_loss_table(rows)
           + fused_dpo_tables(rows) + packing_tables(rows))
    for op in sorted({r["op"] for r in rows} - set(KNOWN)):
        out += generic_tables(rows, op)
    return "\n".join(out)


def chart(rows: list[dict], path: Path) -> bool:
    """Bar chart of the step benchmark: ms per step and peak memory per variant and shape."""
    groups = [(s, by) for s, by in _groups(rows, "train_step")
              if any((v, None) in by for v in STEP_VARIANTS)]
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['lengths']}\nM={s['M']}" for s, _ in groups]
    names = {"reference_layout": "(a) reference layout", "dpo_naive": "(b) DPO, naive",
             "vrpo_fast": "(c) vrpo_fast"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for i, v in enumerate(STEP_VARIANTS):
        xs = [x + (i - 1) * width for x in range(len(groups))]
        ms = [(by.get((v, None)) or {}).get("median_s") for _, by in groups]
        mib = [(by.get((v, None)) or {}).get("peak_bytes") for _, by in groups]
        axes[0].bar(xs, [m * 1e3 if m else 0 for m in ms], width, label=names[v])
        axes[1].bar(xs, [m / 2**20 if m else 0 for m in mib], width, label=names[v])
    for x, (_, by) in enumerate(groups):
        a, c = by.get(("reference_layout", None)), by.get(("vrpo_fast", None))
        if a and c and a.get("median_s") and c.get("median_s"):
            axes[0].annotate(f"{a['median_s'] / c['median_s']:.1f}x", (x + width, c["median_s"]
                                                                        * 1e3),
                             ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("ms per optimizer step (median)")
    axes[1].set_ylabel("peak tensor memory (MiB)")
    for ax in axes:
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        ax.legend(fontsize=8)
    some = groups[0][1][next(iter(groups[0][1]))]
    fig.suptitle(f"One VRPO training step, {some['device']} (labels on (c): (a)/(c))",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- one `vrpo-fast bench` run: a table per (op, shape) and a bar chart ----------------------

BASELINE = {"linear_logprob": "eager", "vrpo_loss": "eager", "fused_vrpo": "eager",
            "train_step": "reference_layout"}


def _check(row) -> str:
    check = row.get("check")
    if check is None:
        return "-"
    worst = max(check["rel_err"], key=lambda k: check["rel_err"][k])
    tol = check["tol"][worst] if isinstance(check["tol"], dict) else check["tol"]
    return (f"ok (max err {check['rel_err'][worst]:.1e})" if check["ok"] else
            f"FAILED: {worst} err {check['rel_err'][worst]:.1e} > {tol:g}")


def run_table(rows: list[dict]) -> str:
    """The rows of one run, one table per (op, shape): provider and pass, median time (min-max),
    speed-up over the baseline (eager, or the reference layout for the step), TFLOP/s or
    useful tokens/s, peak memory (and its ratio to the lower bound), the correctness check;
    a provider that could not run shows why."""
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        for shape, by in _groups(rows, op):
            some = next(iter(by.values()))
            extra = {k: some[k] for k in ("dtype", "temperature") if some.get(k) is not None}
            out += [f"{op}: {shape_text(shape)}" + "".join(f", {k}={v}" for k, v in extra.items()),
                    "", f"| provider | pass | ms, median (min-max) | vs {BASELINE[op]} | "
                    "TFLOP/s or tokens/s | peak MiB | peak / lower bound | check |",
                    "|---|---|---|---|---|---|---|---|"]
            for (prov, direction), r in by.items():
                if r.get("note"):
                    out.append(f"| {prov} | {direction or '-'} | skipped: {r['note']} "
                               "| | | | | |")
                    continue
                base = by.get((BASELINE[op], direction))
                if r.get("tflops") is not None:
                    rate = f"{r['tflops']:.3g} TFLOP/s"
                elif r.get("useful_tokens_per_s") is not None:
                    rate = f"{r['useful_tokens_per_s']:,.0f} tok/s"
                else:
                    rate = "-"
                bound = "-" if r.get("peak_bytes") is None or not r.get("lower_bound_bytes") \
                    else f"{r['peak_bytes'] / r['lower_bound_bytes']:.2f}"
                out.append(f"| {prov} | {direction or 'step'} | {_t(r)} | {_ratio(base, r)} | "
                           f"{rate} | {_mib(r)} | {bound} | {_check(r)} |")
            out.append("")
    return "\n".join(out)


def run_chart(rows: list[dict], path: Path) -> None:
    """Bars per provider of one run: median ms (min-max as error bars) on the left, peak MiB
    on the right (the lower bound as a line), one group of bars per pass; the first shape of
    the first op when a run holds several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("median_s") is not None]
    if not timed:
        raise ValueError("nothing was timed: no chart")
    op = timed[0]["op"]
    shape = timed[0]["shape"]
    timed = [r for r in timed if r["op"] == op and r["shape"] == shape]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    passes = list(dict.fromkeys(r.get("direction") or "step" for r in timed))
    by = {(r["provider"], r.get("direction") or "step"): r for r in timed}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        xs = [x + (i - (len(providers) - 1) / 2) * width for x in range(len(passes))]
        rs = [by.get((prov, p)) for p in passes]
        ms = [r["median_s"] * 1e3 if r else 0 for r in rs]
        err = [[(r["median_s"] - r["min_s"]) * 1e3 if r else 0 for r in rs],
               [(r["max_s"] - r["median_s"]) * 1e3 if r else 0 for r in rs]]
        axes[0].bar(xs, ms, width, yerr=err, capsize=2, label=prov)
        mib = [r["peak_bytes"] / 2**20 if r and r.get("peak_bytes") else 0 for r in rs]
        axes[1].bar(xs, mib, width, label=prov)
    bounds = {p: by[next(k for k in by if k[1] == p)].get("lower_bound_bytes") for p in passes}
    for x, p in enumerate(passes):
        if bounds[p]:
            axes[1].hlines(bounds[p] / 2**20, x - 0.45, x + 0.45, colors="k", linestyles="--",
                           label="lower bound" if x == 0 else None)
    axes[0].set_ylabel("ms per call, median (min-max)")
    axes[1].set_ylabel("peak tensor memory (MiB)")
    for ax in axes:
        ax.set_xticks(range(len(passes)), passes)
        ax.legend(fontsize=8)
    fig.suptitle(f"{op} {shape_text(shape)} on {timed[0]['device']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
