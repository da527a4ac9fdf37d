"""The reverse process: three samplers with one signature, the timesteps they visit, classifier-free
guidance, and the two-step target of progressive distillation.

Every sampler: (model, diffusion, noise x_T [B, C, H, W], steps, generator, callback) -> x_0 in [-1, 1].
Only the ancestral sampler (ddpm) uses a learned variance; DDIM and DPM-Solver++ take the noise they
add from their own formulas, so for them a learned-variance model is its eps (or v) prediction alone.
steps: how many network evaluations (None: all T); callback(i, t, x, x0) is called after each step.
Schedules and the forward process live in diffusion.py; nothing here reads files or picks a device.
"""
import torch


def spaced_timesteps(timesteps, steps):
    """`steps` evenly spaced timesteps from T-1 down to 0, the respacing of Nichol & Dhariwal 2021, sec. 4."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    return torch.linspace(timesteps - 1, 0, steps).round().long().unique_consecutive()


def even_timesteps(timesteps, steps):
    """`steps` timesteps T - 1 - k T / steps, k = 0 .. steps - 1, for steps of equal length whose last one ends
    at clean data (t = -1): the grid of progressive distillation (Salimans & Ho 2022, Algorithm 2, t = i / N),
    where each grid of a power-of-two length holds every other point of the one twice as long."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    return (timesteps * (1 - torch.arange(steps, dtype=torch.float64) / steps)).round().long() - 1


LAMBDA_MIN = -5.1  # half log-SNR below which no step is spent: diffusers' lambda_min_clipped for the cosine schedule


def logsnr_timesteps(alphas_cumprod, steps):
    """`steps` distinct timesteps from T-1 down to 0, nearest to values evenly spaced in log-SNR (Lu et al.
    2022, sec. 3.3: uniform in lambda suits few-step solvers on low-resolution images): [steps].

    The spacing starts at the noisiest timestep whose half log-SNR is at least LAMBDA_MIN, the first step
    jumping there from T-1: the cosine schedule's clipped end plunges to -10 over its last few timesteps,
    where even spacing would stack several steps on pure noise (DPM-Solver truncates it likewise); the
    linear schedule ends at -5.06 and is not cut. Where two steps would still share a timestep (many
    steps, or the steep clean end), the noisier one moves up to the next free timestep.
    """
    T = len(alphas_cumprod)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    abar = alphas_cumprod.detach().cpu().double()  # a handful of indices: work on the CPU wherever the buffer is
    log_snr = torch.log(abar / (1 - abar))
    start = int((log_snr >= 2 * LAMBDA_MIN).nonzero().max()) if log_snr[0] >= 2 * LAMBDA_MIN else T - 1
    targets = torch.linspace(log_snr[start].item(), log_snr[0].item(), steps, dtype=torch.float64)
    nearest = (log_snr[None, :] - targets[:, None]).abs().argmin(1).tolist()
    ts = [T - 1] + [0] * (steps - 1)
    for i in range(steps - 1, 0, -1):  # from the clean end: each at least one above the next, room kept above
        ts[i] = min(max(nearest[i], ts[i + 1] + 1 if i + 1 < steps else 0), T - 1 - i)
    return torch.tensor(ts)


def _schedule(diffusion, steps, spacing="time"):
    """(i, t, s, abar_t, abar_s) for each step from t to the next timestep s; the last has s = -1, abar_s = 1."""
    abar = diffusion.alphas_cumprod
    steps = steps or diffusion.timesteps
    grid = {"time": spaced_timesteps, "even": even_timesteps}.get(spacing)
    ts = (grid(diffusion.timesteps, steps) if grid else logsnr_timesteps(abar, steps)).tolist()
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        yield i, t, s, abar[t], (abar[s] if s >= 0 else abar.new_ones(()))


@torch.no_grad()
def sample_ddpm(model, diffusion, noise, steps=None, generator=None, callback=None):
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, on `steps` respaced timesteps.

    Each step draws x_s from N(mu, Sigma): mu is the posterior mean of q(x_s | x_t, x_0) (eq. 6-7) at the
    model's x_0; Sigma is the model's variance (learned or fixed), both recomputed for the jump from t to s
    with alpha = abar_t / abar_s (Nichol & Dhariwal 2021, sec. 4).
    """
    x = noise
    for i, t, s, abar_t, abar_s in _schedule(diffusion, steps):
        _, x0, v = diffusion.predict(model, x, t)
        beta = 1 - abar_t / abar_s
        x = (abar_s.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_s) * x) / (1 - abar_t)
        if s >= 0:  # the last step returns the mean: at t = 0 Ho et al. add no noise
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + torch.exp(0.5 * diffusion.step_log_variance(v, abar_t, abar_s)) * z
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_ddim(model, diffusion, noise, steps=None, generator=None, callback=None, eta=0.0, spacing="time"):
    """DDIM, eq. 12 of Song et al. 2021: x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps + sigma z.

    sigma = eta * sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) (eq. 16): eta = 0 is the
    deterministic sampler, eta = 1 the ancestral one. spacing "time" (spaced_timesteps) or "even"
    (even_timesteps, a distilled student's grid).
    """
    x = noise
    for i, t, s, abar_t, abar_s in _schedule(diffusion, steps, spacing):
        eps, x0, _ = diffusion.predict(model, x, t)
        sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()
        x = abar_s.sqrt() * x0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
        if s >= 0 and eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, diffusion, noise, steps=None, generator=None, callback=None, eta=0.0):
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022: a second-order multistep solver of the
    probability-flow ODE in lambda = log(alpha / sigma), one network evaluation per step, on
    timesteps evenly spaced in lambda.

    eta > 0 mixes in the reverse SDE, as k-diffusion's and diffusers' "DPM-Solver++(2M) SDE" do:
    x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s (1 - e^(-(1 + eta) h)) D + sigma_s sqrt(1 - e^(-2 eta h)) z;
    eta = 0 is the ODE solver, eta = 1 the SDE solver, which forgets its own errors as DDPM does.
    """
    lam = lambda abar: 0.5 * torch.log(abar / (1 - abar))  # log(alpha / sigma), the half log-SNR
    x, previous = noise, None  # previous: (x_0 estimate, step size h) of the step before
    for i, t, s, abar_t, abar_s in _schedule(diffusion, steps, spacing="logsnr"):
        _, x0, _ = diffusion.predict(model, x, t)
        if s < 0:  # the last step lands on clean data (sigma = 0): its solution is x_0 itself
            x = x0
        else:
            h = lam(abar_s) - lam(abar_t)
            d = x0
            if previous is not None:
                r = previous[1] / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous[0]
            x = (((1 - abar_s) / (1 - abar_t)).sqrt() * torch.exp(-eta * h) * x
                 - abar_s.sqrt() * torch.expm1(-(1 + eta) * h) * d)
            if eta > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + (1 - abar_s).sqrt() * (-torch.expm1(-2 * eta * h)).sqrt() * z
            previous = (x0, h)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# What a progressive-distillation student samples with, recorded in its checkpoint: its teacher's sampler,
# deterministic DDIM on the even grid (Salimans & Ho 2022, Algorithm 2), in the student's own steps.
DISTILLED_SAMPLER = {"sampler": "ddim", "eta": 0.0, "spacing": "even"}


def ddim_step(x, x0, abar_t, abar_s):
    """One deterministic DDIM step from x_t to x_s given the model's x_0 (eq. 12 of Song et al. 2021, sigma = 0):
    x_s = alpha_s x_0 + (sigma_s / sigma_t) (x_t - alpha_t x_0), with alpha^2 = abar, sigma^2 = 1 - abar."""
    return abar_s.sqrt() * x0 + ((1 - abar_s) / (1 - abar_t)).sqrt() * (x - abar_t.sqrt() * x0)


def distillation_target(x, x_s, abar_t, abar_s):
    """The x_0 whose one DDIM step from x_t lands on x_s (x~ of Algorithm 2 of Salimans & Ho 2022): ddim_step
    solved for x_0. x_s: where two teacher steps went; abar_s = 1 (clean data) gives x_s itself. [B, C, H, W]."""
    ratio = ((1 - abar_s) / (1 - abar_t)).sqrt()
    return (x_s - ratio * x) / (abar_s.sqrt() - ratio * abar_t.sqrt())


def guided(model, labels, w):
    """Classifier-free guidance, eq. 6 of Ho & Salimans 2022: (1 + w) f(x, t, c) - w f(x, t, none).

    w = 0 is the conditional model alone; conditional and unconditional run as one doubled batch.
    """
    if w == 0:
        return lambda x, t: model(x, t, labels)

    def fn(x, t):
        none = torch.full_like(labels, model.config.num_classes)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, none])).chunk(2)
        c = x.shape[1]  # a learned variance, in the channels after c, is the conditional model's (GLIDE, sec. 2.3)
        return torch.cat([cond[:, :c] + w * (cond[:, :c] - uncond[:, :c]), cond[:, c:]], dim=1)
    return fn


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++": sample_dpmpp_2m}
