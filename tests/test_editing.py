"""Inpainting, inversion and interpolation (editing.py, sample.py --inpaint/--invert/--interpolate):
the kept pixels exact, the known part deciding the rest, round trips through noise, and the
refusals."""
import json
import math

import pytest
import torch
from matplotlib.pyplot import imread
from PIL import Image
from torch.testing import assert_close

import evaluate
import sample
from checkpoint import SHIPPED
from diffusion import Diffusion, DiffusionConfig
from editing import (MASKS, decode, inpaint, inpainting_accuracy, interpolations, invert,
                     named_mask, slerp)
from samplers import SAMPLERS, SamplerConfig
from unet import UNet

EVERY_SAMPLER = [(name, 1) for name in sorted(SAMPLERS)] + [("ddpm", 3)]  # 3: RePaint's jumps


class TwoImages:
    """The exact eps-prediction for data that is image A or image B with equal odds: the posterior
    mean of x_0 given x_t is their mix weighted by q(x_t | x_0) (Ho et al. 2020, eq. 4)."""

    def __init__(self, diffusion, a, b):
        self.abar, self.images = diffusion.alphas_cumprod, torch.stack([a, b])

    def __call__(self, x, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        d2 = (x[:, None] - abar[:, None].sqrt() * self.images).pow(2).flatten(2).sum(-1)
        w = torch.softmax(-d2 / (2 * (1 - abar.view(-1, 1))), dim=1)  # [B, 2]
        x0 = torch.einsum("bk,kchw->bchw", w, self.images)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def two_images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 8, 8, generator=g) * 2 - 1 for _ in range(2)]


@pytest.mark.parametrize("name, jumps", EVERY_SAMPLER)
def test_inpainting_keeps_the_known_pixels_exactly_for_every_sampler(name, jumps):
    diffusion = Diffusion(DiffusionConfig(50))
    a, b = two_images()
    x0 = torch.stack([a, b, a])
    sampler = SamplerConfig.from_flags(name, 20, None, diffusion.timesteps)
    for region in MASKS:
        mask = named_mask(region, size=8)
        done = inpaint(TwoImages(diffusion, a, b), diffusion, x0, mask, sampler, 1, jumps)
        keep = mask.expand_as(x0) == 0
        assert torch.equal(done[keep], x0[keep]), (name, region)
        assert not torch.equal(done, x0)  # and the rest was drawn, near but not at the original


@pytest.mark.parametrize("name, eta, jumps", [("ddpm", None, 1), ("ddpm", None, 3),
                                               ("renoise", None, 1), ("ddim", 1.0, 1)])
def test_stochastic_inpainting_completes_the_image_the_kept_pixels_belong_to(name, eta, jumps):
    """Samplers that add fresh noise at each step; a deterministic one can commit to the other
    image before the kept pixels are clear enough to tell (docs/how-it-works.md)."""
    diffusion = Diffusion(DiffusionConfig(50))
    a, b = two_images()
    x0 = torch.stack([a, b, a])
    sampler = SamplerConfig.from_flags(name, 20, eta, diffusion.timesteps)
    for region in MASKS:
        done = inpaint(TwoImages(diffusion, a, b), diffusion, x0, named_mask(region, size=8),
                       sampler, 1, jumps)
        assert_close(done, x0, atol=0.02, rtol=0), region


def test_repaint_jumps_complete_the_wrong_image_less_often():
    """Replacing the known pixels alone can leave the drawn ones committed to the other image;
    RePaint's resampling lets them agree (Lugmayr et al. 2022, section 4.2)."""
    diffusion = Diffusion(DiffusionConfig(50))
    sampler = SamplerConfig.from_flags("ddpm", 10, None, diffusion.timesteps)
    wrong = {1: 0, 3: 0}
    for seed in range(3):
        a, b = two_images(seed)
        x0 = torch.stack([a, b] * 16)
        for region in MASKS:
            for jumps in wrong:
                done = inpaint(TwoImages(diffusion, a, b), diffusion, x0,
                               named_mask(region, size=8), sampler, 1, jumps)
                wrong[jumps] += (done - x0).flatten(1).abs().amax(1).gt(0.02).sum().item()
    assert wrong[3] < wrong[1], wrong


def test_without_the_kept_pixels_the_same_model_draws_either_image():
    """The check above is not trivial: from noise alone the two images come out about half each."""
    diffusion = Diffusion(DiffusionConfig(50))
    a, b = two_images()
    x = SAMPLERS["ddim"](TwoImages(diffusion, a, b), diffusion, torch.randn(64, 1, 8, 8), 20)
    is_a = ((x - a).flatten(1).norm(dim=1) < (x - b).flatten(1).norm(dim=1)).float().mean()
    assert 0.2 < is_a < 0.8


class GaussianData:
    """The exact eps-prediction for data x_0 ~ N(mu, s^2) per pixel: the posterior mean of x_0 is
    linear in x_t, so the probability-flow map from x_0 to x_t is known in closed form."""

    def __init__(self, diffusion, mu, s):
        self.abar, self.mu, self.s = diffusion.alphas_cumprod, mu, s

    def __call__(self, x, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        gain = abar.sqrt() * self.s ** 2 / (abar * self.s ** 2 + 1 - abar)
        x0 = self.mu + gain * (x - abar.sqrt() * self.mu)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    def flow(self, x0, abar):
        """Where the probability-flow ODE takes x0 at noise level abar: the mean moves, and the
        deviation from it grows to the marginal's standard deviation."""
        return (abar.sqrt() * self.mu
                + (abar * self.s ** 2 + 1 - abar).sqrt() * (x0 - self.mu) / self.s)


def test_inversion_reaches_the_flows_closed_form_and_decoding_brings_the_image_back():
    diffusion = Diffusion(DiffusionConfig(1000))
    data = GaussianData(diffusion, 0.1, 0.3)
    x0 = (0.1 + 0.3 * torch.randn(4, 1, 8, 8)).clamp(-0.9, 0.9)
    exact = data.flow(x0, diffusion.alphas_cumprod[-1])
    noise_error, image_error = [], []
    for steps in (10, 50, 1000):
        z = invert(data, diffusion, x0, steps)
        noise_error.append((z - exact).abs().max().item())
        image_error.append((decode(data, diffusion, z, steps) - x0).pow(2).mean().sqrt().item())
    # DDIM is first order: both errors fall with the steps; measured once at 1000 steps, 1.1e-2 in
    # the noise (max) and 2.4e-3 in the image (RMS): the bounds are four times those
    assert noise_error == sorted(noise_error, reverse=True) and noise_error[-1] < 0.05
    assert image_error == sorted(image_error, reverse=True) and image_error[-1] < 0.01


def test_slerp_follows_the_great_circle_and_ends_at_its_ends():
    a, b = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
    a[0, 0, 0], b[0, 1, 1] = 3.0, 3.0  # orthogonal, of norm 3
    w = torch.tensor([0.0, 1 / 3, 0.5, 1.0])
    path = slerp(a, b, w)
    for i, wi in enumerate(w.tolist()):  # closed form for orthogonal ends: cos and sin of w pi / 2
        assert_close(path[i], math.cos(wi * math.pi / 2) * a + math.sin(wi * math.pi / 2) * b)
    assert_close(path.flatten(1).norm(dim=1), torch.full((4,), 3.0))
    assert_close(slerp(a, a, w), a.expand(4, 1, 2, 2))  # parallel ends: no division by zero


def test_the_ends_of_an_interpolation_are_plain_samples_of_the_same_noises(tiny_config):
    model, diffusion = UNet(tiny_config).eval(), Diffusion(DiffusionConfig(20))
    a, b = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28)
    rows = interpolations(model, diffusion, a, b, 10, frames=5)
    assert rows.shape == (2, 5, 1, 28, 28)
    assert_close(rows[:, 0], decode(model, diffusion, a, 10), atol=1e-5, rtol=1e-5)
    assert_close(rows[:, -1], decode(model, diffusion, b, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rows[:, 2], rows[:, 0], atol=1e-3)


def run_sample(cli, checkpoint, *args):
    sample.main([str(a) for a in ["--checkpoint", checkpoint, "--output-dir", cli.out,
                                  "--data-dir", cli.data, *args]])


def test_sample_draws_each_edit_and_its_picture(cli, good_checkpoint, capsys):
    run_sample(cli, good_checkpoint, "--inpaint", "left", "--n", "3", "--steps", "4")
    run_sample(cli, good_checkpoint, "--inpaint", "centre", "--n", "2", "--sampler", "ddpm",
               "--steps", "4", "--jumps", "2")
    run_sample(cli, good_checkpoint, "--interpolate", "--n", "2", "--steps", "4")
    run_sample(cli, good_checkpoint, "--invert", "--n", "3", "--steps", "4")
    out = capsys.readouterr().out
    assert "reconstruction error (RMS, in [-1, 1]) after 4 steps each way" in out
    for name in ("inpainting", "interpolation", "inversion", "inversion_interpolation"):
        assert imread(cli.out / f"{name}.png").ndim == 3, name
    assert not (cli.out / "samples.png").exists()


def test_a_png_mask_is_read_white_where_filled(cli, good_checkpoint, capsys):
    pixels = torch.zeros(28, 28, dtype=torch.uint8)
    pixels[:, 20:] = 255
    Image.fromarray(pixels.numpy()).save(cli.out.parent / "mask.png")
    from editing import read_mask
    assert torch.equal(read_mask(cli.out.parent / "mask.png")[0, 0], (pixels > 0).float())
    run_sample(cli, good_checkpoint, "--inpaint", cli.out.parent / "mask.png", "--n", "2",
               "--steps", "2")
    assert (cli.out / "inpainting.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--inpaint", "left", "--jumps", "2"], "add --sampler ddpm"),
    (["--jumps", "2"], "for --inpaint: drop it"),
    (["--interpolate", "--sampler", "dpm++"], "drop --sampler, --eta, --jumps"),
    (["--invert", "--eta", "1"], "drop --sampler, --eta, --jumps"),
    (["--invert", "--save-npz", "x.npz"], "drop --save-npz"),
    (["--inpaint", "top", "--trajectory"], "drop --trajectory"),
    (["--inpaint", "top", "--invert"], "not allowed with argument"),
    (["--inpaint", "nowhere.png"], "cannot read it as an image"),
    (["--export", "x.pt", "--no-ema"], "drop --no-ema"),
    (["--export", "x.pt", "--guidance", "0"], "drop --guidance"),
])
def test_edits_asked_wrongly_are_one_line(cli, good_checkpoint, fails, args, message):
    assert message in fails(sample, ["--checkpoint", good_checkpoint, "--output-dir", cli.out,
                                     "--data-dir", cli.data, *args])
    assert not cli.out.exists()


def test_a_mask_of_the_wrong_size_is_one_line(cli, good_checkpoint, fails, tmp_path):
    Image.new("L", (32, 32), 255).save(tmp_path / "big.png")
    assert "is 32x32 pixels; a mask must be 28x28" in fails(
        sample, ["--checkpoint", good_checkpoint, "--output-dir", cli.out, "--inpaint",
                 tmp_path / "big.png"])
    assert not cli.out.exists()


def test_edits_of_a_conditional_autoguided_model_draw_with_no_class(cli, capsys):
    """The shipped checkpoint: class-conditional, with a guide; the edits give it no label."""
    for edit in (["--inpaint", "top"], ["--interpolate"], ["--invert", "--autoguidance", "1"]):
        run_sample(cli, SHIPPED, *edit, "--n", "2", "--steps", "2")
        assert "EMA weights, autoguidance 1, " in capsys.readouterr().out
    run_sample(cli, SHIPPED, "--invert", "--n", "2", "--steps", "2")  # unguided by default
    assert "--invert: EMA weights, ddim sampler" in capsys.readouterr().out
    assert (cli.out / "inpainting.png").exists() and (cli.out / "inversion.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--jumps", "2"], "for --inpaint: drop it"),
    (["--inpaint", "top", "--guidance", "1"], "drop --guidance"),
    (["--inpaint", "top", "--guidance", "0"], "drop --guidance"),  # 0 is a value, not none
    (["--inpaint", "top", "--bpd", "--eta", "0"], "draws no samples: drop --eta, --classifier-dir"),
    (["--inpaint", "top", "--sweep"], "drop --sweep"),
    (["--inpaint", "top", "--bpd"], "draws no samples: drop --classifier-dir, --inpaint"),
    (["--inpaint", "top", "--jumps", "2"], "add --sampler ddpm"),
])
def test_evaluate_refuses_what_inpainting_cannot_score_before_any_work(cli, good_checkpoint, fails,
                                                                      args, message):
    assert message in fails(evaluate, ["--checkpoint", good_checkpoint, "--classifier-dir", cli.ckpt,
                                       "--output-dir", cli.out, "--data-dir", cli.data, *args])
    assert not cli.out.exists() and not cli.ckpt.exists()  # no classifier trained, no folder made


def test_inpainting_accuracy_counts_what_the_classifier_gets_right():
    """A classifier that looks only at the right half: blanked there, every image looks alike to
    it (half right); completed there by the exact model, it is right on all, as on the originals."""
    diffusion = Diffusion(DiffusionConfig(50))
    a, b = two_images()
    x0, labels = torch.stack([a, b] * 4), torch.tensor([0, 1] * 4)

    def right_half(x):
        distance = [(x - y)[..., 4:].flatten(1).norm(dim=1) for y in (a, b)]
        return torch.stack(distance, 1).argmin(1)

    sampler = SamplerConfig.from_flags("ddpm", 20, None, diffusion.timesteps)
    accuracy = inpainting_accuracy(right_half, TwoImages(diffusion, a, b), diffusion, x0, labels,
                                   named_mask("right", size=8), sampler, seed=1)
    assert accuracy == {"originals": 1.0, "blanked": 0.5, "completed": 1.0}


def test_evaluate_scores_inpainting_in_one_line_and_a_file(cli, good_checkpoint, capsys, fails):
    evaluate.main([str(a) for a in ["--checkpoint", good_checkpoint, "--inpaint", "bottom", "--n", "12",
                                    "--steps", "2", "--data-dir", cli.data, "--classifier-dir", cli.ckpt,
                                    "--output-dir", cli.out]])
    assert "originals" in capsys.readouterr().out
    result = json.loads((cli.out / "inpainting.json").read_text())
    assert result["n"] == 12 and set(result["accuracy"]) == {"originals", "blanked", "completed"}
