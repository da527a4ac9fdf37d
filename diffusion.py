"""Gaussian diffusion as pure tensor math: beta schedules, forward noising, the loss, the bound's
terms. The samplers, which walk the reverse process, are in samplers.py.

Timesteps are 0-based: t = 0 .. T-1 here is t = 1 .. T in Ho et al. 2020. Nothing in this file reads
files or picks a device; tensors stay wherever the caller puts them.
"""
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn, special

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned")  # the reverse process's: beta~, beta, learned
LOSSES = ("simple", "hybrid", "vlb")
HYBRID_LAMBDA = 0.001  # weight of L_vlb in L_hybrid, sec. 3.1 of Nichol & Dhariwal 2021
# checked before the schedule's tables are made: a ddpm sample there is 100,000 network calls
MAX_TIMESTEPS = 100_000


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"  # one of SCHEDULES
    prediction: str = "eps"  # what the network outputs: the noise eps, or v (Salimans & Ho 2022)
    min_snr_gamma: float = 0.0  # > 0: weight the loss by min(SNR, gamma) (Hang et al. 2023); 0: off
    # one of VARIANCES; "learned" needs a network with twice the channels out
    variance: str = "fixed_small"
    # one of LOSSES: L_simple, L_hybrid or L_vlb (Nichol & Dhariwal 2021, sec. 3.1 and 3.3)
    loss: str = "simple"

    def __post_init__(self):
        if not 2 <= self.timesteps <= MAX_TIMESTEPS:
            raise ValueError(f"timesteps must be from 2 to {MAX_TIMESTEPS}, got {self.timesteps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose from {PREDICTIONS}")
        if not self.min_snr_gamma >= 0:  # NaN too
            raise ValueError(f"min_snr_gamma must be 0 (off) or more, got {self.min_snr_gamma}")
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; choose from {VARIANCES}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose from {LOSSES}")
        # Settings that would train nothing are refused rather than run.
        if self.variance == "learned" and self.loss == "simple":
            raise ValueError("a learned variance trains only through L_vlb: use loss hybrid or vlb "
                             "with it")
        if self.loss == "hybrid" and self.variance != "learned":
            raise ValueError("loss hybrid's L_vlb part trains only the variance, and it is fixed "
                             "here: use variance learned, or loss simple")
        if self.loss == "vlb" and self.min_snr_gamma:
            raise ValueError("min_snr_gamma weights the MSE of loss simple or hybrid; loss vlb has "
                             "none: drop it")

    def to_dict(self):
        return asdict(self)

    def loss_name(self):
        """What the training loss is, for plots: L_simple is Ho et al.'s unweighted eps MSE only."""
        if self.loss == "vlb":
            return "L_vlb = sum of L_t, estimated, bits/dim"
        mse = (f"{self.prediction} MSE, min-SNR-{self.min_snr_gamma:g} weighted"
               if self.min_snr_gamma else
               "L_simple, eps MSE" if self.prediction == "eps" else "v MSE")
        return mse + (" + 0.001 L_vlb" if self.loss == "hybrid" else "")


def linear_betas(timesteps, max_beta=0.999):
    """Linear betas of Ho et al. 2020 (1e-4 .. 0.02 at T=1000), rescaled so other T match:
    [T] float64.

    Below T = 50 the rescaled betas pass 1, so they are clipped as the cosine ones are.
    """
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps,
                          dtype=torch.float64).clamp(max=max_beta)


def cosine_alpha_bar(t, s=0.008):
    """alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2):
    eq. 17 of Nichol & Dhariwal 2021.

    t is the fraction of the way through the process, in [0, 1].
    """
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f(t) / f(torch.zeros_like(t))


def cosine_betas(timesteps, max_beta=0.999):
    """Betas whose cumulative product follows eq. 17 of Nichol & Dhariwal 2021, clipped as in their
    sec. 3.2: [T]."""
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
        # The posterior q(x_{t-1} | x_t, x_0) (eq. 6-7 of Ho et al. 2020); its variance beta~_t is 0
        # at t = 0, so its log is clipped to beta~_1 there, as Nichol & Dhariwal's code does.
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        log_tilde = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        # fixed_large: their code's choice
        log_large = torch.log(torch.cat([posterior_variance[1:2], betas[1:]]))
        for name, value in (("posterior_log_variance", log_tilde), ("log_betas", torch.log(betas)),
                            ("large_log_variance", log_large),
                            ("posterior_mean_x0", betas * prev.sqrt() / (1 - alphas_cumprod)),
                            ("posterior_mean_xt",
                             (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod))):
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def timesteps(self):
        return self.config.timesteps

    def q_sample(self, x0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): eq. 4 of Ho et al.
        2020. [B,C,H,W]."""
        if noise is None:
            noise = torch.randn_like(x0)
        a, s = self._coefs(t, x0.ndim)
        return a * x0 + s * noise

    def _coefs(self, t, ndim):
        """sqrt(abar_t) and sqrt(1 - abar_t), shaped to broadcast over images: 2 x [B, 1, 1, 1]."""
        return (_gather(self.sqrt_alphas_cumprod, t, ndim),
                _gather(self.sqrt_one_minus_alphas_cumprod, t, ndim))

    def v_target(self, x0, t, noise):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0: sec. 4 of Salimans & Ho 2022.
        [B, C, H, W]."""
        a, s = self._coefs(t, x0.ndim)
        return a * noise - s * x0

    def to_eps_x0(self, out, x, t):
        """The network's output at x_t turned into (eps, x_0), for either prediction type."""
        a, s = self._coefs(t, x.ndim)
        # x_0 = a x_t - s v and eps = s x_t + a v, as a^2 + s^2 = 1
        if self.config.prediction == "v":
            return s * x + a * out, a * x - s * out
        return out, (x - s * out) / a

    def loss_weight(self, t):
        """Per-example loss weight of min-SNR-gamma (Hang et al. 2023, eq. 9-10),
        SNR = abar / (1 - abar): [B].

        Relative to the eps (or v) loss: min(SNR, gamma) / SNR for eps,
        min(SNR, gamma) / (SNR + 1) for v.
        """
        abar = self.alphas_cumprod[t]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=self.config.min_snr_gamma) if self.config.min_snr_gamma else snr
        return clipped / (snr + 1 if self.config.prediction == "v" else snr)

    def split(self, out):
        """The network's output -> (its eps or v [B, C, H, W], the variance fraction frac in [0, 1]
        or None). With a learned variance the second half of the channels is frac in [-1, 1], mapped
        to [0, 1] as in their code."""
        if self.config.variance != "learned":
            return out, None
        pred, raw = out.chunk(2, dim=1)
        return pred, (raw + 1) / 2

    def p_mean_variance(self, pred, frac, x, t, clip=False):
        """p(x_{t-1} | x_t) = N(mean, e^log_variance) and the x_0 it came from: the posterior mean
        at the predicted x_0 (eq. 11 of Nichol & Dhariwal 2021) and Sigma of eq. 15 or a fixed one.
        clip: x_0 to [-1, 1] first."""
        _, x0 = self.to_eps_x0(pred, x, t)
        x0 = x0.clamp(-1, 1) if clip else x0
        if self.config.variance == "learned":
            log_variance = self.interpolated_log_variance(frac, t)
        else:
            table = (self.large_log_variance if self.config.variance == "fixed_large"
                     else self.posterior_log_variance)
            log_variance = _gather(table, t, x.ndim)
        return self.q_posterior(x0, x, t)[0], log_variance, x0

    def loss(self, model, x0, t, noise, y=None):
        """The training loss per example, [B], of model(x_t, t), or of model(x_t, t, y) given labels
        y [B]: L_simple (Algorithm 1 of Ho et al. 2020: MSE to eps or v);
        L_hybrid = L_simple + lambda L_vlb (eq. 16 of Nichol & Dhariwal 2021), the mean's gradient
        stopped in L_vlb so that it trains the variance only; or L_vlb alone. L_vlb = sum_t L_t is
        estimated by T L_t at the t drawn, in bits per dimension; weigh it by TimestepSampler's
        weights when t is not uniform."""
        if y is not None:
            return self.loss(lambda xt, tt: model(xt, tt, y), x0, t, noise)
        if self.config.loss == "vlb":
            return self.timesteps * self.bound_term(model, x0, t, noise, clip=False)
        xt = self.q_sample(x0, t, noise)
        pred, frac = self.split(model(xt, t).float())
        target = noise if self.config.prediction == "eps" else self.v_target(x0, t, noise)
        mse = (pred - target).pow(2).flatten(1).mean(1)
        mse = mse * self.loss_weight(t) if self.config.min_snr_gamma else mse
        if self.config.loss == "simple":
            return mse
        mean, log_variance, _ = self.p_mean_variance(pred.detach(), frac, xt, t)
        return mse + HYBRID_LAMBDA * self.timesteps * self.vlb_term(x0, xt, t, mean, log_variance)

    def q_posterior(self, x0, xt, t):
        """Mean and log variance of q(x_{t-1} | x_t, x_0), eq. 6-7 of Ho et al. 2020: [B, C, H, W],
        [B, 1, 1, 1]."""
        mean = (_gather(self.posterior_mean_x0, t, x0.ndim) * x0
                + _gather(self.posterior_mean_xt, t, x0.ndim) * xt)
        return mean, _gather(self.posterior_log_variance, t, x0.ndim)

    def interpolated_log_variance(self, frac, t):
        """log Sigma = frac log beta_t + (1 - frac) log beta~_t, eq. 15 of Nichol & Dhariwal 2021,
        for frac in [0, 1] per pixel: [B, C, H, W] -> [B, C, H, W]. frac = 0 is beta~_t (clipped at
        t = 0), frac = 1 is beta_t (at t = 0 too; their fixed_large variance takes beta~_1 there
        instead)."""
        return (frac * _gather(self.log_betas, t, frac.ndim)
                + (1 - frac) * _gather(self.posterior_log_variance, t, frac.ndim))

    def vlb_term(self, x0, xt, t, mean, log_variance):
        """One term of the variational bound in bits per dimension, per example (eq. 4-5 of Nichol &
        Dhariwal 2021). In the papers' 1-based steps, with s = t + 1:
        L_{s-1} = KL(q(x_{s-1} | x_s, x_0) || p(x_{s-1} | x_s)) for t >= 1, and the decoder's
        L_0 = -log p(x_0 | x_1) on 256 bins at t = 0. mean, log_variance: p's, broadcastable to x0.
        [B]."""
        true_mean, true_log_variance = self.q_posterior(x0, xt, t)
        kl = normal_kl(true_mean, true_log_variance, mean, log_variance).flatten(1).mean(1)
        decoder = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance).flatten(1).mean(1)
        return torch.where(t == 0, decoder, kl) / math.log(2)

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, per example:
        [B, C, H, W] -> [B]. Nothing trains it; it is small when the schedule ends in noise."""
        t = torch.full((len(x0),), self.timesteps - 1, device=x0.device, dtype=torch.long)
        a, s = self._coefs(t, x0.ndim)
        kl = normal_kl(a * x0, torch.log(s**2), torch.zeros_like(x0), torch.zeros_like(x0))
        return kl.flatten(1).mean(1) / math.log(2)

    def bound_term(self, model, x0, t, noise, clip=True):
        """L_t in bits per dimension at x_t ~ q(x_t | x_0) made with `noise`: [B]. clip: x_0 to
        [-1, 1] as in sampling (evaluation); training leaves it unclipped."""
        xt = self.q_sample(x0, t, noise)
        mean, log_variance, _ = self.p_mean_variance(*self.split(model(xt, t).float()), xt, t,
                                                     clip=clip)
        return self.vlb_term(x0, xt, t, mean, log_variance)

    @torch.no_grad()
    def bits_per_dim(self, model, x0, generator=None, callback=None):
        """The whole variational bound L_T + sum_t L_t (eq. 5 of Nichol & Dhariwal 2021), every term
        computed, one network evaluation per timestep, in bits per dimension: [B, C, H, W] -> [B].
        Exact in t; each L_t is still taken at one x_t ~ q(x_t | x_0), as in their code. callback(t)
        after each t."""
        total = self.prior_bpd(x0)
        for t in reversed(range(self.timesteps)):
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            total = total + self.bound_term(model, x0,
                                            torch.full_like(total, t, dtype=torch.long), noise)
            if callback is not None:
                callback(t)
        return total

    @torch.no_grad()
    def bits_per_dim_estimate(self, model, x0, generator=None):
        """An unbiased estimate of the bound from two network evaluations per image:
        L_T + L_0 + (T - 1) L_t at one t drawn uniformly from 1 .. T-1 (L_0, the decoder, is
        computed exactly: it is the largest term, and sampling it too would multiply the variance):
        [B, C, H, W] -> [B] bits per dimension."""
        shape, device = (len(x0),), x0.device
        noise = lambda: torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(1, self.timesteps, shape, generator=generator, device=device)
        zero = torch.zeros(shape, dtype=torch.long, device=device)
        return (self.prior_bpd(x0) + self.bound_term(model, x0, zero, noise())
                + (self.timesteps - 1) * self.bound_term(model, x0, t, noise()))

    def predict(self, model, x, t):
        """(eps, x_0, frac) at x_t, with x_0 clipped to the data range [-1, 1] and eps made
        consistent with it; frac: the variance fraction of a learned variance, else None.

        Clipping x_0 follows Ho et al.'s code; recomputing eps from the clipped x_0 is eq. 9 of Song
        et al. 2021 solved for eps. t: one timestep (int) for the whole batch, or one per image [B].
        """
        tb = (t if torch.is_tensor(t)
              else torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        pred, frac = self.split(model(x, tb).float())
        _, x0 = self.to_eps_x0(pred, x, tb)
        x0 = x0.clamp(-1, 1)
        a, s = self._coefs(tb, x.ndim)
        return (x - a * x0) / s, x0, frac

    def step_log_variance(self, frac, abar_t, abar_s):
        """log of the reverse variance for one step from t to s of a respaced sequence (sec. 4 of
        Nichol & Dhariwal 2021): beta = 1 - abar_t / abar_s and
        beta~ = beta (1 - abar_s) / (1 - abar_t) recomputed from the shortened schedule, then
        fixed_small, fixed_large, or eq. 15 between them with frac [B, C, H, W]."""
        beta = 1 - abar_t / abar_s
        log_beta, log_tilde = torch.log(beta), torch.log(beta * (1 - abar_s) / (1 - abar_t))
        if self.config.variance == "learned":
            return frac * log_beta + (1 - frac) * log_tilde
        return log_beta if self.config.variance == "fixed_large" else log_tilde


class TimestepSampler:
    """Importance sampling of t for L_vlb, sec. 3.3 of Nichol & Dhariwal 2021: p_t proportional to
    sqrt(E[L_t^2]) over the last `keep` losses of each t, uniform until every t has `keep`. As in
    their code, 0.1% of uniform is mixed in, so that no t is ever left out. The history is training
    state: train.py saves it in checkpoints (state_dict) so that a resumed run samples what an
    unbroken one does."""
    UNIFORM = 0.001

    def __init__(self, timesteps, keep=10):
        self.losses = torch.zeros(timesteps, keep, dtype=torch.float64)  # [T, keep], oldest first
        self.counts = torch.zeros(timesteps, dtype=torch.long)  # [T], up to keep

    def probabilities(self):
        """p_t: [T] float64."""
        T, keep = self.losses.shape
        if (self.counts < keep).any():
            return torch.full((T,), 1 / T, dtype=torch.float64)
        p = self.losses.pow(2).mean(1).sqrt()
        return (1 - self.UNIFORM) * p / p.sum() + self.UNIFORM / T

    def sample(self, n, generator=None, device="cpu"):
        """n timesteps drawn from p_t, and the weights 1 / (T p_t) that keep T L_t unbiased:
        [n], [n]."""
        p = self.probabilities().to(device, torch.float32)  # some devices (MPS) have no float64
        t = torch.multinomial(p, n, replacement=True, generator=generator)
        return t, (1 / (len(p) * p[t])).float()

    def update(self, t, losses):
        """Record each example's loss under its t, in order: [n] timesteps, [n] losses. A NaN or Inf
        is not recorded (it would poison every p_t): the training loop reports a diverged loss
        itself. Reading the losses back waits for the device every step, a cost only --loss vlb
        pays."""
        keep = self.losses.shape[1]
        for ti, loss in zip(t.tolist(), losses.tolist()):
            if not math.isfinite(loss):
                continue
            if self.counts[ti] == keep:
                self.losses[ti] = torch.cat([self.losses[ti, 1:], self.losses.new_tensor([loss])])
            else:
                self.losses[ti, self.counts[ti]] = loss
                self.counts[ti] += 1

    def state_dict(self):
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state):
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"timestep history of shape {tuple(state['losses'].shape)}, expected "
                             f"{tuple(self.losses.shape)}")
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats; the arguments
    broadcast. (e^d - 1 - d with expm1, d = log_var1 - log_var2, keeps nearly equal variances
    accurate in float32.)"""
    d = log_var1 - log_var2
    return 0.5 * (torch.expm1(d) - d + (mean1 - mean2) ** 2 * torch.exp(-log_var2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) per pixel for data on 256 levels in [-1, 1] under N(mean, e^(2 log_scale))
    integrated over each level's bin (width 2/255), the outermost bins reaching to -inf and +inf
    (sec. 3.3 of Ho et al. 2020): [B, C, H, W]. Uses the exact normal CDF, with the difference of
    two CDFs taken on whichever side of the mean keeps it accurate."""
    inv_scale = torch.exp(-log_scale)
    upper, lower = inv_scale * (x - mean + 1 / 255), inv_scale * (x - mean - 1 / 255)
    # special.ndtr in float32 loses the lower tail
    cdf = lambda z: 0.5 * special.erfc(-z / math.sqrt(2))
    bin_mass = torch.where(lower > 0, cdf(-lower) - cdf(-upper), cdf(upper) - cdf(lower))
    return torch.where(x < -0.999, special.log_ndtr(upper),
                       torch.where(x > 0.999, special.log_ndtr(-lower),
                                   torch.log(bin_mass.clamp(min=1e-12))))
