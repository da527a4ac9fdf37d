"""Train a DDPM on Fashion-MNIST: `python train.py` (see --help), then look in output/.

A thin command line: the loop is training.py's, the objective methods.Denoising, the checkpoint
format checkpoint.py's, the pictures figures.py's."""
import argparse
import contextlib
import math
import os
import sys
import time

import torch.distributed as dist

from checkpoint import make_checkpoint, open_checkpoint, save_checkpoint
from cli import (MAX_BATCH, MAX_IMAGES, MAX_STEPS, ArgumentParser, Diverged, check,
                 check_writable, finite, run_command, seed, whole)
from config import LR_SCHEDULES, MEMORY_FORMATS, PRECISIONS, resolve_configs, validate
from data import load_fashion_mnist, prepare_fashion_mnist
from device import tf32
from diffusion import LOSSES, PREDICTIONS, SCHEDULES, VARIANCES, Diffusion
from distributed import start_distributed, together, world
from figures import (draw_pictures, save_forward_figure, save_loss_history, save_progress,
                     save_progress_figure)
from folders import claim_folder, continues, locked, take_folder
from methods import denoising
from samplers import SamplerConfig, autoguided
from training import PLAN_STEPS, plan_length, planned_steps, train
from unet import count_parameters


def build_parser():
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--preset", choices=["auto", "cpu", "gpu"], help="the defaults (auto: gpu on CUDA, else cpu)")
    a("--epochs", type=whole(1, MAX_STEPS), help="passes over the 60k training images (gpu preset: 40)")
    a("--steps", type=whole(0, MAX_STEPS), help="optimizer steps in the run, instead of --epochs or "
                                                "the cpu preset's --plan-minutes (0: use --epochs)")
    a("--batch-size", type=whole(1, MAX_BATCH), help="images per step and process (preset); fixed")
    a("--lr", type=finite, help="Adam learning rate after warm-up (preset)")
    a("--warmup-steps", type=whole(0, MAX_STEPS), help="steps of linear learning-rate warm-up (200)")
    a("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up: constant, or decay to 0 at the "
                                                  "last step (preset)")
    a("--timesteps", type=int, help="diffusion steps T (1000)")
    a("--schedule", choices=SCHEDULES, help="beta schedule (cpu preset: cosine; gpu: linear)")
    a("--prediction", choices=PREDICTIONS, help="network target: the noise eps, or v "
                                                "(Salimans & Ho 2022) (eps)")
    a("--min-snr-gamma", type=finite, help="min-SNR-gamma loss weights (Hang et al. 2023); 0: off (0)")
    a("--variance", choices=VARIANCES, help="reverse-process variance: beta~_t, beta_t, or "
                                            "learned (fixed_small)")
    a("--loss", choices=LOSSES, help="L_simple; L_hybrid (learned variance); L_vlb, "
                                     "importance-sampled (simple)")
    a("--width", type=int, help="U-Net channels at full resolution (preset)")
    a("--channel-mults", type=int, nargs="+", help="channel multiplier per resolution level (preset)")
    a("--num-res-blocks", type=int, help="residual blocks per level (preset)")
    a("--attn-resolutions", type=int, nargs="*", help="feature-map sizes with self-attention (preset)")
    a("--dropout", type=finite, help="dropout in residual blocks, in [0, 1) (preset)")
    a("--grad-clip", type=finite, help="clip the gradient's global norm to this; 0: off (1.0)")
    a("--conditional", action=argparse.BooleanOptionalAction,
      help="class-conditional model, for guidance (cpu preset: conditional; gpu: not)")
    a("--cond-drop", type=finite, help="conditional models: share of labels dropped as 'no class' (0.1)")
    a("--ema-decay", type=finite, help="decay of the weights' sampled moving average (0.999)")
    a("--ema-power", type=finite, help="EMA warm-up (1+n)/(power+2+n) after n steps; higher: "
                                      "shorter average (cpu preset: 4; gpu: 8)")
    a("--guide-fraction", type=finite, help="keep the EMA this far into the run as autoguidance's "
                                           "guide (cpu preset: 0.3; gpu: 0, none)")
    a("--seed", type=seed, help="seed for weights, data order, timesteps and noise (0); fixed for a run")
    add_command_flags(a)
    return p


def add_command_flags(a):
    """build_parser()'s flags of where and how this command runs, rather than of the recipe."""
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device such as cuda:1")
    a("--data-dir", default="data", help="where Fashion-MNIST is looked for and kept (data)")
    a("--checkpoint-dir", help="where checkpoints go (checkpoints; with --resume, the folder resumed from)")
    a("--output-dir", default="output", help="where the PNGs and loss.csv are written (output)")
    a("--checkpoint-every", type=whole(1, MAX_STEPS), help="steps between checkpoints (500)")
    a("--log-every", type=whole(1, MAX_STEPS), help="steps between progress-bar loss updates (50)")
    a("--resume", metavar="PATH", help="continue the run saved in this checkpoint (file or folder)")
    a("--overwrite", action="store_true", help="start afresh in a --checkpoint-dir that holds a "
                                               "run, replacing it")
    a("--max-steps", type=whole(0, MAX_STEPS), help="stop at this step, checkpoint and sample (0: no "
                                                    "limit); this command only")
    a("--plan-minutes", type=finite, help="a new run's length: the most steps, a multiple of "
                                         f"{PLAN_STEPS}, that the step rate measured as it starts "
                                         "trains in this many minutes (cpu preset: 25; 0: off)")
    a("--max-minutes", type=finite, help="a new run: measure the step rate, then set --steps so "
                                        "that the run and its learning-rate schedule end within "
                                        "this many minutes; a resumed run: stop after them "
                                        "(0: no limit); this command only")
    a("--precision", choices=PRECISIONS, help="fp32 (TF32 on CUDA), bf16 autocast, or auto: bf16 "
                                              "on a CPU with bf16 instructions, else fp32 (preset: auto)")
    a("--memory-format", choices=MEMORY_FORMATS, help="of the model's tensors; auto: channels_last "
                                                      "on a CPU in fp32, else contiguous (preset: auto)")
    a("--compile", action=argparse.BooleanOptionalAction,
      help="torch.compile for training (off); this command only")
    a("--progress", action=argparse.BooleanOptionalAction, default=True,
      help="at each checkpoint, a grid of the same noise sampled, in OUTPUT_DIR/progress/, and "
           "OUTPUT_DIR/progress.png of them at the end (on)")
    a("--sample-n", type=whole(0, MAX_IMAGES), default=64, help="images in samples.png (64; 0: none)")


def run(args):
    """Train as the flags say; returns the Denoising method and the loop's state, for a caller
    in-process."""
    rank, ranks, device = start_distributed(args.device)
    saved, source = open_checkpoint(args.resume) if args.resume else (None, None)
    check(saved is None or saved["distillation"] is None, f"--resume {args.resume}: a distilled "
          f"student; continue its distillation with distill.py --resume")
    model_cfg, diffusion_cfg, cfg, note = resolve_configs(args, device, saved and saved["config"])
    validate(args, model_cfg, cfg)
    check(saved is None or saved["world_size"] == ranks,
          f"--resume: the checkpoint was made by {saved and saved['world_size']} process(es); "
          f"resume it with as many (torchrun --nproc_per_node), not {ranks}")
    home = source.parent if source is not None and continues(source.parent, source) else None
    # a resumed run goes on where it was saved
    ckpt_dir = args.checkpoint_dir or home or "checkpoints"
    out = check_writable(args.output_dir, "--output-dir")
    ckpt_dir = check_writable(ckpt_dir, "--checkpoint-dir", args.resume and not args.checkpoint_dir
                              and "a resumed run writes where it was saved unless given "
                                  "another --checkpoint-dir: add one")
    with contextlib.ExitStack() as held:
        def claim():
            if rank == 0:  # the only process that writes checkpoints
                held.enter_context(locked(ckpt_dir))
                claim_folder(ckpt_dir, source, args.overwrite)
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # one process per machine unpacks data
                prepare_fashion_mnist(args.data_dir)

        def load():
            images, labels = load_fashion_mnist(args.data_dir)
            check_length(cfg, len(images) // ranks, saved)
            built = denoising(model_cfg, diffusion_cfg, cfg, device, saved)
            if rank == 0:  # the last step before training: every check has passed
                take_folder(ckpt_dir, args.resume, source, args.overwrite)
            return images, labels, built

        together(claim, device)
        images, labels, (method, state) = together(load, device)
        fit(args, cfg, device, saved, note, images, labels, method, state, out, ckpt_dir)
        return method, state


def check_length(cfg, images, saved):
    """Refuse a run that cannot take a step: a batch larger than the images, a resumed run already
    at its end, or a learning-rate decay that its warm-up fills."""
    check(cfg.batch_size <= images, f"--batch-size {cfg.batch_size} is larger than the {images} "
                                    f"training images")
    planned = cfg.total_steps(images // cfg.batch_size)
    limit = "--max-steps" if 0 < cfg.max_steps < planned else "--steps" if cfg.steps else "--epochs"
    check(saved is None or saved["step"] < min(planned, cfg.max_steps or planned),
          f"--resume: the run is at step {saved and saved['step']}, where this command would stop: "
          f"give a larger {limit}")
    # a plan's length is known once it has measured the rate; planned() warns then
    check(cfg.decays_within(planned) or (saved is None and cfg.plan_minutes),
          f"--lr-schedule {cfg.lr_schedule} decays after the warm-up, "
          f"but --warmup-steps {cfg.warmup_steps} fills the run's {planned} steps: give fewer "
          f"--warmup-steps, a longer run or --lr-schedule constant")


def planned(cfg, method, state, images, labels, device, deadline, steps_per_epoch):
    """A new run's length from the step rate measured on a scratch model: --plan-minutes's fixed
    step counts, then --max-minutes's deadline."""
    log = print if world()[0] == 0 else lambda *_: None
    model_cfg, diffusion_cfg = method.parts[0].model.config, method.diffusion.config
    scratch, _ = denoising(model_cfg, diffusion_cfg, cfg, device)
    with tf32(device.type == "cuda"):  # as the run will train
        cfg, rate = plan_length(cfg, scratch, images, labels, device, deadline, steps_per_epoch,
                                state["step"])
    measured = f"{rate * world()[1] * cfg.batch_size:.0f} img/s measured"
    if cfg.planned_rate:
        steps = planned_steps(cfg, rate)
        log(f"--plan-minutes {cfg.plan_minutes:g}: {measured}, so {steps} steps, the most (in "
            f"multiples of {PLAN_STEPS}) that train in that time: about {steps / rate / 60:.0f} "
            f"min. `--steps {cfg.steps}` repeats this run on any machine")
    if cfg.max_minutes:
        log(f"--max-minutes {cfg.max_minutes:g}: {measured}, so the run ends at step {cfg.steps} "
            f"(`--steps {cfg.steps}` without --max-minutes repeats it exactly)")
    if not cfg.decays_within(cfg.steps):
        log(f"warning: those {cfg.steps} steps are all warm-up, so the learning rate never decays; "
            f"give more minutes, fewer --warmup-steps or --lr-schedule constant")
    return cfg


def describe_run(note, cfg, method, images, steps_per_epoch, device):
    """The lines a run starts with: where its settings came from, its size, length and configs."""
    ranks, model = world()[1], method.parts[0].model
    total = cfg.total_steps(steps_per_epoch)
    return (f"{note}\ndevice {device}, U-Net "
            f"{count_parameters(model) / 1e6:.2f}M parameters, {len(images)} images, {total} steps "
            f"({total / steps_per_epoch:.2f} epochs of {steps_per_epoch})\neffective batch "
            f"{ranks * cfg.batch_size} ({cfg.batch_size} per process x {ranks} "
            f"process{'es' if ranks > 1 else ''}), learning rate {cfg.lr:g} ({cfg.lr_schedule})\n"
            f"model {model.config}\n{method.diffusion.config}\n{cfg}")


def fit(args, cfg, device, saved, note, images, labels, method, state, out, ckpt_dir):
    """run()'s second half, once everything is checked: train, and write the loss curve and
    samples."""
    rank, ranks = world()
    log = print if rank == 0 else lambda *_: None
    part, diffusion = method.parts[0], method.diffusion
    steps_per_epoch = len(images) // (ranks * cfg.batch_size)
    images, labels, started = images.to(device), labels.to(device), time.time()
    deadline = started + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    # a resumed run keeps its length; the deadline may stop it
    if (cfg.max_minutes or cfg.plan_minutes) and saved is None:
        cfg = planned(cfg, method, state, images, labels, device, deadline, steps_per_epoch)
    log(describe_run(note, cfg, method, images, steps_per_epoch, device))
    if saved is None and rank == 0:
        firsts = [int((labels == c).nonzero()[0]) for c in (0, 1, 5, 7, 8)]  # shirt ... bag
        save_forward_figure(images[firsts], Diffusion(diffusion.config),
                            out / "forward_diffusion.png", cfg.seed)

    def save():
        if rank == 0:  # every rank holds the same weights
            ckpt = make_checkpoint(part, diffusion, cfg.recipe(), state, ranks, method.importance)
            save_checkpoint(ckpt, ckpt_dir)
            if args.progress:
                save_progress(part.ema.module, diffusion, out, state["step"], cfg.seed)

    try:
        with tf32(device.type == "cuda"):  # TF32 matmuls for training; sampling stays in full fp32
            stopped = train(method, images, cfg, device, state, save, labels, deadline)
    except Diverged as e:
        raise Diverged(f"{e}. Nothing after that was saved: the newest checkpoint in {ckpt_dir}/ "
                       f"is the last good one") from None
    if rank == 0:
        finish(args, cfg, method, state, stopped, out, ckpt_dir, started)


def finish(args, cfg, method, state, stopped, out, ckpt_dir, started):
    """What rank 0 writes after training: the loss curve, what to do next, and the samples."""
    diffusion, ema = method.diffusion, method.parts[0].ema
    save_loss_history(state["history"], out, diffusion.config.loss_name())
    print(f"trained to step {state['step']} in {(time.time() - started) / 60:.1f} min; "
          f"checkpoint in {ckpt_dir}/; loss curve {out / 'loss.png'}")
    every = cfg.checkpoint_every
    shown = args.progress and save_progress_figure(
        out, sorted({*range(every, state["step"], every), state["step"]}))
    if shown:
        print(f"samples through training: {shown}, from the grids in {out / 'progress'}/")
    if stopped:
        print(f"stopped early by {stopped}; to continue: python train.py --resume {ckpt_dir}")
    if stopped in ("SIGINT", "SIGTERM") or not args.sample_n:
        return
    sampler = SamplerConfig().resolve(diffusion.timesteps)
    model, w = autoguided(ema.module.eval(), ema.guide())  # as sample.py draws from the checkpoint
    n, _ = draw_pictures(model, diffusion, args.sample_n, out, cfg.seed, sampler=sampler)
    conditional = ema.module.config.num_classes
    print(f"wrote {out / 'samples.png'} ({n} images from the EMA weights"
          + (f" autoguided at {w:g}" if w else "") + f", {sampler.describe()}"
          + (", and samples_by_class.png)" if conditional else ")"))


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    try:
        run_command(run, build_parser().parse_args(argv))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
