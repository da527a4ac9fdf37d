"""Every picture the commands write: the samples a run draws, image grids, labelled grids, the
forward process, the loss curve and evaluate.py's plots. Each file is written atomically, so a
failed write leaves the old one. How images are drawn is samplers.py's."""
import csv
import io
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint import build_model
from data import CLASSES, to_model_range
from files import atomic_write
from folders import saved_rounds
from samplers import GUIDANCE, SamplerConfig, generate, generate_batches

# the most images samples.png shows (8 a row), and samples_by_class.png of each class: what a
# picture can show, whatever the n drawn
SHOWN, SHOWN_PER_CLASS = 256, 16
# of T; t = 0, 50, 100, 200, ... 999 at T = 1000
FORWARD_FRACTIONS = (0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1)
# a progress grid: its images (one per class of a conditional model) and the default sampler's
# steps; the most grids progress.png shows
PROGRESS_N, PROGRESS_STEPS, PROGRESS_ROWS = 10, 10, 12
EDIT_ROWS = 8  # the test images, or pairs, an edit's picture shows (sample.py --inpaint ...)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path):
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        _pyplot().close(fig)


def save_grid(images, path, nrow=8, scale=3):
    """Images in [-1, 1] as one PNG grid, upscaled with nearest-neighbour so the pixels stay
    crisp."""
    from torchvision.utils import make_grid, save_image

    grid = make_grid(images.clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=2, pad_value=1.0)
    atomic_write(path, lambda f: save_image(F.interpolate(grid[None], scale_factor=scale,
                                                          mode="nearest")[0], f, format="png"))


def save_pngs(images, folder, start=0):
    """uint8 images [b, H, W] as one grayscale PNG each at their own size, folder/NNNNNN.png
    numbered from `start`: the folder of images that external FID tools read."""
    from PIL import Image

    for k, image in enumerate(images):
        atomic_write(Path(folder) / f"{start + k:06d}.png",
                     lambda f, pixels=image: Image.fromarray(pixels).save(f, format="png"))


def save_labelled(groups, path, title, rows=False):
    """groups: [(label, images [k, 1, H, W] in [-1, 1])] -> one labelled column per group (or
    row)."""
    plt = _pyplot()
    k, m = len(groups[0][1]), len(groups)
    shape = (m, k) if rows else (k, m)
    fig, axes = plt.subplots(*shape,
                             figsize=(1.1 * shape[1] + (1.2 if rows else 0), 1.1 * shape[0] + 0.3),
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
    _save_figure(fig, path)


def save_rows(rows, path, title):
    """rows [N, K, C, H, W] in [-1, 1], K images each (an interpolation): the first EDIT_ROWS as
    one numbered row each."""
    save_labelled([(f"{i + 1}", r) for i, r in enumerate(rows[:EDIT_ROWS])], path, title,
                  rows=True)


def save_forward_figure(images, diffusion, path, seed=0):
    """A few real uint8 images (rows) noised to increasing t (columns); diffusion must be on the
    CPU."""
    times = sorted({min(round(f * diffusion.timesteps), diffusion.timesteps - 1)
                    for f in FORWARD_FRACTIONS})
    x0 = to_model_range(images.cpu())
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    columns = [(f"t = {t}", diffusion.q_sample(x0, torch.full((len(x0),), t), noise))
               for t in times]
    save_labelled(columns, path, f"q(x_t | x_0), {diffusion.config.schedule} schedule")


def progress_path(out, step):
    return out / "progress" / f"step-{step:06d}.png"


def save_progress(model, diffusion, out, step, seed=0):
    """out/progress/step-NNNNNN.png: PROGRESS_N images of the weights at `step`, unguided, from the
    same noise at every step (seed, drawn by its own generator: the run's draws are untouched).
    model is read in eval mode, then left as it was."""
    classes = model.config.num_classes
    labels = torch.arange(PROGRESS_N) % classes if classes else None
    training = model.training
    try:
        batches = generate_batches(model.eval(), diffusion, PROGRESS_N, seed, progress=False,
                                   sampler=SamplerConfig(steps=PROGRESS_STEPS), labels=labels)
        images = torch.cat(list(batches))
    finally:
        model.train(training)
    save_grid(images, progress_path(out, step), nrow=PROGRESS_N)


def save_progress_figure(out, steps):
    """out/progress.png: the progress grids of `steps` that were drawn, one labelled row each, at
    most PROGRESS_ROWS of them spread evenly (the first and last kept). Returns its path, or None
    where no grid was drawn."""
    drawn = [s for s in steps if progress_path(out, s).exists()]
    if not drawn:
        return None
    if len(drawn) > PROGRESS_ROWS:
        drawn = [drawn[round(i * (len(drawn) - 1) / (PROGRESS_ROWS - 1))]
                 for i in range(PROGRESS_ROWS)]
    plt = _pyplot()
    fig, axes = plt.subplots(len(drawn), 1, figsize=(8, 0.85 * len(drawn) + 0.5),
                                   squeeze=False)
    for ax, step in zip(axes[:, 0], drawn):
        ax.imshow(plt.imread(progress_path(out, step)))
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(f"step {step:,}", fontsize=9, rotation=0, ha="right", va="center")
    fig.suptitle("The same noise through training (EMA weights, unguided)", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, out / "progress.png")
    return out / "progress.png"


def save_loss_history(history, output_dir, name, smooth=100):
    """history: [(step, epoch, loss)], one per step -> output_dir/loss.csv, and loss.png titled with
    the loss's name."""
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["step", "epoch", "loss"])
    w.writerows(history)
    atomic_write(output_dir / "loss.csv", lambda f: f.write(text.getvalue().encode()))
    if not history:
        return
    steps, _, losses = map(torch.tensor, zip(*history))
    k = min(smooth, len(losses))
    fig, ax = _pyplot().subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.5, alpha=0.3, label="per step")
    ax.plot(steps[k - 1:], losses.unfold(0, k, 1).mean(1), lw=1.5, label=f"mean of {k} steps")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"Training loss ({name})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, output_dir / "loss.png")


def plot_guidance(rows, path):
    """evaluate.py's rows: FID and conditional accuracy against the guidance scale w, on two
    axes."""
    w = [r["guidance"] for r in rows]
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    ax.plot(w, [r["fid"] for r in rows], "o-", color="C0")
    ax.set(xlabel="guidance scale w", ylabel="FID (classifier features)",
           title="Classifier-free guidance")
    ax.tick_params(axis="y", labelcolor="C0")
    ax.yaxis.label.set_color("C0")
    acc = ax.twinx()
    acc.plot(w, [100 * r["accuracy"] for r in rows], "s--", color="C1")
    acc.set_ylabel("conditional accuracy (%)", color="C1")
    acc.tick_params(axis="y", labelcolor="C1")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_sweep(rows, path):
    """evaluate.py's rows (the first is the real-image floor): FID against network evaluations, one
    line per sampler and eta (and checkpoint, if several), solid for EMA weights and dashed for raw
    ones; distilled students (distill.py), one point each, share one line per method."""
    # a line per checkpoint
    several = len({r.get("checkpoint") for r in rows[1:] if not r.get("student")}) > 1
    def label(r):
        if r.get("student"):
            names = {"dmd": f"DMD generators ({r['sampler']})", "ect": "ECT model, any --steps"}
            return names.get(r.get("method"), "progressive-distillation students")
        eta = f" eta={r['eta']:g}" if r.get("eta") is not None else ""
        return (r["checkpoint"] + ": ") * several + r["sampler"] + eta
    samplers = sorted({label(r) for r in rows[1:]})
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for weights, line in (("ema", "-"), ("raw", "--")):
        for i, name in enumerate(samplers):
            pts = sorted((r["nfe"], r["fid"]) for r in rows[1:]
                         if label(r) == name and r["weights"] == weights)
            if pts:
                ax.plot(*zip(*pts), "os^dv"[i % 5] + line, color=f"C{i}",
                        label=f"{name} ({weights})")
    ax.axhline(rows[0]["fid"], color="gray", ls=":", label="real train images")
    ax.set(xscale="log", xlabel="network evaluations per image (NFE)",
           ylabel="FID (classifier features)", title="Sample quality against sampling cost")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


def picture_labels(num_classes, n, label=None, by_class=True):
    """(labels [N] or None, images per class or None): the classes draw_pictures() draws, N = n,
    or ceil(n / 10) of each class where a conditional model is drawn by class."""
    if num_classes and label is not None:
        return torch.full((n,), label), None
    if num_classes and by_class:
        per_class = -(-n // len(CLASSES))
        return torch.arange(len(CLASSES)).repeat_interleave(per_class), per_class
    return None, None


def draw_pictures(model, diffusion, n, out, seed=0, label=None, guidance=GUIDANCE, learned=None,
                  by_class=True, on_batch=None, **kw):
    """The pictures a run draws: n images, the first SHOWN of them in out/samples.png. A conditional
    model given no label draws ceil(n / 10) of each class instead, also as out/samples_by_class.png
    with a labelled row per class (the first SHOWN_PER_CLASS of each); by_class=False: n images
    with no class asked for, as an unconditional model draws. learned: a distilled student's
    guidance scale, which it applies itself: none is added to it. on_batch(images): called with
    every batch in order; only the images shown are kept, so memory stays flat in n.
    kw: generate_batches()'s options (sampler, batch_size, callback, ...).
    Returns (the number of images drawn, the images shown)."""
    guidance = 0.0 if learned is not None else guidance
    labels, per_class = picture_labels(model.config.num_classes, n, label, by_class)
    total = len(labels) if labels is not None else n
    # the images kept: the first SHOWN, or the first SHOWN_PER_CLASS of each class
    index = torch.arange(total)
    keep = index < SHOWN if not per_class else index % per_class < SHOWN_PER_CLASS
    shown, start = [], 0
    for batch in generate_batches(model, diffusion, total, seed, labels=labels,
                                  guidance=guidance if labels is not None else 0.0, **kw):
        if on_batch is not None:
            on_batch(batch)
        shown.append(batch[keep[start:start + len(batch)]])
        start += len(batch)
    images, columns = torch.cat(shown), min(per_class or 8, SHOWN_PER_CLASS)
    save_grid(images, out / "samples.png", nrow=columns)
    if per_class:
        student = "a student distilled at " * (learned is not None)
        w = guidance if learned is None else learned
        save_labelled(list(zip(CLASSES, images.split(columns))), out / "samples_by_class.png",
                      f"One row per class, {student}guidance w = {w:g}", rows=True)
    return total, images


def save_students(ckpt_dir, path, device, seed, n=10):
    """students.png: one row per student, each drawing from the same starting noise (conditional
    ones one image of each class), so that a row's change shows what halving the steps cost."""
    rows = []
    for steps, (ckpt, _) in sorted(saved_rounds(ckpt_dir).items(), reverse=True):
        model, diffusion = build_model(ckpt, device)
        labels = torch.arange(n) % len(CLASSES) if model.config.num_classes else None
        sampler = SamplerConfig(**ckpt["distillation"]["sampler"])
        images = generate(model, diffusion, n, seed, sampler, labels=labels, progress=False)
        rows.append((f"{steps} step{'s' * (steps > 1)}", images))
    save_labelled(rows, path, "Distilled students, the same noise in each row", rows=True)
    print(f"wrote {path}")
