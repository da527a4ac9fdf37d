"""Easy consistency tuning (consistency.py), against closed forms: with data x0 ~ N(mu, s^2) per
pixel, the best consistency function for each stage's pairs (t, r) is known exactly, so what the
implemented loss trains a per-timestep affine model to can be checked."""
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import distill
import sample
from checkpoint import load_checkpoint
from cli import UserError
from consistency import ConsistencyConfig, ConsistencyTuning, consistency_model
from diffusion import Diffusion, DiffusionConfig
from samplers import SamplerConfig
from test_matching import draws_with_its_two_renoise_steps, flat
from training import Batch, Part

T = 20
MU, S = 0.3, 0.5


def diffusion():
    return Diffusion(DiffusionConfig(T, "cosine", "v"))


class PerTimestep(nn.Module):
    """f(x_t, t) = mu + a_t (x_t - sqrt(abar_t) mu) with its own a_t and mu_t at each timestep, as
    the v-prediction network that gives that x_0."""

    def __init__(self):
        super().__init__()
        self.a, self.mu = nn.Parameter(torch.full((T,), 0.5)), nn.Parameter(torch.zeros(T))
        self.d = diffusion()

    def forward(self, x, t, y=None):
        alpha, sigma = self.d._coefs(t, x.ndim)
        a, mu = self.a[t].reshape(-1, 1, 1, 1), self.mu[t].reshape(-1, 1, 1, 1)
        return (alpha * x - (mu + a * (x - alpha * mu))) / sigma


def tuning(stage=0, stages=8, model=None):
    """The method at `stage`, one step a stage."""
    part = Part(model, torch.optim.Adam(model.parameters(), lr=0.03)) if model else None
    return ConsistencyTuning(diffusion(), part, ConsistencyConfig(stages=stages), stages,
                             {"step": stage})


def test_stage_zero_pairs_every_level_with_clean_data_and_each_stage_shrinks_the_gap_by_q():
    c = ConsistencyConfig()
    method = ConsistencyTuning(Diffusion(DiffusionConfig(1000, "cosine", "v")), None, c, 8,
                               {"step": 0})
    sigmas, last = method.sigmas.double(), len(method.sigmas) - 1
    levels = torch.logspace(-2, 2, 200)
    for stage in range(8):
        t, r = method.pairs(levels, stage)
        assert (r < t).all() and (r >= -1).all()
        assert ((levels <= sigmas[t].float()) | (t == last)).all()  # t's sigma reaches the level
        assert ((t == 0) | (sigmas[(t - 1).clamp(min=0)].float() < levels)).all()  # the first one
        aim = sigmas[t] * (1 - (1 + c.k * torch.sigmoid(-c.b * sigmas[t])) / c.q ** stage)
        below = torch.where(r >= 0, sigmas[r.clamp(min=0)], torch.zeros_like(aim))
        assert ((below <= aim) | (r == t - 1) | (r == -1)).all()  # r at or below the aim ...
        above = sigmas[(r + 1).clamp(max=last)]
        assert ((above > aim) | (r == t - 1)).all()  # ... and the last such timestep
        if stage == 0:
            assert (r == -1).all()
    gaps = [((method.sigma(t) - method.sigma(r)) / method.sigma(t)).mean() for t, r in
            (method.pairs(levels, stage) for stage in range(8))]  # relative to sigma_t
    assert gaps[0] == 1 and all(a >= b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 0.1


def test_the_loss_is_the_squared_error_to_the_target_over_the_gap_in_sigma():
    torch.manual_seed(0)
    model, method = PerTimestep(), tuning(7)
    with torch.no_grad():
        model.a.uniform_(0.2, 1.0)
        model.mu.uniform_(-0.5, 0.5)
    x0, noise = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t, r = torch.tensor([5, 12, 19]), torch.tensor([-1, 11, 17])
    f = lambda x, s: model.mu[s].reshape(-1, 1, 1, 1) + model.a[s].reshape(-1, 1, 1, 1) * (
        x - method.diffusion.alphas_cumprod[s].sqrt().reshape(-1, 1, 1, 1)
        * model.mu[s].reshape(-1, 1, 1, 1))
    q = method.diffusion.q_sample
    target = torch.where((r >= 0).reshape(-1, 1, 1, 1), f(q(x0, r.clamp(min=0), noise),
                                                         r.clamp(min=0)), x0)
    sigma = lambda s: torch.where(s >= 0, method.sigmas[s.clamp(min=0)], 0)
    expected = (f(q(x0, t, noise), t) - target).pow(2).mean((1, 2, 3)) / (sigma(t) - sigma(r))
    assert_close(method.per_example(model, x0, t, r, noise).detach(), expected.detach())


def test_the_stage_follows_the_loops_step_in_equal_parts_of_the_run():
    method = ConsistencyTuning(diffusion(), None, ConsistencyConfig(stages=8), 80, {"step": 0})
    assert [method.stage(s) for s in (0, 9, 10, 39, 40, 79, 80, 500)] == [0, 0, 1, 3, 4, 7, 7, 7]


def best_slopes(method, stage):
    """a_t of the affine f that minimises the stage's loss: E[f(x_r, r) | x_t] = f(x_t, t) for the
    stage's pair (t, r), so a_t = a_r (abar_r^1/2 abar_t^1/2 s^2 + sigma_r sigma_t) / D_t^2 with
    D_t^2 = abar_t s^2 + 1 - abar_t, from a_(-1) = 1 at clean data (f = x0). float64, [T]."""
    abar = method.diffusion.alphas_cumprod.double()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    t = torch.arange(T)
    _, r = method.pairs(method.sigmas[t], stage)
    slopes = []
    for i in range(T):  # r < t: every r's slope is known by then
        j = int(r[i])
        a_r, al_r, si_r = (1.0, 1.0, 0.0) if j < 0 else (slopes[j], alpha[j], sigma[j])
        slopes.append(a_r * (al_r * alpha[i] * S**2 + si_r * sigma[i])
                      / (alpha[i]**2 * S**2 + sigma[i]**2))
    return torch.tensor(slopes, dtype=torch.float64)


@pytest.mark.parametrize("stage", [0, 7])
def test_tuning_trains_an_affine_model_to_the_closed_form_best_of_its_stage(stage):
    torch.manual_seed(0)
    model = PerTimestep()
    method = tuning(stage, model=model)
    g = torch.Generator().manual_seed(0)
    for i in range(3000):
        for group in method.parts[0].optimizer.param_groups:  # settle the minibatch noise
            group["lr"] = 0.03 if i < 1000 else 0.01 if i < 2000 else 0.003 if i < 2600 else 5e-4
        x0 = MU + S * torch.randn(16384, 1, 1, 1, generator=g)
        loss = method.loss(0, model, Batch(x0, None, g, slice(None)))
        method.parts[0].optimizer.zero_grad()
        loss.backward()
        method.parts[0].optimizer.step()
    best = best_slopes(method, stage)
    # atol: the noisiest levels' denoiser slopes are near 0, and few draws land there
    assert_close(model.a.detach().double(), best, rtol=0.02, atol=0.005)
    assert_close(model.mu.detach(), torch.full((T,), MU), rtol=0, atol=0.02)
    abar = method.diffusion.alphas_cumprod.double()
    denoiser = abar.sqrt() * S**2 / (abar * S**2 + 1 - abar)  # E[x0 | x_t]'s slope
    ode = S / (abar * S**2 + 1 - abar).sqrt()  # the probability-flow map's
    if stage == 0:  # the first stage is the diffusion loss: its best is the denoiser
        assert_close(best, denoiser)
    else:  # the last is nearer the probability-flow map than the denoiser everywhere noisy
        noisy = abar < 0.9
        assert ((best - ode).abs() < (best - denoiser).abs())[noisy].all()


def ect(cli, teacher, *args, folder="ect"):
    return distill.main([str(a) for a in [
        "--method", "ect", "--teacher", teacher, "--to-steps", 2, "--round-steps", 8,
        "--warmup-steps", 0, "--batch-size", 8, "--checkpoint-every", 3, "--precision", "fp32",
        "--data-dir", cli.data, "--checkpoint-dir", cli.ckpt / folder, "--output-dir", cli.out,
        "--sample-n", 0, *args]])


def test_resume_inside_a_run_is_bitwise_equal_to_an_unbroken_run(cli, good_checkpoint):
    ect(cli, good_checkpoint, "--max-steps", 5)  # stops inside the run, across stages
    assert load_checkpoint(cli.ckpt / "ect" / "2-steps")["step"] == 5
    distill.main([str(a) for a in ["--resume", cli.ckpt / "ect", "--data-dir", cli.data,
                                   "--output-dir", cli.out, "--sample-n", 0]])
    ect(cli, good_checkpoint, folder="unbroken")
    (step_a, a, history_a), (step_b, b, history_b) = (flat(cli.ckpt / f / "2-steps")
                                                      for f in ("ect", "unbroken"))
    assert step_a == step_b and step_a[0] == 8 and history_a == history_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert len({round(v, 6) for *_, v in history_a}) > 1 and all(map(math.isfinite,
                                                                      [v for *_, v in history_a]))


def test_the_tuned_model_samples_with_its_own_renoise_sampler_and_no_flag(cli, good_checkpoint,
                                                                         capsys):
    ect(cli, good_checkpoint)
    ckpt = load_checkpoint(cli.ckpt / "ect" / "2-steps")
    record = ckpt["distillation"]
    assert record["sampler"] == {"sampler": "renoise", "steps": 2, "eta": None, "grid": "even"}
    assert record["method"] == "ect" and record["consistency"]["steps"] == 2
    assert ckpt["config"]["diffusion"]["prediction"] == "v"
    assert ckpt["config"]["model"] == load_checkpoint(good_checkpoint)["config"]["model"]
    draws_with_its_two_renoise_steps(cli.ckpt / "ect" / "2-steps", cli.out, capsys)


def test_a_tuned_model_samples_at_any_step_count_and_a_distilled_student_at_its_own(
        cli, good_checkpoint, capsys, fails):
    own = SamplerConfig("renoise", 2, None, "even")
    assert SamplerConfig.from_flags(None, 3, None, T, own, any_steps=True) == SamplerConfig(
        "renoise", 3, None, "even")
    assert SamplerConfig.from_flags(None, None, None, T, own, any_steps=True) == own
    with pytest.raises(UserError, match="cannot take 3"):
        SamplerConfig.from_flags(None, 3, None, T, own)
    with pytest.raises(UserError, match="from 1 to the model's 20, got 21"):
        SamplerConfig.from_flags(None, 21, None, T, own, any_steps=True)
    ect(cli, good_checkpoint)
    assert consistency_model(load_checkpoint(cli.ckpt / "ect" / "2-steps")["distillation"])
    capsys.readouterr()
    sample.main([str(a) for a in ["--checkpoint", cli.ckpt / "ect" / "2-steps", "--n", 3,
                                  "--steps", 1, "--output-dir", cli.out]])
    assert "renoise sampler, 1 steps" in capsys.readouterr().out
    err = fails(sample, ["--checkpoint", cli.ckpt / "ect" / "2-steps", "--steps", 3, "--sampler",
                         "ddim", "--output-dir", cli.out])
    assert "drop --sampler" in err


@pytest.mark.parametrize("case, expected", [
    ("teacher is a student", "is a distilled student, not a trained model"),
    ("student", "on data alone, unguided: drop --student"),
    ("gan", "on data alone, unguided: drop --gan-weights"),
    ("guidance", "drop --guidance"),
    ("no steps", "--to-steps must be from 1 to the model's 20 timesteps, got 0"),
    ("again", "already holds a run of --method ect"),
    ("mixed", "holds runs of several methods"),
    ("other method", "holds a distillation of another method (progressive)"),
    ("teacher steps", "--teacher-steps applies to progressive distillation"),
])
def test_bad_requests_are_refused_in_one_line(cli, good_checkpoint, fails, case, expected):
    if case in ("again", "teacher is a student", "mixed", "other method"):
        ect(cli, good_checkpoint)
    tuned = cli.ckpt / "ect" / "2-steps"
    args = {"teacher is a student": ["--teacher", tuned, "--checkpoint-dir", cli.ckpt / "other"],
            "student": ["--student", good_checkpoint], "guidance": ["--guidance", 1],
            "gan": ["--gan-weights", 1, 1],
            "no steps": ["--to-steps", 0], "again": [], "mixed": [],
            "other method": ["--overwrite"],
            "teacher steps": ["--teacher-steps", 8]}[case]
    if case == "mixed":  # a progressive round beside the ECT run
        (cli.ckpt / "ect" / "4-steps").mkdir()
        ckpt = load_checkpoint(tuned)
        ckpt["distillation"] = {**ckpt["distillation"], "method": "progressive",
                                "sampler": {**ckpt["distillation"]["sampler"], "steps": 4}}
        torch.save(ckpt, cli.ckpt / "ect" / "4-steps" / "ckpt.pt")
    if case == "other method":  # the folder's one run, a progressive round: not replaced
        ckpt = load_checkpoint(tuned)
        ckpt["distillation"] = {**ckpt["distillation"], "method": "progressive"}
        torch.save(ckpt, tuned / "ckpt.pt")
    before = {p: p.read_bytes() for p in cli.ckpt.rglob("*.pt")}
    err = fails(distill, ["--method", "ect", "--teacher", good_checkpoint, "--to-steps", 2,
                          "--data-dir", cli.data, "--checkpoint-dir", cli.ckpt / "ect",
                          "--output-dir", cli.out, *args])
    assert expected in err and {p: p.read_bytes() for p in cli.ckpt.rglob("*.pt")} == before
