"""Train a DDPM on Fashion-MNIST: `python train.py` (see --help), then look in output/."""
import argparse
import contextlib
import csv
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from data import epoch_batches, load_fashion_mnist, prepare_fashion_mnist, to_model_range
from diffusion import PREDICTIONS, SCHEDULES, Diffusion, DiffusionConfig
from sample import (DEFAULT_SAMPLER, FORMAT, ArgumentParser, UserError, autocast_for, check_writable, describe,
                    draw_pictures, load_checkpoint, pick_device, sampler_settings, save_labelled)
from unet import UNet, UNetConfig, count_parameters

# Presets fill in every flag the user did not give. The cpu one is sized to finish in about
# 30 minutes on 2 cores (README, "Measured"); the gpu one is a larger model trained for longer.
PRESETS = {
    "cpu": dict(width=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,), dropout=0.0,
                epochs=2, batch_size=64, lr=1e-3),
    "gpu": dict(width=64, channel_mults=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1,
                epochs=40, batch_size=128, lr=2e-4),
}
FORWARD_FRACTIONS = (0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1)  # of T; t = 0, 50, 100, 200, ... 999 at T = 1000


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    ema_decay: float = 0.999
    cond_drop: float = 0.1  # conditional models: share of labels replaced by "no class" (Ho & Salimans 2022)
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    max_steps: int = 0  # 0: no limit
    max_minutes: float = 0.0  # 0: no limit
    precision: str = "fp32"  # or "bf16" autocast: 1.65x faster on a bf16-capable CPU, slower on an H100 (README)
    compile: bool = False  # torch.compile the model for the training step


# ---------------------------------------------------------------------------- figures

def save_forward_figure(images, diffusion, path, seed=0):
    """A few real images (rows) noised to increasing t (columns); diffusion must be on the CPU."""
    times = sorted({min(round(f * diffusion.timesteps), diffusion.timesteps - 1) for f in FORWARD_FRACTIONS})
    x0 = to_model_range(images.cpu())
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    columns = [(f"t = {t}", diffusion.q_sample(x0, torch.full((len(x0),), t), noise)) for t in times]
    save_labelled(columns, path, f"q(x_t | x_0), {diffusion.config.schedule} schedule")


def save_loss_history(history, output_dir, smooth=100):
    """history: [(step, epoch, loss)], one per step -> output_dir/loss.csv and output_dir/loss.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(output_dir / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss"])
        w.writerows(history)
    if not history:
        return
    steps, _, losses = map(torch.tensor, zip(*history))
    k = min(smooth, len(losses))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.5, alpha=0.3, label="per step")
    ax.plot(steps[k - 1:], losses.unfold(0, k, 1).mean(1), lw=1.5, label=f"mean of {k} steps")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="Training loss (L_simple)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_dir / "loss.png", dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- checkpoints

def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj, path, previous=None):
    """torch.save obj to path through a synced temporary file renamed over it, so that a crash at any
    moment leaves a complete file; the file it replaces is moved to `previous` if given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    return path


def save_checkpoint(state, checkpoint_dir):
    """Write checkpoint_dir/ckpt.pt atomically, keeping the one it replaces as ckpt.prev.pt."""
    return atomic_save(state, Path(checkpoint_dir) / "ckpt.pt", previous=Path(checkpoint_dir) / "ckpt.prev.pt")


def make_checkpoint(model, ema, diffusion, optimizer, cfg, state, device):
    """Everything needed to rebuild the model (configs as plain types) and to resume exactly."""
    return {"format": FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged),
            "step": state["step"], "epoch": state["epoch"], "history": state["history"],
            "config": {"model": model.config.to_dict(), "diffusion": diffusion.config.to_dict(), "train": asdict(cfg)},
            "rng": rng_state(device), "world_size": world()[1]}  # data order and steps depend on the process count


# ---------------------------------------------------------------------------- several processes

def start_distributed(device_flag):
    """(rank, world size, device). Under torchrun (RANK and WORLD_SIZE set) join its process group:
    NCCL with one GPU per process (cuda:LOCAL_RANK) when CUDA is there, gloo on the CPU otherwise."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, pick_device(device_flag)
    if device_flag not in ("auto", "cuda", "cpu"):
        raise UserError(f"under torchrun each process takes the GPU of its LOCAL_RANK: give --device auto, cuda "
                        f"or cpu, not {device_flag} (CUDA_VISIBLE_DEVICES picks the GPUs)")
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA device here")
    cuda = device_flag != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def world():
    """(rank, world size): (0, 1) for a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def agree_to_stop(reason, device):
    """reason if this rank wants to stop, else "another process's stop" if any rank does, else None."""
    flag = torch.tensor([float(reason is not None)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return reason or ("another process's stop" if flag.item() else None)


def mean_over_ranks(x):
    """The average of tensor x over all processes (x itself for one); gloo has no AVG, hence SUM."""
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world()[1]
    return x


# ---------------------------------------------------------------------------- training

def ema_of(model, decay):
    """An exponential moving average of model's weights, updated by ema.update_parameters(model).

    The decay starts low, min(decay, (1 + n) / (10 + n)) after n updates, so the average
    forgets the random initialisation quickly and then settles to `decay`.
    """
    @torch.no_grad()
    def update(ema_params, params, n):
        d = min(decay, (1 + n.item()) / (10 + n.item()))
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1 - d)

    return AveragedModel(model, multi_avg_fn=update)


def setup(model_cfg, diffusion_cfg, cfg, device, saved=None):
    """Seeded model, its EMA, diffusion, Adam and loop state; restored from checkpoint `saved` if given."""
    torch.manual_seed(cfg.seed)
    model = UNet(model_cfg).to(device)
    ema = ema_of(model, cfg.ema_decay)
    diffusion = Diffusion(diffusion_cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    state = {"step": 0, "epoch": 0, "history": []}
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.module.load_state_dict(saved["ema"])
        ema.n_averaged.fill_(saved["ema_updates"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update(step=saved["step"], epoch=saved["epoch"], history=[tuple(h) for h in saved["history"]])
        set_rng_state(saved["rng"], device)
    return model, ema, diffusion, optimizer, state


def lr_at(step, cfg):
    """Linear warm-up, then constant: Adam's early steps are the unstable ones."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


class Diverged(Exception):
    """The loss or the weights stopped being finite; nothing after that point was saved."""


@contextlib.contextmanager
def graceful_signals():
    """While inside: the first SIGINT or SIGTERM is recorded for the loop to act on; a second aborts."""
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        tqdm.write(f"\n{received[0]} received: finishing this step and saving a checkpoint (again to abort now)")

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread, where Python allows no handlers: leave them be
        previous = {}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def drop_labels(labels, p, null):
    """Replace each label by the "no class" token `null` with probability p, so that one model learns both
    the conditional and the unconditional score (Ho & Salimans 2022, Algorithm 1): [B] -> [B]."""
    return torch.where(torch.rand(labels.shape, device=labels.device) < p, torch.full_like(labels, null), labels)


def train(model, ema, diffusion, optimizer, images, cfg, device, state, save, labels=None):
    """The loop: sample t and noise, take an Adam step on L_simple, update the EMA, log, save() now and then.

    images: uint8 [N, 28, 28] on device; labels [N] too, used if the model is class-conditional.
    state holds what must survive a restart (step, epoch, per-step loss history), updated in place.
    Always ends with a save(). Returns why it stopped before the planned end, or None.

    Under torchrun each of the W processes takes its own cfg.batch_size slice of a global batch of
    W * cfg.batch_size, with the global batch's timesteps and noise drawn alike on every rank from the
    same seed: the W ranks together take exactly the step a single process would take with that batch.
    """
    rank, ranks = world()
    batch = ranks * cfg.batch_size
    mine = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    say = tqdm.write if rank == 0 else lambda *_: None
    steps_per_epoch = len(images) // batch
    total = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    autocast = autocast_for(device, cfg.precision)
    net = torch.compile(model) if cfg.compile else model  # same parameters; checkpoints save `model`
    if ranks > 1:  # averages the gradients over ranks during backward()
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    deadline = time.time() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
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

    step, tick, started, stopped = state["step"], time.time(), time.time(), None
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, disable=None if rank == 0 else True)
    model.train()
    with graceful_signals() as signals:
        say(f"training from step {step} to {total}; Ctrl-C stops cleanly with a checkpoint")
        while step < total and not stopped:
            epoch, start = divmod(step, steps_per_epoch)
            epoch_start = time.time()
            for idx in epoch_batches(len(images), batch, cfg.seed, epoch, device)[start:]:
                x0 = to_model_range(images[idx])
                y = drop_labels(labels[idx], cfg.cond_drop, model.config.num_classes) if model.config.num_classes else None
                t = torch.randint(0, diffusion.timesteps, (len(x0),), device=device)
                noise = torch.randn_like(x0)
                x0, t, noise, y = x0[mine], t[mine], noise[mine], y if y is None else y[mine]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                with autocast:
                    loss = diffusion.loss(lambda xt, tt: net(xt, tt, y), x0, t, noise).mean()
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
                    values = flush()
                    rate = len(values) * batch / (time.time() - tick)
                    bar.set_postfix(loss=f"{sum(values) / len(values):.4f}", img_s=f"{rate:.0f}")
                    tick = time.time()
                if step % cfg.checkpoint_every == 0 and step < total:
                    checked_save()
                stopped = signals[0] if signals else ("--max-minutes" if time.time() >= deadline else None)
                if ranks > 1:  # all ranks must stop at the same step; agree where they meet anyway, at a flush
                    stopped = agree_to_stop(stopped, device) if step % cfg.log_every == 0 else None
                if step >= total or stopped:
                    break
            flush()
            losses = [v for _, e, v in state["history"] if e == epoch]
            rate = (step - epoch * steps_per_epoch - start) * batch / (time.time() - epoch_start)
            say(f"epoch {epoch + 1}/{cfg.epochs}: mean loss {sum(losses) / max(1, len(losses)):.4f}, "
                       f"{rate:.0f} img/s, step {step}/{total}, {(time.time() - started) / 60:.1f} min")
        bar.close()
        checked_save()
    return stopped


# ---------------------------------------------------------------------------- command line

def build_parser():
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--preset", default="auto", choices=["auto", "cpu", "gpu"],
      help="defaults for the model size and schedule; auto: gpu on CUDA, cpu otherwise")
    a("--epochs", type=int, help="passes over the 60k training images (preset)")
    a("--batch-size", type=int, help="images per step (preset)")
    a("--lr", type=float, help="Adam learning rate after warm-up (preset)")
    a("--warmup-steps", type=int, help="steps of linear learning-rate warm-up (200)")
    a("--timesteps", type=int, help="diffusion steps T (1000)")
    a("--schedule", choices=SCHEDULES, help="beta schedule (linear)")
    a("--prediction", choices=PREDICTIONS, help="network target: the noise eps, or v (Salimans & Ho 2022) (eps)")
    a("--min-snr-gamma", type=float, help="weight the loss by min(SNR, gamma) (Hang et al. 2023); 0: off (0)")
    a("--width", type=int, help="U-Net channels at full resolution (preset)")
    a("--channel-mults", type=int, nargs="+", help="channel multiplier per resolution level (preset)")
    a("--num-res-blocks", type=int, help="residual blocks per level (preset)")
    a("--attn-resolutions", type=int, nargs="*", help="feature-map sizes with self-attention (preset)")
    a("--dropout", type=float, help="dropout in residual blocks (preset)")
    a("--grad-clip", type=float, help="clip the gradient's global norm to this; 0: off (1.0)")
    a("--conditional", action=argparse.BooleanOptionalAction,
      help="class-conditional model, for sample.py --class and guidance (preset)")
    a("--cond-drop", type=float, help="conditional models: share of labels dropped to 'no class' (0.1)")
    a("--ema-decay", type=float, help="decay of the weights' exponential moving average, used to sample (0.999)")
    a("--seed", type=int, help="seed for weights, data order, timesteps and noise (0)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device such as cuda:1")
    a("--data-dir", default="data", help="where Fashion-MNIST is looked for and kept (data)")
    a("--checkpoint-dir", default="checkpoints", help="where ckpt.pt and ckpt.prev.pt are written (checkpoints)")
    a("--output-dir", default="output", help="where the PNGs and loss.csv are written (output)")
    a("--checkpoint-every", type=int, help="steps between checkpoints (500)")
    a("--log-every", type=int, help="steps between progress-bar loss updates (50)")
    a("--resume", metavar="PATH", help="continue the run saved in this checkpoint")
    a("--max-steps", type=int, help="stop at this step, checkpoint and sample (0: no limit)")
    a("--max-minutes", type=float, help="stop after this many minutes of training, checkpoint and sample (0: no limit)")
    a("--precision", choices=["fp32", "bf16"],
      help="plain fp32 (TF32 on CUDA), or bf16 autocast; see the README's speed table (fp32)")
    a("--compile", action="store_true", default=None, help="torch.compile the model for training (off)")
    a("--sample-n", type=int, default=64, help="images in the final samples.png (64; 0 skips sampling)")
    return p


def resolve_configs(args, device, saved=None):
    """Model, diffusion and training configs, and a line saying where they came from.

    Every flag left out (None) takes its value from the checkpoint when resuming, else from
    the preset; a flag given explicitly always wins, except that a resumed model cannot change.
    """
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if v is not None}
    if "conditional" in given:
        given["num_classes"] = 10 if given.pop("conditional") else 0
    if saved is not None:
        base = {**saved["model"], **saved["diffusion"], **saved["train"]}
        fixed = [f.name for cls in (UNetConfig, DiffusionConfig) for f in fields(cls)]
        clash = [k for k in fixed if k in given and given[k] != base[k]]
        if clash:
            raise UserError("--resume: the checkpoint was trained with a different model; drop or change "
                            + ", ".join(f"--{k.replace('_', '-')} {given[k]} (checkpoint: {base[k]})" for k in clash))
        note = f"config from {args.resume}"
    else:
        preset = args.preset if args.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
        base = {**asdict(UNetConfig()), **DiffusionConfig().to_dict(), **asdict(TrainConfig()), **PRESETS[preset]}
        why = (f"--preset auto found a {device.type} device" if args.preset == "auto" else "--preset")
        note = f"preset {preset} ({why}; --preset cpu|gpu or any single flag changes it)"
    merged = {**base, **given}
    pick = lambda cls: cls(**{f.name: merged[f.name] for f in fields(cls)})
    return pick(UNetConfig), pick(DiffusionConfig), pick(TrainConfig), note


def validate(cfg, n_images=None):
    """Refuse settings that cannot train, before anything is written."""
    for name in ("epochs", "batch_size", "lr", "checkpoint_every", "log_every"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "max_steps", "max_minutes", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} cannot be negative, got {getattr(cfg, name)}")
    if not 0 <= cfg.cond_drop <= 1:
        raise UserError(f"--cond-drop must be in [0, 1], got {cfg.cond_drop}")
    if not 0 <= cfg.ema_decay < 1:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if n_images is not None and cfg.batch_size > n_images:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {n_images} training images")


def run(args):
    """Train as the flags say; returns (model, ema, state) for whoever called it in-process."""
    rank, ranks, device = start_distributed(args.device)
    log = print if rank == 0 else lambda *_: None
    saved = load_checkpoint(args.resume) if args.resume else None
    try:
        model_cfg, diffusion_cfg, cfg, note = resolve_configs(args, device, saved and saved["config"])
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    validate(cfg)
    if saved is not None and saved.get("world_size", 1) != ranks:  # the data order and step count depend on it
        raise UserError(f"--resume: the checkpoint was made by {saved.get('world_size', 1)} process(es); resume it "
                        f"with as many (torchrun --nproc_per_node), not {ranks}")
    if device.type == "cuda":  # TF32 matmuls for whatever stays in fp32 (autocast covers the rest)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out, ckpt_dir = (check_writable(d, flag) for d, flag in ((args.output_dir, "--output-dir"),
                                                              (args.checkpoint_dir, "--checkpoint-dir")))
    if rank == 0:  # one process unpacks (or downloads) the data, then the others read it
        prepare_fashion_mnist(args.data_dir)
    if ranks > 1:
        dist.barrier()
    images, labels = load_fashion_mnist(args.data_dir)
    validate(cfg, len(images) // ranks)

    model, ema, diffusion, optimizer, state = setup(model_cfg, diffusion_cfg, cfg, device, saved)
    log(f"{note}\ndevice {device}, U-Net {count_parameters(model) / 1e6:.2f}M parameters, {len(images)} images, "
        f"{cfg.epochs} epochs of {len(images) // (ranks * cfg.batch_size)} steps\n"
        f"effective batch {ranks * cfg.batch_size} ({cfg.batch_size} per process x {ranks} process"
        f"{'es' if ranks > 1 else ''}), learning rate {cfg.lr:g}\nmodel {model_cfg}\n{diffusion_cfg}\n{cfg}")
    if saved is None and rank == 0:
        firsts = [int((labels == c).nonzero()[0]) for c in (0, 1, 5, 7, 8)]  # T-shirt, trouser, sandal, sneaker, bag
        save_forward_figure(images[firsts], Diffusion(diffusion_cfg), out / "forward_diffusion.png", cfg.seed)
    images = images.to(device)

    def save():
        if rank == 0:  # every rank holds the same weights
            save_checkpoint(make_checkpoint(model, ema, diffusion, optimizer, cfg, state, device), ckpt_dir)

    started = time.time()
    stopped = train(model, ema, diffusion, optimizer, images, cfg, device, state, save, labels.to(device))
    if rank > 0:
        return model, ema, state
    save_loss_history(state["history"], out)
    path = ckpt_dir / "ckpt.pt"
    print(f"trained to step {state['step']} in {(time.time() - started) / 60:.1f} min; checkpoint {path}; "
          f"loss curve {out / 'loss.png'}")
    if stopped:
        print(f"stopped early by {stopped}; to continue: python train.py --resume {path}")
    if stopped in ("SIGINT", "SIGTERM") or not args.sample_n:
        return model, ema, state
    settings = sampler_settings(DEFAULT_SAMPLER, diffusion.timesteps)
    draw_pictures(ema.module.eval(), diffusion, args.sample_n, out, cfg.seed, **settings)
    print(f"wrote {out / 'samples.png'} ({args.sample_n} images from the EMA weights, {describe(settings)}"
          + (", and samples_by_class.png)" if model_cfg.num_classes else ")"))
    return model, ema, state


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"error: training diverged: {e}. Nothing after that was saved: the newest checkpoint in "
              f"{args.checkpoint_dir}/ is the last good one. Resume from it with a lower --lr.", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\naborted; the newest complete checkpoint is in {args.checkpoint_dir}/", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
