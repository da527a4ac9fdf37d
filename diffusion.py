"""Gaussian diffusion as pure tensor math: beta schedules, forward noising, the loss, the bound's terms.
The samplers, which walk the reverse process, are in samplers.py.

Timesteps are 0-based: t = 0 .. T-1 here is t = 1 .. T in Ho et al. 2020. Nothing in this
file reads files or picks a device; tensors stay wherever the caller puts them.
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn, special


SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"  # one of SCHEDULES
    prediction: str = "eps"  # what the network outputs: the noise eps, or v (Salimans & Ho 2022)
    min_snr_gamma: float = 0.0  # > 0: weight the loss by min(SNR, gamma) (Hang et al. 2023); 0: off

    def __post_init__(self):
        if self.timesteps < 2:
            raise ValueError(f"timesteps must be at least 2, got {self.timesteps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose from {PREDICTIONS}")
        if not self.min_snr_gamma >= 0:  # NaN too
            raise ValueError(f"min_snr_gamma must be 0 (off) or more, got {self.min_snr_gamma}")

    def to_dict(self):
        return asdict(self)

    def loss_name(self):
        """What the training loss is, for plots: L_simple is Ho et al.'s unweighted eps MSE only."""
        if self.min_snr_gamma:
            return f"{self.prediction} MSE, min-SNR-{self.min_snr_gamma:g} weighted"
        return "L_simple, eps MSE" if self.prediction == "eps" else "v MSE"


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
        # The posterior q(x_{t-1} | x_t, x_0) (eq. 6-7 of Ho et al. 2020); its variance beta~_t is 0 at t = 0,
        # so its log is clipped to beta~_1 there, as Nichol & Dhariwal's code does.
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        log_tilde = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        for name, value in (("posterior_log_variance", log_tilde), ("log_betas", torch.log(betas)),
                            ("posterior_mean_x0", betas * prev.sqrt() / (1 - alphas_cumprod)),
                            ("posterior_mean_xt", (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod))):
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def timesteps(self):
        return self.config.timesteps

    def q_sample(self, x0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): eq. 4 of Ho et al. 2020. [B,C,H,W]."""
        if noise is None:
            noise = torch.randn_like(x0)
        a, s = self._coefs(t, x0.ndim)
        return a * x0 + s * noise

    def _coefs(self, t, ndim):
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped to broadcast over images: 2 x [B, 1, 1, 1]."""
        return _gather(self.sqrt_alphas_cumprod, t, ndim), _gather(self.sqrt_one_minus_alphas_cumprod, t, ndim)

    def v_target(self, x0, t, noise):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0: sec. 4 of Salimans & Ho 2022. [B, C, H, W]."""
        a, s = self._coefs(t, x0.ndim)
        return a * noise - s * x0

    def to_eps_x0(self, out, x, t):
        """The network's output at x_t turned into (eps, x_0), for either prediction type."""
        a, s = self._coefs(t, x.ndim)
        if self.config.prediction == "v":  # x_0 = a x_t - s v and eps = s x_t + a v, as a^2 + s^2 = 1
            return s * x + a * out, a * x - s * out
        return out, (x - s * out) / a

    def loss_weight(self, t):
        """Per-example loss weight of min-SNR-gamma (Hang et al. 2023, eq. 9-10), SNR = abar / (1 - abar): [B].

        Relative to the eps (or v) loss: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v.
        """
        abar = self.alphas_cumprod[t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.config.min_snr_gamma) if self.config.min_snr_gamma else snr
        return clipped / (snr + 1 if self.config.prediction == "v" else snr)

    def loss(self, model, x0, t, noise):
        """L_simple (Algorithm 1 of Ho et al. 2020): mean squared error to eps, or to v; per example: [B]."""
        target = noise if self.config.prediction == "eps" else self.v_target(x0, t, noise)
        mse = (model(self.q_sample(x0, t, noise), t).float() - target).pow(2).flatten(1).mean(1)
        return mse * self.loss_weight(t) if self.config.min_snr_gamma else mse

    def q_posterior(self, x0, xt, t):
        """Mean and log variance of q(x_{t-1} | x_t, x_0), eq. 6-7 of Ho et al. 2020: [B, C, H, W], [B, 1, 1, 1]."""
        mean = _gather(self.posterior_mean_x0, t, x0.ndim) * x0 + _gather(self.posterior_mean_xt, t, x0.ndim) * xt
        return mean, _gather(self.posterior_log_variance, t, x0.ndim)

    def interpolated_log_variance(self, v, t):
        """log Sigma = v log beta_t + (1 - v) log beta~_t, eq. 15 of Nichol & Dhariwal 2021, for v in [0, 1]
        per pixel: [B, C, H, W] -> [B, C, H, W]. v = 0 is beta~_t (clipped at t = 0), v = 1 is beta_t (at t = 0
        too; their fixed_large variance takes beta~_1 there instead)."""
        return v * _gather(self.log_betas, t, v.ndim) + (1 - v) * _gather(self.posterior_log_variance, t, v.ndim)

    def vlb_term(self, x0, xt, t, mean, log_variance):
        """One term of the variational bound in bits per dimension, per example (eq. 4-5 of Nichol &
        Dhariwal 2021). In the papers' 1-based steps, with s = t + 1: L_{s-1} = KL(q(x_{s-1} | x_s, x_0) ||
        p(x_{s-1} | x_s)) for t >= 1, and the decoder's L_0 = -log p(x_0 | x_1) on 256 bins at t = 0.
        mean, log_variance: p's, broadcastable to x0. [B]."""
        true_mean, true_log_variance = self.q_posterior(x0, xt, t)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).flatten(1).mean(1)
        decoder = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).flatten(1).mean(1)
        return torch.where(t == 0, decoder, kl) / math.log(2)

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per example: [B, C, H, W] -> [B]. Nothing
        trains it; it is small when the schedule ends in noise."""
        t = torch.full((len(x0),), self.timesteps - 1, device=x0.device, dtype=torch.long)
        a, s = self._coefs(t, x0.ndim)
        kl = normal_kl(a * x0, torch.log(s**2), torch.zeros_like(x0), torch.zeros_like(x0))
        return kl.flatten(1).mean(1) / math.log(2)

    def predict(self, model, x, t):
        """(eps, x_0) at x_t, with x_0 clipped to the data range [-1, 1] and eps made consistent with it.

        Clipping x_0 follows Ho et al.'s code; recomputing eps from the clipped x_0 is eq. 9 of
        Song et al. 2021 solved for eps. t: one timestep (int) for the whole batch.
        """
        tb = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        _, x0 = self.to_eps_x0(model(x, tb).float(), x, tb)
        x0 = x0.clamp(-1, 1)
        a, s = self._coefs(tb, x.ndim)
        return (x - a * x0) / s, x0


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats; the arguments broadcast.
    (e^d - 1 - d with expm1, d = log_var1 - log_var2, keeps nearly equal variances accurate in float32.)"""
    d = log_var1 - log_var2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) per pixel for data on 256 levels in [-1, 1] under N(mean, e^(2 log_scale)) integrated over
    each level's bin (width 2/255), the outermost bins reaching to -inf and +inf (sec. 3.3 of Ho et al.
    2020): [B, C, H, W]. Uses the exact normal CDF, with the difference of two CDFs taken on whichever
    side of the mean keeps it accurate."""
    inv_scale = torch.exp(-log_scale)
    upper, lower = inv_scale * (x - mean + 1 / 255), inv_scale * (x - mean - 1 / 255)
    cdf = lambda z: 0.5 * special.erfc(-z / math.sqrt(2))  # special.ndtr in float32 loses the lower tail
    bin_mass = torch.where(lower > 0, cdf(-lower) - cdf(-upper), cdf(upper) - cdf(lower))
    return torch.where(x < -0.999, special.log_ndtr(upper),
                       torch.where(x > 0.999, special.log_ndtr(-lower), torch.log(bin_mass.clamp(min=1e-12))))
