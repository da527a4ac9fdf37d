"""Gaussian diffusion as pure tensor math: beta schedules, forward noising, the loss, samplers.

Timesteps are 0-based: t = 0 .. T-1 here is t = 1 .. T in Ho et al. 2020. Nothing in this
file reads files or picks a device; tensors stay wherever the caller puts them.
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


SCHEDULES = ("linear", "cosine")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"  # "linear" or "cosine"

    def __post_init__(self):
        if self.timesteps < 2:
            raise ValueError(f"timesteps must be at least 2, got {self.timesteps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")

    def to_dict(self):
        return asdict(self)



def linear_betas(timesteps, max_beta=0.999):
    """Linear betas of Ho et al. 2020 (1e-4 .. 0.02 at T=1000), rescaled so other T match: [T] float64.

    Below T = 50 the rescaled betas pass 1, so they are clipped as the cosine ones are.
    """
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=max_beta)


def cosine_alpha_bar(t, s=0.008):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2): eq. 17 of Nichol & Dhariwal 2021.

    t is the fraction of the way through the process, in [0, 1].
    """
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f(t) / f(torch.zeros_like(t))


def cosine_betas(timesteps, max_beta=0.999):
    """Betas whose cumulative product follows eq. 17 of Nichol & Dhariwal 2021, clipped as in their sec. 3.2: [T]."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = cosine_alpha_bar(t)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(schedule, timesteps):
    if schedule == "linear":
        return linear_betas(timesteps)
    if schedule == "cosine":
        return cosine_betas(timesteps)
    raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")


def _gather(a, t, ndim):
    """a[t] reshaped to broadcast over a batch of images: ([T], [B]) -> [B, 1, 1, 1]."""
    return a[t].reshape(-1, *([1] * (ndim - 1)))


class Diffusion(nn.Module):
    """The fixed forward process q(x_t | x_0) and what the loss and samplers derive from it.

    The schedule is computed in float64 and kept as float32 buffers, so `.to(device)` moves it
    along with the model and it works on devices without float64.
    """

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        betas = make_betas(config.schedule, config.timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt().float(),
                             persistent=False)

    @property
    def timesteps(self):
        return self.config.timesteps

    def q_sample(self, x0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): eq. 4 of Ho et al. 2020. [B,C,H,W]."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (_gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def loss(self, model, x0, t, noise):
        """L_simple = ||eps - eps_theta(x_t, t)||^2 (Algorithm 1 of Ho et al. 2020), mean per example: [B]."""
        pred = model(self.q_sample(x0, t, noise), t)
        return (pred.float() - noise).pow(2).flatten(1).mean(1)

    def predict_x0(self, model, x, t):
        """The model's estimate of x_0 from x_t, clipped to the data range [-1, 1]: eq. 15 of Ho et al. 2020."""
        eps = model(x, t).float()
        x0 = (x - _gather(self.sqrt_one_minus_alphas_cumprod, t, x.ndim) * eps) / _gather(
            self.sqrt_alphas_cumprod, t, x.ndim)
        return x0.clamp(-1, 1)


def spaced_timesteps(timesteps, steps):
    """`steps` evenly spaced timesteps from T-1 down to 0, the respacing of Nichol & Dhariwal 2021, sec. 4."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    return torch.linspace(timesteps - 1, 0, steps).round().long().unique_consecutive()


@torch.no_grad()
def sample_ddpm(model, diffusion, noise, steps=None, generator=None, callback=None):
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, on `steps` respaced timesteps (all T by default).

    Each step draws x_s from the posterior q(x_s | x_t, x_0) (eq. 6-7) with x_0 predicted by the model;
    skipping from t to s uses alpha = abar_t / abar_s (Nichol & Dhariwal 2021, sec. 4).
    noise: x_T, [B, C, H, W]. callback(i, t, x, x0) sees each step. Returns x_0 in [-1, 1].
    """
    ts = spaced_timesteps(diffusion.timesteps, steps or diffusion.timesteps).tolist()
    x = noise
    abar = diffusion.alphas_cumprod
    one = abar.new_ones(())
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        abar_t, abar_s = abar[t], (abar[s] if s >= 0 else one)
        beta = 1 - abar_t / abar_s
        x0 = diffusion.predict_x0(model, x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        mean = (abar_s.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_s) * x) / (1 - abar_t)
        if s >= 0:
            var = beta * (1 - abar_s) / (1 - abar_t)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + var.sqrt() * z
        else:
            x = mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


SAMPLERS = {"ddpm": sample_ddpm}
