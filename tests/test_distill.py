"""Progressive distillation (distill.py): the grid, the target of Algorithm 2 against an exact teacher, a round
that learns, the student's sampler, exact resume, and the refusals."""
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

import methods
import samplers
import distill
import evaluate
import sample
import train
from checkpoint import build_model, build_teacher, load_checkpoint
from cli import UserError
from conftest import wait_for
from diffusion import Diffusion, DiffusionConfig
from methods import student_sampler
from samplers import SamplerConfig, even_timesteps, sample_ddim
from unet import UNet


@pytest.mark.parametrize("timesteps", [20, 1000])
def test_each_grid_holds_every_other_point_of_the_one_twice_as_long(timesteps):
    for n in (1, 2, 4, 8):
        fine, coarse = even_timesteps(timesteps, 2 * n), even_timesteps(timesteps, n)
        assert torch.equal(fine[::2], coarse)
        assert coarse[0] == timesteps - 1 and (coarse.diff() < 0).all() and coarse[-1] >= 0
    assert even_timesteps(1000, 1).tolist() == [999] and even_timesteps(1000, 2).tolist() == [999, 499]


def test_the_rounds_halve_the_steps_exactly_down_to_the_last_students():
    assert methods.halvings(64, 4) == [32, 16, 8, 4] and methods.halvings(2, 1) == [1]
    assert methods.reached_by_halving(64, 4) and methods.reached_by_halving(48, 3)
    for teacher_steps, to_steps in ((64, 3), (64, 64), (64, 0), (6, 2), (1, 1)):
        assert not methods.reached_by_halving(teacher_steps, to_steps)


class GaussianTeacher(torch.nn.Module):
    """The exact denoiser of data x ~ N(mu, s^2 I), E[x_0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 +
    sigma^2), as an eps-predicting model: a teacher with no error of its own."""

    def __init__(self, diffusion, mu=0.1, s=0.2):
        super().__init__()
        self.diffusion, self.mu, self.s = diffusion, mu, s

    def forward(self, x, t):
        a, sigma = (v.double() for v in self.diffusion._coefs(t, x.ndim))
        x = x.double()
        x0 = self.mu + a * self.s**2 * (x - a * self.mu) / (a**2 * self.s**2 + sigma**2)
        return ((x - a * x0) / sigma).float()


class PerfectStudent(torch.nn.Module):
    """A v-predicting student whose every step is the target of Algorithm 2: v = (alpha x_t - x~) / sigma."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective

    def forward(self, x, t):
        i = (self.objective.grid[::2][:-1] == t[:, None]).float().argmax(1)  # the student step that starts at t
        abar = self.objective.abar(t)
        return (abar.sqrt() * x - self.objective.target(x, i)) / (1 - abar).sqrt()


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_one_student_step_with_the_target_lands_where_two_exact_teacher_steps_do(steps, schedule):
    teacher_diffusion = Diffusion(DiffusionConfig(1000, schedule))
    diffusion = Diffusion(DiffusionConfig(1000, schedule, prediction="v"))
    teacher = GaussianTeacher(teacher_diffusion)
    objective = methods.Distillation(teacher, teacher_diffusion, diffusion, steps)
    noise = torch.randn(6, 1, 8, 8)
    teacher_path, student_path = [], []
    x_teacher = sample_ddim(teacher, teacher_diffusion, noise, 2 * steps, grid="even",
                            callback=lambda i, t, x, x0: teacher_path.append(x))
    x_student = sample_ddim(PerfectStudent(objective), diffusion, noise, steps, grid="even",
                            callback=lambda i, t, x, x0: student_path.append(x))
    assert len(student_path) == steps and len(teacher_path) == 2 * steps
    for k in range(steps):  # after each student step, where the teacher is after two
        assert_close(student_path[k], teacher_path[2 * k + 1], rtol=1e-4, atol=1e-4)
    assert_close(x_student, x_teacher, rtol=1e-4, atol=1e-4)
    assert (x_teacher - noise).abs().mean() > 0.5  # the walk went somewhere: from noise to near mu
    x0 = 0.1 + 0.2 * torch.randn(6, 1, 8, 8)  # and the perfect student's loss is 0 at every step
    for i in range(steps):
        losses = objective.per_example(PerfectStudent(objective), x0, torch.full((6,), i), torch.randn_like(x0))
        assert losses.max() < 1e-6


def test_a_guided_teacher_teaches_its_guided_prediction(tiny_config):
    teacher = UNet(replace(tiny_config, num_classes=10)).eval()
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.05)
    d = Diffusion(DiffusionConfig(20))
    objective = methods.Distillation(teacher, d, Diffusion(DiffusionConfig(20, prediction="v")), 4, guidance=2.0)
    x, i, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 3]), torch.tensor([1, 5, 10])
    plain = methods.Distillation(samplers.guided(teacher, y, 2.0), d, objective.diffusion, 4)
    assert_close(objective.target(x, i, y), plain.target(x, i))
    unguided = methods.Distillation(samplers.guided(teacher, y, 0.0), d, objective.diffusion, 4)
    assert not torch.allclose(objective.target(x, i, y), unguided.target(x, i))


def distil(cli, teacher, *args):
    return distill.main([str(a) for a in ["--teacher", teacher, "--teacher-steps", 8, "--to-steps", 2,
                                          "--round-steps", 6, "--warmup-steps", 0, "--batch-size", 8, "--lr", 1e-3,
                                          "--checkpoint-every", 2, "--precision", "fp32", "--data-dir", cli.data,
                                          "--checkpoint-dir", cli.ckpt, "--output-dir", cli.out, "--sample-n", 0,
                                          *args]])


def test_a_round_lowers_the_loss_and_its_student_takes_exactly_its_steps(cli, good_checkpoint, capsys):
    distil(cli, good_checkpoint, "--to-steps", 4, "--round-steps", 30)
    student_ckpt = load_checkpoint(cli.ckpt / "4-steps")
    record = student_ckpt["distillation"]
    assert record["sampler"]["steps"] == 4 and record["round"] == 1 and record["source"]["checkpoint"] == str(good_checkpoint)
    teacher, teacher_diffusion = build_teacher(student_ckpt)
    original, _ = build_model(load_checkpoint(good_checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), original.state_dict().values()))
    student, diffusion = build_model(student_ckpt)
    objective = methods.Distillation(teacher, teacher_diffusion, diffusion, 4)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1, torch.randn(64, 1, 28, 28, generator=g)
    i = torch.arange(64) % 4
    with torch.no_grad():
        before, after = (objective.per_example(m, x0, i, noise).mean() for m in (original, student))
    assert after < 0.9 * before, (before, after)  # the same examples, t and noise: no sampling noise
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    images = samplers.generate(student, diffusion, 5, sampler=SamplerConfig("ddim", 4, 0.0, "even"),
                               progress=False)
    assert len(calls) == 4 and images.shape == (5, 1, 28, 28)
    assert "4-step student trained" in capsys.readouterr().out


def tensors(folder):
    ckpt = load_checkpoint(folder)
    flat = {f"model.{k}": v for k, v in ckpt["model"].items()} | {f"ema.{k}": v for k, v in ckpt["ema"].items()}
    for key, state in ckpt["optimizer"]["state"].items():
        flat |= {f"adam.{key}.{k}": v for k, v in state.items()}
    return ckpt["step"], flat, ckpt["history"]


def test_resume_inside_either_round_is_bitwise_equal_to_an_unbroken_run(cli, good_checkpoint, tmp_path):
    resume = ["--resume", str(cli.ckpt), "--data-dir", str(cli.data), "--sample-n", "0", "--output-dir", str(cli.out)]
    distil(cli, good_checkpoint, "--max-steps", 3)  # stops in round 1 (the 4-step student) at step 3
    assert load_checkpoint(cli.ckpt / "4-steps")["step"] == 3 and not (cli.ckpt / "2-steps").exists()
    distill.main([*resume, "--max-steps", "5"])  # round 1's last 3 steps, then round 2 stops at step 2
    assert load_checkpoint(cli.ckpt / "2-steps")["step"] == 2
    distill.main(resume)
    resumed = cli.ckpt
    cli.ckpt = tmp_path / "unbroken"
    distil(cli, good_checkpoint)
    for n in ("4-steps", "2-steps"):
        (step_a, a, history_a), (step_b, b, history_b) = tensors(resumed / n), tensors(cli.ckpt / n)
        assert step_a == step_b == 6 and history_a == history_b and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_sample_and_evaluate_use_the_students_own_sampler_and_refuse_others(cli, good_checkpoint, fails, capsys):
    distil(cli, good_checkpoint, "--to-steps", 4)
    sample.main([str(a) for a in ["--checkpoint", cli.ckpt / "4-steps", "--n", "3", "--output-dir", cli.out]])
    assert "ddim sampler, 4 steps, eta 0, even grid" in capsys.readouterr().out
    student = cli.ckpt / "4-steps"
    assert "distilled for 4 steps" in fails(sample, ["--checkpoint", student, "--steps", "8"])
    assert "drop --sampler" in fails(sample, ["--checkpoint", student, "--sampler", "ddpm"])
    assert "give its teacher" in fails(sample, ["--checkpoint", student, "--interpolate"])
    sample.main([str(a) for a in ["--checkpoint", student, "--n", "3", "--output-dir", cli.out,
                                  "--sampler", "renoise"]])  # its x_0 on its grid, noised afresh
    assert "renoise sampler, 4 steps" in capsys.readouterr().out
    assert "distill.py --resume" in fails(train, ["--resume", student])
    assert "drop --grid" in fails(evaluate, ["--sweep", "--checkpoint", student, "--grid", "ddim:4"])


def test_bad_requests_are_refused_in_one_line_and_leave_the_folder_as_it_was(cli, good_checkpoint, fails):
    assert "not reached by halving" in fails(distill, ["--teacher", good_checkpoint, "--to-steps", "3",
                                                       "--teacher-steps", "8", "--checkpoint-dir", cli.ckpt])
    assert "has only 20 timesteps" in fails(distill, ["--teacher", good_checkpoint, "--checkpoint-dir", cli.ckpt])
    assert "does not exist" in fails(distill, ["--teacher", cli.data / "none", "--checkpoint-dir", cli.ckpt])
    assert "no such folder" in fails(distill, ["--resume", cli.data / "none"]) and not (cli.data / "none").exists()
    distil(cli, good_checkpoint, "--to-steps", 4)
    before = {p: p.read_bytes() for p in cli.ckpt.rglob("*.pt")}
    common = ["--teacher", good_checkpoint, "--teacher-steps", "8", "--checkpoint-dir", cli.ckpt]
    assert "already holds a distillation" in fails(distill, common)
    assert "is a distilled student" in fails(distill, [*common[2:], "--teacher", cli.ckpt / "4-steps",
                                                       "--overwrite"])
    assert "drop --lr" in fails(distill, ["--resume", cli.ckpt, "--lr", "1"])
    assert f"above it, --resume {cli.ckpt}" in fails(distill, ["--resume", cli.ckpt / "4-steps"])  # a round's folder
    assert "--guidance applies to class-conditional" in fails(distill, [*common, "--overwrite", "--guidance", "1"])
    assert {p: p.read_bytes() for p in cli.ckpt.rglob("*.pt")} == before


def test_evaluate_scores_a_student_with_its_own_sampler_alone_or_beside_its_teacher():
    student = {"sampler": student_sampler(4).to_dict(), "guidance": 0.0}
    parse = evaluate.build_parser().parse_args
    expected = SamplerConfig("ddim", 4, 0.0, "even")
    assert evaluate.plan(parse([]), 1000, False, True, student) == [("ema", expected, 0.0)]
    assert evaluate.plan(parse(["--sweep"]), 1000, False, False, student) == [("ema", expected, 0.0)]
    with pytest.raises(UserError, match="distilled for 4 steps"):
        evaluate.plan(parse(["--steps", "8"]), 1000, False, True, student)
    with pytest.raises(UserError, match="drop --guidance"):
        evaluate.plan(parse(["--guidance", "1"]), 1000, True, True, student)


def test_only_the_trained_model_is_guided_later_teachers_have_learned_it(cli, tiny_config, tmp_path, monkeypatch):
    from checkpoint import make_checkpoint, save_checkpoint
    from config import TrainConfig
    cfg = TrainConfig(batch_size=8)
    method, state = methods.denoising(replace(tiny_config, num_classes=10), DiffusionConfig(20), cfg,
                                      torch.device("cpu"))
    part = method.parts[0]
    part.ema.update_parameters(part.model)
    save_checkpoint(make_checkpoint(part, method.diffusion, cfg.recipe(), state, 1), tmp_path / "teacher")
    scales = []
    real = methods.Distillation
    monkeypatch.setattr(distill, "Distillation", lambda *a, **k: scales.append(a[4]) or real(*a, **k))
    distil(cli, tmp_path / "teacher", "--guidance", 1.5, "--round-steps", 2)
    assert scales == [1.5, 0.0]
    students = [load_checkpoint(cli.ckpt / n)["distillation"] for n in ("4-steps", "2-steps")]
    assert [s["guidance"] for s in students] == [1.5, 1.5] and [s["round"] for s in students] == [1, 2]


@pytest.mark.slow
def test_ctrl_c_inside_a_round_keeps_its_steps_and_the_resumed_distillation_is_bitwise_unbroken(
        cli, good_checkpoint, tmp_path):
    sig = signal.SIGINT  # SIGTERM takes the same path (training.graceful_signals): test_reliability
    flags = ["--teacher", good_checkpoint, "--teacher-steps", 8, "--to-steps", 4, "--round-steps", 80,
             "--warmup-steps", 0, "--batch-size", 8, "--lr", 1e-3, "--checkpoint-every", 1000, "--precision", "fp32",
             "--data-dir", cli.data, "--output-dir", cli.out, "--sample-n", 0]
    p = subprocess.Popen([sys.executable, str(cli.root / "distill.py"), *map(str, flags), "--checkpoint-dir",
                          str(cli.ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cli.root)
    wait_for(p, "epoch 1/")  # 32 steps of 80 taken: the signal lands inside the round
    p.send_signal(sig)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "Traceback" not in err, err
    assert f"{sig.name} received" in out and "python distill.py --resume" in out
    kept = load_checkpoint(cli.ckpt / "4-steps")["step"]
    assert 32 <= kept < 80  # what was done is kept, up to the step the signal found
    distill.main([str(a) for a in ["--resume", cli.ckpt, "--data-dir", cli.data, "--output-dir", cli.out,
                                   "--sample-n", 0]])
    unbroken = tmp_path / "unbroken"
    distill.main([str(a) for a in [*flags, "--checkpoint-dir", unbroken]])
    (step_a, a, history_a), (step_b, b, history_b) = tensors(cli.ckpt / "4-steps"), tensors(unbroken / "4-steps")
    assert step_a == step_b == 80 and history_a == history_b and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
