"""Training methods: what differs between ways of training, behind one small interface that the one
training loop (training.train) takes. The loop owns everything else: data order, per-step seeds,
label dropping, precision, the learning-rate schedule, clipping, Adam steps, EMA, logging,
checkpoints, signals and torchrun.

A Method has
    parts: [training.Part]  the networks it trains, each with its optimizer and EMA, stepped in this
                            order every step (one for DDPM; a generator and a critic would be two);
    loss(k, net, batch)     the scalar loss that part k steps on: net is part k's network as
                            the loop runs it (compiled, DDP-wrapped), batch a training.Batch.
                            The method draws its own timesteps and noise from batch.generator,
                            over the global batch, and keeps this rank's share, batch.mine.
Denoising is DDPM's objective (train.py), Distillation progressive distillation's (distill.py).
"""
from dataclasses import replace

import torch

from checkpoint import restore
from diffusion import Diffusion, TimestepSampler
from distributed import gather_from_ranks
from samplers import SamplerConfig, ddim_step, even_timesteps, guided
from training import new_part, new_state


class Denoising:
    """The DDPM objective (Ho et al. 2020, Algorithm 1) with the losses of diffusion.Diffusion.loss:
    t drawn uniformly, or for L_vlb importance-sampled from the history of past losses (Nichol &
    Dhariwal 2021, sec. 3.3), which the method keeps in `importance` and a checkpoint saves."""

    def __init__(self, diffusion, part):
        self.diffusion, self.parts = diffusion, [part]
        self.importance = (TimestepSampler(diffusion.timesteps) if diffusion.config.loss == "vlb"
                           else None)

    def loss(self, k, net, batch):
        n, g, device = len(batch.x0), batch.generator, batch.x0.device
        if self.importance:
            t_all, weights = self.importance.sample(n, g, device)
        else:
            t_all = torch.randint(0, self.diffusion.timesteps, (n,), device=device, generator=g)
        noise, t = batch.noise(), t_all[batch.mine]
        losses = self.diffusion.loss(net, batch.x0[batch.mine], t, noise, batch.labels_of_mine())
        if not self.importance:
            return losses.mean()
        self.importance.update(t_all, gather_from_ranks(losses.detach()))  # every rank's, in order
        return (losses * weights[batch.mine]).mean()


def denoising(model_cfg, diffusion_cfg, cfg, device, saved=None):
    """(the Denoising method on a new U-Net seeded by cfg.seed, the loop's state), restored from the
    checkpoint `saved` if given: what train.py trains, and what the step rate is measured on."""
    part = new_part(model_cfg, cfg, device)
    method, state = Denoising(Diffusion(diffusion_cfg).to(device), part), new_state()
    if saved is not None:
        restore(saved, part, state, method.importance)
    return method, state


def distillation_target(x, x_s, abar_t, abar_s):
    """The x_0 whose one DDIM step from x_t lands on x_s (x~ of Algorithm 2 of Salimans & Ho 2022):
    samplers.ddim_step solved for x_0. x_s: where two teacher steps went; abar_s = 1 (clean data)
    gives x_s itself. [B, C, H, W]."""
    ratio = ((1 - abar_s) / (1 - abar_t)).sqrt()
    return (x_s - ratio * x) / (abar_s.sqrt() - ratio * abar_t.sqrt())


def halvings(teacher_steps, to_steps):
    """The students' step counts, one per round: teacher_steps / 2, / 4, ... down to to_steps."""
    steps = [teacher_steps // 2]
    while steps[-1] > to_steps:
        steps.append(steps[-1] // 2)
    return steps


def reached_by_halving(teacher_steps, to_steps):
    """Whether halving teacher_steps exactly, once or more, reaches to_steps (at least 1)."""
    n = teacher_steps
    while n > max(to_steps, 0) and n % 2 == 0:
        n //= 2
    return 1 <= to_steps < teacher_steps and n == to_steps


def student_diffusion(config):
    """A student's DiffusionConfig from its teacher's: v-prediction (Salimans & Ho 2022, sec. 4),
    and none of the teacher's loss settings, its objective being its method's."""
    return replace(config, prediction="v", min_snr_gamma=0.0,
                   loss="hybrid" if config.variance == "learned" else "simple")


def student_sampler(steps):
    """What a progressive-distillation student samples with: its teacher's sampler, deterministic
    DDIM on the even grid (Salimans & Ho 2022, Algorithm 2), in the student's own steps."""
    return SamplerConfig("ddim", steps, 0.0, "even")


class Distillation:
    """One round of progressive distillation, Algorithm 2 of Salimans & Ho 2022: the student step i,
    drawn uniformly from range(steps), starts at grid[2 i] (t = i / N in the paper), and the student
    learns to land, in one deterministic DDIM step, where two DDIM steps of the teacher land.

    teacher(x, t[, y]) predicts in its own parametrisation (teacher_diffusion), a conditional one
    with classifier-free guidance w; the student's Diffusion says how its output reads (v).
    """

    def __init__(self, teacher, teacher_diffusion, diffusion, steps, guidance=0.0, part=None):
        self.teacher, self.teacher_diffusion, self.diffusion = teacher, teacher_diffusion, diffusion
        self.steps, self.guidance = steps, guidance
        # none: its target and loss alone, for tests
        self.parts = [part] if part is not None else []
        grid = even_timesteps(diffusion.timesteps, 2 * steps)  # the teacher's: twice as fine
        self.grid = torch.cat([grid, grid.new_tensor([-1])]).to(diffusion.alphas_cumprod.device)

    def abar(self, t):
        """alpha-bar at timesteps t [B], 1 at t = -1 (clean data): [B, 1, 1, 1]."""
        abar = self.diffusion.alphas_cumprod
        return torch.where(t >= 0, abar[t.clamp(min=0)],
                           torch.ones_like(abar[0])).reshape(-1, 1, 1, 1)

    def teacher_x0(self, x, t, y):
        fn = self.teacher if y is None else guided(self.teacher, y, self.guidance)
        # clipped to [-1, 1], as its sampler does
        return self.teacher_diffusion.predict(fn, x, t)[1]

    @torch.no_grad()
    def target(self, x, i, y=None):
        """x~ of Algorithm 2 at x_t, t = grid[2 i]: the x_0 whose one DDIM step lands where the
        teacher's two steps, t -> grid[2 i + 1] -> grid[2 i + 2], do; in full fp32, the teacher's
        sampler's precision. [B, C, H, W]."""
        t, mid, s = (self.grid[2 * i + k] for k in range(3))
        with torch.autocast(x.device.type, enabled=False):
            x_mid = ddim_step(x, self.teacher_x0(x, t, y), self.abar(t), self.abar(mid))
            x_s = ddim_step(x_mid, self.teacher_x0(x_mid, mid, y), self.abar(mid), self.abar(s))
        return distillation_target(x, x_s, self.abar(t), self.abar(s))

    def per_example(self, model, x0, i, noise, y=None):
        """[B]: the MSE of the student's v to the target's, v = (alpha_t x_t - x~) / sigma_t; as an
        x_0 error that is weighted by SNR + 1, one of the two weightings sec. 4 of the paper
        advises."""
        t = self.grid[2 * i]
        x = self.diffusion.q_sample(x0, t, noise)
        abar = self.abar(t)
        v = (abar.sqrt() * x - self.target(x, i, y)) / (1 - abar).sqrt()
        pred, _ = self.diffusion.split((model(x, t) if y is None else model(x, t, y)).float())
        return (pred - v).pow(2).flatten(1).mean(1)

    def loss(self, k, net, batch):
        n, g, device = len(batch.x0), batch.generator, batch.x0.device
        i = torch.randint(0, self.steps, (n,), device=device, generator=g)[batch.mine]
        return self.per_example(net, batch.x0[batch.mine], i, batch.noise(),
                                batch.labels_of_mine()).mean()
