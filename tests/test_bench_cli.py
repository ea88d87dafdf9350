"""`vrpo-fast bench` from an installed wheel: built here from the source, installed into a
temporary folder (no dependencies: the current interpreter's serve), and run from an empty
working folder, so nothing of the checkout (benchmarks/, data/) can be read. Nothing is
asserted about speed: the rows must carry the shape, every provider (measured, or skipped with
the reason) and a passed correctness check against the float64 reference."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrpo_fast.bench.layouts import hh_lengths, hh_lengths_from_jsonl
from vrpo_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"N": 16, "D": 8, "V": 50}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder holding the installed wheel, its vrpo-fast script, an empty folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("vrpo_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                    src], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("vrpo_fast-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", tmp / "site", wheel], check=True,
                   capture_output=True, timeout=300)
    empty = tmp / "empty"
    empty.mkdir()
    return tmp / "site", tmp / "site" / "bin" / "vrpo-fast", empty


def run_installed(installed, *args):
    site, script, empty = installed
    # Timed code paths, not Triton's interpreter; no commit handed in from outside.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "VRPO_BENCH_COMMIT", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, script, "bench", *args], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=300)


def test_linear_logprob_from_the_wheel_in_an_empty_folder(installed):
    empty = installed[2]
    out = run_installed(installed, "linear-logprob", "--tokens", "16", "--hidden", "8",
                        "--vocab", "50", "--providers", "eager,ours,liger", "--passes",
                        "fwd,full", "--rounds", "2", "--rep-ms", "1", "--json", "rows.jsonl",
                        "--plot", "chart.png")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (empty / "rows.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows} == {"eager", "ours", "liger"}
    for row in rows:
        assert row["op"] == "linear_logprob" and row["shape"] == SHAPE
        assert row["dtype"] == "fp32" and row["device"].startswith("cpu")
        assert row["versions"]["torch"] and row["versions"]["vrpo-fast"]
        assert "commit" not in row, "an installed package has no commit"
    liger = [r for r in rows if r["provider"] == "liger"]
    assert len(liger) == 1 and "CUDA only" in liger[0]["note"]
    measured = [r for r in rows if r["provider"] != "liger"]
    assert {(r["provider"], r["direction"]) for r in measured} == {
        ("eager", "fwd"), ("eager", "full"), ("ours", "fwd"), ("ours", "full")}
    for row in measured:
        check = row["check"]
        assert check["ok"] and check["reference"] == "float64 full logits"
        assert set(check["rel_err"]) == {"log p", "d hidden", "d weight"}
        assert max(check["rel_err"].values()) <= check["tol"]
        assert row["rounds"] >= 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["tflops"] > 0
        # Inputs and output (and both gradients in `full`) are live at the peak.
        assert row["peak_bytes"] >= row["lower_bound_bytes"] > 0
    assert "| ours | full |" in out.stdout
    assert (empty / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_preset_from_the_wheel_is_one_line_error(installed):
    out = run_installed(installed, "linear-logprob", "--preset", "llama9-1t")
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "--preset: unknown preset 'llama9-1t'" in lines[0]
    assert "qwen2.5-7b" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the setting is the CPU's")
def test_rows_record_the_host_allocator_setting(installed):
    """Every provider runs with the trainer's malloc setting (freed blocks kept) unless
    --system-malloc; each row says which (vrpo_fast/host_memory.py)."""
    from vrpo_fast.host_memory import glibc_malloc

    args = ["vrpo-loss", "--groups", "2", "--pairs", "1", "--providers", "eager", "--rounds",
            "1", "--rep-ms", "1", "--no-memory", "--json", "-"]
    for flags, kept in (([], glibc_malloc()), (["--system-malloc"], False)):
        out = run_installed(installed, *args, *flags)
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert rows and all(r["malloc_kept"] is kept for r in rows), (flags, rows[0])


@pytest.mark.parametrize("args, message", [
    (["linear-logprob", "--tokens", "0"], "--tokens: must be >= 1, got 0"),
    (["linear-logprob", "--hidden", "x"], "--hidden: expected an integer, got 'x'"),
    (["linear-logprob", "--vocab", "1"], "--vocab: must be >= 2, got 1"),
    (["linear-logprob", "--dtype", "fp8"], "--dtype: expected one of bf16, fp16, fp32"),
    (["linear-logprob", "--temperature", "0"], "--temperature: must be > 0"),
    (["linear-logprob", "--preset", "llama3-8b", "--vocab", "7"], "--preset: sets --hidden"),
    (["linear-logprob", "--providers", "eager,triton"], "--providers: unknown triton"),
    (["vrpo-loss", "--groups", "-3"], "--groups: must be >= 1, got -3"),
    (["vrpo-loss", "--passes", "sideways"], "--passes: unknown sideways"),
    (["step", "--model", "no-such-model"], "--model: 'no-such-model' is neither a preset"),
    (["step", "--lengths", "120"], "--lengths: expected hh, long or P,R"),
    (["step", "--M", "0"], "--M: must be >= 1, got 0"),
    (["--plot", "chart.svg"], "--plot: expected a .png file name"),
    (["--quick", "step"], "--quick: the tiny shapes of a run without a sub-command"),
    (["--providers", "eager", "suite"], "--providers: not an option of `bench suite`"),
])
def test_wrong_shapes_and_flags_are_one_line_errors(args, message, capsys):
    assert main(["bench", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_packaged_hh_length_table_matches_the_data_slice():
    """The table shipped in the package is the one computed from data/hh-rlhf (regenerate it
    with `python -m vrpo_fast.bench.layouts data/hh-rlhf/harmless-base-test.jsonl.gz`)."""
    prompts, responses = hh_lengths_from_jsonl(
        ROOT / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    assert hh_lengths() == (prompts, responses)
    assert len(responses) == 2 * len(prompts)


def json_rows(capsys, argv):
    assert main(["bench", *argv, "--json", "-"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_vrpo_loss_rows_carry_the_check_and_skip_ours_on_the_cpu(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = json_rows(capsys, ["vrpo-loss", "--groups", "4", "--pairs", "3", "--providers",
                              "eager,ours", "--rounds", "2", "--rep-ms", "1"])
    assert all(r["shape"] == {"B": 4, "M": 3} for r in rows)
    eager = {r["direction"]: r for r in rows if r["provider"] == "eager"}
    assert set(eager) == {"fwd", "bwd", "full"}
    assert all(r["check"]["ok"] and r["median_s"] > 0 for r in eager.values())
    # policy, reference (4, 8) and g (4, 4) in float32, the (4,) output; + d policy (4, 8).
    assert eager["fwd"]["lower_bound_bytes"] == (2 * 32 + 16 + 4) * 4
    assert eager["full"]["lower_bound_bytes"] == (2 * 32 + 16 + 4 + 32) * 4
    (ours,) = [r for r in rows if r["provider"] == "ours"]
    assert "eager formula" in ours["note"]


def test_options_before_the_sub_command_are_kept(capsys):
    """`bench --providers eager vrpo-loss ...` measures eager alone, as after the name."""
    before = json_rows(capsys, ["--providers", "eager", "--rounds", "1", "vrpo-loss",
                                "--groups", "2", "--pairs", "1", "--rep-ms", "1", "--no-memory"])
    after = json_rows(capsys, ["vrpo-loss", "--groups", "2", "--pairs", "1", "--providers",
                               "eager", "--rounds", "1", "--rep-ms", "1", "--no-memory"])
    assert {r["provider"] for r in before} == {r["provider"] for r in after} == {"eager"}
    assert len(before) == len(after) == 3          # fwd, bwd, full
    assert all("peak_bytes" not in r for r in before)


def test_step_of_a_model_folder_counts_the_useful_tokens_of_fixed_lengths(capsys, tmp_path):
    from vrpo_fast.models import build_tiny_causal_lm

    build_tiny_causal_lm(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=64).save_pretrained(tmp_path / "model")
    rows = json_rows(capsys, ["step", "--model", str(tmp_path / "model"), "--groups", "2",
                              "--M", "1",
                              "--lengths", "6,3", "--providers", "reference_layout,vrpo_fast",
                              "--rounds", "1", "--rep-ms", "1", "--warmup", "0"])
    assert [r["provider"] for r in rows] == ["reference_layout", "vrpo_fast"]
    for row in rows:
        # 2 groups of one 6-token prompt and 2 + 2M = 4 responses of 3 tokens.
        assert row["useful_tokens"] == 2 * 6 + 2 * 4 * 3
        assert row["shape"]["lengths"] == "6,3" and row["peak_bytes"] > row["base_bytes"] > 0
    assert rows[1]["check"]["ok"]
    # The reference layout: 8 rows of 9 tokens, through the policy and the reference model.
    assert rows[0]["model_tokens"] == 2 * 8 * 9


def test_step_bound_counts_the_useful_flops():
    """`step_flops` (the bound's numerator) against counts made another way: the body's and
    the LM head's matrix FLOPs from torch's FlopCounterMode over forwards of the useful tokens
    (each prompt once, every response; the head on response tokens only), the attention pairs
    by enumerating the packed batch's dense mask (pads excluded); x3 for forward + backward, x4
    with an online reference. And `bound` divides by the rate it is given (a RateProbe's, the
    median of the probes taken as the timing's setup)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vrpo_fast.bench import step
    from vrpo_fast.bench.timing import time_calls
    from vrpo_fast.models import build_tiny_causal_lm
    from vrpo_fast.packing import pack_groups

    model = build_tiny_causal_lm(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, intermediate_size=48)
    prompts = [[1] * 7, [2]]
    responses = [[[3] * 5, [4], [5] * 3, [6] * 2], [[7] * 4, [8] * 6, [9], [10] * 2]]
    cfg = model.config

    def matrix_flops(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        ops = counter.get_flop_counts()["Global"]
        return sum(v for k, v in ops.items() if k.__name__.split(".")[0] in ("mm", "addmm"))

    tokens = sum(map(len, prompts)) + sum(len(r) for rs in responses for r in rs)
    N = sum(len(r) for rs in responses for r in rs)
    with torch.no_grad():
        body = matrix_flops(lambda: model.model(torch.ones(1, tokens, dtype=torch.long)))
        head = matrix_flops(lambda: model.lm_head(torch.zeros(N, cfg.hidden_size)))
    batch = pack_groups(prompts, responses)
    pairs = int(batch.dense_mask().sum()) - int((batch.group < 0).sum())    # pads see themselves
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers * pairs
    forward = body + attention + head
    assert step.step_flops(model, prompts, responses, reference=False) == 3 * forward
    assert step.step_flops(model, prompts, responses, reference=True) == 4 * forward

    probe = step.RateProbe(seconds=0.01)
    assert probe.rate() is None
    seconds = time_calls(lambda: None, setup=probe, rounds=3, warmup=1, rep_ms=0)
    assert len(probe.rates) == len(seconds) + 1 and probe.rate() > 0      # one per call
    state = dict(keep=[model], prompts=prompts, responses=responses)
    out = step.bound("vrpo_fast_online", state, 2.0, rate=1e9)
    assert out["matmul_flops_per_s"] == 1e9 and out["bound_s"] == 4 * forward / 1e9
    assert out["bound_ratio"] == pytest.approx(2.0 / out["bound_s"])


def test_step_bound_probes_the_model_dtype(monkeypatch):
    """Without a rate, `bound` probes the matmul rate in the model's dtype (bf16 on a GPU: an
    fp32 probe would understate the chip's rate several times over and flatter the ratio)."""
    from vrpo_fast.bench import step
    from vrpo_fast.models import build_tiny_causal_lm

    asked = []
    monkeypatch.setattr(step, "matmul_rate", lambda seconds=1.0, dtype=torch.float32:
                        asked.append(dtype) or 1e9)
    model = build_tiny_causal_lm(dtype=torch.bfloat16, vocab_size=50, hidden_size=32,
                                 num_layers=1)
    state = dict(keep=[model], prompts=[[1, 2]], responses=[[[3], [4]]])
    out = step.bound("vrpo_fast_online", state, 1.0)
    assert asked == [torch.bfloat16] and out["matmul_flops_per_s"] == 1e9
    rate = step.RateProbe(seconds=0.01, dtype=torch.bfloat16)
    rate()
    assert asked == [torch.bfloat16, torch.bfloat16]
    assert "mfu" not in out                                 # the CPU has no peak to divide by
    monkeypatch.setattr(step, "device", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    out = step.bound("vrpo_fast_online", state, 0.5, rate=2e9)
    assert out["mfu"] == pytest.approx(out["bound_flops"] / 0.5 / 989e12)


def test_report_keeps_system_malloc_rows_apart():
    """A --system-malloc run's rows are their own table, not newer rows of the kept run's."""
    from vrpo_fast.bench.report import latest

    def row(kept, stamp, seconds):
        out = dict(device="cpu-X-2cores", op="train_step", provider="ours", shape={"M": 8},
                   direction="full", timestamp=stamp, median_s=seconds)
        return out if kept is None else dict(out, malloc_kept=kept)
    rows = [row(None, "2026-01-01", 5.0), row(True, "2026-01-02", 3.0),
            row(False, "2026-01-03", 4.0), row(True, "2026-01-04", 2.5)]
    by_device = latest(rows)
    assert sorted(by_device) == ["cpu-X-2cores", "cpu-X-2cores, system malloc"]
    assert [r["median_s"] for r in by_device["cpu-X-2cores"]] == [2.5]
    assert [r["median_s"] for r in by_device["cpu-X-2cores, system malloc"]] == [4.0]


def test_report_puts_the_online_step_beside_its_bound_and_trl():
    from vrpo_fast.bench.report import tables

    shape = dict(G=2, M=8, lengths="long", cap=[256, 128], hidden=256, layers=4, vocab=32000,
                 budget=None)

    def row(provider, seconds, bound_s):
        return dict(device="cpu-X-2cores", op="train_step", provider=provider, shape=shape,
                    timestamp="2026-01-01", median_s=seconds, min_s=seconds, max_s=seconds,
                    rounds=1, bound_s=bound_s, matmul_flops_per_s=1.0e11,
                    bound_ratio=seconds / bound_s)
    text = tables([row("vrpo_fast_online", 4.0, 3.2), row("trl_dpo", 2.0, 0.4)])
    line = next(x for x in text.splitlines() if x.startswith("| long | 8 | 2 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:] == ["4e+03", "3,200 (100)", "1.25x", "2e+03", "5.00x", "2.00x"]
    assert "(a) reference layout" not in text       # no layout rows at this shape
