"""Train a DDPM on Fashion-MNIST: `python train.py` (see --help), then look in output/."""
import argparse
import contextlib
import io
import math
import os
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from checkpoint import (claim_folder, continues, locked, make_checkpoint, open_checkpoint, restore, save_checkpoint,
                        take_folder)
from cli import (DEFAULT_SAMPLER, ArgumentParser, Diverged, agree_to_stop, autocast_for, check, check_writable,
                 describe, gather_from_ranks, graceful_signals, mean_over_ranks, run_command, sampler_settings,
                 start_distributed, tf32, together, world)
from config import LR_SCHEDULES, MEMORY_FORMATS, PRECISIONS, resolve_configs, validate
from data import epoch_batches, load_fashion_mnist, prepare_fashion_mnist, to_model_range
from diffusion import LOSSES, PREDICTIONS, SCHEDULES, VARIANCES, Diffusion, TimestepSampler
from figures import save_forward_figure, save_loss_history
from sample import draw_pictures
from unet import UNet, count_parameters

# ---------------------------------------------------------------------------- the loop

def step_seed(seed, step, stream):
    """The seed of one step's random draws, so that a resumed run draws what an unbroken one does with no
    saved RNG state. Stream 0 is shared by all ranks (the global batch's timesteps, noise and dropped
    labels); stream 1 + rank is each rank's own (dropout masks, which must differ between ranks)."""
    return ((seed * 1_000_003 + step) * 1_009 + stream) % 2**63


class EMA(AveragedModel):
    """An exponential moving average of a model's weights, to sample from: update_parameters(model) each step.

    After n updates the decay is min(decay, (1 + n) / (power + 2 + n)): it starts low, so the average forgets
    the random initialisation at once, and until it reaches `decay` it is about the power-function EMA of
    Karras et al. 2024 (Eq. 3 there: step s weighted by s^power, an average over the last ~1/(power+1) of the
    run). The update is one foreach lerp, with the count on the host: no device sync per step on a GPU.
    """

    def __init__(self, model, decay, power):
        super().__init__(model)  # n_averaged, the count, is a CPU buffer
        self.decay, self.power = decay, power

    @torch.no_grad()
    def update_parameters(self, model):
        n = int(self.n_averaged)
        d = min(self.decay, (1 + n) / (self.power + 2 + n)) if n else 0.0  # n = 0: a copy
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1 - d)
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.n_averaged += 1


def setup(model_cfg, diffusion_cfg, cfg, device, saved=None):
    """Seeded model, its EMA, diffusion, Adam and loop state; restored from checkpoint `saved` if given."""
    torch.manual_seed(cfg.seed)
    model = UNet(model_cfg).to(device)
    if cfg.memory_format == "channels_last":  # before the EMA copies it and Adam allocates its state
        model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg.ema_decay, cfg.ema_power)
    diffusion = Diffusion(diffusion_cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    state = {"step": 0, "epoch": 0, "history": [],
             "timesteps": TimestepSampler(diffusion.timesteps) if diffusion_cfg.loss == "vlb" else None}
    if saved is not None:
        restore(saved, model, ema, optimizer, state)
    return model, ema, diffusion, optimizer, state


def lr_at(step, cfg, total):
    """Linear warm-up (Adam's early steps are the unstable ones), then constant, or decaying to 0 at step
    `total` along a half cosine (Loshchilov & Hutter 2017) or a straight line."""
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1 - done)


def drop_labels(labels, p, null, generator=None):
    """Replace each label by the "no class" token `null` with probability p, so that one model learns both
    the conditional and the unconditional score (Ho & Salimans 2022, Algorithm 1): [B] -> [B]."""
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def train(model, ema, diffusion, optimizer, images, cfg, device, state, save, labels=None, deadline=math.inf):
    """The loop: sample t and noise, take an Adam step on the loss, update the EMA, log, save() now and then.

    images: uint8 [N, 28, 28] on device; labels [N] too, used if the model is class-conditional.
    diffusion gives the loss: a Diffusion, or what has its .timesteps (t is drawn uniformly below it) and
    .loss(model, x0, t, noise, y), such as distill.py's Distillation. state holds what must survive a restart
    (step, epoch, per-step loss history), updated in place. Ends with a save() if it took a step. Returns
    why it stopped before the planned end (a signal, or the time.time() `deadline`), or None.

    Under torchrun each of the W processes takes its own cfg.batch_size slice of a global batch of
    W * cfg.batch_size, with the global batch's timesteps and noise drawn alike on every rank from the
    same seed: the W ranks together take the step a single process would take with that batch.
    """
    rank, ranks = world()
    batch = ranks * cfg.batch_size
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    say = tqdm.write if rank == 0 else lambda *_: None
    steps_per_epoch = len(images) // batch
    planned = cfg.total_steps(steps_per_epoch)  # where the learning-rate schedule ends
    total = min(planned, cfg.max_steps or math.inf)
    autocast = autocast_for(device, cfg.precision)
    net = torch.compile(model) if cfg.compile else model  # same parameters; checkpoints save `model`
    if ranks > 1:  # averages the gradients over ranks during backward()
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    shared = torch.Generator(device)  # the draws every rank makes alike; see step_seed
    timesteps = state.get("timesteps")  # loss vlb's importance sampler of t, else None: uniform t
    pending = []  # (step, epoch, loss on the device): read back once per log_every steps, not every step

    def flush():
        values = mean_over_ranks(torch.stack([loss for *_, loss in pending])).tolist() if pending else []
        for (s, _, _), v in zip(pending, values):
            if not math.isfinite(v):
                raise Diverged(f"the loss became {v} at step {s}")
        state["history"] += [(s, e, v) for (s, e, _), v in zip(pending, values)]
        pending.clear()
        return values

    def checked_save():
        flush()
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise Diverged(f"the weights stopped being finite by step {state['step']}")
        save()
        clock.update(step=state["step"], time=time.time())  # the rate counts training, not saving

    step = first = state["step"]
    started, stopped, clock, losses = time.time(), None, {"step": step, "time": time.time()}, []
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=None if rank == 0 else True)
    model.train()
    with graceful_signals() as signals:
        say(f"training from step {step} to {total}; Ctrl-C stops cleanly with a checkpoint")
        while step < total and not stopped:
            epoch, start = divmod(step, steps_per_epoch)
            epoch_start = time.time()
            for idx in epoch_batches(len(images), batch, cfg.seed, epoch, device)[start:]:
                shared.manual_seed(step_seed(cfg.seed, step, 0))
                torch.manual_seed(step_seed(cfg.seed, step, 1 + rank))
                x0 = to_model_range(images[idx])
                classes = model.config.num_classes
                y = drop_labels(labels[idx], cfg.cond_drop, classes, shared)[mine] if classes else None
                if timesteps:  # L_vlb: importance-sampled, from the history of the global batch's losses
                    t_all, weights = timesteps.sample(len(x0), shared, device)
                else:
                    t_all = torch.randint(0, diffusion.timesteps, (len(x0),), device=device, generator=shared)
                t = t_all[mine]
                noise = torch.randn(x0.shape, device=device, generator=shared)[mine]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg, planned)
                with autocast:
                    losses = diffusion.loss(net, x0[mine], t, noise, y)
                    loss = (losses * weights[mine]).mean() if timesteps else losses.mean()
                if timesteps:
                    timesteps.update(t_all, gather_from_ranks(losses.detach()))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                ema.update_parameters(model)
                step += 1
                pending.append((step, epoch, loss.detach()))
                state.update(step=step, epoch=epoch)
                bar.update(1)
                if step % cfg.log_every == 0:
                    losses = flush() or losses
                    rate = (step - clock["step"]) * batch / max(time.time() - clock["time"], 1e-9)
                    clock.update(step=step, time=time.time())
                    bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", img_s=f"{rate:.0f}")
                    if bar.disable:  # no terminal (a log file, a pipe): a plain line instead of the bar
                        say(f"step {step}/{total}: loss {sum(losses) / len(losses):.4f}, {rate:.0f} img/s")
                if step % cfg.checkpoint_every == 0 and step < total:
                    checked_save()
                stopped = signals[0] if signals else ("--max-minutes" if time.time() >= deadline else None)
                if ranks > 1:  # all ranks must stop at the same step; agree where they meet anyway, at a flush
                    stopped = agree_to_stop(stopped, device) if step % cfg.log_every == 0 else None
                if step >= total or stopped:
                    break
            flush()
            in_epoch = [v for _, e, v in state["history"] if e == epoch]
            rate = (step - epoch * steps_per_epoch - start) * batch / (time.time() - epoch_start)
            say(f"epoch {epoch + 1}/{math.ceil(planned / steps_per_epoch)}: mean loss "
                f"{sum(in_epoch) / max(1, len(in_epoch)):.4f}, {rate:.0f} img/s, step {step}/{total}, "
                f"{(time.time() - started) / 60:.1f} min")
        bar.close()
        if step > first:
            checked_save()
    return stopped


def measure_rate(model_cfg, diffusion_cfg, cfg, images, device, labels=None, steps=20, warmup=5):
    """Steps per second of train() itself, on a scratch model and optimizer, after `warmup` steps (and any
    compilation) are done. The run it is measured for is untouched: every step of train() seeds its own draws."""
    model, ema, diffusion, optimizer, state = setup(model_cfg, diffusion_cfg, cfg, device)
    def go(n):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            stopped = train(model, ema, diffusion, optimizer, images, replace(cfg, max_steps=n), device, state,
                            lambda: None, labels)
        if stopped in ("SIGINT", "SIGTERM"):  # nothing of the run itself has changed: stop at once
            raise KeyboardInterrupt

    go(warmup)
    first, start = state["step"], time.perf_counter()
    go(warmup + steps)  # ends reading the losses back: the device has finished
    return (state["step"] - first) / (time.perf_counter() - start) if state["step"] > first else math.inf


def plan(cfg, built, images, labels, device, deadline, steps_per_epoch):
    """(cfg with `steps` set so that the run's schedule ends by time.time() `deadline`, or at its own end if that
    comes first; the step rate measured now): what --max-minutes does to a new run."""
    model, _, diffusion, _, state = built
    rate = measure_rate(model.config, diffusion.config, cfg, images, device, labels)
    left = max(0.0, deadline - time.time())
    affordable = state["step"] + int(0.97 * rate * left) if math.isfinite(rate) else math.inf  # 3%: saves, noise
    steps = torch.tensor([max(state["step"] + 1, min(cfg.total_steps(steps_per_epoch), affordable))], device=device)
    if world()[1] > 1:  # the ranks' clocks and rates differ a little: all take the shortest plan
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    return replace(cfg, steps=int(steps)), rate


# ---------------------------------------------------------------------------- command line

def build_parser():
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--preset", choices=["auto", "cpu", "gpu"], help="defaults for model and schedule (auto: gpu on CUDA, else cpu)")
    a("--epochs", type=int, help="passes over the 60k training images, instead of --steps (gpu preset: 40)")
    a("--steps", type=int, help="optimizer steps in the run, instead of --epochs (cpu preset: 5500; 0: use --epochs)")
    a("--batch-size", type=int, help="images per step and process (preset); fixed for a run")
    a("--lr", type=float, help="Adam learning rate after warm-up (preset)")
    a("--warmup-steps", type=int, help="steps of linear learning-rate warm-up (200)")
    a("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up: constant, or decay to 0 at the last step (preset)")
    a("--timesteps", type=int, help="diffusion steps T (1000)")
    a("--schedule", choices=SCHEDULES, help="beta schedule (cpu preset: cosine; gpu: linear)")
    a("--prediction", choices=PREDICTIONS, help="network target: the noise eps, or v (Salimans & Ho 2022) (eps)")
    a("--min-snr-gamma", type=float, help="weight the loss by min(SNR, gamma) (Hang et al. 2023); 0: off (0)")
    a("--variance", choices=VARIANCES, help="reverse-process variance: beta~_t, beta_t, or learned (fixed_small)")
    a("--loss", choices=LOSSES, help="L_simple; L_hybrid (learned variance); L_vlb, importance-sampled (simple)")
    a("--width", type=int, help="U-Net channels at full resolution (preset)")
    a("--channel-mults", type=int, nargs="+", help="channel multiplier per resolution level (preset)")
    a("--num-res-blocks", type=int, help="residual blocks per level (preset)")
    a("--attn-resolutions", type=int, nargs="*", help="feature-map sizes with self-attention (preset)")
    a("--dropout", type=float, help="dropout in residual blocks, in [0, 1) (preset)")
    a("--grad-clip", type=float, help="clip the gradient's global norm to this; 0: off (1.0)")
    a("--conditional", action=argparse.BooleanOptionalAction, help="class-conditional model, for guidance (preset)")
    a("--cond-drop", type=float, help="conditional models: share of labels dropped to 'no class' (0.1)")
    a("--ema-decay", type=float, help="decay of the weights' exponential moving average, used to sample (0.999)")
    a("--ema-power", type=float, help="EMA warm-up (1+n)/(power+2+n) after n steps; higher: shorter average "
                                      "(cpu preset: 4; gpu: 8)")
    a("--seed", type=int, help="seed for weights, data order, timesteps and noise (0); fixed for a run")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device such as cuda:1")
    a("--data-dir", default="data", help="where Fashion-MNIST is looked for and kept (data)")
    a("--checkpoint-dir", help="where checkpoints go (checkpoints; with --resume, the folder resumed from)")
    a("--output-dir", default="output", help="where the PNGs and loss.csv are written (output)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (500)")
    a("--log-every", type=int, help="steps between progress-bar loss updates (50)")
    a("--resume", metavar="PATH", help="continue the run saved in this checkpoint (file or folder)")
    a("--overwrite", action="store_true", help="start afresh in a --checkpoint-dir that holds a run, replacing it")
    a("--max-steps", type=int, help="stop at this step, checkpoint and sample (0: no limit); this command only")
    a("--max-minutes", type=float, help="a new run: measure the step rate, then set --steps so that the run and "
                                          "its learning-rate schedule end within this many minutes; a resumed run: "
                                          "stop after them (0: no limit); this command only")
    a("--precision", choices=PRECISIONS, help="fp32 (TF32 on CUDA), bf16 autocast, or auto: bf16 on a CPU with bf16 "
                                              "instructions, else fp32 (preset: auto)")
    a("--memory-format", choices=MEMORY_FORMATS, help="of the model's tensors; auto: channels_last on a CPU in "
                                                      "fp32, else contiguous (preset: auto)")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile for training (off); this command only")
    a("--sample-n", type=int, default=64, help="images in the final samples.png (64; 0 skips sampling)")
    return p


def run(args):
    """Train as the flags say; returns (model, ema, state) for whoever called it in-process."""
    rank, ranks, device = start_distributed(args.device)
    saved, source = open_checkpoint(args.resume) if args.resume else (None, None)
    check(saved is None or saved["distillation"] is None, f"--resume {args.resume}: a distilled student; "
                                                          f"continue its distillation with distill.py --resume")
    model_cfg, diffusion_cfg, cfg, note = resolve_configs(args, device, saved and saved["config"])
    validate(args, model_cfg, cfg)
    check(saved is None or saved["world_size"] == ranks,
          f"--resume: the checkpoint was made by {saved and saved['world_size']} process(es); resume it with as "
          f"many (torchrun --nproc_per_node), not {ranks}")
    home = source.parent if source is not None and continues(source.parent, source) else None
    ckpt_dir = args.checkpoint_dir or home or "checkpoints"  # a resumed run goes on where it was saved
    out, ckpt_dir = check_writable(args.output_dir, "--output-dir"), check_writable(ckpt_dir, "--checkpoint-dir")
    with contextlib.ExitStack() as held:
        def claim():
            if rank == 0:  # the only process that writes checkpoints
                held.enter_context(locked(ckpt_dir))
                claim_folder(ckpt_dir, source, args.overwrite)
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one process per machine unpacks or downloads data
                prepare_fashion_mnist(args.data_dir)

        def load():
            images, labels = load_fashion_mnist(args.data_dir)
            check(cfg.batch_size <= len(images) // ranks,
                  f"--batch-size {cfg.batch_size} is larger than the {len(images) // ranks} training images")
            planned = cfg.total_steps(len(images) // (ranks * cfg.batch_size))
            limit = "--max-steps" if 0 < cfg.max_steps < planned else "--steps" if cfg.steps else "--epochs"
            check(saved is None or saved["step"] < min(planned, cfg.max_steps or planned), f"--resume: the run is at "
                  f"step {saved and saved['step']}, where this command would stop: give a larger {limit}")
            check(cfg.decays_within(planned), f"--lr-schedule {cfg.lr_schedule} "
                  f"decays after the warm-up, but --warmup-steps {cfg.warmup_steps} fills the run's {planned} steps: "
                  f"give fewer --warmup-steps, a longer run or --lr-schedule constant")
            built = setup(model_cfg, diffusion_cfg, cfg, device, saved)  # a checkpoint that does not fit: refused
            if rank == 0:  # the last step before training: every check has passed
                take_folder(ckpt_dir, args.resume, source, args.overwrite)
            return images, labels, built

        together(claim, device)
        return fit(args, cfg, device, saved, note, *together(load, device), out, ckpt_dir)


def fit(args, cfg, device, saved, note, images, labels, built, out, ckpt_dir):
    """run()'s second half, once everything is checked: train, and write the loss curve and samples."""
    (rank, ranks), log = world(), print if world()[0] == 0 else lambda *_: None
    model, ema, diffusion, optimizer, state = built
    model_cfg, diffusion_cfg = model.config, diffusion.config
    steps_per_epoch = len(images) // (ranks * cfg.batch_size)
    images, labels, started = images.to(device), labels.to(device), time.time()
    deadline = started + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    if cfg.max_minutes and saved is None:  # a resumed run keeps its length; the deadline may stop it early
        with tf32(device.type == "cuda"):  # as the run will train
            cfg, rate = plan(cfg, built, images, labels, device, deadline, steps_per_epoch)
        log(f"--max-minutes {cfg.max_minutes:g}: {rate * ranks * cfg.batch_size:.0f} img/s measured, so the run "
            f"ends at step {cfg.steps} (`--steps {cfg.steps}` without --max-minutes repeats it exactly)")
        if not cfg.decays_within(cfg.steps):
            log(f"warning: those {cfg.steps} steps are all warm-up, so the learning rate never decays; give more "
                f"minutes, fewer --warmup-steps or --lr-schedule constant")
    total = cfg.total_steps(steps_per_epoch)
    log(f"{note}\ndevice {device}, U-Net {count_parameters(model) / 1e6:.2f}M parameters, {len(images)} images, "
        f"{total} steps ({total / steps_per_epoch:.2f} epochs of {steps_per_epoch})\neffective batch "
        f"{ranks * cfg.batch_size} ({cfg.batch_size} per process x {ranks} process{'es' if ranks > 1 else ''}), "
        f"learning rate {cfg.lr:g} ({cfg.lr_schedule})\n"
        f"model {model_cfg}\n{diffusion_cfg}\n{cfg}")
    if saved is None and rank == 0:
        firsts = [int((labels == c).nonzero()[0]) for c in (0, 1, 5, 7, 8)]  # T-shirt, trouser, sandal, sneaker, bag
        save_forward_figure(images[firsts], Diffusion(diffusion_cfg), out / "forward_diffusion.png", cfg.seed)
    def save():
        if rank == 0:  # every rank holds the same weights
            save_checkpoint(make_checkpoint(model, ema, diffusion, optimizer, cfg.recipe(), state, ranks), ckpt_dir)

    try:
        with tf32(device.type == "cuda"):  # TF32 matmuls for training; sampling stays in full fp32
            stopped = train(model, ema, diffusion, optimizer, images, cfg, device, state, save, labels, deadline)
    except Diverged as e:
        raise Diverged(f"{e}. Nothing after that was saved: the newest checkpoint in {ckpt_dir}/ is the last good "
                       f"one") from None
    if rank > 0:
        return model, ema, state
    save_loss_history(state["history"], out, diffusion_cfg.loss_name())
    print(f"trained to step {state['step']} in {(time.time() - started) / 60:.1f} min; checkpoint in {ckpt_dir}/; "
          f"loss curve {out / 'loss.png'}")
    if stopped:
        print(f"stopped early by {stopped}; to continue: python train.py --resume {ckpt_dir}")
    if stopped in ("SIGINT", "SIGTERM") or not args.sample_n:
        return model, ema, state
    settings = sampler_settings(DEFAULT_SAMPLER, diffusion.timesteps)
    draw_pictures(ema.module.eval(), diffusion, args.sample_n, out, cfg.seed, **settings)
    print(f"wrote {out / 'samples.png'} ({args.sample_n} images from the EMA weights, {describe(settings)}"
          + (", and samples_by_class.png)" if model_cfg.num_classes else ")"))
    return model, ema, state


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    try:
        run_command(run, build_parser().parse_args(argv))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
