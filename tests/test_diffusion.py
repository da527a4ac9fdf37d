import math

import pytest
import torch
from torch.testing import assert_close

from diffusion import SAMPLERS, Diffusion, DiffusionConfig, make_betas, spaced_timesteps
from unet import UNet


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 100, 1000])
def test_alpha_bar_strictly_decreasing_inside_unit_interval(schedule, timesteps):
    d = Diffusion(DiffusionConfig(timesteps, schedule))
    abar = d.alphas_cumprod
    assert abar.dtype == torch.float32 and abar.shape == (timesteps,)
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_linear_schedule_is_ho_et_al():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64
    assert_close(betas[0].item(), 1e-4)
    assert_close(betas[-1].item(), 0.02)
    assert_close(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_schedule_matches_its_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    abar = torch.cumprod(1 - make_betas("cosine", T), 0)
    # Betas are clipped at 0.999 only in the last step, where f(T) is ~0.
    assert_close(abar[:-1], expected[:-1], rtol=1e-9, atol=1e-12)


def test_q_sample_with_given_noise_is_the_closed_form():
    d = Diffusion(DiffusionConfig(1000))
    x0, noise = torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 10, 500, 999])
    abar = torch.cumprod(1 - make_betas("linear", 1000), 0)[t].float().view(-1, 1, 1, 1)
    assert_close(d.q_sample(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("t", [5, 900])
def test_q_sample_moments_match_closed_form(schedule, t):
    d = Diffusion(DiffusionConfig(1000, schedule))
    x0 = torch.linspace(-1, 1, 16).view(1, 1, 4, 4).expand(20000, 1, 4, 4)
    xt = d.q_sample(x0, torch.full((20000,), t))
    abar = d.alphas_cumprod[t]
    sem = ((1 - abar) / 20000).sqrt()  # standard error of each pixel's mean
    assert_close(xt.mean(0), abar.sqrt() * x0[0], atol=5 * sem.item(), rtol=0)
    assert_close(xt.var(0), torch.full_like(x0[0], (1 - abar).item()), rtol=0.05, atol=0)


def test_loss_is_per_example_eps_mse():
    d = Diffusion(DiffusionConfig(100))
    x0, noise, t = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28), torch.tensor([1, 50, 99])
    model = lambda x, t: torch.zeros_like(x)  # predicts no noise: the loss is E[eps^2]
    assert_close(d.loss(model, x0, t, noise), noise.pow(2).mean((1, 2, 3)))
    perfect = lambda x, t_: noise  # the true noise: zero loss
    assert_close(d.loss(perfect, x0, t, noise), torch.zeros(3))


def test_spaced_timesteps():
    ts = spaced_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10
    assert (ts.diff() < 0).all()
    assert spaced_timesteps(20, 20).tolist() == list(range(19, -1, -1))
    with pytest.raises(ValueError):
        spaced_timesteps(20, 21)


def gaussian_oracle(d, std):
    """The exact eps-predictor E[eps | x_t] when the data is N(0, std^2) per pixel."""
    def model(x, t):
        abar = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * x / (abar * std**2 + 1 - abar)
    return model


def ancestral_variance(abar, ts, std):
    """Variance of x_0 from Algorithm 2 driven by the Gaussian oracle: every step is linear in x_t."""
    var = 1.0
    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_s = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        c = a_t**0.5 * std**2 / (a_t * std**2 + 1 - a_t)  # x0_hat = c * x_t
        beta = 1 - a_t / a_s
        gain = (a_s**0.5 * beta * c + (1 - beta) ** 0.5 * (1 - a_s)) / (1 - a_t)
        var = gain**2 * var + beta * (1 - a_s) / (1 - a_t)
    return var


@pytest.mark.parametrize("steps", [1000, 100, 10])
def test_ancestral_sampler_on_gaussian_data(steps):
    """With the exact denoiser for N(0, std^2) data, Algorithm 2's output has the variance its update
    rule implies; on the full schedule that is within 2% of the data's own (the plug-in x_0
    leaves out Var[x_0 | x_t], so each step is slightly under-dispersed)."""
    d, std = Diffusion(DiffusionConfig(1000)), 0.3
    g = torch.Generator().manual_seed(0)
    x = SAMPLERS["ddpm"](gaussian_oracle(d, std), d, torch.randn(4096, 1, 2, 2, generator=g), steps, generator=g)
    expected = ancestral_variance(d.alphas_cumprod.double(), spaced_timesteps(1000, steps).tolist(), std) ** 0.5
    assert abs(x.mean().item()) < 0.02
    assert x.std().item() == pytest.approx(expected, rel=0.03)
    if steps == 1000:
        assert expected == pytest.approx(std, rel=0.02)


def test_sampler_shape_finite_and_seeded(tiny_config):
    d, model = Diffusion(DiffusionConfig(20)), UNet(tiny_config).eval()
    for p in model.parameters():  # leave the zero init so the output depends on the weights
        torch.nn.init.normal_(p, std=0.05)

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return SAMPLERS["ddpm"](model, d, torch.randn(3, 1, 28, 28, generator=g), None, generator=g)

    a, b, c = draw(1), draw(1), draw(2)
    assert a.shape == (3, 1, 28, 28) and torch.isfinite(a).all()
    assert a.abs().max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampler_callback_sees_every_step(tiny_config):
    d, model = Diffusion(DiffusionConfig(20)), UNet(tiny_config).eval()
    seen = []
    SAMPLERS["ddpm"](model, d, torch.randn(1, 1, 28, 28), 5, callback=lambda i, t, x, x0: seen.append((i, t)))
    assert seen == list(enumerate(spaced_timesteps(20, 5).tolist()))
