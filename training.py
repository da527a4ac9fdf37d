"""The one training loop, for every method (methods.py): data order, per-step seeds, label dropping,
precision, the learning-rate schedule, clipping, Adam, the EMA, logging, checkpoints, signals,
torchrun and exact resume, each written once here. Also the step rate the --max-minutes planner and
bench.py measure. What a method trains on, and with which networks, is the method's."""
import contextlib
import copy
import io
import math
import signal
import time
from dataclasses import dataclass, replace

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from cli import Diverged, check
from data import epoch_batches, to_model_range
from device import autocast_for, memory_bytes
from distributed import agree_to_stop, mean_over_ranks, smallest_over_ranks, world
from unet import UNet, planned_parameters


def step_seed(seed, step, stream):
    """The seed of one step's random draws, so that a resumed run draws what an unbroken one does
    with no saved RNG state. Stream 0 is shared by all ranks (the global batch's timesteps, noise
    and dropped labels); stream 1 + rank is each rank's own (dropout masks, which must differ)."""
    return ((seed * 1_000_003 + step) * 1_009 + stream) % 2**63


class EMA(AveragedModel):
    """An exponential moving average of a model's weights, to sample from: update_parameters(model).

    After n updates the decay is min(decay, (1 + n) / (power + 2 + n)): it starts low, so the
    average forgets the random initialisation at once, and until it reaches `decay` it is about the
    power-function EMA of Karras et al. 2024 (Eq. 3 there: step s weighted by s^power, an average
    over the last ~1/(power+1) of the run). One foreach lerp, the count on the host: no device sync.
    After update `keep_at` (0: never) a copy of the average is kept as `kept`, autoguidance's guide.
    """

    def __init__(self, model, decay, power, keep_at=0):
        super().__init__(model)  # n_averaged, the count, is a CPU buffer
        self.decay, self.power, self.keep_at, self.kept = decay, power, keep_at, None

    @torch.no_grad()
    def update_parameters(self, model):
        n = int(self.n_averaged)
        d = min(self.decay, (1 + n) / (self.power + 2 + n)) if n else 0.0  # n = 0: a copy
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1 - d)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.n_averaged += 1
        if int(self.n_averaged) == self.keep_at:
            self.kept = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def guide(self):
        """The average as kept, as a model in eval mode (autoguidance's guide); None before."""
        if self.kept is None:
            return None
        guide = copy.deepcopy(self.module)
        guide.load_state_dict(self.kept)
        return guide.eval()


@dataclass
class Batch:
    """One step's data, the same on every rank: the method takes its rank's share, x0[mine]."""
    x0: torch.Tensor  # the global batch [W * B, C, H, W] in [-1, 1]
    labels: torch.Tensor  # [W * B], some dropped to "no class"; None for an unconditional model
    generator: torch.Generator  # the draws every rank makes alike (training.step_seed's stream 0)
    mine: slice  # this rank's share of the global batch

    def labels_of_mine(self):
        return None if self.labels is None else self.labels[self.mine]

    def noise(self):
        """Gaussian noise drawn for the whole global batch, every rank alike, and this rank's share
        of it: what W ranks draw together is what one process would. [B, C, H, W]."""
        x0 = self.x0
        return torch.randn(x0.shape, device=x0.device, generator=self.generator)[self.mine]


@dataclass
class Part:
    """One network a method trains, with its optimizer and the EMA of its weights (None: none),
    stepped at the loop's steps 0, every, 2 every, ... (a generator updated once per several updates
    of its critic)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA = None
    every: int = 1


def new_part(model_cfg, cfg, device):
    """A U-Net seeded by cfg.seed, its EMA and Adam, as every run starts; one too large for the
    device's memory is refused before it is built."""
    size = planned_parameters(model_cfg)
    need = 20 * size  # fp32 weights, EMA, gradients and Adam's two moments, activations not counted
    check(need < memory_bytes(device),
          f"a U-Net of {size / 1e6:,.0f}M parameters needs {need / 2**30:,.1f} GiB for its "
          f"weights, EMA, gradients and Adam alone, more than the "
          f"{memory_bytes(device) / 2**30:,.1f} GiB of {device}: choose a smaller --width, "
          f"--channel-mults or --num-res-blocks")
    torch.manual_seed(cfg.seed)
    model = UNet(model_cfg).to(device)
    # before the EMA copies it and Adam allocates its state
    if cfg.memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay, cfg.ema_power)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    return Part(model, optimizer, ema)


def new_state():
    """What the loop keeps across a restart besides the networks: the step, the epoch, and the
    per-step loss history [(step, epoch, loss)]."""
    return {"step": 0, "epoch": 0, "history": []}


def lr_at(step, cfg, total):
    """Linear warm-up (Adam's early steps are the unstable ones), then constant, or decaying to 0 at
    step `total` along a half cosine (Loshchilov & Hutter 2017) or a straight line."""
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
    return cfg.lr * (1 - done)


def drop_labels(labels, p, null, generator=None):
    """Replace each label by the "no class" token `null` with probability p, so that one model
    learns both the conditional and the unconditional score (Ho & Salimans 2022, Algorithm 1):
    [B] -> [B]."""
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


@contextlib.contextmanager
def graceful_signals():
    """While inside: the first SIGINT or SIGTERM is recorded for the loop to act on; a second
    aborts."""
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        tqdm.write(f"\n{received[0]} received: finishing this step and saving a checkpoint "
                   f"(again to abort now)")

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread, where Python allows no handlers: leave them be
        previous = {}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Progress:
    """What the loop reports: the losses, read back once per log_every steps (each read waits for
    the device) into the state's history; the bar with loss and images/s; a line per epoch."""

    def __init__(self, state, cfg, total, batch, rank):
        self.state, self.cfg, self.batch, self.pending = state, cfg, batch, []
        self.say = tqdm.write if rank == 0 else lambda *_: None
        self.bar = tqdm(total=total, initial=state["step"], unit="step", dynamic_ncols=True,
                        disable=None if rank == 0 else True)
        self.started, self.clock, self.last = time.time(), (state["step"], time.time()), []

    def flush(self):
        """Read back the pending losses (averaged over ranks) into the history; a non-finite one is
        Diverged. Returns them."""
        losses = [loss for *_, loss in self.pending]
        values = mean_over_ranks(torch.stack(losses)).tolist() if losses else []
        for (s, _, _), v in zip(self.pending, values):
            if not math.isfinite(v):
                raise Diverged(f"the loss became {v} at step {s}")
        self.state["history"] += [(s, e, v) for (s, e, _), v in zip(self.pending, values)]
        self.pending.clear()
        return values

    def restart_clock(self):
        """The rate counts training alone: restarted after a save."""
        self.clock = (self.state["step"], time.time())

    def step(self, step, epoch, loss):
        self.pending.append((step, epoch, loss))
        self.bar.update(1)
        if step % self.cfg.log_every:
            return
        self.last = self.flush() or self.last
        rate = (step - self.clock[0]) * self.batch / max(time.time() - self.clock[1], 1e-9)
        self.restart_clock()
        mean = sum(self.last) / len(self.last)
        self.bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate:.0f}")
        if self.bar.disable:  # no terminal (a log file, a pipe): a plain line instead of the bar
            self.say(f"step {step}/{self.bar.total}: loss {mean:.4f}, {rate:.0f} img/s")

    def epoch_done(self, epoch, steps, seconds, epochs):
        """The epoch's line: its mean loss, and the rate over its `steps` steps."""
        self.flush()
        in_epoch = [v for _, e, v in self.state["history"] if e == epoch]
        self.say(f"epoch {epoch + 1}/{epochs}: "
                 f"mean loss {sum(in_epoch) / max(1, len(in_epoch)):.4f}, "
                 f"{steps * self.batch / seconds:.0f} img/s, "
                 f"step {self.state['step']}/{self.bar.total}, "
                 f"{(time.time() - self.started) / 60:.1f} min")


def take_step(method, nets, batch, cfg, lr, device, step=0):
    """One optimizer step of each of the method's parts due at this step, in turn: the loss under
    the run's precision, backward, clipping, Adam, the EMA. Returns the first part's loss (stepped
    every step), on the device."""
    for k, (part, net) in enumerate(zip(method.parts, nets)):
        if step % part.every:
            continue
        for group in part.optimizer.param_groups:
            group["lr"] = lr
        with autocast_for(device, cfg.precision):
            loss = method.loss(k, net, batch)
        part.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(part.model.parameters(), cfg.grad_clip)
        part.optimizer.step()
        if part.ema is not None:
            part.ema.update_parameters(part.model)
        if k == 0:  # what the loop reports and records
            first = loss.detach()
    return first


def _runnable(model, cfg, device, ranks):
    """The model as the loop runs it: compiled if asked, and under torchrun wrapped so that
    backward() averages the gradients over ranks. Same parameters: checkpoints save the model
    itself."""
    net = torch.compile(model) if cfg.compile else model
    if ranks > 1:
        net = DistributedDataParallel(net,
                                      device_ids=[device.index] if device.type == "cuda" else None)
    return net


def _prepare(method, cfg, planned):
    """Every part in training mode; the first one's EMA set to keep its value cfg.guide_fraction of
    the way through the `planned` steps, as autoguidance's guide."""
    if method.parts[0].every != 1:
        raise ValueError("the first part is stepped every step: the loop reports its loss")
    for part in method.parts:
        part.model.train()
    if method.parts[0].ema is not None and cfg.guide_fraction:
        method.parts[0].ema.keep_at = max(1, round(cfg.guide_fraction * planned))


def train(method, images, cfg, device, state, save, labels=None, deadline=math.inf):
    """Train the method's parts on images (uint8 [N, 28, 28] on device; labels [N] too, used for a
    class-conditional model) to the run's planned step, taking save() every cfg.checkpoint_every
    steps and at the end if a step was taken. state (new_state()) is updated in place. Returns why
    it stopped before the planned end (a signal, the time.time() `deadline`), or None.

    Under torchrun each of the W processes takes its own cfg.batch_size slice of a global batch of
    W * cfg.batch_size, whose draws every rank makes alike from the same seed: the W ranks together
    take the step a single process would take with that batch.
    """
    rank, ranks = world()
    batch_size = ranks * cfg.batch_size
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    steps_per_epoch = len(images) // batch_size
    planned = cfg.total_steps(steps_per_epoch)  # where the learning-rate schedule ends
    total = min(planned, cfg.max_steps or math.inf)
    nets = [_runnable(part.model, cfg, device, ranks) for part in method.parts]
    classes = method.parts[0].model.config.num_classes
    shared = torch.Generator(device)  # the draws every rank makes alike; see step_seed
    progress = Progress(state, cfg, total, batch_size, rank)

    def checked_save():
        progress.flush()
        if not all(torch.isfinite(p).all()
                   for part in method.parts for p in part.model.parameters()):
            raise Diverged(f"the weights stopped being finite by step {state['step']}")
        save()
        progress.restart_clock()

    step = first = state["step"]
    stopped = None
    _prepare(method, cfg, planned)
    with graceful_signals() as signals:
        progress.say(f"training from step {step} to {total}; Ctrl-C stops cleanly with a checkpoint")
        while step < total and not stopped:
            epoch, start = divmod(step, steps_per_epoch)
            epoch_start = time.time()
            for idx in epoch_batches(len(images), batch_size, cfg.seed, epoch, device)[start:]:
                shared.manual_seed(step_seed(cfg.seed, step, 0))
                torch.manual_seed(step_seed(cfg.seed, step, 1 + rank))
                y = drop_labels(labels[idx], cfg.cond_drop, classes, shared) if classes else None
                batch = Batch(to_model_range(images[idx]), y, shared, mine)
                loss = take_step(method, nets, batch, cfg, lr_at(step, cfg, planned), device,
                                 step)
                step += 1
                state.update(step=step, epoch=epoch)
                progress.step(step, epoch, loss)
                if step % cfg.checkpoint_every == 0 and step < total:
                    checked_save()
                stopped = (signals[0] if signals
                           else "--max-minutes" if time.time() >= deadline else None)
                # all ranks stop at one step: they agree where they meet anyway, at a flush
                if ranks > 1:
                    stopped = agree_to_stop(stopped, device) if step % cfg.log_every == 0 else None
                if step >= total or stopped:
                    break
            progress.epoch_done(epoch, step - epoch * steps_per_epoch - start,
                                time.time() - epoch_start, math.ceil(planned / steps_per_epoch))
        progress.bar.close()
        if step > first:
            checked_save()
    return stopped


PLAN_STEPS = 500  # a planned run's length is a multiple of this


def measure_rate(method, images, cfg, device, labels=None, steps=20, warmup=5):
    """Steps per second of train() itself, on a scratch method (its own networks and optimizers),
    after `warmup` steps (and any compilation) are done. Every step of train() seeds its own draws,
    so the run it is measured for is untouched."""
    state = new_state()

    def go(n):
        quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
        with quiet[0], quiet[1]:  # its progress
            stopped = train(method, images, replace(cfg, max_steps=n), device, state, lambda: None,
                            labels)
        if stopped in ("SIGINT", "SIGTERM"):  # nothing of the run itself has changed: stop at once
            raise KeyboardInterrupt

    go(warmup)
    first, start = state["step"], time.perf_counter()
    go(warmup + steps)  # ends reading the losses back: the device has finished
    return ((state["step"] - first) / (time.perf_counter() - start) if state["step"] > first
            else math.inf)


def planned_steps(cfg, rate):
    """The most steps, a multiple of PLAN_STEPS (at least one), that train in cfg.plan_minutes at
    `rate` steps per second."""
    return max(PLAN_STEPS, int(rate * 60 * cfg.plan_minutes) // PLAN_STEPS * PLAN_STEPS)


def plan_length(cfg, scratch, images, labels, device, deadline, steps_per_epoch, done=0):
    """(cfg with its length planned, the step rate measured on the scratch method) for a run that
    has taken `done` steps. cfg.plan_minutes: planned_steps() (whole multiples of PLAN_STEPS, so
    that reruns on one machine repeat), recorded with the rate measured; a finite time.time()
    `deadline` (--max-minutes) then ends the run's schedule by it."""
    rate = measure_rate(scratch, images, cfg, device, labels)
    steps = cfg.total_steps(steps_per_epoch)
    if cfg.plan_minutes and math.isfinite(rate):
        steps = planned_steps(cfg, rate)
        cfg = replace(cfg, planned_rate=round(rate * world()[1] * cfg.batch_size, 1))
    elif cfg.plan_minutes:  # too short to time: no plan, and none recorded
        cfg = replace(cfg, plan_minutes=0.0)
    if math.isfinite(deadline) and math.isfinite(rate):
        # 3%: saves, noise
        steps = min(steps, done + int(0.97 * rate * max(0.0, deadline - time.time())))
    return replace(cfg, steps=smallest_over_ranks(max(done + 1, steps), device)), rate
