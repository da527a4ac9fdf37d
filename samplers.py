"""The reverse process: the samplers, the timestep grids they visit, their settings (SamplerConfig,
the one home of every sampler default), classifier-free guidance and autoguidance, and
generate_batches() and generate(), which draw n images.

Every sampler: (model, diffusion, noise x_T [B, C, H, W], steps, generator, callback, **options) ->
x_0 in [-1, 1], its options being SamplerConfig.options(): the grid, and eta where it takes one.
Only the ancestral sampler (ddpm) uses a learned variance; DDIM and DPM-Solver++ take the noise they
add from their own formulas, so for them a learned-variance model is its eps (or v) prediction
alone. callback(i, t, x, x0) is called after each step. Schedules and the forward process are in
diffusion.py; training objectives (progressive distillation's target among them) in methods.py.
"""
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from cli import check
from device import autocast_for, default_batch_size, tf32

def spaced_timesteps(timesteps, steps):
    """`steps` evenly spaced timesteps from T-1 down to 0, the respacing of Nichol & Dhariwal 2021,
    sec. 4."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    return torch.linspace(timesteps - 1, 0, steps).round().long().unique_consecutive()


def even_timesteps(timesteps, steps):
    """`steps` timesteps T - 1 - k T / steps, k = 0 .. steps - 1, for steps of equal length whose
    last one ends at clean data (t = -1): the grid of progressive distillation (Salimans & Ho 2022,
    Algorithm 2, t = i / N), where each grid of a power-of-two length holds every other point of the
    one twice as long."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be between 1 and {timesteps}, got {steps}")
    return (timesteps * (1 - torch.arange(steps, dtype=torch.float64) / steps)).round().long() - 1


# half log-SNR below which no step is spent: diffusers' lambda_min_clipped for the cosine schedule
LAMBDA_MIN = -5.1


def logsnr_timesteps(alphas_cumprod, steps):
    """`steps` distinct timesteps from T-1 down to 0, nearest to values evenly spaced in log-SNR
    (Lu et al. 2022, sec. 3.3: uniform in lambda suits few-step solvers on low-resolution images):
    [steps].

    The spacing starts at the noisiest timestep whose half log-SNR is at least LAMBDA_MIN, the first
    step jumping there from T-1: the cosine schedule's clipped end plunges to -10 over its last few
    timesteps, where even spacing would stack several steps on pure noise (DPM-Solver truncates it
    likewise); the linear schedule ends at -5.06 and is not cut. Where two steps would still share a
    timestep (many steps, or the steep clean end), the noisier one moves up to the next free
    timestep.
    """
    T = len(alphas_cumprod)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    # a handful of indices: work on the CPU wherever the buffer is
    abar = alphas_cumprod.detach().cpu().double()
    log_snr = torch.log(abar / (1 - abar))
    start = (int((log_snr >= 2 * LAMBDA_MIN).nonzero().max()) if log_snr[0] >= 2 * LAMBDA_MIN
             else T - 1)
    targets = torch.linspace(log_snr[start].item(), log_snr[0].item(), steps, dtype=torch.float64)
    nearest = (log_snr[None, :] - targets[:, None]).abs().argmin(1).tolist()
    ts = [T - 1] + [0] * (steps - 1)
    # from the clean end: each at least one above the next, room kept above
    for i in range(steps - 1, 0, -1):
        ts[i] = min(max(nearest[i], ts[i + 1] + 1 if i + 1 < steps else 0), T - 1 - i)
    return torch.tensor(ts)


def timestep_grid(name, diffusion, steps):
    """The timesteps a sampler visits, from the noisiest: [steps] (respacing may merge a few). name
    is one of GRIDS: "time" (spaced_timesteps), "even" (even_timesteps) or "logsnr"
    (logsnr_timesteps)."""
    if name == "logsnr":
        return logsnr_timesteps(diffusion.alphas_cumprod, steps)
    if name not in GRIDS:
        raise ValueError(f"unknown timestep grid {name!r}; choose from {', '.join(GRIDS)}")
    return (spaced_timesteps if name == "time" else even_timesteps)(diffusion.timesteps, steps)


def _schedule(diffusion, steps, grid):
    """(i, t, s, abar_t, abar_s) for each step from t to the next timestep s; the last has s = -1,
    abar_s = 1."""
    abar = diffusion.alphas_cumprod
    ts = timestep_grid(grid, diffusion, steps or diffusion.timesteps).tolist()
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        yield i, t, s, abar[t], (abar[s] if s >= 0 else abar.new_ones(()))


def ddim_step(x, x0, abar_t, abar_s, sigma=0.0):
    """The mean of one DDIM step from x_t to x_s given the model's x_0, eq. 12 of Song et al. 2021:
    x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps,
    eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t); sigma = 0 is the deterministic step.
    Broadcasts: x, x0 [B, C, H, W]; the abar and sigma scalars or [B, 1, 1, 1]. The caller adds
    sigma z."""
    scale = ((1 - abar_s - sigma**2).clamp(min=0) / (1 - abar_t)).sqrt()
    return abar_s.sqrt() * x0 + scale * (x - abar_t.sqrt() * x0)


@torch.no_grad()
def sample_ddpm(model, diffusion, noise, steps=None, generator=None, callback=None, grid="time"):
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, on `steps` respaced timesteps.

    Each step draws x_s from N(mu, Sigma): mu is the posterior mean of q(x_s | x_t, x_0) (eq. 6-7)
    at the model's x_0; Sigma is the model's variance (learned or fixed), both recomputed for the
    jump from t to s with alpha = abar_t / abar_s (Nichol & Dhariwal 2021, sec. 4).
    """
    x = noise
    for i, t, s, abar_t, abar_s in _schedule(diffusion, steps, grid):
        x, x0 = ddpm_step(model, diffusion, x, t, s, abar_t, abar_s, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def ddpm_step(model, diffusion, x, t, s, abar_t, abar_s, generator=None):
    """One ancestral step from x_t to x_s (sample_ddpm's): a draw of the posterior q(x_s | x_t, x_0)
    at the model's x_0 (Ho et al. 2020, eqs. 6-7; a learned variance: Nichol & Dhariwal 2021,
    eq. 15): (x_s, x_0), both [B, C, H, W]."""
    _, x0, frac = diffusion.predict(model, x, t)
    beta = 1 - abar_t / abar_s
    x = (abar_s.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_s) * x) / (1 - abar_t)
    if s >= 0:  # the last step returns the mean: at t = 0 Ho et al. add no noise
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + torch.exp(0.5 * diffusion.step_log_variance(frac, abar_t, abar_s)) * z
    return x, x0


@torch.no_grad()
def sample_ddim(model, diffusion, noise, steps=None, generator=None, callback=None, eta=0.0,
                grid="time"):
    """DDIM, eq. 12 of Song et al. 2021:
    x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps + sigma z.

    sigma = eta * sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) (eq. 16): eta = 0 is the
    deterministic sampler, eta = 1 the ancestral one. grid "even" is a distilled student's.
    """
    x = noise
    for i, t, s, abar_t, abar_s in _schedule(diffusion, steps, grid):
        _, x0, _ = diffusion.predict(model, x, t)
        sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()
        x = ddim_step(x, x0, abar_t, abar_s, sigma)
        if s >= 0 and eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device,
                                        dtype=x.dtype)
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, diffusion, noise, steps=None, generator=None, callback=None, eta=0.0,
                    grid="logsnr"):
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022: a second-order multistep solver of the
    probability-flow ODE in lambda = log(alpha / sigma), one network evaluation per step, on
    timesteps evenly spaced in lambda.

    eta > 0 mixes in the reverse SDE, as k-diffusion's and diffusers' "DPM-Solver++(2M) SDE" do:
    x_s = (sigma_s / sigma_t) e^(-eta h) x_t + alpha_s (1 - e^(-(1 + eta) h)) D
          + sigma_s sqrt(1 - e^(-2 eta h)) z;
    eta = 0 is the ODE solver, eta = 1 the SDE solver, which forgets its own errors as DDPM does.
    """
    lam = lambda abar: 0.5 * torch.log(abar / (1 - abar))  # log(alpha / sigma), the half log-SNR
    x, previous = noise, None  # previous: (x_0 estimate, step size h) of the step before
    for i, t, s, abar_t, abar_s in _schedule(diffusion, steps, grid):
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


def renoise(x0, abar_s, z):
    """A fresh draw of q(x_s | x_0) = N(sqrt(abar_s) x_0, (1 - abar_s) I) with noise z (eq. 4 of Ho
    et al. 2020): how a few-step generator passes its x_0 on to its next step. [B, C, H, W]."""
    return abar_s.sqrt() * x0 + (1 - abar_s).sqrt() * z


@torch.no_grad()
def sample_renoise(model, diffusion, noise, steps=None, generator=None, callback=None,
                   grid="time"):
    """Multistep sampling of a few-step generator (Song et al. 2023, Algorithm 1; DMD2, sec. 4.3
    of Yin et al. 2024): the model's x_0 at each timestep of the grid, then renoise() with fresh
    noise to the next one; of x_t nothing but that x_0 is carried on."""
    x = noise
    for i, t, s, abar_t, abar_s in _schedule(diffusion, steps, grid):
        _, x0, _ = diffusion.predict(model, x, t)
        x = x0 if s < 0 else renoise(x0, abar_s, torch.randn(x.shape, generator=generator,
                                                             device=x.device, dtype=x.dtype))
        if callback is not None:
            callback(i, t, x, x0)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++": sample_dpmpp_2m,
            "renoise": sample_renoise}
GRIDS = ("time", "even", "logsnr")
# Each sampler's defaults: its steps (None: all T), its eta (None: it takes none) and its grid.
SAMPLER_DEFAULTS = {"ddpm": (None, None, "time"), "ddim": (50, 0.0, "time"),
                    "dpm++": (20, 1.0, "logsnr"), "renoise": (4, None, "time")}


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample; a field left None takes the sampler's default (SAMPLER_DEFAULTS) in resolve().
    The default sampler is DPM-Solver++ in its SDE form (eta = 1): it matched 1000-step DDPM's FID
    in 20 steps, 50x sooner, and the ODE samplers did not (docs/results.md, "Sampling")."""
    sampler: str = "dpm++"  # one of SAMPLERS
    steps: int = None  # network evaluations, on the grid's timesteps
    eta: float = None  # ddim and dpm++: 0 deterministic (ODE) to 1 ancestral (SDE)
    grid: str = None  # one of GRIDS: the timesteps visited

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.grid is not None and self.grid not in GRIDS:
            raise ValueError(f"unknown timestep grid {self.grid!r}; choose from {', '.join(GRIDS)}")
        if self.eta is not None and SAMPLER_DEFAULTS[self.sampler][1] is None:
            raise ValueError(f"eta applies to ddim and dpm++, not {self.sampler}")
        if self.steps is not None and not (type(self.steps) is int and self.steps >= 1):
            raise ValueError(f"steps must be a whole number from 1 up, got {self.steps!r}")
        if self.eta is not None and not (type(self.eta) in (int, float) and 0 <= self.eta <= 1):
            raise ValueError(f"eta must be a number from 0 to 1, got {self.eta!r}")

    @classmethod
    def from_flags(cls, sampler, steps, eta, timesteps, own=None, any_steps=False):
        """The settings a command's --sampler, --steps and --eta ask for, resolved for a model of
        `timesteps` steps; a flag that cannot apply is a UserError. own: a distilled student's
        SamplerConfig, the only one it samples with: a flag that would change it is refused, but
        with any_steps (a consistency model, whose x_0 holds at every t) --steps."""
        if own is not None:
            # renoise: the student's own x_0 on its own grid, with fresh noise between its steps
            check(sampler in (None, own.sampler, "renoise") and eta is None,
                  f"this checkpoint is a student distilled to sample in {own.steps} steps with its "
                  f"own sampler ({own.describe()}): drop --sampler (or give renoise, its x_0 "
                  f"with fresh noise between its steps) and --eta")
            check(steps in (None, own.steps) or (any_steps and 1 <= steps <= timesteps),
                  f"--steps must be from 1 to the model's {timesteps}, got {steps}" if any_steps
                  else f"this student was distilled for {own.steps} steps and cannot take {steps}: "
                  f"other counts lie off the grid it learned; drop --steps, or take the student "
                  f"for {steps} beside it")
            same = sampler in (None, own.sampler)
            return cls(own.sampler if same else "renoise", steps or own.steps,
                       own.eta if same else None, own.grid)
        sampler = sampler or cls.sampler
        check(eta is None or SAMPLER_DEFAULTS[sampler][1] is not None,
              f"--eta applies to ddim and dpm++, not {sampler}")
        check(eta is None or 0 <= eta <= 1, f"--eta must be between 0 (deterministic, ODE) and 1 "
                                            f"(ancestral, SDE), got {eta}")
        check(steps is None or 1 <= steps <= timesteps,
              f"--steps must be between 1 and {timesteps}, got {steps}")
        return cls(sampler, steps, eta).resolve(timesteps)

    def resolve(self, timesteps):
        """These settings with every None replaced by the sampler's default, steps at most T."""
        steps, eta, grid = SAMPLER_DEFAULTS[self.sampler]
        steps = self.steps or min(steps or timesteps, timesteps)
        return replace(self, steps=steps, eta=eta if self.eta is None else self.eta,
                       grid=self.grid or grid)

    def options(self):
        """The sampler function's keyword options: the grid, and eta where the sampler takes one."""
        return {"grid": self.grid, **({"eta": self.eta} if self.eta is not None else {})}

    def to_dict(self):
        return asdict(self)

    def describe(self):
        """'dpm++ sampler, 20 steps, eta 1', and the grid where it is not the sampler's own."""
        eta = f", eta {self.eta:g}" if self.eta is not None else ""
        grid = (f", {self.grid} grid" if self.grid not in (None, SAMPLER_DEFAULTS[self.sampler][2])
                else "")
        return f"{self.sampler} sampler, {self.steps} steps{eta}{grid}"


# default classifier-free guidance scale w: the conditional model alone, the best FID measured (docs/
# results.md, "Classifier-free guidance"); 0.5 makes more samples of the class asked, at some FID
GUIDANCE = 0.0


def guided(model, labels, w):
    """Classifier-free guidance, eq. 6 of Ho & Salimans 2022: (1 + w) f(x, t, c) - w f(x, t, none).

    w = 0 is the conditional model alone; conditional and unconditional run as one doubled batch.
    """
    if w == 0:
        return lambda x, t: model(x, t, labels)

    def fn(x, t):
        none = torch.full_like(labels, model.config.num_classes)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([labels, none])).chunk(2)
        return extrapolate(cond, uncond, w, x.shape[1])
    return fn


def extrapolate(strong, weak, w, c):
    """(1 + w) strong - w weak on the first c channels (the eps or v prediction), which every
    guidance here shares; a learned variance, after channel c, is the strong prediction's own
    (GLIDE, sec. 2.3). eps is affine in x0 with the same coefficients, so guiding it guides x0."""
    return torch.cat([strong[:, :c] + w * (strong[:, :c] - weak[:, :c]), strong[:, c:]], dim=1)


class EpsScaled(torch.nn.Module):
    """Epsilon scaling (Ning et al. 2024, eq. 13 with a constant lambda): an eps-prediction model's
    eps divided by `factor` (a little above 1) at sampling, against the exposure bias that makes
    the eps of a sampler's own x_t too large. Called as the model it wraps."""

    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor, self.config = model, factor, model.config

    def forward(self, x, t, labels=None):
        out = self.model(x, t, labels)
        c = x.shape[1]  # a learned variance, after channel c, is not an eps
        return torch.cat([out[:, :c] / self.factor, out[:, c:]], dim=1)


# default autoguidance scale: guiding the model with the early EMA its checkpoint keeps (the
# checkpoint's "guide"); the best FID measured on the default run (docs/results.md, "Autoguidance")
AUTOGUIDANCE = 1.0


class Autoguided(torch.nn.Module):
    """Autoguidance, eq. 1 of Karras et al. 2024: (1 + w) D(x, t, c) - w D_guide(x, t, c), D_guide
    a weaker version of the same model (here an early EMA of its run): it sharpens what the guide
    gets wrong without the loss of variety of classifier-free guidance, conditional or not.
    Called as the model it wraps: (x [B, C, H, W], t [B], labels [B] or None) -> [B, C', H, W]."""

    def __init__(self, model, guide, w):
        super().__init__()
        self.model, self.guide, self.w, self.config = model, guide, w, model.config

    def forward(self, x, t, labels=None):
        return extrapolate(self.model(x, t, labels), self.guide(x, t, labels), self.w, x.shape[1])


def autoguided(model, guide, w=None):
    """(the model to sample with, its autoguidance scale): model guided by `guide` (a checkpoint's
    early EMA, checkpoint.build_guide, or None) with scale w, AUTOGUIDANCE if None and there is a
    guide; the model itself at w = 0."""
    check(w is None or 0 <= w < float("inf"), f"--autoguidance must be 0 (off) or more, got {w}")
    check(guide is not None or not w,
          "--autoguidance needs the early EMA a checkpoint keeps as its guide, and this one keeps "
          "none (trained with --guide-fraction 0, distilled, or older): drop --autoguidance")
    w = (AUTOGUIDANCE if guide is not None else 0.0) if w is None else w
    return (Autoguided(model, guide, w) if w else model), w


def generate(model, diffusion, n, seed=0, sampler=SamplerConfig(), batch_size=None, callback=None,
             progress=True, precision="fp32", labels=None, guidance=0.0):
    """n images [n, C, H, W] in [-1, 1] on the CPU: generate_batches()'s batches, joined."""
    return torch.cat(list(generate_batches(model, diffusion, n, seed, sampler, batch_size, callback,
                                           progress, precision, labels, guidance)))


def generate_batches(model, diffusion, n, seed=0, sampler=SamplerConfig(), batch_size=None,
                     callback=None, progress=True, precision="fp32", labels=None, guidance=0.0):
    """Yield n images in [-1, 1] on the CPU as batches [b, C, H, W], drawn with `sampler` (a
    SamplerConfig: what sample.py draws with unless told otherwise), so that a caller keeping none
    uses memory flat in n; the same seed and batch size give the same images. labels [n]: the class
    of each image, for a conditional model, guided with scale `guidance`. Always in full fp32 (or
    the precision asked for), TF32 off, whoever calls it."""
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    sampler = sampler.resolve(diffusion.timesteps)
    c = model.config
    g = torch.Generator(device=device).manual_seed(seed)
    with tqdm(total=sampler.steps * -(-n // batch_size), unit="step", desc="sampling",
              disable=not progress or None, leave=False) as bar:
        def step_callback(i, t, x, x0):
            bar.update(1)
            if callback is not None:
                callback(i, t, x, x0)

        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            noise = torch.randn((b, c.in_channels, c.image_size, c.image_size), generator=g,
                                device=device)
            fn = (model if labels is None
                  else guided(model, labels[start:start + b].to(device), guidance))
            with autocast_for(device, precision), tf32(False):
                x = SAMPLERS[sampler.sampler](fn, diffusion, noise, sampler.steps, generator=g,
                                              callback=step_callback, **sampler.options())
            yield x.cpu()
