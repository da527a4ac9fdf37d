"""Distribution matching distillation, DMD2 (Yin et al. 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis"): a generator G that samples in a few steps learns to make
the teacher's distribution, not to copy its sampler's path. Its gradient is the difference of two
scores at a random noise level: the frozen teacher's (the real one) and a critic's (the fake one),
a copy of the teacher fitted to G's own samples, updated several times per update of G. A small
head on the critic's bottleneck, trained to tell noised real images from noised generated ones,
adds a GAN term; DMD's first version's regression term, optional here, holds G near the student it
started from. A method on the one training loop (training.train): parts [critic, generator].
"""
import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import (build_guide, build_model, build_teacher, make_checkpoint,
                        open_checkpoint, restore, save_checkpoint, teacher_checkpoint)
from cli import check
from samplers import (AUTOGUIDANCE, Autoguided, SamplerConfig, ddim_step, even_timesteps,
                      guided, renoise)
from training import Part, new_part, new_state
from unet import GROUPS, UNet

# how the generator passes one step's x_0 on to its next: fresh noise (DMD2), or the
# deterministic DDIM step of the progressive-distillation student it starts from
JOINS = ("renoise", "ddim")


@dataclass(frozen=True)
class MatchingConfig:
    """DMD2's settings, saved in the student's checkpoint."""
    steps: int = 1  # the generator's network evaluations, on the even grid
    sampler: str = "renoise"  # one of JOINS: what joins its steps
    critic_updates: int = 5  # critic updates per generator update (DMD2, sec. 4.1: TTUR)
    gan_generator: float = 3e-3  # weight of the GAN term in G's loss (DMD2's ImageNet value)
    gan_critic: float = 1e-2  # weight of the GAN term in the critic's loss
    t_low: float = 0.02  # the matching loss's noise levels, as fractions of T: the noisiest
    t_high: float = 0.98  # and the cleanest are left out, as in DMD2
    guidance: float = 0.0  # the real score's classifier-free guidance w (conditional teachers)
    autoguidance: float = 0.0  # the real score's autoguidance w (a teacher keeping a guide)
    anchor: float = 0.0  # weight of the regression term towards the starting student's x_0 (off)

    def __post_init__(self):
        if not (type(self.steps) is int and self.steps >= 1):
            raise ValueError(f"steps must be a whole number from 1 up, got {self.steps!r}")
        if self.sampler not in JOINS:
            raise ValueError(f"sampler must be one of {', '.join(JOINS)}, got {self.sampler!r}")
        if not (type(self.critic_updates) is int and self.critic_updates >= 1):
            raise ValueError(f"critic_updates must be a whole number from 1 up, "
                             f"got {self.critic_updates!r}")
        if not 0 <= self.t_low < self.t_high <= 1:
            raise ValueError(f"need 0 <= t_low < t_high <= 1, got {self.t_low}, {self.t_high}")
        if not all(0 <= w < math.inf for w in (self.gan_generator, self.gan_critic,
                                                self.guidance, self.autoguidance, self.anchor)):
            raise ValueError("GAN and anchor weights and guidance scales are 0 or more, finite")

    def to_dict(self):
        return asdict(self)


class Critic(nn.Module):
    """The fake score, a U-Net started as a copy of the teacher, and a head on its bottleneck whose
    logit says "real" (DMD2, sec. 4.2). forward(x, t, y) is the score's prediction, in the
    teacher's parametrisation; forward(..., logits=True) the head's logit per image, [B]."""

    def __init__(self, score):
        super().__init__()
        self.score, self.config = score, score.config
        ch = score.config.width * score.config.channel_mults[-1]
        self.head = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(GROUPS, ch),
                                  nn.SiLU(), nn.Conv2d(ch, 1, 1))

    def forward(self, x, t, y=None, logits=False):
        if logits:
            return self.head(self.score.encode(x, t, y)[0]).mean((1, 2, 3))
        return self.score(x, t, y)


def denoised(model, diffusion, x, t, y=None):
    """The x_0 a network predicts at x_t, unclipped: [B, C, H, W]."""
    out = model(x, t) if y is None else model(x, t, y)
    return diffusion.to_eps_x0(diffusion.split(out.float())[0], x, t)[1]


def matching_loss(x0, real, fake):
    """DMD's generator loss (Yin et al. 2024a, eq. 7; DMD2, Algorithm 1): its gradient in x_0 is
    (fake - real) / mean|x_0 - real|, the KL gradient s_fake - s_real in denoised form, normalised
    per image. x0 [B, C, H, W] (with gradient), real and fake the two denoisers' x_0 there."""
    weight = (x0 - real).abs().mean((1, 2, 3), keepdim=True).detach().clamp(min=1e-12)
    grad = torch.nan_to_num((fake - real) / weight)
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


@contextlib.contextmanager
def read_only(model, frozen=True):
    """model in eval mode (no dropout) while inside, its weights frozen too unless frozen=False:
    a network read, not trained, whose gradient (if any) is for its input alone."""
    training, wanted = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(not frozen and any(wanted))
    try:
        yield model
    finally:
        model.train(training)
        for p, w in zip(model.parameters(), wanted):
            p.requires_grad_(w)


def backward_simulation(model, diffusion, noise, grid, i, draw, y=None, steps=None,
                        sampler="renoise"):
    """The inputs (x_t [B, C, H, W], t [B]) of each image's step i [B] of the N-step generator:
    its first i steps of its sampler (one of JOINS: samplers.sample_renoise, with fresh noise
    draw() [B, C, H, W] between steps, DMD2 sec. 4.3; or sample_ddim with eta 0), run without
    gradient from `noise` as the sampler runs them (eval mode), so that G trains on what it
    meets. steps: how many to run (max(i) unless given)."""
    fn = model if y is None else (lambda x, t: model(x, t, y))
    abar, x, inputs = diffusion.alphas_cumprod, noise, [noise]
    with torch.no_grad(), read_only(model, frozen=False):
        for k in range(int(i.max()) if steps is None else steps):
            t = torch.full_like(i, int(grid[k]))
            _, x0, _ = diffusion.predict(fn, x, t)
            if sampler == "ddim":
                x = ddim_step(x, x0, abar[grid[k]], abar[grid[k + 1]])
            else:
                x = renoise(x0, abar[grid[k + 1]], draw())
            inputs.append(x)
    return torch.stack(inputs)[i, torch.arange(len(i), device=i.device)], grid[i]


class DistributionMatching:
    """DMD2 on the loop: part 0 the critic, stepped every step, part 1 the generator, stepped every
    config.critic_updates steps. real(x, t[, y]): the teacher (autoguided, if asked), in the
    parametrisation of real_diffusion, which the critic shares; diffusion: the generator's;
    anchor: the frozen student G started as, read where config.anchor > 0."""

    def __init__(self, real, real_diffusion, diffusion, critic, generator, config, anchor=None):
        if config.anchor and anchor is None:
            raise ValueError("config.anchor > 0 needs the anchor network")
        self.real, self.real_diffusion, self.diffusion = real, real_diffusion, diffusion
        self.anchor = anchor
        self.config, self.parts = config, [critic, generator]
        generator.every = config.critic_updates
        self.grid = even_timesteps(diffusion.timesteps, config.steps).to(
            diffusion.alphas_cumprod.device)

    def inputs(self, net, batch, y):
        """(x_t, t) of G's step, for this rank's share of fresh noise, each from a step drawn
        uniformly, made by backward_simulation: [B, C, H, W], [B]."""
        n, device = len(batch.x0), batch.x0.device
        # drawn for the global batch, so that every rank makes as many draws as one process would
        i = torch.randint(0, self.config.steps, (n,), device=device, generator=batch.generator)
        return backward_simulation(net, self.diffusion, batch.noise(), self.grid, i[batch.mine],
                                   batch.noise, y, int(i.max()), self.config.sampler)

    def generate(self, net, batch, y):
        """G's samples x_0 at self.inputs: [B, C, H, W], with gradient where net takes it."""
        return denoised(net, self.diffusion, *self.inputs(net, batch, y), y)

    def anchored(self, net, batch, y):
        """(G's x_0 [B, C, H, W] with gradient, the regression term): DMD's (Yin et al. 2024a,
        eq. 8), its target the anchor's x_0 at G's own input rather than the teacher's ODE
        sample, and MSE for LPIPS (a trained network's features); times config.anchor, 0 when
        off."""
        x, t = self.inputs(net, batch, y)
        x0 = denoised(net, self.diffusion, x, t, y)
        if not self.config.anchor:
            return x0, 0.0
        # read at G's precision, so that at the start (G the anchor, no dropout) the term is 0
        with torch.no_grad(), read_only(self.anchor):
            target = denoised(self.anchor, self.diffusion, x, t, y)
        return x0, self.config.anchor * F.mse_loss(x0.float(), target.float())

    def noise_levels(self, batch, lo=0.0, hi=1.0):
        """Timesteps uniform in [lo T, hi T) for this rank's share of the batch: [B]."""
        T, n = self.real_diffusion.timesteps, len(batch.x0)
        low = int(lo * T)
        return torch.randint(low, max(int(hi * T), low + 1), (n,), device=batch.x0.device,
                             generator=batch.generator)[batch.mine]

    def noised(self, x0, batch):
        """(x_t, t): x0 [B, C, H, W] noised to t drawn over all of [0, T), as the GAN terms read
        their images (DMD2's code)."""
        t = self.noise_levels(batch)
        return self.real_diffusion.q_sample(x0, t, batch.noise()), t

    def real_x0(self, x, t, y):
        fn = self.real if y is None else guided(self.real, y, self.config.guidance)
        return denoised(fn, self.real_diffusion, x, t)

    def generator_loss(self, net, batch):
        """DMD2, Algorithm 1, the generator's update: the matching loss at x_t of G's samples, the
        teacher and the critic read in fp32, plus the GAN term through the critic's head, plus
        the regression term towards the anchor (self.anchored)."""
        y, critic = batch.labels_of_mine(), self.parts[0].model
        x0, regression = self.anchored(net, batch, y)
        t = self.noise_levels(batch, self.config.t_low, self.config.t_high)
        xt = self.real_diffusion.q_sample(x0, t, batch.noise())
        with read_only(critic):  # the critic's gradient here would be thrown away
            with torch.no_grad(), torch.autocast(xt.device.type, enabled=False):
                real = self.real_x0(xt.float(), t, y)
                fake = denoised(critic, self.real_diffusion, xt.float(), t, y)
            loss = matching_loss(x0.float(), real, fake) + regression
            if self.config.gan_generator:
                logits = critic(*self.noised(x0, batch), y, logits=True).float()
                loss = loss + self.config.gan_generator * F.softplus(-logits).mean()
        return loss

    def critic_loss(self, net, batch):
        """DMD2, Algorithm 1, the critic's update: the teacher's own loss (denoising score
        matching) on G's samples, plus the head's logistic loss on noised real and generated
        images."""
        y, generator = batch.labels_of_mine(), self.parts[1].model
        with torch.no_grad(), read_only(generator):  # unclipped, as the generator's loss reads
            x0 = self.generate(generator, batch, y)
        loss = self.real_diffusion.loss(net, x0, self.noise_levels(batch), batch.noise(), y).mean()
        if self.config.gan_critic:
            real, t_real = self.noised(batch.x0[batch.mine], batch)
            fake, t_fake = self.noised(x0, batch)
            logits = net(torch.cat([real, fake]), torch.cat([t_real, t_fake]),
                         None if y is None else torch.cat([y, y]), logits=True).float()
            gan = F.softplus(-logits[:len(real)]) + F.softplus(logits[len(real):])
            loss = loss + self.config.gan_critic * gan.mean()
        return loss

    def loss(self, k, net, batch):
        return self.critic_loss(net, batch) if k == 0 else self.generator_loss(net, batch)


def generator_sampler(config):
    """What a DMD generator samples with: config.sampler on the even grid, in config.steps:
    renoise (Song et al. 2023, Algorithm 1), or DDIM with eta 0 (Song et al. 2021, eq. 12) as
    progressive-distillation students sample."""
    return SamplerConfig(config.sampler, config.steps, 0.0 if config.sampler == "ddim" else None,
                         "even")


def real_score(teacher, guide, config):
    """The frozen teacher as DMD's real score: autoguided by `guide` at config.autoguidance."""
    for net in (teacher, guide):
        if net is not None:
            net.eval().requires_grad_(False)
    return Autoguided(teacher, guide, config.autoguidance) if config.autoguidance else teacher


def matching(teacher_ckpt, student_ckpt, config, cfg, device, source, saved=None):
    """(the DistributionMatching method, the loop's state, save_to(folder)): a generator started
    from the distilled student `student_ckpt` (its EMA weights), the critic from the teacher,
    the real score the teacher; or all of them from `saved`, a checkpoint of this run, whose
    record keeps the teacher, its guide and the anchor. source: what the record says the run
    came from."""
    if saved is not None:
        record = saved["distillation"]
        teacher, teacher_diffusion = build_teacher(saved, device)
        guide = build_guide({"config": record["teacher"]["config"], "guide": record["guide"]},
                            device)
        generator_config, diffusion_config = (saved["config"]["model"],
                                              saved["config"]["diffusion"])
    else:
        teacher, teacher_diffusion = build_model(teacher_ckpt, device)
        guide = build_guide(teacher_ckpt, device) if config.autoguidance else None
        check(guide is not None or not config.autoguidance,
              "the teacher keeps no guide to autoguide it by: set autoguidance 0")
        generator_config, diffusion_config = (student_ckpt["config"]["model"],
                                              student_ckpt["config"]["diffusion"])
    configs = {"model": generator_config, "diffusion": diffusion_config}
    student, diffusion = build_model({"config": configs, "ema": (saved or student_ckpt)["ema"]},
                                     device)
    # the regression term's anchor, the student G starts as: kept in the record, since G and
    # its EMA move away from it and resuming could not rebuild it from them
    anchor = student if saved is None and config.anchor else None  # a new run's: no copy needed
    if saved is not None and saved["distillation"]["anchor"] is not None:
        anchor = build_model({"config": configs, "ema": saved["distillation"]["anchor"]}, device)[0]
    generator = new_part(student.config, cfg, device)
    critic_model = Critic(UNet(teacher.config)).to(device)
    critic = Part(critic_model, torch.optim.Adam(critic_model.parameters(), lr=cfg.lr,
                                                 fused=device.type == "cuda"))
    state = new_state()
    if saved is not None:
        restore(saved, generator, state, others=[critic])
    else:  # G starts as the student samples, the critic as the teacher
        generator.model.load_state_dict(student.state_dict())
        critic_model.score.load_state_dict(teacher.state_dict())
    method = DistributionMatching(real_score(teacher, guide, config), teacher_diffusion,
                                  diffusion.to(device), critic, generator, config, anchor)

    def kept(net):  # a frozen network's weights, as the record keeps them
        return None if net is None else {k: v.detach().clone() for k, v in net.state_dict().items()}
    record = saved["distillation"] if saved is not None else {
        "method": "dmd", "matching": config.to_dict(),
        "sampler": generator_sampler(config).to_dict(), "round": 1,
        "from_steps": config.steps, "to_steps": config.steps, "guidance": config.guidance,
        "source": source, "teacher": teacher_checkpoint(teacher, teacher_diffusion),
        "guide": kept(guide), "anchor": kept(anchor)}

    def save_to(folder):
        save_checkpoint(make_checkpoint(generator, method.diffusion, cfg.recipe(), state, 1,
                                        distillation=record, others=[critic]), folder)
    return method, state, save_to


def start_matching(teacher_path, student_path, to_steps=None, autoguidance=None, sampler=None,
                   gan_weights=None, anchor=None):
    """(teacher checkpoint, student checkpoint, MatchingConfig, source record) of a new DMD run
    of distill.py, from its flags --teacher (None: the one the student came from), --student,
    --to-steps, --autoguidance (None: the teacher's default sampler's), --generator-sampler,
    --gan-weights and --anchor (None: MatchingConfig's)."""
    weights = " ".join(f"{w:g}" for w in gan_weights or ())
    check(not weights or min(gan_weights) >= 0,
          f"--gan-weights must be 0 (off) or more, got {weights}")
    if anchor is not None:
        check(anchor >= 0, f"--anchor must be 0 (off) or more, got {anchor:g}")
    check(student_path, "--method dmd starts its generator from a distilled student: give "
                        "--student checkpoints/distilled/N-steps (`python distill.py` makes them)")
    student, student_file = open_checkpoint(student_path)
    record = student["distillation"]
    check(record is not None, f"--student {student_file} is a trained model, not a distilled "
                              f"student: give one of distill.py's N-steps/ folders")
    steps = record["sampler"]["steps"]
    check(sampler != "ddim" or record["sampler"]["sampler"] == "ddim",
          f"--generator-sampler ddim continues its --student's DDIM, and {student_file} samples "
          f"with {record['sampler']['sampler']}: give a progressive-distillation student")
    check(to_steps in (None, steps),
          f"--to-steps {to_steps}: the generator starts from {student_file}, a {steps}-step "
          f"student, and takes its steps: give the {to_steps}-step student, or drop --to-steps")
    teacher, teacher_file = open_checkpoint(teacher_path or record["source"]["checkpoint"])
    check(teacher["distillation"] is None,
          f"--teacher {teacher_file} is a distilled student, not a trained model: give the "
          f"checkpoint the students were distilled from")
    schedule = lambda c: {k: c["config"]["diffusion"][k] for k in ("timesteps", "schedule")}
    check(teacher["config"]["model"] == student["config"]["model"]
          and schedule(teacher) == schedule(student),
          f"--teacher {teacher_file} is not of the student's kind (its U-Net or noise schedule "
          f"differs): give the checkpoint the student was distilled from")
    check(autoguidance is None or autoguidance == 0 or teacher["guide"] is not None,
          f"--autoguidance: the teacher {teacher_file} keeps no guide: drop --autoguidance")
    check(autoguidance is None or autoguidance >= 0,
          f"--autoguidance must be 0 (off) or more, got {autoguidance}")
    chosen = dict(zip(("gan_generator", "gan_critic"), gan_weights or ()))
    if anchor is not None:
        chosen["anchor"] = anchor
    if autoguidance is None:
        autoguidance = AUTOGUIDANCE if teacher["guide"] is not None else 0.0
    # the guidance the student learned: matched with the teacher guided as it was
    config = MatchingConfig(steps=steps, sampler=sampler or MatchingConfig.sampler,
                            guidance=record["guidance"], autoguidance=autoguidance, **chosen)
    source = {"checkpoint": str(teacher_file), "step": teacher["step"],
              "student": str(student_file)}
    return teacher, student, config, source
