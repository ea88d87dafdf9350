"""DRO with state across steps (vrpo_fast.dro): the weights and gradients against float64
oracles, the running state against the full-data value, the tau limits, and in the trainers:
the same trajectory whatever the micro-batching or the number of ranks, exact resume, and every
trainer taking the settings. Per-domain evaluation against direct computation."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrpo_fast.config import load_config
from vrpo_fast.dro import KLDRO, Chi2DRO, GroupDRO, per_domain
from vrpo_fast.errors import UserError
from vrpo_fast.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["--model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, "
         "intermediate_size: 64}", "--train.batch_groups=4", "--train.save_every=0"]


def _state_from(est, losses):
    """Give `est` the state of one update on `losses` alone (gamma = 1 or a first update)."""
    est.begin()
    est.observe(losses)
    est.update()


# --- the maths -----------------------------------------------------------------------------------

def test_kl_weights_loss_and_gradient_match_float64_oracle():
    torch.manual_seed(1)
    theta = torch.randn(12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 3, dtype=torch.float64)
    tau = 0.3

    def losses(t):       # a differentiable per-prompt loss (softplus of a linear margin)
        return torch.nn.functional.softplus(-(x.sum(dim=1) * t))

    est = KLDRO(tau, gamma=1.0)
    # First step: no state yet, plain mean.
    L = losses(theta).float()
    torch.testing.assert_close(est.weights(L), torch.ones(12))
    _state_from(est, L.detach())
    # u = the batch's mean of exp(L / tau): the surrogate's gradient is the gradient of the
    # KL-DRO objective tau log mean exp(L / tau), written here in float64 from its definition.
    oracle_obj = tau * torch.log(torch.exp(losses(theta) / tau).mean())
    (g_oracle,) = torch.autograd.grad(oracle_obj, theta)
    th32 = theta.detach().float().requires_grad_(True)
    L32 = torch.nn.functional.softplus(-(x.float().sum(dim=1) * th32))
    w = est.weights(L32)
    torch.testing.assert_close(w.double(), torch.exp(L32.detach().double() / tau)
                               / torch.exp(L32.detach().double() / tau).mean(),
                               rtol=1e-5, atol=1e-7)
    (w * L32).mean().backward()
    torch.testing.assert_close(th32.grad.double(), g_oracle, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(est.objective(), oracle_obj.detach(), rtol=1e-6, atol=1e-7)
    # Next step: a new batch is weighed by the stored normaliser, not its own.
    new = torch.rand(5, dtype=torch.float64)
    want = torch.exp(new / tau) / torch.exp(losses(theta).detach() / tau).mean()
    torch.testing.assert_close(est.weights(new), want, rtol=1e-5, atol=0)


def test_kl_running_state_is_the_moving_average_of_batch_means():
    tau, gamma = 0.5, 0.25
    est = KLDRO(tau, gamma)
    batches = [torch.rand(6, dtype=torch.float64) * 3 for _ in range(5)]
    u = None
    for b in batches:
        m = torch.exp(b / tau).mean().item()
        u = m if u is None else (1 - gamma) * u + gamma * m
        # Split the batch over two "micro-batches": the state must not care.
        est.begin()
        est.observe(b[:2])
        est.observe(b[2:])
        est.update()
        assert est.log_u.item() == pytest.approx(math.log(u), rel=1e-12)


def test_kl_gather_over_ranks_equals_one_rank():
    tau = 0.2
    batch = torch.rand(8, dtype=torch.float64) * 4
    one = KLDRO(tau, 0.5)
    two = [KLDRO(tau, 0.5), KLDRO(tau, 0.5)]
    for step in range(3):
        b = batch + step
        one.begin()
        one.observe(b)
        for r, est in enumerate(two):
            est.begin()
            est.observe(b[4 * r:4 * r + 4])
        shares = [torch.stack([e._lse, e._count]) for e in two]
        one.update()
        for est in two:
            est.update(lambda t, shares=shares: torch.stack(shares))
        for est in two:
            assert est.log_u.item() == pytest.approx(one.log_u.item(), rel=1e-13)


def test_running_normaliser_converges_to_the_full_data_value():
    gen = torch.Generator().manual_seed(0)
    data = torch.rand(64, generator=gen, dtype=torch.float64) * 2
    tau = 0.5
    exact = torch.exp(data / tau).mean().item()
    est = KLDRO(tau, gamma=0.02)
    values = []
    for step in range(3000):
        batch = data[torch.randint(0, 64, (8,), generator=gen)]
        est.begin()
        est.observe(batch)
        est.update()
        if step >= 1000:
            values.append(est.log_u.exp().item())
    assert sum(values) / len(values) == pytest.approx(exact, rel=0.02)
    # The chi-square dual variable goes to the root of mean_x (1 + (L_x - eta) / tau)_+ = 1.
    chi = Chi2DRO(0.3, gamma=0.5)
    for _ in range(200):
        _state_from(chi, data)
    lo, hi = data.min().item() - 1, data.max().item() + 1     # bisection in float64
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if torch.relu(1 + (data - mid) / 0.3).mean() > 1 else (lo, mid)
    assert chi.eta.item() == pytest.approx(lo, abs=1e-9)
    torch.testing.assert_close(chi.weights(data).mean(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("cls", [KLDRO, Chi2DRO])
def test_tau_limits_plain_mean_and_worst_prompt(cls):
    losses = torch.tensor([0.3, 1.7, 0.9, 1.2, 0.1], dtype=torch.float64)
    wide = cls(1e8, gamma=1.0)
    _state_from(wide, losses)
    torch.testing.assert_close(wide.weights(losses), torch.ones(5, dtype=torch.float64))
    assert (wide.weights(losses) * losses).mean().item() == pytest.approx(losses.mean().item())
    narrow = cls(1e-4, gamma=1.0)
    for _ in range(1 if cls is KLDRO else 300):   # chi2: eta moves to its root
        _state_from(narrow, losses)
    w = narrow.weights(losses)
    assert (w * losses).mean().item() == pytest.approx(losses.max().item(), rel=1e-3)
    assert w[1].item() == pytest.approx(5.0, rel=1e-3)                 # all on the worst


def test_group_dro_exponentiated_gradient_against_oracle():
    eta = 0.7
    est = GroupDRO(3, eta)
    # Domain 2 absent from the step; domains 0 and 1 with 3 and 1 prompts.
    domains = torch.tensor([0, 1, 0, 0])
    losses = torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=torch.float64)
    est.begin(domains.tolist())
    w = est.weights(losses, domains)
    # Uniform q = 1/3: w = N q_d / n_d.
    torch.testing.assert_close(w, torch.tensor([4 / 9, 4 / 3, 4 / 9, 4 / 9], dtype=torch.float64))
    # The weighted mean is sum_d q_d (mean loss of d).
    assert (w * losses).mean().item() == pytest.approx((0.5 / 3) + 2.0 / 3, rel=1e-12)
    est.observe(losses[:2], domains[:2])
    est.observe(losses[2:], domains[2:])
    est.update()
    q = torch.tensor([math.exp(eta * 0.5), math.exp(eta * 2.0), 1.0], dtype=torch.float64)
    torch.testing.assert_close(est.domain_weights(), q / q.sum(), rtol=1e-12, atol=0)
    # A domain that stays worst takes all the weight.
    for _ in range(200):
        est.begin(domains.tolist())
        est.observe(losses, domains)
        est.update()
    assert est.domain_weights()[1].item() == pytest.approx(1.0, abs=1e-6)


def test_state_round_trips_through_a_checkpoint_dict():
    for est, fresh in [(KLDRO(0.4, 0.3), KLDRO(0.4, 0.3)), (Chi2DRO(0.4, 0.3),
                                                            Chi2DRO(0.4, 0.3))]:
        _state_from(est, torch.tensor([0.2, 0.9]))
        fresh.load_state_dict(est.state_dict())
        probe = torch.tensor([0.5, 1.5])
        assert torch.equal(fresh.weights(probe), est.weights(probe))
    g, fresh = GroupDRO(2, 0.5), GroupDRO(2, 0.5)
    g.begin([0, 1])
    g.observe(torch.tensor([0.1, 0.8]), torch.tensor([0, 1]))
    g.update()
    fresh.load_state_dict(g.state_dict())
    assert torch.equal(fresh.domain_weights(), g.domain_weights())


def test_functional_api_keeps_its_one_batch_weighting():
    # vrpo_loss(dro_tau=...) weighs a batch by softmax over the batch itself (documented);
    # the trainers use vrpo_fast.dro instead. Both agree when the state is that batch's.
    from vrpo_fast import vrpo_loss

    pol = torch.randn(6, 4, dtype=torch.float64)
    ref = torch.randn(6, 4, dtype=torch.float64)
    g = torch.rand(6, 2, dtype=torch.float64)
    functional, _ = vrpo_loss(pol, ref, g, dro_tau=0.05)
    per, _ = vrpo_loss(pol, ref, g, reduction="none")
    est = KLDRO(0.05, 1.0)
    _state_from(est, per)
    assert (est.weights(per) * per).mean().item() == pytest.approx(functional.item(), rel=1e-10)


# --- the trainers --------------------------------------------------------------------------------

def domain_data(tmp_path) -> Path:
    """configs/data/tiny.jsonl with a domain per prompt: its first letter (4 domains)."""
    rows = [json.loads(line) for line in (ROOT / "configs/data/tiny.jsonl").read_text()
            .splitlines()]
    path = tmp_path / "domains.jsonl"
    path.write_text("".join(json.dumps({**r, "domain": r["prompt"][0]}) + "\n" for r in rows))
    return path


DRO_SETTINGS = {
    "kl": ["--loss.dro_tau=0.1", "--loss.dro_gamma=0.5"],
    "chi2": ["--loss.dro_tau=0.2", "--loss.dro_ambiguity=chi2", "--loss.dro_gamma=0.5"],
    "group": ["--loss.group_dro_eta=1.0"],
}


def run(tmp_path, name, *overrides, trainer="policy"):
    from vrpo_fast.train.loop import Trainer
    from vrpo_fast.train.reward import RewardTrainer

    cfg = load_config(TINY, [f"--train.output_dir={tmp_path / name}",
                             f"--data.path={domain_data(tmp_path)}", *SMALL, *overrides])
    (RewardTrainer if trainer == "reward" else Trainer)(cfg, quiet=True).fit()
    return read_metrics(cfg.train.output_dir)


KEYS = ["loss", "grad_norm", "dro_objective", "dro_weight_mean", "margin"]


def table(log, keys=KEYS):
    return torch.tensor([[r[k] for k in keys] for r in log], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["kl", "chi2", "group"])
def test_trajectory_does_not_depend_on_micro_batching(tmp_path, kind):
    common = ["--train.max_steps=3", *DRO_SETTINGS[kind]]
    one = run(tmp_path, "mb1", "--train.micro_batch_groups=1", *common)
    four = run(tmp_path, "mb4", "--train.micro_batch_groups=4", *common)
    torch.testing.assert_close(table(one), table(four), rtol=1e-5, atol=1e-6)
    # The weighting is live: after the first step (the plain mean over prompts) the weights
    # are not all 1; group DRO weighs domains from the start and moves their weights.
    if kind == "group":
        q = [one[-1][f"dro_weight/{d}"] for d in "abcd"]
        assert sum(q) == pytest.approx(1.0, abs=1e-6) and max(q) - min(q) > 1e-4
    else:
        assert one[0]["dro_weight_mean"] == 1.0
        assert abs(one[2]["dro_weight_mean"] - 1.0) > 1e-4


def test_reward_trainer_takes_the_same_settings(tmp_path):
    common = ["--train.max_steps=2", "--loss.estimator=dpo", "--ref.source=none",
              *DRO_SETTINGS["kl"]]
    one = run(tmp_path, "rm1", "--train.micro_batch_groups=1", *common, trainer="reward")
    four = run(tmp_path, "rm4", "--train.micro_batch_groups=4", *common, trainer="reward")
    torch.testing.assert_close(table(one, ["loss", "dro_objective"]),
                               table(four, ["loss", "dro_objective"]), rtol=1e-5, atol=1e-6)


def test_stop_and_resume_keeps_the_dro_state(tmp_path, monkeypatch):
    from vrpo_fast.train.loop import Trainer

    for kind in ("kl", "group"):
        common = ["--train.max_steps=5", "--train.save_every=2", "--train.micro_batch_groups=2",
                  *DRO_SETTINGS[kind]]
        want = run(tmp_path, f"straight_{kind}", *common)
        original = Trainer.train_step
        monkeypatch.setattr(Trainer, "train_step", lambda self, original=original: (
            _ for _ in ()).throw(RuntimeError("crash")) if self.step == 3 else original(self))
        with pytest.raises(RuntimeError, match="crash"):
            run(tmp_path, f"stopped_{kind}", *common)
        monkeypatch.setattr(Trainer, "train_step", original)
        got = run(tmp_path, f"stopped_{kind}", *common)          # resumes from step 2
        assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
        assert table(got).tolist() == table(want).tolist()         # bitwise on one process


def test_rl_trainer_takes_the_dro_settings(tmp_path):
    from tests.test_two_stage import tiny_reward_model
    from vrpo_fast.train.rloo import RLOOTrainer

    tiny_reward_model().save_pretrained(tmp_path / "rm")
    prompts = ("ab>", "cd>", "ba>", "dc>")
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "domain": p[0]}) + "\n" for p in prompts))
    (tmp_path / "bare.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                 for p in prompts))

    def cfg(data, name, *extra):
        return load_config(None, [
            f"--data.path={tmp_path / data}", "--model.tokenizer=byte",
            "--model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, "
            "intermediate_size: 64}", f"--rl.reward_model={tmp_path / 'rm'}",
            "--rl.num_samples=2", "--rl.max_new_tokens=3", "--train.max_steps=2",
            "--train.batch_groups=4", "--train.micro_batch_groups=2", "--train.lr=1e-2",
            "--train.save_every=0", f"--train.output_dir={tmp_path / name}", *extra])

    with pytest.raises(UserError, match=r"loss.group_dro_eta: .*domain"):
        RLOOTrainer(cfg("bare.jsonl", "x", "--loss.group_dro_eta=1.0"), quiet=True)
    trainer = RLOOTrainer(cfg("p.jsonl", "rl", "--loss.group_dro_eta=5.0"), quiet=True)
    seen = []
    share = trainer.prompt_share
    trainer.prompt_share = lambda per, groups, stats, values=None: (
        seen.append(values), share(per, groups, stats, values))[1]
    records = [trainer.train_step() for _ in range(2)]
    # Each prompt is weighed by its penalised reward (as a loss), not by the surrogate.
    assert all(v is not None and v.shape == (2,) for v in seen)
    q = [records[-1][f"dro_weight/{d}"] for d in "abcd"]
    assert sum(q) == pytest.approx(1.0, abs=1e-6) and max(q) - min(q) > 1e-6
    kl = RLOOTrainer(cfg("bare.jsonl", "rl_kl", "--loss.dro_tau=0.5"), quiet=True)
    assert "dro_objective" in kl.train_step()


@pytest.mark.parametrize("overrides, match", [
    (["--loss.dro_gamma=0"], r"loss.dro_gamma: must be in \(0, 1\]"),
    (["--loss.dro_ambiguity=wasserstein"], r"loss.dro_ambiguity"),
    (["--loss.group_dro_eta=-1"], r"loss.group_dro_eta: must be > 0"),
    (["--loss.group_dro_eta=1", "--loss.dro_tau=0.1"], r"loss.group_dro_eta: .*exclusive"),
])
def test_bad_dro_settings_name_the_key(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(TINY, overrides)


def test_group_dro_without_a_domain_column_is_a_clear_error(tmp_path):
    from vrpo_fast.train.loop import Trainer

    cfg = load_config(TINY, [f"--train.output_dir={tmp_path / 'x'}", *SMALL,
                             "--train.micro_batch_groups=2", "--loss.group_dro_eta=1.0"])
    with pytest.raises(UserError, match=r"loss.group_dro_eta: .*`domain`.*tiny.jsonl"):
        Trainer(cfg, quiet=True)


@pytest.mark.slow
def test_trajectory_does_not_depend_on_the_number_of_ranks(tmp_path):
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    data = domain_data(tmp_path)
    for kind in ("kl", "group"):
        common = ["--config", str(TINY), f"--data.path={data}", *SMALL,
                  "--train.max_steps=3", "--train.micro_batch_groups=1", *DRO_SETTINGS[kind]]
        one, two = tmp_path / f"one_{kind}", tmp_path / f"two_{kind}"
        r1 = subprocess.run([sys.executable, "-m", "vrpo_fast.cli", "train",
                             f"--train.output_dir={one}", *common], env=env,
                            capture_output=True, text=True, timeout=600)
        assert r1.returncode == 0, r1.stderr[-2000:]
        r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                             "--nproc-per-node=2", "--standalone", "-m", "vrpo_fast.cli",
                             "train", f"--train.output_dir={two}", *common], env=env,
                            capture_output=True, text=True, timeout=600)
        assert r2.returncode == 0, r2.stderr[-3000:]
        torch.testing.assert_close(table(read_metrics(two)), table(read_metrics(one)),
                                   rtol=1e-4, atol=1e-5)


# --- evaluation by domain ------------------------------------------------------------------------

def test_per_domain_reports_each_domain_the_worst_and_the_domain_mean():
    from vrpo_fast.evaluate import Estimate

    domains = ["x", "y", "x", "z", "y", "x"]
    values = [1.0, 0.2, 0.5, 0.9, 0.4, 0.0]
    rep = per_domain(domains, Estimate.of, values)
    assert rep["domains"]["x"].mean == pytest.approx(0.5)
    assert rep["domains"]["y"].mean == pytest.approx(0.3) and rep["domains"]["z"].n == 1
    assert rep["worst"] == "y"
    assert rep["domain_mean"] == pytest.approx((0.5 + 0.3 + 0.9) / 3)
    assert per_domain(domains, Estimate.of, values, higher_is_better=False)["worst"] == "z"


def test_reward_model_evaluation_reports_domains(tmp_path):
    from tests.test_two_stage import tiny_reward_model
    from vrpo_fast.data.load import load_preference_data
    from vrpo_fast.models import byte_tokenizer
    from vrpo_fast.train.reward import evaluate_reward_model, reward_scores

    examples, _ = load_preference_data(str(domain_data(tmp_path)))
    examples = examples[:24]
    rm, tok = tiny_reward_model(), byte_tokenizer()
    report = evaluate_reward_model(rm, tok, examples)
    scores = reward_scores(rm.eval(), tok, examples)
    by = report["by_domain"]["accuracy"]
    for d in sorted({ex.domain for ex in examples}):
        rows = [i for i, ex in enumerate(examples) if ex.domain == d]
        want = sum(float(scores[i, 0] > scores[i, 1]) for i in rows) / len(rows)
        assert by["domains"][d].mean == pytest.approx(want)
    assert by["domains"][by["worst"]].mean == min(e.mean for e in by["domains"].values())


def test_domain_column_is_validated_and_written_back(tmp_path):
    from vrpo_fast.data.load import load_preference_data, write_preference_data

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ab>", "chosen": "a", "rejected": "b", "domain": 3})
                    + "\n" + json.dumps({"prompt": "ab>", "chosen": "a", "rejected": "b",
                                         "domain": ["x"]}) + "\n")
    with pytest.raises(UserError, match=r"line 2: field 'domain'"):
        load_preference_data(str(path))
    examples, _ = load_preference_data(str(path), on_bad_row="skip")
    assert examples[0].domain == "3"
    again, _ = load_preference_data(str(write_preference_data(examples, str(tmp_path / "o.jsonl"))))
    assert again[0].domain == "3"
