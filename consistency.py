"""Easy consistency tuning, ECT (Geng et al. 2024, "Consistency Models Made Easy"): a model that
samples in a few steps, tuned from a trained diffusion model on the training images alone. It copies
no sampler's path and asks no teacher, so no teacher's ODE bounds it (issue 25's fallback to
distribution matching).

Its x_0 at noise level t, the consistency function f(x_t, t), learns to agree with its own value,
taken without gradient, at a lower level r of the same noise path: x_t and x_r are q_sample(x_0, .,
eps) with one eps. r starts at clean data, where f is x_0 itself, so the first stage is the
diffusion loss; at each later stage r's gap to t shrinks by q, which tunes the denoiser into a
consistency model (ECT, sec. 3). It samples with renoise, as consistency models do (Song et al.
2023, Algorithm 1). A method on the one training loop (training.train): parts [model].
"""
from dataclasses import asdict, dataclass

import torch

from checkpoint import build_model, make_checkpoint, open_checkpoint, restore, save_checkpoint
from cli import check
from diffusion import Diffusion
from matching import denoised
from methods import student_diffusion
from samplers import SamplerConfig
from training import new_part, new_state


@dataclass(frozen=True)
class ConsistencyConfig:
    """ECT's settings, saved in the tuned model's checkpoint. Noise levels are EDM's sigma =
    sqrt((1 - abar_t) / abar_t), as the paper's; the values are its CIFAR-10 ones (appendix)."""
    steps: int = 4  # the tuned model's network evaluations: renoise on the even grid
    stages: int = 8  # r's gap to t shrinks by q at the start of each equal part of the run
    q: float = 2.0
    k: float = 8.0  # the gap's shape n(sigma) = 1 + k sigmoid(-b sigma): wider at low noise
    b: float = 1.0
    p_mean: float = -1.1  # log sigma of the training pairs ~ N(p_mean, p_std^2)
    p_std: float = 2.0

    def __post_init__(self):
        for name in ("steps", "stages"):
            value = getattr(self, name)
            if not (type(value) is int and value >= 1):
                raise ValueError(f"{name} must be a whole number from 1 up, got {value!r}")
        if not (self.q > 1 and self.k >= 0 and self.b >= 0 and self.p_std > 0):
            raise ValueError("need q > 1, k >= 0, b >= 0 and p_std > 0")

    def to_dict(self):
        return asdict(self)


class ConsistencyTuning:
    """ECT's objective, Algorithm 1 of Geng et al. 2024 with its squared-L2 metric and weight
    1 / (sigma_t - sigma_r). `state` is the loop's: its step says the stage, of run_steps // stages
    steps each, so that a resumed run tunes exactly as an unbroken one."""

    def __init__(self, diffusion, part, config, run_steps, state):
        self.diffusion, self.parts, self.config = diffusion, [part], config
        self.run_steps, self.state = run_steps, state
        abar = diffusion.alphas_cumprod
        self.sigmas = ((1 - abar) / abar).sqrt()  # [T], rising with t

    def stage(self, step):
        """The stage the run's step is in: 0, 1, ..., config.stages - 1."""
        return min(step * self.config.stages // self.run_steps, self.config.stages - 1)

    def sigma(self, t):
        """sigma at timesteps t [B], 0 at t = -1 (clean data)."""
        return torch.where(t >= 0, self.sigmas[t.clamp(min=0)], torch.zeros_like(self.sigmas[0]))

    def pairs(self, sigma, stage):
        """(t, r), each [B]: t the first timestep whose sigma reaches `sigma` [B] (the last one
        past it), r the last whose sigma is at most sigma_t - dt, dt = sigma_t n(sigma_t) / q^stage
        (ECT's shrinking dt; its code starts at q^1, here stage 0 is the plain diffusion loss,
        in which the eps-trained weights learn to read as v), -1 (clean data) where none is;
        always r < t."""
        c, sigmas = self.config, self.sigmas
        t = torch.searchsorted(sigmas, sigma).clamp(max=len(sigmas) - 1)
        ratio = (1 + c.k * torch.sigmoid(-c.b * sigmas[t])) / c.q ** stage
        r = torch.searchsorted(sigmas, sigmas[t] * (1 - ratio), right=True) - 1
        return t, torch.minimum(r, t - 1)

    def per_example(self, net, x0, t, r, noise, y=None, clean=False):
        """[B]: |f(x_t, t) - sg f(x_r, r)|^2 / (sigma_t - sigma_r), the mean over pixels; f(x_r, r)
        is x_0 where r = -1 (the boundary condition) and in full fp32, the target's precision.
        clean: every r is -1 (stage 0), and the network is not run for the target."""
        q, devices = self.diffusion.q_sample, [x0.device] if x0.device.type == "cuda" else []
        with torch.random.fork_rng(devices):  # the target's dropout masks are f_t's, as in ECT
            f_t = denoised(net, self.diffusion, q(x0, t, noise), t, y)
        target = x0
        if not clean:
            s = r.clamp(min=0)
            with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
                f_r = denoised(net, self.diffusion, q(x0, s, noise), s, y)
            target = torch.where((r >= 0).reshape(-1, 1, 1, 1), f_r, x0)
        gap = self.sigma(t) - self.sigma(r)
        return (f_t.float() - target).pow(2).flatten(1).mean(1) / gap

    def loss(self, k, net, batch):
        n, g, device, c = len(batch.x0), batch.generator, batch.x0.device, self.config
        log_sigma = c.p_mean + c.p_std * torch.randn(n, device=device, generator=g)
        stage = self.stage(self.state["step"])
        t, r = self.pairs(log_sigma[batch.mine].exp(), stage)
        return self.per_example(net, batch.x0[batch.mine], t, r, batch.noise(),
                                batch.labels_of_mine(), clean=stage == 0).mean()


def consistency_model(record):
    """Whether a checkpoint's distillation record (None: not distilled) is of an ECT model, which
    samples with renoise at any step count: its x_0 is trained at every noise level."""
    return record is not None and record.get("method") == "ect"


def tuned_sampler(config):
    """What a tuned model samples with: renoise on the even grid, in config.steps."""
    return SamplerConfig("renoise", config.steps, None, "even")


def tuning(trained, config, cfg, device, source, saved=None):
    """(the ConsistencyTuning method, the loop's state, save_to(folder)): a v-prediction model
    started from the trained checkpoint `trained` (its EMA weights), as progressive distillation's
    first student is, or from `saved`, a checkpoint of this run. cfg.steps sets the stages.
    source: what the record says the run came from."""
    model, diffusion = build_model(saved or trained, device)
    if saved is None:
        diffusion = Diffusion(student_diffusion(diffusion.config))
    diffusion = diffusion.to(device)
    part, state = new_part(model.config, cfg, device), new_state()
    if saved is not None:
        restore(saved, part, state)
    else:
        part.model.load_state_dict(model.state_dict())
    method = ConsistencyTuning(diffusion, part, config, cfg.steps, state)
    # learned from data alone: no teacher to keep
    record = saved["distillation"] if saved is not None else {
        "method": "ect", "consistency": config.to_dict(),
        "sampler": tuned_sampler(config).to_dict(), "round": 1, "from_steps": config.steps,
        "to_steps": config.steps, "guidance": 0.0, "source": source, "teacher": None}

    def save_to(folder):
        save_checkpoint(make_checkpoint(part, diffusion, cfg.recipe(), state, 1,
                                        distillation=record), folder)
    return method, state, save_to


def start_tuning(trained_path, to_steps=None):
    """(trained checkpoint, ConsistencyConfig, source record) of a new ECT run of distill.py, from
    its flags --teacher (the trained model it starts from) and --to-steps (None: the config's)."""
    trained, file = open_checkpoint(trained_path or "checkpoints")
    check(trained["distillation"] is None,
          f"--teacher {file} is a distilled student, not a trained model: --method ect tunes the "
          f"model train.py made")
    timesteps = trained["config"]["diffusion"]["timesteps"]
    steps = ConsistencyConfig.steps if to_steps is None else to_steps
    check(1 <= steps <= timesteps, f"--to-steps must be from 1 to the model's {timesteps} "
                                   f"timesteps, got {steps}")
    source = {"checkpoint": str(file), "step": trained["step"]}
    return trained, ConsistencyConfig(steps=steps), source
