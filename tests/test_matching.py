"""Distribution matching distillation (matching.py), against closed forms: with data x0 ~ N(mu, s^2)
per pixel the denoiser of every noise level is known, so the generator's gradient, the critic's
fit and the sampler can be checked exactly."""
import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import distill
import matching
import sample
from checkpoint import build_model, load_checkpoint
from diffusion import Diffusion, DiffusionConfig
from matching import (Critic, DistributionMatching, MatchingConfig, backward_simulation,
                      matching_loss)
from samplers import SamplerConfig, generate, sample_ddim, sample_renoise
from training import Batch, Part, take_step
from config import TrainConfig
from conftest import write_idx
from unet import UNet

T = 100
MU, S = 0.3, 0.5
SHAPE = (1, 4, 4)


def diffusion(prediction):
    return Diffusion(DiffusionConfig(T, "cosine", prediction))


class Gaussian(nn.Module):
    """The eps-prediction denoiser of x0 ~ N(m, v) per pixel, eq. 4 of Ho et al. inverted:
    E[x0 | x_t] = m + a v / (a^2 v + s^2) (x_t - a m), eps = (x_t - a E[x0 | x_t]) / s."""

    def __init__(self, m, v, trainable=False):
        super().__init__()
        make = nn.Parameter if trainable else (lambda x: x)
        self.m, self.log_v = make(torch.tensor(float(m))), make(torch.tensor(float(v)).log())
        self.d, self.config = diffusion("eps"), SimpleNamespace(num_classes=0)

    def forward(self, x, t, y=None):
        a, s = self.d._coefs(t, x.ndim)
        v = self.log_v.exp()
        x0 = self.m + a * v / (a**2 * v + s**2) * (x - a * self.m)
        return (x - a * x0) / s


class Affine(nn.Module):
    """A one-step generator G(z) = b + A z, as the v-prediction network that gives that x_0."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = nn.Parameter(torch.tensor(A)), nn.Parameter(torch.tensor(b))
        self.d, self.config = diffusion("v"), SimpleNamespace(num_classes=0)

    def forward(self, x, t, y=None):
        a, s = self.d._coefs(t, x.ndim)
        return (a * x - (self.b + self.A * x)) / s


def method(generator, critic, steps=1, **kw):
    config = MatchingConfig(steps=steps, gan_generator=0.0, gan_critic=0.0, **kw)
    gen = Part(generator, torch.optim.Adam(generator.parameters(), lr=0.02))
    fake = Part(critic, torch.optim.Adam(critic.parameters(), lr=0.02) if list(critic.parameters())
                else None)
    return DistributionMatching(Gaussian(MU, S**2), diffusion("eps"), diffusion("v"), fake, gen,
                                config)


def batch(n=256, seed=0, shape=SHAPE):
    x0 = MU + S * torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed + 10**6))
    return Batch(x0, None, torch.Generator().manual_seed(seed), slice(None))


def test_the_generators_gradient_vanishes_exactly_where_the_fake_score_is_the_real_one():
    x0 = torch.randn(8, *SHAPE, requires_grad=True)
    real = torch.randn(8, *SHAPE)
    matching_loss(x0, real, real.clone()).backward()
    assert torch.equal(x0.grad, torch.zeros_like(x0))
    G = Affine(0.7, -0.2)
    dmd = method(G, Gaussian(MU, S**2))  # the critic is the real score: nothing to match
    dmd.generator_loss(G, batch()).backward()
    assert G.A.grad == 0 and G.b.grad == 0
    dmd = method(G, Gaussian(-0.2, 0.49))  # the critic is G's own denoiser: a gradient
    G.zero_grad()
    dmd.generator_loss(G, batch()).backward()
    assert G.A.grad != 0 and G.b.grad != 0


def test_the_generator_update_drives_an_affine_generator_to_the_data():
    """With the critic G's exact denoiser (an oracle fake score), the implemented update takes
    (A, b) to (s, mu); a swapped sign would take them away."""
    G = Affine(1.0, -0.4)
    dmd = method(G, Gaussian(0.0, 1.0))
    opt = torch.optim.Adam(G.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    for step in range(400):
        dmd.parts[0].model = Gaussian(G.b.detach(), G.A.detach() ** 2)
        opt.zero_grad()
        dmd.generator_loss(G, batch(seed=step)).backward()
        opt.step()
        sched.step()
    assert abs(G.A.item() - S) < 0.02 * S and abs(G.b.item() - MU) < 0.02 * MU, (G.A, G.b)


def test_a_critic_trained_with_the_critics_loss_becomes_the_generators_own_denoiser():
    G = Affine(0.7, -0.2)
    critic = Gaussian(0.0, 1.0, trainable=True)
    dmd = method(G, critic)
    opt = dmd.parts[0].optimizer
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 500)
    for step in range(500):
        opt.zero_grad()
        dmd.critic_loss(critic, batch(seed=step)).backward()
        opt.step()
        sched.step()
    # G's samples are N(-0.2, 0.49), not the data's N(0.3, 0.25)
    assert abs(critic.m.item() + 0.2) < 0.02 and abs(critic.log_v.exp().item() - 0.49) < 0.02 * 0.49


@pytest.mark.parametrize("sampler", matching.JOINS)
def test_the_sampler_makes_n_evaluations_and_backward_simulation_meets_its_states(sampler):
    steps, calls, states = 4, [], []
    d = diffusion("v")
    G = Affine(0.7, -0.2)
    G.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(6, *SHAPE, generator=g)
    sample = sample_renoise if sampler == "renoise" else sample_ddim  # ddim's eta: 0
    sample(G, d, noise, steps, generator=g, callback=lambda i, t, x, x0: states.append(x),
           grid="even")
    assert len(calls) == steps
    grid = matching.even_timesteps(T, steps)
    for i in [torch.full((6,), k) for k in range(steps)] + [torch.tensor([2, 0, 3, 1, 3, 0])]:
        g = torch.Generator().manual_seed(3)
        z = torch.randn(6, *SHAPE, generator=g)
        x, t = backward_simulation(G, d, z, grid, i, lambda: torch.randn(6, *SHAPE, generator=g),
                                   sampler=sampler)
        assert torch.equal(t, grid[i])
        for j, k in enumerate(i.tolist()):  # image j's input at its step k
            assert torch.equal(x[j], noise[j] if k == 0 else states[k - 1][j])


# ---------------------------------------------------------------------------- on the U-Net

@pytest.fixture(scope="module")
def pd(tmp_path_factory, good_checkpoint):
    """A 2-step progressive-distillation student of the tiny teacher, made once for this file."""
    folder = tmp_path_factory.mktemp("pd")
    rng = np.random.default_rng(0)
    for name, shape in (("train-images-idx3-ubyte", (64, 28, 28)), ("train-labels-idx1-ubyte", (64,)),
                        ("t10k-images-idx3-ubyte", (16, 28, 28)), ("t10k-labels-idx1-ubyte", (16,))):
        write_idx(folder / f"{name}.gz", rng.integers(0, 10 if len(shape) == 1 else 256, shape))
    distill.main([str(a) for a in [
        "--teacher", good_checkpoint, "--teacher-steps", 4, "--to-steps", 2,
        "--round-steps", 2, "--warmup-steps", 0, "--batch-size", 8, "--precision", "fp32",
        "--data-dir", folder, "--checkpoint-dir", folder / "ckpt", "--output-dir", folder / "out",
        "--sample-n", 0]])
    return folder / "ckpt" / "2-steps"


def dmd(cli, teacher, student_folder, *args, folder="dmd"):
    return distill.main([str(a) for a in [
        "--method", "dmd", "--teacher", teacher, "--student", student_folder,
        "--round-steps", 6, "--warmup-steps", 0, "--batch-size", 8, "--lr", 1e-3,
        "--checkpoint-every", 2, "--precision", "fp32", "--data-dir", cli.data,
        "--checkpoint-dir", cli.ckpt / folder, "--output-dir", cli.out, "--sample-n", 0, *args]])


def tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_a_generator_update_changes_only_g_a_critic_update_only_the_critic_the_teacher_never(
        good_checkpoint, pd):
    teacher, pd = load_checkpoint(good_checkpoint), load_checkpoint(pd)
    config = MatchingConfig(steps=2, critic_updates=3, guidance=0.5)
    cfg = TrainConfig(batch_size=8, lr=1e-3, precision="fp32")
    dmd, _, _ = matching.matching(teacher, pd, config, cfg, torch.device("cpu"), {})
    labels = torch.arange(8) % 10
    x0 = torch.rand(8, 1, 28, 28) * 2 - 1
    new_batch = lambda: Batch(x0, labels, torch.Generator().manual_seed(0), slice(None))
    real = dmd.real
    critic, generator = (p.model for p in dmd.parts)
    before = [tensors(m) for m in (real, critic, generator)]
    again = copy.deepcopy(dmd)
    nets = [p.model for p in dmd.parts]
    take_step(dmd, nets, new_batch(), cfg, 1e-3, torch.device("cpu"), step=1)  # the critic's alone
    assert not changed(before[0], real) and not changed(before[2], generator)
    updated = changed(before[1], critic)
    assert any(k.startswith("head.") for k in updated) and any(k.startswith("score.") for k in updated)
    # both, the critic first: the generator's step leaves the critic as its own step left it
    take_step(again, [p.model for p in again.parts], new_batch(), cfg, 1e-3, torch.device("cpu"),
              step=3)
    assert not changed(before[0], again.real)
    assert not changed(tensors(critic), again.parts[0].model)
    assert changed(before[2], again.parts[1].model)
    grads = lambda m: [p.grad for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads(critic), grads(again.parts[0].model)))


def flat(folder):
    """Every tensor a DMD checkpoint keeps for resuming: G, its EMA and Adam, the critic and its."""
    ckpt = load_checkpoint(folder)
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    out |= {f"ema.{k}": v for k, v in ckpt["ema"].items()}
    for name, part in [("g", ckpt), *(("critic", p) for p in ckpt["parts"])]:
        out |= {f"{name}.model.{k}": v for k, v in part["model"].items()} if name != "g" else {}
        for key, state in part["optimizer"]["state"].items():
            out |= {f"{name}.adam.{key}.{k}": v for k, v in state.items() if torch.is_tensor(v)}
    return (ckpt["step"], ckpt["ema_updates"]), out, ckpt["history"]


def test_resume_inside_a_run_is_bitwise_equal_to_an_unbroken_run(cli, good_checkpoint, pd):
    dmd(cli, good_checkpoint, pd, "--max-steps", 4)  # stops inside, between generator steps
    assert load_checkpoint(cli.ckpt / "dmd" / "2-steps")["step"] == 4
    distill.main([str(a) for a in ["--resume", cli.ckpt / "dmd", "--data-dir", cli.data,
                                   "--output-dir", cli.out, "--sample-n", 0]])
    dmd(cli, good_checkpoint, pd, folder="unbroken")
    (step_a, a, history_a), (step_b, b, history_b) = (flat(cli.ckpt / f / "2-steps")
                                                      for f in ("dmd", "unbroken"))
    assert step_a == step_b == (6, 2) and history_a == history_b and a.keys() == b.keys()
    assert len([k for k in a if k.startswith("critic.model.head")]) == 6
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_the_generator_samples_with_its_own_renoise_sampler_and_no_flag(cli, good_checkpoint, pd,
                                                                        capsys):
    dmd(cli, good_checkpoint, pd)
    ckpt = load_checkpoint(cli.ckpt / "dmd" / "2-steps")
    assert ckpt["distillation"]["sampler"] == {"sampler": "renoise", "steps": 2, "eta": None,
                                               "grid": "even"}
    draws_with_its_two_renoise_steps(cli.ckpt / "dmd" / "2-steps", cli.out, capsys)


def draws_with_its_two_renoise_steps(folder, out, capsys):
    """The one-run checkpoint in folder draws with the 2-step renoise sampler its record keeps:
    two network evaluations, images in [-1, 1]; and sample.py draws with it, given no flag."""
    ckpt = load_checkpoint(folder)
    model, diffusion = build_model(ckpt)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    images = generate(model, diffusion, 5, sampler=SamplerConfig(**ckpt["distillation"]["sampler"]),
                      labels=torch.arange(5), progress=False)
    assert len(calls) == 2 and images.shape == (5, 1, 28, 28) and images.abs().max() <= 1
    capsys.readouterr()
    sample.main([str(a) for a in ["--checkpoint", folder, "--n", 3, "--output-dir", out]])
    assert "renoise sampler, 2 steps" in capsys.readouterr().out


def test_a_ddim_generator_keeps_its_students_deterministic_sampler(cli, good_checkpoint, pd, capsys):
    dmd(cli, good_checkpoint, pd, "--generator-sampler", "ddim")
    ckpt = load_checkpoint(cli.ckpt / "dmd" / "2-steps")
    own = ckpt["distillation"]["sampler"]
    assert own == load_checkpoint(pd)["distillation"]["sampler"] == {
        "sampler": "ddim", "steps": 2, "eta": 0.0, "grid": "even"}
    assert ckpt["distillation"]["matching"]["sampler"] == "ddim"
    model, diffusion = build_model(ckpt)
    draw = lambda seed: generate(model, diffusion, 3, seed, SamplerConfig(**own),
                                 labels=torch.arange(3), progress=False)
    assert torch.equal(draw(0), draw(0))
    capsys.readouterr()
    sample.main([str(a) for a in ["--checkpoint", cli.ckpt / "dmd" / "2-steps", "--n", 3,
                                  "--output-dir", cli.out]])
    assert "ddim sampler, 2 steps, eta 0, even grid" in capsys.readouterr().out


@pytest.mark.parametrize("case, expected", [
    ("student is a trained model", "is a trained model, not a distilled student"),
    ("teacher is a student", "is a distilled student, not a trained model"),
    ("other step count", "a 2-step student, and takes its steps"),
    ("no student", "starts its generator from a distilled student"),
    ("again", "already holds a run of --method dmd"),
    ("guidance", "drop --guidance"),
    ("no guide", "keeps no guide: drop --autoguidance"),
    ("not dmd", "--student applies to --method dmd"),
    ("sampler not dmd", "--generator-sampler applies to --method dmd"),
    ("ddim from renoise", "continues its --student's DDIM"),
    ("negative gan", "--gan-weights must be 0 (off) or more, got -1 0.01"),
    ("gan not dmd", "--gan-weights applies to --method dmd"),
])
def test_bad_requests_are_refused_in_one_line(cli, good_checkpoint, pd, fails, case, expected):
    args = {"student is a trained model": ["--student", good_checkpoint],
            "teacher is a student": ["--teacher", pd],
            "other step count": ["--to-steps", 1],
            "no student": ["--student", ""], "again": [], "guidance": ["--guidance", 1],
            "no guide": ["--autoguidance", 1], "not dmd": ["--method", "progressive"],
            "sampler not dmd": ["--method", "progressive", "--student", "", "--generator-sampler",
                                "ddim"],
            "ddim from renoise": ["--student", cli.ckpt / "dmd" / "2-steps", "--generator-sampler",
                                  "ddim"],
            "negative gan": ["--gan-weights", -1, 0.01],
            "gan not dmd": ["--method", "progressive", "--student", "", "--gan-weights", 1,
                            1]}[case]
    if case in ("again", "ddim from renoise"):
        dmd(cli, good_checkpoint, pd)
    before = {p: p.read_bytes() for p in cli.ckpt.rglob("*.pt")}
    err = fails(distill, ["--method", "dmd", "--teacher", good_checkpoint, "--student", pd,
                          "--data-dir", cli.data, "--checkpoint-dir", cli.ckpt / "dmd",
                          "--output-dir", cli.out, *args])
    assert expected in err and {p: p.read_bytes() for p in cli.ckpt.rglob("*.pt")} == before


def test_gan_weights_are_the_runs_and_resume_keeps_them(cli, good_checkpoint, pd, fails):
    dmd(cli, good_checkpoint, pd, "--gan-weights", 0.5, 0, "--max-steps", 2)
    record = lambda: load_checkpoint(cli.ckpt / "dmd" / "2-steps")["distillation"]["matching"]
    assert (record()["gan_generator"], record()["gan_critic"]) == (0.5, 0.0)
    resume = ["--resume", cli.ckpt / "dmd", "--data-dir", cli.data, "--output-dir", cli.out,
              "--sample-n", 0]
    assert "drop --gan-weights" in fails(distill, [*resume, "--gan-weights", 1, 1])
    distill.main([str(a) for a in resume])
    assert (record()["gan_generator"], record()["gan_critic"]) == (0.5, 0.0)


def test_with_the_teacher_as_critic_and_dropout_on_the_gradient_is_exactly_zero(tiny_config):
    """The fake score is read as the real one is, in eval mode: a critic still equal to the
    teacher gives no gradient, however much dropout the network has."""
    teacher = UNet(replace(tiny_config, dropout=0.5))
    d = Diffusion(DiffusionConfig(20))
    G = UNet(replace(tiny_config, dropout=0.5))
    critic = Critic(copy.deepcopy(teacher)).train()
    parts = [Part(m, torch.optim.Adam(m.parameters())) for m in (critic, G)]
    dmd = DistributionMatching(teacher.eval().requires_grad_(False), d,
                               Diffusion(DiffusionConfig(20, prediction="v")), *parts,
                               MatchingConfig(steps=2, gan_generator=0.0))
    G.train()
    dmd.generator_loss(G, Batch(torch.rand(4, 1, 28, 28) * 2 - 1, torch.arange(4),
                                torch.Generator().manual_seed(0), slice(None))).backward()
    assert all(p.grad is None or not p.grad.any() for p in G.parameters())
    assert critic.training and all(p.requires_grad for p in critic.parameters())


def test_overwrite_replaces_a_finished_run_and_keeps_nothing_of_it(cli, good_checkpoint, pd):
    dmd(cli, good_checkpoint, pd)
    first = load_checkpoint(cli.ckpt / "dmd" / "2-steps")
    dmd(cli, good_checkpoint, pd, "--overwrite", "--round-steps", 4, "--seed", 1)
    again = load_checkpoint(cli.ckpt / "dmd" / "2-steps")
    assert again["step"] == 4 and again["config"]["train"]["seed"] == 1
    assert not any(torch.equal(again["model"][k], v) for k, v in first["model"].items()
                   if v.is_floating_point() and v.any())


def test_a_dmd_runs_pictures_go_apart_from_progressive_distillations(cli, good_checkpoint, pd,
                                                                      tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default output/ folders are made
    distill.main([str(a) for a in [
        "--method", "dmd", "--teacher", good_checkpoint, "--student", pd, "--round-steps", 2,
        "--warmup-steps", 0, "--batch-size", 8, "--precision", "fp32", "--data-dir", cli.data,
        "--checkpoint-dir", cli.ckpt / "dmd", "--sample-n", 2]])
    assert (tmp_path / "output" / "dmd" / "2-steps" / "samples.png").is_file()
    assert not (tmp_path / "output" / "distilled").exists()
