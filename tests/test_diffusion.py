import math
import re

import pytest
import torch
from torch.testing import assert_close

import samplers
from diffusion import Diffusion, DiffusionConfig, make_betas
from samplers import SAMPLERS, logsnr_timesteps, spaced_timesteps
from samplers import SamplerConfig
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


def linear_sampler_variance(abar, ts, std, eta):
    """Variance of x_0 from DDIM (eta = 1: the ancestral sampler) driven by the Gaussian oracle:
    every step is x_s = gain * x_t + sigma * z, so the variance follows a recursion."""
    var = 1.0
    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_s = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        c = a_t**0.5 * std**2 / (a_t * std**2 + 1 - a_t)  # x0_hat = c * x_t
        sigma2 = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        gain = a_s**0.5 * c + (1 - a_s - sigma2) ** 0.5 * (1 - a_t**0.5 * c) / (1 - a_t) ** 0.5
        var = gain**2 * var + sigma2
    return var


def draw(name, model, d, n=4096, shape=(1, 2, 2), steps=None, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return SAMPLERS[name](model, d, torch.randn(n, *shape, generator=g), steps, generator=g, **kw)


@pytest.mark.parametrize("name, steps, eta", [("ddpm", 1000, 1), ("ddpm", 100, 1), ("ddpm", 10, 1),
                                              ("ddim", 1000, 0), ("ddim", 50, 0), ("ddim", 50, 0.5)])
def test_ancestral_and_ddim_on_gaussian_data(name, steps, eta):
    """With the exact denoiser for N(0, std^2) data, the output has the variance the update rule implies;
    on the full schedule that is within 2% of the data's own (the plug-in x_0 leaves out Var[x_0 | x_t])."""
    d, std = Diffusion(DiffusionConfig(1000)), 0.3
    x = draw(name, gaussian_oracle(d, std), d, steps=steps, **({"eta": eta} if name == "ddim" else {}))
    expected = linear_sampler_variance(d.alphas_cumprod.double(), spaced_timesteps(1000, steps).tolist(), std, eta)
    assert abs(x.mean().item()) < 0.02
    assert x.std().item() == pytest.approx(expected**0.5, rel=0.03)
    if steps == 1000:
        assert expected**0.5 == pytest.approx(std, rel=0.02)


@pytest.mark.parametrize("steps, eta", [(10, 0), (20, 0), (20, 1), (50, 1)])
def test_dpm_solver_reaches_gaussian_data_in_few_steps(steps, eta):
    """A second-order solver (ODE, or SDE at eta = 1) with the exact denoiser lands within 3% of the data's
    spread in 10-50 steps, where first-order DDIM on the same budget is still 10-20% short."""
    d, std = Diffusion(DiffusionConfig(1000)), 0.3
    x = draw("dpm++", gaussian_oracle(d, std), d, steps=steps, eta=eta)
    assert x.std().item() == pytest.approx(std, rel=0.03)
    if steps <= 20:
        assert draw("ddim", gaussian_oracle(d, std), d, steps=steps).std().item() < 0.9 * std


def test_ddim_with_eta_1_is_the_ancestral_sampler(tiny_config):
    """Same x_T, same noise draws: DDIM(eta=1) and Algorithm 2 take the same steps, full or respaced."""
    d, model = Diffusion(DiffusionConfig(50)), UNet(tiny_config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for steps in (None, 10):
        seen = {"ddpm": [], "ddim": []}
        for name in seen:
            draw(name, model, d, n=2, shape=(1, 28, 28), steps=steps, callback=lambda i, t, x, x0: seen[name].append(x),
                 **({"eta": 1.0} if name == "ddim" else {}))
        assert len(seen["ddpm"]) == (steps or 50)
        for a, b in zip(seen["ddpm"], seen["ddim"]):
            assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_logsnr_timesteps():
    d = Diffusion(DiffusionConfig(1000))
    ts = logsnr_timesteps(d.alphas_cumprod, 20)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 20 and (ts.diff() < 0).all()
    log_snr = torch.log(d.alphas_cumprod / (1 - d.alphas_cumprod))[ts]
    gaps = log_snr.diff()
    assert gaps.max() < 1.5 * gaps.min()  # evenly spaced in log-SNR, up to rounding t to integers


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_eps_and_v_convert_into_each_other_exactly(prediction):
    d = Diffusion(DiffusionConfig(1000, prediction=prediction))
    x0, eps = torch.rand(5, 1, 28, 28) * 2 - 1, torch.randn(5, 1, 28, 28)
    t = torch.tensor([0, 10, 300, 700, 999])
    xt = d.q_sample(x0, t, eps)
    out = eps if prediction == "eps" else d.v_target(x0, t, eps)
    eps_hat, x0_hat = d.to_eps_x0(out, xt, t)
    assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)
    # x_0 from eps divides by sqrt(abar), which is ~0.006 at t = 999: compare where that is tame
    assert_close(x0_hat[:4], x0[:4], rtol=1e-4, atol=1e-3)
    perfect = lambda x, t_: out
    assert_close(d.loss(perfect, x0, t, eps), torch.zeros(5), atol=1e-10, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_gamma_weights(prediction):
    d = Diffusion(DiffusionConfig(1000, prediction=prediction, min_snr_gamma=5.0))
    t = torch.tensor([0, 100, 999])
    abar = torch.cumprod(1 - make_betas("linear", 1000), 0)[t]
    snr = abar / (1 - abar)
    expected = snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
    assert_close(d.loss_weight(t), expected.float())
    w = d.loss_weight(t)
    assert w[0] < 1e-3  # nearly clean: the clipped SNR weighs the easy steps down
    if prediction == "eps":
        assert w[-1] == 1  # SNR below gamma: the plain eps loss
    else:
        assert w[-1] < 1e-3  # v's loss already carries a factor SNR + 1, so the weight falls with the SNR


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sampler_shape_finite_and_seeded(name, prediction, tiny_config):
    d, model = Diffusion(DiffusionConfig(20, prediction=prediction)), UNet(tiny_config).eval()
    for p in model.parameters():  # leave the zero init so the output depends on the weights
        torch.nn.init.normal_(p, std=0.05)
    last = []
    a = draw(name, model, d, n=3, shape=(1, 28, 28), steps=8, seed=1, callback=lambda i, t, x, x0: last.append(x))
    b, c = (draw(name, model, d, n=3, shape=(1, 28, 28), steps=8, seed=s) for s in (1, 2))
    assert a.shape == (3, 1, 28, 28) and torch.isfinite(a).all()
    assert torch.equal(a, last[-1])  # what the callback saw last is what comes out
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpm_solver_matches_the_papers_update_on_uneven_steps(eta):
    """DPM-Solver++(2M) written out in alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) as in Lu et al.
    2022, Algorithm 2 (plus the SDE terms for eta > 0). T = 20 makes the log-SNR steps h uneven, so
    a ratio r = h_prev / h taken the wrong way round would show; the Gaussian denoiser keeps x_0 inside
    [-1, 1], where clipping would hide the difference."""
    d = Diffusion(DiffusionConfig(20))
    model = gaussian_oracle(d, 0.5)
    ts = logsnr_timesteps(d.alphas_cumprod, 8).tolist()
    abar = [d.alphas_cumprod[t].double() for t in ts] + [torch.tensor(1.0, dtype=torch.float64)]
    alpha, sigma = [a.sqrt() for a in abar], [(1 - a).sqrt() for a in abar]
    lam = [torch.log(a / s) if s > 0 else None for a, s in zip(alpha, sigma)]
    hs = [lam[i + 1] - lam[i] for i in range(len(ts) - 1)]
    assert max(hs) > 1.5 * min(hs), "the steps must be uneven for this test to mean anything"

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 28, 28, generator=g)
    out = SAMPLERS["dpm++"](model, d, x.clone(), 8, generator=torch.Generator().manual_seed(1), eta=eta)
    g = torch.Generator().manual_seed(1)
    x, previous = x.double(), None
    with torch.no_grad():
        for i, t in enumerate(ts):
            x0 = d.predict(model, x.float(), t)[1].double()
            if i == len(ts) - 1:
                x = x0
                break
            h = hs[i]
            D = x0 if previous is None else (1 + 1 / (2 * (previous[1] / h))) * x0 - previous[0] / (2 * (previous[1] / h))
            x = (sigma[i + 1] / sigma[i] * torch.exp(-eta * h) * x + alpha[i + 1] * (1 - torch.exp(-(1 + eta) * h)) * D)
            if eta:
                x = x + sigma[i + 1] * (1 - torch.exp(-2 * eta * h)).sqrt() * torch.randn(x.shape, generator=g).double()
            previous = (x0, h)
    assert_close(out, x.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [5, 20, 50])
def test_every_sampler_runs_the_steps_asked_for(schedule, name, steps):
    """As many network evaluations as steps asked, on distinct timesteps from T-1 down to 0. The cosine
    schedule's log-SNR plunges over its last timesteps; spacing in log-SNR must not stack steps there."""
    d, seen = Diffusion(DiffusionConfig(1000, schedule)), []
    model = lambda x, t: (seen.append(t[0].item()), torch.zeros_like(x))[1]
    SAMPLERS[name](model, d, torch.randn(1, 1, 2, 2), steps)
    assert len(seen) == steps and seen[0] == 999 and seen[-1] == 0
    assert all(a > b for a, b in zip(seen, seen[1:]))
    assert sum(t >= 991 for t in seen) <= math.ceil(steps / 10)  # was 5 of 17 at 20 steps


def test_dpm_solver_sde_is_seeded_and_differs_from_the_ode(tiny_config):
    d, model = Diffusion(DiffusionConfig(20)), UNet(tiny_config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    a, b, ode = (draw("dpm++", model, d, n=3, shape=(1, 28, 28), steps=8, seed=1, eta=e) for e in (1, 1, 0))
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, ode)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_sampler_callback_sees_every_step(name, tiny_config):
    d, model = Diffusion(DiffusionConfig(100)), UNet(tiny_config).eval()
    seen = []
    SAMPLERS[name](model, d, torch.randn(1, 1, 28, 28), 7, callback=lambda i, t, x, x0: seen.append((i, t)))
    ts = logsnr_timesteps(d.alphas_cumprod, 7) if name == "dpm++" else spaced_timesteps(100, 7)
    assert seen == list(enumerate(ts.tolist()))


@pytest.mark.parametrize("sampler, timesteps, steps, eta, expected", [
    (None, 1000, None, None, {"sampler": "dpm++", "steps": 20, "eta": 1.0, "grid": "logsnr"}),
    ("ddim", 1000, None, None, {"sampler": "ddim", "steps": 50, "eta": 0.0, "grid": "time"}),
    ("ddpm", 1000, None, None, {"sampler": "ddpm", "steps": 1000, "eta": None, "grid": "time"}),
    ("dpm++", 10, None, None, {"sampler": "dpm++", "steps": 10, "eta": 1.0, "grid": "logsnr"}),  # <= T
    ("dpm++", 1000, 7, 0.0, {"sampler": "dpm++", "steps": 7, "eta": 0.0, "grid": "logsnr"}),  # given values win
])
def test_sampler_defaults(sampler, timesteps, steps, eta, expected):
    assert SamplerConfig.from_flags(sampler, steps, eta, timesteps).to_dict() == expected
    assert SamplerConfig(**expected).resolve(timesteps).to_dict() == expected  # a resolved one stays as it is


def test_generate_draws_what_sample_py_draws_unless_told_otherwise():
    import inspect
    assert inspect.signature(samplers.generate).parameters["sampler"].default == SamplerConfig()
    assert SamplerConfig().resolve(1000) == SamplerConfig.from_flags(None, None, None, 1000)


@pytest.mark.parametrize("fields, message", [
    (dict(sampler="euler"), "unknown sampler 'euler'"),
    (dict(grid="karras"), "unknown timestep grid 'karras'"),
    (dict(sampler="ddpm", eta=0.5), "eta applies to ddim and dpm++, not ddpm"),
    (dict(steps=True), "steps must be a whole number from 1 up, got True"),
    (dict(steps=0), "steps must be a whole number from 1 up, got 0"),
    (dict(eta="0"), "eta must be a number from 0 to 1, got '0'"),
    (dict(eta=1.5), "eta must be a number from 0 to 1, got 1.5"),
])
def test_unknown_sampler_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplerConfig(**fields)
    with pytest.raises(ValueError, match="unknown timestep grid"):
        samplers.timestep_grid("karras", Diffusion(DiffusionConfig(10)), 4)


def test_sampling_runs_without_tf32_whoever_calls_it(tiny_config):
    """train.py trains with TF32 on CUDA; its final grid must still be drawn as sample.py draws it."""
    from device import tf32

    model, seen = UNet(tiny_config).eval(), []
    forward = model.forward
    model.forward = lambda *a: (seen.append(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
                                forward(*a))[1]
    with tf32(True):
        samplers.generate(model, Diffusion(DiffusionConfig(10)), 2, sampler=SamplerConfig("ddpm", 2), progress=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored afterwards
    assert seen == [False, False]


def test_epsilon_scaling_divides_the_eps_channels_alone(tiny_config):
    """Ning et al. 2024's eps / lambda; a learned variance's channels are not an eps and stay."""
    model = lambda x, t, y=None: torch.cat([x + 1, x - 1], dim=1)
    model.config = tiny_config
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    out = samplers.EpsScaled(model, 1.25)(x, t)
    assert_close(out[:, :1], (x + 1) / 1.25)
    assert_close(out[:, 1:], x - 1)
