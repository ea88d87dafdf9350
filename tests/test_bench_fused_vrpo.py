"""`vrpo-fast bench fused-vrpo` (the one-sweep LM head + VRPO loss beside eager, the two-pass
head and the fused-CE heads of Liger / CCE), the step benchmark's model-size flags and the
presets as model.tiny. Nothing about speed: the rows, their correctness checks against float64
and the shapes against the models' published parameter counts."""

import json

import pytest
import torch

from vrpo_fast.bench import fused_vrpo
from vrpo_fast.bench.presets import tiny_config
from vrpo_fast.cli import main

N, D, V = 300, 16, 97


def test_rows_of_every_provider(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    assert main(["bench", "fused-vrpo", "--tokens", str(N), "--hidden", str(D), "--vocab",
                 str(V), "--pairs", "1", "--providers", "eager,two_pass,ours,liger,cce",
                 "--rounds", "2", "--rep-ms", "1", "--json", str(rows_file)]) == 0
    rows = {r["provider"]: r for r in map(json.loads, rows_file.read_text().splitlines())}
    assert list(rows) == ["eager", "two_pass", "ours", "liger", "cce"]
    for name in ("eager", "two_pass", "ours"):
        r = rows[name]
        assert r["op"] == "fused_vrpo" and r["direction"] == "full"
        assert r["shape"] == dict(N=N, D=D, V=V, M=1) and r["groups"] == max(1, N // 256)
        assert r["check"]["ok"] and max(r["check"]["rel_err"].values()) < 1e-4
        assert r["tflops"] == pytest.approx(6 * N * D * V / r["median_s"] / 1e12)
        assert r["lower_bound_bytes"] == 2 * (N * D + V * D) * 4 + 2 * N * 8
        assert r["peak_bytes"] >= r["base_bytes"] > 0
        assert r["command"] == (f"vrpo-fast bench fused-vrpo --tokens {N} --hidden {D} "
                                f"--vocab {V} --dtype fp32 --pairs 1")
    for name in ("liger", "cce"):      # Triton kernels: skipped on the CPU, with the reason
        assert "CUDA only" in rows[name]["note"] and "median_s" not in rows[name]


def test_check_catches_a_head_that_computes_another_loss():
    d = fused_vrpo.make_inputs(N, D, V, "fp32", M=2)

    def no_reference(h, w, t, seg, G, K, ref, g):      # forgets pi_ref's log-probs
        return fused_vrpo.eager(h, w, t, seg, G, K, torch.zeros_like(ref), g)
    assert fused_vrpo.check(fused_vrpo.provider_fn("ours"), d, "fp32")["ok"]
    bad = fused_vrpo.check(no_reference, d, "fp32")
    assert not bad["ok"] and bad["rel_err"]["loss"] > 1e-4


@pytest.mark.parametrize("argv, error", [
    (["fused-vrpo", "--providers", "ours,nope"], "--providers: unknown nope"),
    (["fused-vrpo", "--passes", "fwd"], "--passes: unknown fwd"),
    (["fused-vrpo", "--pairs", "0"], "--pairs: must be >= 1, got 0"),
    (["step", "--model", "qwen2.5-0.5b", "--hidden", "32"],
     "--hidden: only for the default model (--model qwen2.5-0.5b has its own)"),
])
def test_bad_flags_are_one_line(argv, error, capsys):
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vrpo-fast bench: error: {error}"), err


@pytest.mark.parametrize("name, params", [("qwen2.5-0.5b", 494_032_768),
                                          ("llama3.1-8b", 8_030_261_248)])
def test_tiny_config_of_a_preset_has_the_models_published_size(name, params):
    """Qwen2.5-0.5B and Llama-3.1-8B as model.tiny (random weights, no download): the
    parameter counts their model cards publish, counted on a meta-device build."""
    from vrpo_fast.models import tiny_llama_config
    from vrpo_fast.plan import model_shape

    assert model_shape(tiny_llama_config(**tiny_config(name))).params == params
    assert tiny_config(name, layers=2)["num_layers"] == 2
