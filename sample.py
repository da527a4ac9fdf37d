"""Draw images from a trained checkpoint: `python sample.py` (see --help), then look in output/.

A thin command line: the model is rebuilt by checkpoint.py from the checkpoint alone, the images
drawn by samplers.generate, the pictures written by figures.py."""
import contextlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from checkpoint import (SHIPPED, build_guide, build_model, load_checkpoint, resolve_checkpoint,
                        slim_checkpoint)
from cli import (MAX_BATCH, MAX_IMAGES, ArgumentParser, UserError, check, check_new_folder,
                 check_output, check_writable, finite, given, is_npz, run_command, seed, whole)
from consistency import consistency_model
from data import load_fashion_mnist, parse_class, to_model_range
from device import pick_device
from editing import (MASKS, blanked, check_jumps, completions, interpolations, mask_from_flag,
                     round_trip)
from figures import (EDIT_ROWS, draw_pictures, picture_labels, save_labelled, save_pngs,
                     save_rows)
from files import atomic_save, atomic_write
from samplers import AUTOGUIDANCE, GUIDANCE, SAMPLERS, SamplerConfig, autoguided


def to_uint8(images):
    """[-1, 1] float [N, 1, H, W] -> uint8 numpy [N, H, W], the way the dataset stores images."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()


@contextlib.contextmanager
def npz_stream(f, shape):
    """Write into f an .npz holding 'images', uint8 of `shape` [N, H, W], as np.savez_compressed
    would, one batch at a time: yields add(images uint8 [b, H, W]), so memory stays flat in N."""
    written = 0

    def add(images):
        nonlocal written
        member.write(np.ascontiguousarray(images).tobytes())
        written += len(images)

    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z, \
            z.open("images.npy", "w", force_zip64=True) as member:
        header = {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(member, header)
        yield add
        if written != shape[0]:
            raise RuntimeError(f"{written} images written to an .npz of {shape[0]}")


DEFAULT_CHECKPOINT = "checkpoints"


def build_parser():
    p = ArgumentParser(description=__doc__)
    a = p.add_argument
    a("--checkpoint", default=DEFAULT_CHECKPOINT,
      help=f"checkpoint file, or folder to take the newest from ({DEFAULT_CHECKPOINT}; while it "
           f"holds none, the weights shipped in {SHIPPED.parent.name}/)")
    a("--n", type=whole(1, MAX_IMAGES), default=64, help="number of images to draw (64)")
    a("--seed", type=seed, default=0,
      help="seed for the starting noise and every sampling step (0)")
    a("--sampler", choices=sorted(SAMPLERS),
      help=f"reverse-process sampler ({SamplerConfig.sampler}; a distilled student: its own)")
    a("--steps", type=int,
      help="network evaluations, on respaced timesteps (ddpm: all T, ddim: 50, dpm++: 20; a "
           "distilled student: its own; an ECT model: any, its own by default)")
    a("--eta", type=finite,
      help="ddim and dpm++: noise, 0 deterministic (ODE) to 1 ancestral (SDE) (ddim: 0, dpm++: 1)")
    a("--batch-size", type=whole(1, MAX_BATCH),
      help="images generated at once (default: 64 on a CPU, 1000 on a GPU)")
    a("--output-dir", default="output",
      help="where samples.png (and denoising.png) are written (output)")
    a("--trajectory", action="store_true",
      help="also write denoising.png: a few samples from noise to image")
    a("--save-npz", metavar="PATH",
      help="also save every image drawn as uint8 [N, 28, 28] under the key 'images', written "
           "batch by batch")
    a("--save-png", metavar="DIR",
      help="also save every image drawn as a 28x28 PNG of its own, DIR/000000.png on (the folder "
           "of images external FID tools read); DIR must be new or empty")
    edit = p.add_mutually_exclusive_group()
    edit.add_argument("--inpaint", metavar="MASK",
                      help=f"fill in this region of the first --n test images (at most "
                           f"{EDIT_ROWS}, a row each), 4 times each ({', '.join(MASKS)}, or a "
                           f"28x28 PNG, white where filled); the other pixels stay exact")
    edit.add_argument("--interpolate", action="store_true",
                      help="pairs of noises (--n, at most 8) and the images between them along "
                           "the great circle, decoded by DDIM with eta 0")
    edit.add_argument("--invert", action="store_true",
                      help="encode --n test images to noise by DDIM run backwards, decode them "
                           "again (the error printed), and interpolate between pairs of them; "
                           "unguided unless --autoguidance is given")
    a("--jumps", type=whole(1, 100), default=1,
      help="--inpaint with --sampler ddpm: RePaint's resampling, each step taken this many times")
    a("--data-dir", default="data", help="--inpaint, --invert: where Fashion-MNIST is (data)")
    a("--export", metavar="FILE",
      help="write a copy of the checkpoint for drawing only (EMA weights and guide in fp16, no "
           "optimizer: how the shipped one was made) to FILE, a new file, and draw nothing")
    a("--class", dest="class_", metavar="CLASS",
      help="conditional models: draw this class, by name (\"ankle boot\") or index 0-9")
    a("--guidance", type=finite,
      help=f"conditional models: classifier-free guidance scale w ({GUIDANCE:g})")
    a("--autoguidance", type=finite, metavar="W",
      help=f"guide the model with the early EMA its checkpoint keeps, at scale W; 0: off "
           f"({AUTOGUIDANCE:g} where the checkpoint keeps one, else 0)")
    a("--unconditional", action="store_true",
      help="conditional models: draw with the 'no class' token, as an unconditional model would, "
           "instead of a row per class")
    a("--no-ema", action="store_true",
      help="sample with the raw trained weights instead of their EMA")
    a("--device", default="auto",
      help="auto (cuda, then mps, then cpu; the default), or a torch device")
    return p


def run(args):
    check(args.guidance is None or args.guidance >= 0,
          f"--guidance must be 0 (conditional model alone) or more, got {args.guidance}")
    device = pick_device(args.device)
    ckpt = load_checkpoint(checkpoint_to_use(args.checkpoint))
    if args.export:
        return export(args, ckpt)
    model, diffusion = build_model(ckpt, device, ema=not args.no_ema)
    # inversion runs the ODE both ways, and the guided eps, an extrapolation, round-trips worse
    w = 0.0 if args.invert and args.autoguidance is None else args.autoguidance
    model, autoguidance = autoguided(model, build_guide(ckpt, device), w)
    label = parse_class(args.class_) if args.class_ is not None else None
    conditional = model.config.num_classes > 0
    check(conditional or label is None,
          "--class needs a class-conditional model; this checkpoint's is unconditional (train one "
          "with `python train.py --conditional`)")
    check(conditional or args.guidance is None,
          "--guidance applies to class-conditional models only; this checkpoint's is "
          "unconditional: drop --guidance")
    check(conditional or not args.unconditional,
          "--unconditional applies to class-conditional models; this checkpoint's is "
          "unconditional already: drop --unconditional")
    check(not (args.unconditional and (label is not None or args.guidance is not None)),
          "--unconditional draws with no class, where --class and --guidance have nothing to "
          "steer: drop one of them")
    student = ckpt["distillation"]
    if student:
        check(args.guidance is None,
              f"this student learned guidance w = {student['guidance']:g} from its teacher, and "
              f"samples with it alone: drop --guidance")
    own = SamplerConfig(**student["sampler"]) if student else None
    if args.inpaint or args.interpolate or args.invert:
        return edit(args, model, diffusion, student, autoguidance)
    check(args.jumps == 1, "--jumps is RePaint's resampling, for --inpaint: drop it")
    sampler = SamplerConfig.from_flags(args.sampler, args.steps, args.eta, diffusion.timesteps, own,
                                       any_steps=consistency_model(student))
    if args.save_npz:  # first: a refusal leaves even --output-dir as it was
        check_output(args.save_npz, "--save-npz", is_npz)
    if args.save_png:
        check(Path(args.save_png).resolve() != Path(args.output_dir).resolve(),
              f"--save-png {args.save_png} is the --output-dir, where samples.png would join the "
              f"images: name another folder")
        check_new_folder(args.save_png, "--save-png")
    out = check_writable(args.output_dir, "--output-dir")
    guide = f", autoguidance {autoguidance:g}" if autoguidance else ""
    print(f"checkpoint step {ckpt['step']} ({'raw' if args.no_ema else 'EMA'} weights{guide}), "
          f"{sampler.describe()}, {args.n} images on {device}")
    draw(args, model, diffusion, sampler, label, student, out)


def draw(args, model, diffusion, sampler, label, student, out):
    """Draw and write the pictures (and the --save-npz array) that the flags ask for."""
    # trajectory: the first `keep` images at ~10 points of the reverse process
    snapshots, keep = [], 8
    marks = set(np.linspace(0, sampler.steps - 1, 10).round().astype(int).tolist())

    def record(i, t, x, x0):
        if args.trajectory and len(snapshots) < len(marks) and i in marks:
            snapshots.append((f"t = {t}", x[:keep].cpu()))

    guidance = GUIDANCE if args.guidance is None else args.guidance
    by_class = model.config.num_classes and label is None and not args.unconditional

    def pictures(on_batch=None):
        return draw_pictures(model, diffusion, args.n, out, args.seed, label, guidance,
                             student["guidance"] if student else None, by_class=by_class,
                             sampler=sampler, batch_size=args.batch_size, callback=record,
                             on_batch=on_batch)

    pngs = [png_writer(args.save_png)] if args.save_png else []
    if args.save_npz:
        labels, _ = picture_labels(model.config.num_classes, args.n, label, by_class)
        n, size = len(labels) if labels is not None else args.n, model.config.image_size

        def write(f):
            with npz_stream(f, (n, size, size)) as add:
                pictures(each(lambda batch: add(to_uint8(batch)), *pngs))
        atomic_write(args.save_npz, write)
    else:
        n, _ = pictures(each(*pngs))
    print(f"wrote {out / 'samples.png'}" + (", samples_by_class.png" if by_class else ""))
    if args.trajectory:
        save_labelled(snapshots, out / "denoising.png",
                      "Reverse process, from noise (left) to a sample (right): "
                      "x after the step at t")
        print(f"wrote {out / 'denoising.png'}")
    if args.save_npz:
        print(f"wrote {args.save_npz} ({n} images)")
    if args.save_png:
        print(f"wrote {n} PNGs to {args.save_png}/")


def export(args, ckpt):
    """--export: the checkpoint's EMA and guide in fp16, to a new file; nothing is drawn."""
    ignored = given(args, "no_ema", "inpaint", "interpolate", "invert", "save_npz", "save_png",
                    "trajectory", "class_", "guidance", "unconditional", "sampler", "steps",
                    "eta", "autoguidance")
    check(not ignored, f"--export copies the checkpoint's EMA weights and draws nothing: drop "
                       f"{', '.join(ignored)}")
    check_output(args.export, "--export", lambda path: False)
    atomic_save(slim_checkpoint(ckpt), args.export)
    print(f"wrote {args.export}: the EMA weights and guide in fp16, for drawing only")


def edit(args, model, diffusion, student, autoguidance):
    """--inpaint, --interpolate or --invert, with the model as the flags built it, given no class:
    the kept pixels or the noise decide what is drawn."""
    mode = "--inpaint" if args.inpaint else "--interpolate" if args.interpolate else "--invert"
    check(not student, f"{mode}: this checkpoint is a distilled student, which samples only with "
                       f"its own sampler, and {mode} needs another: give its teacher")
    others = given(args, "class_", "guidance", "unconditional", "save_npz", "save_png",
                   "trajectory")
    check(not others, f"{mode} draws with no class and writes its own picture: drop "
                      f"{', '.join(others)}")
    if args.inpaint:
        check_jumps(args.jumps, args.sampler)
        sampler = SamplerConfig.from_flags(args.sampler, args.steps, args.eta, diffusion.timesteps)
        mask = mask_from_flag(args.inpaint)
    else:
        check(args.sampler in (None, "ddim") and not args.eta and args.jumps == 1,
              f"{mode} decodes with the deterministic DDIM sampler: drop --sampler, --eta, --jumps")
        sampler = SamplerConfig.from_flags("ddim", args.steps, None, diffusion.timesteps)
    out = check_writable(args.output_dir, "--output-dir")
    guide = f", autoguidance {autoguidance:g}" if autoguidance else ""
    print(f"{mode}: {'raw' if args.no_ema else 'EMA'} weights{guide}, {sampler.describe()}")
    if args.interpolate:
        return draw_interpolation(args, model, diffusion, sampler, out)
    n = min(args.n, EDIT_ROWS) if args.inpaint else args.n  # what the picture shows
    x0 = to_model_range(load_fashion_mnist(args.data_dir, False)[0][:n])
    print(f"{len(x0)} test images")
    if args.inpaint:
        return draw_inpainting(args, model, diffusion, sampler, x0, mask, out)
    draw_inversion(args, model, diffusion, sampler, x0, out)


def draw_inpainting(args, model, diffusion, sampler, x0, mask, out):
    """inpainting.png: the first test images, what is kept of them, and their completions."""
    done = completions(model, diffusion, x0, mask, sampler, args.seed, jumps=args.jumps,
                       batch_size=args.batch_size or 64)
    shown = slice(EDIT_ROWS)
    columns = [("original", x0[shown]), ("kept", blanked(x0, mask)[shown])]
    resampled = f", RePaint {args.jumps} jumps" if args.jumps > 1 else ""
    save_labelled(columns + [(f"completion {j + 1}", x[shown]) for j, x in enumerate(done)],
                  out / "inpainting.png",
                  f"Inpainting ({args.inpaint}), {sampler.describe()}{resampled}")
    print(f"wrote {out / 'inpainting.png'}")


def draw_interpolation(args, model, diffusion, sampler, out):
    """interpolation.png: a row of images between each of up to EDIT_ROWS pairs of noises."""
    pairs = min(args.n, EDIT_ROWS)
    print(f"{pairs} pairs of noises")
    g = torch.Generator().manual_seed(args.seed)
    shape = (pairs, model.config.in_channels, model.config.image_size, model.config.image_size)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    rows = interpolations(model, diffusion, a, b, sampler.steps)
    save_rows(rows, out / "interpolation.png", f"Between two noises, {sampler.describe()}")
    print(f"wrote {out / 'interpolation.png'}")


def draw_inversion(args, model, diffusion, sampler, x0, out):
    """inversion.png (test images and their round trips through noise) and
    inversion_interpolation.png (between pairs of them, through their noises)."""
    noises, again = round_trip(model, diffusion, x0, sampler.steps, args.batch_size or 64)
    print(f"reconstruction error (RMS, in [-1, 1]) after {sampler.steps} steps each way: "
          f"{(again - x0).pow(2).mean().sqrt():.4f}")
    shown = slice(EDIT_ROWS)
    save_labelled([("original", x0[shown]), ("decoded", again[shown])], out / "inversion.png",
                  f"DDIM inversion and back, {sampler.steps} steps", rows=True)
    print(f"wrote {out / 'inversion.png'}")
    if len(x0) < 2:
        return
    pairs = slice(0, 2 * EDIT_ROWS - 1, 2), slice(1, 2 * EDIT_ROWS, 2)
    a, b = noises[pairs[0]], noises[pairs[1]]
    rows = interpolations(model, diffusion, a[:len(b)], b, sampler.steps)
    save_rows(rows, out / "inversion_interpolation.png",
              f"Between two test images, through their noises, {sampler.describe()}")
    print(f"wrote {out / 'inversion_interpolation.png'}")


def checkpoint_to_use(path):
    """--checkpoint, or the shipped weights when it is the default folder and holds no run yet."""
    if Path(path) != Path(DEFAULT_CHECKPOINT) or not SHIPPED.is_file():
        return path
    try:
        return resolve_checkpoint(path)
    except UserError:
        print(f"no checkpoint in {path}/ yet: drawing with the weights shipped in "
              f"{SHIPPED.parent.name}/{SHIPPED.name} (the default recipe); train your own with "
              f"`python train.py`")
        return SHIPPED


def png_writer(folder):
    """on_batch for --save-png: each batch's images as PNGs, numbered on from the last batch's."""
    written = 0

    def add(batch):
        nonlocal written
        save_pngs(to_uint8(batch), folder, written)
        written += len(batch)
    return add


def each(*adds):
    """One on_batch calling every writer asked for, in turn."""
    return lambda batch: [add(batch) for add in adds]


def main(argv=None):
    run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
