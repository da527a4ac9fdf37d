"""Draw images from a trained checkpoint: `python sample.py` (see --help), then look in output/."""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import atomic_write, build_model, load_checkpoint
from cli import (DEFAULT_SAMPLER, GUIDANCE, ArgumentParser, UserError, autocast_for, check, check_writable,
                 default_batch_size, describe, pick_device, run_command, sampler_settings, tf32)
from data import CLASSES
from samplers import SAMPLERS, guided
from figures import save_grid, save_labelled


def parse_class(text):
    """A class index 0-9, or its torchvision name in any case ("ankle boot"), as an int."""
    names = [c.lower() for c in CLASSES]
    if text.strip().lower() in names:
        return names.index(text.strip().lower())
    if text.strip().isdigit() and int(text) < len(CLASSES):
        return int(text)
    raise UserError(f"unknown class {text!r}; use an index 0-9 or one of: {', '.join(CLASSES)}")


def generate(model, diffusion, n, seed=0, sampler="ddpm", steps=None, batch_size=None, callback=None,
             progress=True, precision="fp32", labels=None, guidance=0.0, **sampler_options):
    """n images [n, C, H, W] in [-1, 1] on the CPU, drawn in batches; the same seed and batch size
    give the same images. labels [n]: the class of each image, for a conditional model. Always in
    full fp32 (or the precision asked for), TF32 off, whoever calls it: the same images as sample.py."""
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    c = model.config
    g = torch.Generator(device=device).manual_seed(seed)
    steps = steps or diffusion.timesteps
    out = []
    with tqdm(total=steps * -(-n // batch_size), unit="step", desc="sampling", disable=not progress or None,
              leave=False) as bar:
        def step_callback(i, t, x, x0):
            bar.update(1)
            if callback is not None:
                callback(i, t, x, x0)

        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            noise = torch.randn((b, c.in_channels, c.image_size, c.image_size), generator=g, device=device)
            fn = model if labels is None else guided(model, labels[start:start + b].to(device), guidance)
            with autocast_for(device, precision), tf32(False):
                x = SAMPLERS[sampler](fn, diffusion, noise, steps, generator=g, callback=step_callback,
                                      **sampler_options)
            out.append(x.cpu())
    return torch.cat(out)


def draw_pictures(model, diffusion, n, out, seed=0, label=None, guidance=GUIDANCE, learned=None, **kw):
    """The standard pictures: n images in out/samples.png. A conditional model given no label draws
    ceil(n / 10) of each class instead, also as out/samples_by_class.png with a labelled row per class.
    learned: a distilled student's guidance scale, which it applies itself: none is added to it."""
    guidance = 0.0 if learned is not None else guidance
    labels, per_class = None, None
    if model.config.num_classes and label is not None:
        labels = torch.full((n,), label)
    elif model.config.num_classes:
        per_class = -(-n // len(CLASSES))
        labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    images = generate(model, diffusion, len(labels) if labels is not None else n, seed, labels=labels,
                      guidance=guidance if labels is not None else 0.0, **kw)
    save_grid(images, out / "samples.png", nrow=per_class or 8)
    if per_class:
        save_labelled(list(zip(CLASSES, images.split(per_class))), out / "samples_by_class.png",
                      f"One row per class, {'a student distilled at ' * (learned is not None)}guidance "
                      f"w = {guidance if learned is None else learned:g}", rows=True)
    return images


def to_uint8(images):
    """[-1, 1] float [N, 1, H, W] -> uint8 numpy [N, H, W], the way the dataset stores images."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()


def build_parser():
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--checkpoint", default="checkpoints", help="checkpoint file, or folder to take the newest from (checkpoints)")
    a("--n", type=int, default=64, help="number of images to draw (64)")
    a("--seed", type=int, default=0, help="seed for the starting noise and every sampling step (0)")
    a("--sampler", choices=sorted(SAMPLERS), help=f"reverse-process sampler ({DEFAULT_SAMPLER}; a distilled student: "
                                                  f"its own)")
    a("--steps", type=int, help="network evaluations, on respaced timesteps (ddpm: all T, ddim: 50, dpm++: 20)")
    a("--eta", type=float, help="ddim and dpm++: noise, 0 deterministic (ODE) to 1 ancestral (SDE) (ddim: 0, dpm++: 1)")
    a("--batch-size", type=int, help="images generated at once (default: 64 on a CPU, 1000 on a GPU)")
    a("--output-dir", default="output", help="where samples.png (and denoising.png) are written (output)")
    a("--trajectory", action="store_true", help="also write denoising.png: a few samples from noise to image")
    a("--save-npz", metavar="PATH", help="also save the images as uint8 [N, 28, 28] under the key 'images'")
    a("--class", dest="class_", metavar="CLASS",
      help="conditional models: draw this class, by name (\"ankle boot\") or index 0-9")
    a("--guidance", type=float, help=f"conditional models: classifier-free guidance scale w ({GUIDANCE:g})")
    a("--no-ema", action="store_true", help="sample with the raw trained weights instead of their EMA")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu; the default), or a torch device")
    return p


def run(args):
    check(args.n > 0, f"--n must be a positive number of images, got {args.n}")
    check(args.batch_size is None or args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    check(args.guidance is None or args.guidance >= 0,
          f"--guidance must be 0 (conditional model alone) or more, got {args.guidance}")
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    model, diffusion = build_model(ckpt, device, ema=not args.no_ema)
    label = parse_class(args.class_) if args.class_ is not None else None
    conditional = model.config.num_classes > 0
    check(conditional or label is None, "--class needs a class-conditional model; this checkpoint's is "
                                        "unconditional (train one with `python train.py --conditional`)")
    check(conditional or args.guidance is None, "--guidance applies to class-conditional models only; this "
                                                "checkpoint's is unconditional: drop --guidance")
    distilled = ckpt["distillation"]
    if distilled:
        check(args.guidance is None, f"this student learned guidance w = {distilled['guidance']:g} from its "
                                     f"teacher, and samples with it alone: drop --guidance")
    settings = sampler_settings(args.sampler, diffusion.timesteps, args.steps, args.eta, distilled)
    out = check_writable(args.output_dir, "--output-dir")
    if args.save_npz:
        check_writable(Path(args.save_npz).parent, "--save-npz")
    print(f"checkpoint step {ckpt['step']} ({'raw' if args.no_ema else 'EMA'} weights), {describe(settings)}, "
          f"{args.n} images on {device}")

    snapshots, keep = [], 8  # trajectory: the first `keep` images at ~10 points of the reverse process
    marks = set(np.linspace(0, settings["steps"] - 1, 10).round().astype(int).tolist())

    def record(i, t, x, x0):
        if args.trajectory and len(snapshots) < len(marks) and i in marks:
            snapshots.append((f"t = {t}", x[:keep].cpu()))

    guidance = GUIDANCE if args.guidance is None else args.guidance
    images = draw_pictures(model, diffusion, args.n, out, args.seed, label, guidance,
                           distilled["guidance"] if distilled else None, batch_size=args.batch_size,
                           callback=record, **settings)
    print(f"wrote {out / 'samples.png'}" + (", samples_by_class.png" if conditional and label is None else ""))
    if args.trajectory:
        save_labelled(snapshots, out / "denoising.png",
                      "Reverse process, from noise (left) to a sample (right): x after the step at t")
        print(f"wrote {out / 'denoising.png'}")
    if args.save_npz:
        atomic_write(args.save_npz, lambda f: np.savez_compressed(f, images=to_uint8(images)))
        print(f"wrote {args.save_npz}")


def main(argv=None):
    run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
