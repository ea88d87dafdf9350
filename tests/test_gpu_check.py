"""scripts/gpu_check.sh, the GPU proof in one run: its dry run (every section at tiny shapes on
the CPU, as CI runs it) must report every row it owes with a status and sane numbers, the
LoRA budget must be the largest the plan fits, and a section that fails or runs out of time
must leave failed rows with its reason, not a hole. Nothing is asserted about speed: the
targets are a report (checked here only for their verdict logic, on hand-made rows)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vrpo_fast.bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
STATUS = ("measured", "failed: ", "skipped: ")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "VRPO_BENCH_COMMIT")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out),
                           "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    return proc, out


@pytest.mark.slow
def test_dry_run_reports_every_row_with_a_status(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.json",
                                                     "results.md"]
    report = json.loads((out / "results.json").read_text())
    assert report["dry_run"] is True
    owed = {(s.name, p, d) for s in gpu_check.sections(True, 8) for p, d in s.expected}
    got = {(r["section"], r["provider"], r["direction"]) for r in report["rows"]}
    assert got == owed
    assert [s["name"] for s in report["sections"]] == [s.name for s in
                                                        gpu_check.sections(True, 8)]
    for r in report["rows"]:
        assert r["status"].startswith(STATUS), r
        assert not r["status"].startswith("failed"), r
    env = report["env"]
    assert env["device"].startswith("cpu-") and env["versions"]["torch"]
    assert env["commit"], "the script stamps the checkout's commit"
    # Every target is listed and, in a dry run, not evaluated.
    assert len(report["targets"]) == 6
    assert all(t["verdict"].startswith("not evaluated: dry run") for t in report["targets"])


@pytest.mark.slow
def test_dry_run_numbers_are_sane(dry_run):
    _, out = dry_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    get = {(r["section"], r["provider"], r["direction"]): r for r in rows}
    for section, providers, passes in (("sweep_a", ("ours", "eager", "two_pass"), ("full",)),
                                       ("logprob_a", ("ours", "eager"), ("full", "score"))):
        for p in providers:
            for d in passes:
                r = get[(section, p, d)]
                assert r["status"] == "measured", r
                assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
                assert r["tflops"] > 0 and r["peak_bytes"] > 0 and r["lower_bound_bytes"] > 0
                assert r["check"]["ok"], r["check"]
        for p in ("liger", "cce"):    # Triton kernels: GPU only
            assert get[(section, p, passes[0])]["status"].startswith("skipped: "), p
    assert all(get[("step_m2", p, None)]["status"].startswith("skipped: dry run")
               for p in gpu_check.STEP_PROVIDERS)
    for p in ("vrpo_fast_one_sweep", "vrpo_fast", "vrpo_fast_online"):
        r = get[("step_m8", p, None)]
        assert r["status"] == "measured", r
        assert r["median_s"] > 0 and r["useful_tokens_per_s"] > 0 and r["peak_bytes"] > 0
        assert r["bound_s"] > 0 and r["bound_ratio"] > 0
        assert r["compiled_graphs"] == 0            # the CPU's cascade attention compiles nothing
        assert r["responses_per_group"] == 2 + 2 * 8
    flash = get[("step_m8", "vrpo_fast_online_flash", None)]
    assert flash["status"].startswith("skipped: ") and "CUDA" in flash["status"]
    for op in ("linear_logprob", "fused_vrpo"):      # the Triton path, in the interpreter
        r = get[("kernels", op, "interpreted")]
        assert r["status"] == "measured" and r["check"]["ok"], r
        assert max(r["check"]["rel_err"].values()) < 1e-4 and "median_s" not in r
    lora = get[("lora", "lora_train", "plan_vs_measured")]
    assert lora["status"] == "measured", lora
    assert lora["steps"] == 2 and math.isfinite(lora["final_loss"])
    assert lora["predicted_bytes"] > 0 and lora["peak_bytes"] > 0
    assert math.isclose(lora["plan_error"], lora["predicted_bytes"] / lora["peak_bytes"] - 1)
    assert lora["micro_batch_groups"] == lora["budget_tokens"] // lora["group_tokens"] >= 1
    score, train = get[("train", "score", "stage")], get[("train", "train", "stage")]
    assert score["status"] == train["status"] == "measured"
    assert train["steps"] == 3 and math.isfinite(train["final_loss"])
    assert train["tokens_per_s"] > 0 and train["tokens_per_step"] > 0


@pytest.mark.slow
def test_lora_budget_is_the_largest_the_plan_fits(dry_run):
    """Against the plan's own memory model, counted here at the budget and one token more."""
    from vrpo_fast.plan import GIB, plan_memory

    _, out = dry_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    lora = next(r for r in rows if r["provider"] == "lora_train")
    cfg = gpu_check._config([
        "--config", str(ROOT / "configs" / gpu_check.RECIPES["llama"]), "--model.path=",
        f"--model.tiny={json.dumps(lora['model'])}", "--model.tokenizer=byte",
        "--model.dtype=float32", "--lora.enabled=true", "--ref.source=online",
        "--aux.mode=given", "--train.mixed_precision=auto"])
    budget = int(float(f"{lora['gpu_memory_gib']:.3f}") * GIB)      # as `plan` reads it
    at = plan_memory(cfg, tokens=lora["budget_tokens"]).total         # a GPU's plan, as
    over = plan_memory(cfg, tokens=lora["budget_tokens"] + 1).total   # `vrpo-fast plan`
    assert at <= budget < over
    assert lora["predicted_bytes"] == at


@pytest.mark.slow
def test_dry_run_markdown_lists_every_row(dry_run):
    _, out = dry_run
    report = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")
             and line.split(" | ")[0][2:] in {s["name"] for s in report["sections"]}
             and line.count(" | ") == 7]
    assert len(table) == len(report["rows"])
    for line, r in zip(table, report["rows"]):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[0] == r["section"] and cells[1].startswith(r["provider"])
        assert cells[2].startswith(STATUS)
    assert "device: cpu-" in md and "commit: " in md and "torch " in md


def test_unknown_section_is_one_error_line(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run", "--only", "sweep_a,nope"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gpu_check: error: --only: unknown section nope (known: "
                   f"{', '.join(s.name for s in gpu_check.sections(True, 8))})"]
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("not a folder")
    assert gpu_check.main([str(out), "--dry-run", "--configs", str(ROOT / "configs")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gpu_check: error: OUT: cannot write to {out}: it is a file, not a folder"]
    assert out.read_text() == "not a folder"


def test_configs_without_the_recipes_is_one_error_line(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out"), "--configs", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: error: --configs: no ")


def test_script_without_an_output_folder_says_how_to_run_it():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: scripts/gpu_check.sh OUT")


def _write(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_section_that_fails_leaves_failed_rows_with_its_reason(tmp_path):
    """A timed-out section keeps the rows that came back and owes the rest as failed with the
    timeout; a command that crashed names its error on its provider's rows; a provider
    skipped before its passes is skipped on each."""
    section = gpu_check.Section("logprob_a", "t", 50, commands=[["bench"]] * 3,
                                expected=[(p, d) for p in ("ours", "eager", "liger")
                                          for d in ("full", "score")])
    _write(tmp_path / "logprob_a.0.jsonl", [
        dict(provider="ours", direction="full", median_s=0.01),
        dict(provider="ours", direction="score", median_s=0.004)])
    _write(tmp_path / "logprob_a.1.jsonl", [
        dict(provider="liger", direction=None, note="liger: liger-kernel is not installed")])
    _write(tmp_path / "logprob_a.status.jsonl", [
        dict(command=0, argv=["bench", "--providers", "ours"], rc=0, error=None),
        dict(command=2, argv=["bench", "--providers", "eager"], rc=1,
             error="OutOfMemoryError: CUDA out of memory")])
    rows = gpu_check.collect(section, dict(reason=None), tmp_path)
    status = {(r["provider"], r["direction"]): r["status"] for r in rows}
    assert status == {
        ("ours", "full"): "measured", ("ours", "score"): "measured",
        ("eager", "full"): "failed: no row (OutOfMemoryError: CUDA out of memory)",
        ("eager", "score"): "failed: no row (OutOfMemoryError: CUDA out of memory)",
        ("liger", "full"): "skipped: liger: liger-kernel is not installed",
        ("liger", "score"): "skipped: liger: liger-kernel is not installed"}
    (tmp_path / "logprob_a.status.jsonl").unlink()
    rows = gpu_check.collect(section, dict(reason="timed out after 50 s"), tmp_path)
    status = {(r["provider"], r["direction"]): r["status"] for r in rows}
    assert status[("eager", "full")] == "failed: no row (timed out after 50 s)"
    assert status[("ours", "full")] == "measured"
    for path in tmp_path.iterdir():
        path.unlink()
    rows = gpu_check.collect(section, dict(reason="skipped: out of time (8 s of the run's "
                                                  "460 s left)"), tmp_path)
    assert {r["status"] for r in rows} == {"skipped: out of time (8 s of the run's 460 s left)"}


def _rows(over=None):
    base = {("sweep_a", "ours", "full"): dict(median_s=0.030, peak_bytes=105),
            ("sweep_a", "eager", "full"): dict(median_s=0.045, peak_bytes=100),
            ("step_m8", "vrpo_fast_one_sweep", None): dict(mfu=0.47),
            ("step_m8", "vrpo_fast_online", None): dict(mfu=0.31),
            ("lora", "lora_train", "plan_vs_measured"): dict(plan_error=-0.12)}
    base.update(over or {})
    return [dict(v, section=s, provider=p, direction=d, status=v.get("status", "measured"))
            for (s, p, d), v in base.items()]


def test_targets_verdicts():
    got = {t["target"]: (t["value"], t["verdict"])
           for t in gpu_check.targets(_rows(), False, "NVIDIA H100 80GB HBM3")}
    assert list(got.values()) == [
        ("0.67x eager", "met"), ("1.05x eager", "met"), ("30.0 ms", "met"),
        ("47.0% MFU", "met"), ("31.0% MFU", "not met"), ("-12.0%", "met")]
    slow = _rows({("sweep_a", "ours", "full"): dict(median_s=0.050, peak_bytes=120),
                  ("lora", "lora_train", "plan_vs_measured"): dict(plan_error=0.2)})
    verdicts = [t["verdict"] for t in gpu_check.targets(slow, False, "NVIDIA H200")]
    assert verdicts == ["not met", "not met", "not met", "met", "not met", "not met"]
    failed = _rows({("sweep_a", "eager", "full"): dict(status="failed: out of memory")})
    verdicts = [t["verdict"] for t in gpu_check.targets(failed, False, "NVIDIA H100")]
    assert verdicts[:3] == ["not measured (sweep_a: ours or eager has no measured row)"] * 2 \
        + ["met"]
