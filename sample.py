"""Draw images from a trained checkpoint: `python sample.py` (see --help), then look in output/."""
import argparse
import pickle
import re
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffusion import SAMPLERS, Diffusion, DiffusionConfig
from unet import UNet, UNetConfig

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
GUIDANCE = 2.0  # default classifier-free guidance scale for conditional models (README, "Guidance")
FORMAT = "ddpm-fashion-mnist/1"  # stored in every checkpoint; anything else is not ours
CHECKPOINT_NAMES = ("ckpt.pt", "ckpt.prev.pt")  # newest first; see train.save_checkpoint
# What each sampler does unless told otherwise (README, "Sampling"): DPM-Solver++ in its SDE form
# (eta = 1) matched 1000-step DDPM's FID in 20 steps, 50x sooner; the ODE samplers did not.
DEFAULT_SAMPLER = "dpm++"
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm++": 20}  # None: all T
DEFAULT_ETA = {"ddim": 0.0, "dpm++": 1.0}


class UserError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one line on stderr (status 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def check_writable(folder, flag):
    """Create folder if needed and prove a file can be written there, before any long work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}/ ({e.strerror or e}); choose another folder with {flag}") from None
    return folder


def pick_device(name):
    """auto: the first of cuda, mps, cpu that this machine has; otherwise the device named."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:1 or mps") from None
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if not available.get(device.type, True):
            raise UserError(f"--device {name}: this machine has no {device.type} device; use --device auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device, precision):
    """bf16 autocast for precision "bf16", else nullcontext(): plain fp32 (TF32 on CUDA, where train.py enables it)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def resolve_checkpoint(path):
    """A checkpoint file, or the newest one in a folder (ckpt.pt, else ckpt.prev.pt if a save was cut short)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
        raise UserError(f"no checkpoint in {path}/ (it holds: {', '.join(found) or 'nothing'}); "
                        f"train one with `python train.py` or pass --checkpoint PATH")
    raise UserError(f"checkpoint {path} does not exist; train one with `python train.py` or pass --checkpoint PATH")


def load_checkpoint(path):
    """Load a checkpoint safely (weights_only: tensors and plain data, never code) onto the CPU."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))  # how torch names a callable the file wants to import
        if code:
            raise UserError(f"refusing {path}: it asks to run {code[1]}, which weights_only loading never does; "
                            f"load only checkpoints made by train.py") from None
        raise UserError(f"cannot read checkpoint {path} (damaged or not a checkpoint): not a valid pickle") from None
    except Exception as e:  # truncated, not a zip, not a torch file: all mean the file is unusable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read checkpoint {path} (damaged or not a checkpoint): {reason[:150]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (expected format {FORMAT!r})")
    missing = sorted({"model", "ema", "config", "step", "epoch"} - set(ckpt))
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    return ckpt


def build_model(ckpt, device="cpu", ema=True):
    """Rebuild the U-Net (EMA weights unless ema=False) and diffusion from the checkpoint alone."""
    config = ckpt["config"]
    try:
        model = UNet(UNetConfig.from_dict(config["model"]))
        model.load_state_dict(ckpt["ema" if ema else "model"])
        diffusion = Diffusion(DiffusionConfig(**config["diffusion"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint config does not match its weights: {reason[:200]}") from None
    return model.to(device).eval(), diffusion.to(device)


def sampler_settings(sampler, timesteps, steps=None, eta=None):
    """{sampler, steps, eta} for generate(), with the sampler's defaults for what is None."""
    if eta is not None and sampler not in DEFAULT_ETA:
        raise UserError(f"--eta applies to ddim and dpm++, not {sampler}")
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"--eta must be between 0 (deterministic, ODE) and 1 (ancestral, SDE), got {eta}")
    if steps is not None and not 1 <= steps <= timesteps:
        raise UserError(f"--steps must be between 1 and {timesteps}, got {steps}")
    steps = steps or min(DEFAULT_STEPS[sampler] or timesteps, timesteps)
    eta = DEFAULT_ETA[sampler] if eta is None and sampler in DEFAULT_ETA else eta
    return {"sampler": sampler, "steps": steps, **({"eta": eta} if eta is not None else {})}


def describe(settings):
    """'dpm++ sampler, 20 steps, eta 1' for a sampler_settings() dict."""
    eta = f", eta {settings['eta']:g}" if "eta" in settings else ""
    return f"{settings['sampler']} sampler, {settings['steps']} steps{eta}"


def default_batch_size(device):
    """Images per sampling batch: on a CPU 64 is fastest (more spills the caches), a GPU wants many."""
    return 64 if device.type == "cpu" else 1000


def parse_class(text):
    """A class index 0-9, or its torchvision name in any case ("ankle boot"), as an int."""
    names = [c.lower() for c in CLASSES]
    if text.strip().lower() in names:
        return names.index(text.strip().lower())
    if text.strip().isdigit() and int(text) < len(CLASSES):
        return int(text)
    raise UserError(f"unknown class {text!r}; use an index 0-9 or one of: {', '.join(CLASSES)}")


def guided(model, labels, w):
    """Classifier-free guidance, eq. 6 of Ho & Salimans 2022: (1 + w) f(x, t, c) - w f(x, t, none).

    w = 0 is the conditional model alone; conditional and unconditional run as one doubled batch.
    """
    if w == 0:
        return lambda x, t: model(x, t, labels)

    def fn(x, t):
        none = torch.full_like(labels, model.config.num_classes)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, none])).chunk(2)
        return cond + w * (cond - uncond)
    return fn


def generate(model, diffusion, n, seed=0, sampler="ddpm", steps=None, batch_size=None, callback=None,
             progress=True, precision="fp32", labels=None, guidance=0.0, **sampler_options):
    """n images [n, C, H, W] in [-1, 1] on the CPU, drawn in batches; the same seed and batch size
    give the same images. labels [n]: the class of each image, for a conditional model."""
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
            with autocast_for(device, precision):
                x = SAMPLERS[sampler](fn, diffusion, noise, steps, generator=g, callback=step_callback,
                                      **sampler_options)
            out.append(x.cpu())
    return torch.cat(out)


def save_grid(images, path, nrow=8, scale=3):
    """Images in [-1, 1] as one PNG grid, upscaled with nearest-neighbour so the pixels stay crisp."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(images.clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=2, pad_value=1.0)
    save_image(F.interpolate(grid[None], scale_factor=scale, mode="nearest")[0], path)


def save_labelled(groups, path, title, rows=False):
    """groups: [(label, images [k, 1, H, W] in [-1, 1])] -> one labelled column per group (or row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, m = len(groups[0][1]), len(groups)
    shape = (m, k) if rows else (k, m)
    fig, axes = plt.subplots(*shape, figsize=(1.1 * shape[1] + (1.2 if rows else 0), 1.1 * shape[0] + 0.3),
                             squeeze=False)
    for j, (label, x) in enumerate(groups):
        for i in range(k):
            ax = axes[j, i] if rows else axes[i, j]
            ax.imshow(x[i, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        if rows:
            axes[j, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center")
        else:
            axes[0, j].set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_pictures(model, diffusion, n, out, seed=0, label=None, guidance=GUIDANCE, **kw):
    """The standard pictures: n images in out/samples.png. A conditional model given no label draws
    ceil(n / 10) of each class instead, also as out/samples_by_class.png with a labelled row per class."""
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
                      f"One row per class, guidance w = {guidance}", rows=True)
    return images


def to_uint8(images):
    """[-1, 1] float [N, 1, H, W] -> uint8 numpy [N, H, W], the way the dataset stores images."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--checkpoint", default="checkpoints", help="checkpoint file, or folder to take the newest from")
    a("--n", type=int, default=64, help="number of images to draw")
    a("--seed", type=int, default=0, help="seed for the starting noise and every sampling step")
    a("--sampler", default=DEFAULT_SAMPLER, choices=sorted(SAMPLERS), help="reverse-process sampler")
    a("--steps", type=int, help="network evaluations, on respaced timesteps (ddpm: all T, ddim: 50, dpm++: 20)")
    a("--eta", type=float, help="ddim and dpm++: noise, 0 deterministic (ODE) to 1 ancestral (SDE) (ddim: 0, dpm++: 1)")
    a("--batch-size", type=int, help="images generated at once (default: 64 on a CPU, 1000 on a GPU)")
    a("--output-dir", default="output", help="where samples.png (and denoising.png) are written")
    a("--trajectory", action="store_true", help="also write denoising.png: a few samples from noise to image")
    a("--save-npz", metavar="PATH", help="also save the images as uint8 [N, 28, 28] under the key 'images'")
    a("--class", dest="class_", metavar="CLASS",
      help="conditional models: draw this class, by name (\"ankle boot\") or index 0-9")
    a("--guidance", type=float, default=GUIDANCE, help="conditional models: classifier-free guidance scale w")
    a("--no-ema", action="store_true", help="sample with the raw trained weights instead of their EMA")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    return p


def run(args):
    if args.n <= 0:
        raise UserError(f"--n must be a positive number of images, got {args.n}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint)
    model, diffusion = build_model(ckpt, device, ema=not args.no_ema)
    label = parse_class(args.class_) if args.class_ is not None else None
    if label is not None and not model.config.num_classes:
        raise UserError("--class needs a class-conditional model; this checkpoint's is unconditional "
                        "(train one with `python train.py --conditional`)")
    if args.guidance < 0:
        raise UserError(f"--guidance must be 0 (conditional model alone) or more, got {args.guidance}")
    settings = sampler_settings(args.sampler, diffusion.timesteps, args.steps, args.eta)
    out = check_writable(args.output_dir, "--output-dir")
    if args.save_npz:
        check_writable(Path(args.save_npz).parent, "--save-npz")
    print(f"checkpoint step {ckpt['step']} ({'raw' if args.no_ema else 'EMA'} weights), {describe(settings)}, "
          f"{args.n} images on {device}")

    snapshots, keep = [], 8  # trajectory: the first `keep` images at ~10 points of the reverse process
    steps = settings["steps"]
    marks = set(np.linspace(0, steps - 1, 10).round().astype(int).tolist())

    def record(i, t, x, x0):
        if args.trajectory and len(snapshots) < len(marks) and i in marks:
            snapshots.append((f"t = {t}", x[:keep].cpu()))

    images = draw_pictures(model, diffusion, args.n, out, args.seed, label, args.guidance,
                           batch_size=args.batch_size, callback=record, **settings)
    print(f"wrote {out / 'samples.png'}" + (", samples_by_class.png" if model.config.num_classes and label is None
                                             else ""))
    if args.trajectory:
        save_labelled(snapshots, out / "denoising.png",
                     "Reverse process, from noise (left) to a sample (right): x after the step at t")
        print(f"wrote {out / 'denoising.png'}")
    if args.save_npz:
        np.savez_compressed(args.save_npz, images=to_uint8(images))
        print(f"wrote {args.save_npz}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
