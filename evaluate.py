"""Score samples offline: `python evaluate.py --sampler dpm++ --steps 20 --n 10000` (see --help).

Features come from a small CNN classifier trained on the Fashion-MNIST train set (cached in
checkpoints/classifier.pt). Generated images are compared with the 10,000 test images by FID,
KID and precision/recall, and the classifier's predicted classes show whether any class is
missing. Real train images scored the same way give the floor a perfect generator would reach.
"""
import argparse
import hashlib
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from checkpoint import atomic_save, atomic_write, build_model, load_checkpoint
from cli import (DEFAULT_SAMPLER, GUIDANCE, ArgumentParser, UserError, check, check_writable, first_line,
                 pick_device, run_command, sampler_settings)
from data import CLASSES, load_fashion_mnist, to_model_range
from samplers import SAMPLERS
from figures import plot_guidance, plot_sweep
from sample import generate

CLASSIFIER_FORMAT = "fashion-mnist-classifier/2"
CLASSIFIER_SETTINGS = {"epochs": 5, "seed": 0, "batch_size": 128, "lr": 3e-3, "features": 128}
# ETA left out: the sampler's default, what sample.py draws with (dpm++: 1, the SDE form; ddim: 0).
GRID = ("ddpm:1000", "ddpm:100", "ddim:50", "ddim:20", "ddim:10", "dpm++:20:0", "dpm++:10:0", "dpm++:20", "dpm++:10")


class Classifier(nn.Module):
    """Two conv-conv-pool stages and a 128-wide hidden layer, whose activations are the features."""

    def __init__(self, features=128):
        super().__init__()

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(*stage(1, 32), *stage(32, 64), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, features), nn.BatchNorm1d(features), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(features, 10))

    def forward(self, x):
        """[B, 1, 28, 28] in [-1, 1] -> (features [B, 128], logits [B, 10])."""
        f = self.body(x)
        return f, self.head(f)


def train_classifier(images, labels, test_images, test_labels, epochs, seed, batch_size, lr, features, device="cpu"):
    """Adam with a one-cycle learning rate and random 2-pixel shifts; returns (model, test accuracy)."""
    torch.manual_seed(seed)
    model = Classifier(features).to(device)
    steps_per_epoch = len(images) // batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="training the evaluation classifier", disable=None)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(images), generator=g)[: steps_per_epoch * batch_size].view(-1, batch_size):
            x = to_model_range(images[idx]).to(device)
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()  # the same shift for the whole batch
            x = torch.roll(x, (dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x)[1], labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    _, logits = embed(model, to_model_range(test_images))
    return model.eval(), (logits.argmax(1) == test_labels).float().mean().item()


@torch.no_grad()
def embed(model, x, batch_size=500):
    """Features [N, 128] and logits [N, 10] of images [N, 1, 28, 28] in [-1, 1], on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    return torch.cat([f for f, _ in out]).cpu(), torch.cat([lg for _, lg in out]).cpu()


def fingerprint(*tensors):
    """A short hash of the tensors' bytes: which data a classifier was trained and tested on."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_classifier(path, train_x, train_y, test_x, test_y, device):
    """The classifier cached at path if it was trained on this data with these settings, else a new one
    trained (about 5 minutes on 2 CPU cores) and cached; a damaged or stale cache is said and replaced."""
    key = {"format": CLASSIFIER_FORMAT, "data": fingerprint(train_x, train_y, test_x, test_y), **CLASSIFIER_SETTINGS}
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                model = Classifier(CLASSIFIER_SETTINGS["features"])
                model.load_state_dict(saved["model"])
                return model.to(device).eval(), saved["test_accuracy"]
            print(f"{path} was trained on other data or settings; training a new one")
        except Exception as e:  # truncated, garbage, foreign: the cache is only a cache
            print(f"{path} is damaged ({first_line(e, 100)}); training a new one")
    model, accuracy = train_classifier(train_x, train_y, test_x, test_y, device=device, **CLASSIFIER_SETTINGS)
    atomic_save({"key": key, "model": model.state_dict(), "test_accuracy": accuracy}, path)
    print(f"trained the evaluation classifier: test accuracy {accuracy:.2%}; cached in {path}")
    return model, accuracy


# ---------------------------------------------------------------------------- metrics (pure tensor math)

def frechet_distance(a, b):
    """FID between feature sets a [N, D] and b [M, D] as Gaussians (Heusel et al. 2017, eq. 6):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(s_a)
    root_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which is symmetric: eigenvalues are real
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def kernel_inception_distance(a, b, subsets=50, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / D + 1)^3, averaged over subsets."""
    a, b = a.double(), b.double()
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    kernel = lambda x, y: (x @ y.T / a.shape[1] + 1) ** 3
    values = []
    for _ in range(subsets):
        x, y = a[torch.randperm(len(a), generator=g)[:m]], b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy = kernel(x, x), kernel(y, y)
        values.append((kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
                      - 2 * kernel(x, y).mean())
    return torch.stack(values).mean().item()


def _kth_neighbour_radius(x, k, chunk=1000):
    """Distance from each row of x to its k-th nearest other row: [N]."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _covered(points, centres, radii, chunk=1000):
    """For each point, whether it lies inside any ball (centre, radius): [N] bool."""
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii).any(1) for i in range(0, len(points), chunk)])


def precision_recall(real, fake, k=3):
    """Improved precision and recall, Kynkaanniemi et al. 2019: the share of fake samples inside the
    real k-NN manifold, and of real samples inside the fake one."""
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_neighbour_radius(real, k)).float().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radius(fake, k)).float().mean().item()
    return precision, recall


def score(features, logits, reference, labels=None, reference_labels=None):
    """Every metric of one image set against the reference (test-set) features, as a dict. With the
    classes the images were asked for (labels): how often the classifier agrees, and FID per class."""
    precision, recall = precision_recall(reference, features)
    counts = torch.bincount(logits.argmax(1), minlength=10).tolist()
    result = {"fid": frechet_distance(features, reference), "kid": kernel_inception_distance(features, reference),
              "precision": precision, "recall": recall, "classes": dict(zip(CLASSES, counts))}
    if labels is not None:
        result["accuracy"] = (logits.argmax(1) == labels).float().mean().item()
        result["fid_per_class"] = {name: frechet_distance(features[labels == c], reference[reference_labels == c])
                                   for c, name in enumerate(CLASSES) if (labels == c).sum() > 1}
    return result


# ---------------------------------------------------------------------------- command line

def print_table(rows, header=False):
    if header:
        print(f"{'images':<26}{'NFE':>6}{'img/s':>9}{'FID':>9}{'KID x1e3':>10}{'prec.':>7}{'recall':>7}"
              f"{'cond.acc':>9}  fewest class")
    for r in rows:
        rarest = min(r["classes"], key=r["classes"].get)
        share = r["classes"][rarest] / max(1, sum(r["classes"].values()))
        rate = f"{r['images_per_s']:.1f}" if r.get("images_per_s") else "-"
        accuracy = f"{r['accuracy']:.1%}" if "accuracy" in r else "-"
        print(f"{r['name']:<26}{r.get('nfe') or '-':>6}{rate:>9}{r['fid']:>9.2f}{1e3 * r['kid']:>10.2f}"
              f"{r['precision']:>7.3f}{r['recall']:>7.3f}{accuracy:>9}  {rarest} {share:.1%}")


def parse_grid(entries, timesteps):
    """'SAMPLER:STEPS[:ETA]' strings -> sampler_settings() dicts, checked by the rules sample.py applies to
    its flags; a left-out ETA is the sampler's default, as in sample.py."""
    grid = []
    for entry in entries:
        try:
            name, steps, *rest = entry.split(":")
            if name not in SAMPLERS or not steps.isdigit() or len(rest) > 1:
                raise ValueError
            grid.append(sampler_settings(name, timesteps, int(steps), float(rest[0]) if rest else None))
        except (ValueError, UserError):
            raise UserError(f"--grid entry {entry!r} is not SAMPLER:STEPS[:ETA] with SAMPLER in {sorted(SAMPLERS)}, "
                            f"STEPS in 1..{timesteps} and ETA in [0, 1] (ddim and dpm++ only)") from None
    return grid


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", nargs="+", default=["checkpoints"], help="checkpoint file, or folder to take the newest from "
      "(checkpoints); --sweep takes several and compares their EMA weights")
    a("--sampler", choices=sorted(SAMPLERS), help=f"sampler for a single evaluation ({DEFAULT_SAMPLER})")
    a("--steps", type=int, help="sampler steps for a single evaluation (the sampler's default, as in sample.py)")
    a("--eta", type=float, help="ddim and dpm++: noise, 0 (ODE) to 1 (SDE), for a single evaluation "
                                "(the sampler's default, as in sample.py: dpm++ 1, ddim 0)")
    a("--n", type=int, help="images to generate and score per evaluation (10000)")
    a("--no-ema", action="store_true", help="score the raw weights instead of their moving average")
    a("--sweep", action="store_true", help="score every --grid entry with EMA and raw weights, plot FID vs NFE")
    a("--grid", nargs="+", help=f"SAMPLER:STEPS[:ETA] entries for --sweep ({' '.join(GRID)})")
    a("--guidance", type=float, help=f"conditional models: guidance scale w ({GUIDANCE:g})")
    a("--guidance-sweep", type=float, nargs="+", metavar="W",
      help="conditional models: score each guidance scale, plot FID and accuracy against it")
    a("--unconditional", action="store_true",
      help="conditional models: sample with the 'no class' token, as an unconditional model would")
    a("--bpd", action="store_true", help="instead of sampling: the test set's negative log-likelihood bound in "
                                         "bits/dim, estimated over all of it and exact on --bpd-exact images")
    a("--bpd-exact", type=int, default=100, metavar="N",
      help="--bpd: test images whose whole bound is computed, T network evaluations each (100; 0 skips)")
    a("--seed", type=int, default=0, help="seed for generation and for the real-image subset (0)")
    a("--batch-size", type=int, help="images generated at once (64 on CPU, 1000 on GPU)")
    a("--data-dir", default="data", help="where Fashion-MNIST is (data)")
    a("--classifier-dir", help="where classifier.pt is cached (checkpoints)")
    a("--output-dir", default="output", help="where eval.json and fid_vs_steps.png go (output)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    return p


def plan(args, timesteps, conditional, both=True, distilled=None):
    """[(weights, sampler settings, guidance)] to score, after refusing flags that would be ignored.
    both: a sweep scores the raw weights as well as the EMA. distilled: a student's record (distill.py)."""
    check(not (distilled and (args.guidance is not None or args.guidance_sweep)), "a distilled student samples with "
          "the guidance it learned: drop --guidance and --guidance-sweep")
    single = [f"--{k.replace('_', '-')}" for k in ("sampler", "steps", "eta", "no_ema") if getattr(args, k)
              not in (None, False)]
    check(not (args.sweep and single), f"--sweep scores every --grid entry with both weights: drop {', '.join(single)}")
    check(args.sweep or args.grid is None, "--grid lists what --sweep scores: add --sweep, or drop --grid")
    check(not (args.sweep and args.guidance_sweep), "--sweep and --guidance-sweep are separate evaluations: give one")
    check(conditional or (args.guidance is None and not args.guidance_sweep and not args.unconditional),
          "--guidance, --guidance-sweep and --unconditional need a class-conditional checkpoint "
          "(train.py --conditional)")
    check(not (args.unconditional and (args.guidance is not None or args.guidance_sweep)),
          "--unconditional samples with no class, where guidance has nothing to steer: drop the guidance flag")
    check(args.guidance is None or not args.guidance_sweep, "--guidance-sweep scores its own scales: drop --guidance")
    check(min(args.guidance_sweep or [args.guidance or 0]) >= 0, "guidance scales must be 0 or more")
    guidance = GUIDANCE if args.guidance is None else args.guidance
    if args.sweep and distilled:  # a student beside its teacher: scored with its own sampler, once
        return [("ema", sampler_settings(None, timesteps, distilled=distilled), 0.0)]
    if args.sweep:
        capped = lambda name, steps, *eta: ":".join([name, str(min(int(steps), timesteps)), *eta])  # T < 1000
        grid = args.grid or list(dict.fromkeys(capped(*entry.split(":")) for entry in GRID))
        weights = ("ema", "raw") if both else ("ema",)
        return [(w, settings, guidance) for w in weights for settings in parse_grid(grid, timesteps)]
    settings = sampler_settings(args.sampler, timesteps, args.steps, args.eta, distilled)
    return [("raw" if args.no_ema else "ema", settings, w) for w in (args.guidance_sweep or [0.0 if distilled else
                                                                                            guidance])]


def likelihood(args, ckpt, device):
    """--bpd: the bound in bits per dimension on the test set, estimated (unbiased, two network evaluations
    per image) over all of it with its standard error, and exact on the first --bpd-exact images."""
    sampling = [f"--{k.replace('_', '-')}" for k in ("n", "sampler", "steps", "eta", "sweep", "grid", "guidance",
                                                      "guidance_sweep", "unconditional", "classifier_dir")
                if getattr(args, k) not in (None, False)]
    check(not sampling, f"--bpd scores the model's likelihood and draws no samples: drop {', '.join(sampling)}")
    check(args.bpd_exact >= 0, f"--bpd-exact must be 0 (skip) or more, got {args.bpd_exact}")
    check(ckpt["distillation"] is None, "--bpd: a distilled student has learned its own few steps, not the "
                                        "reverse process the bound is made of; score its teacher")
    out = check_writable(args.output_dir, "--output-dir")
    model, diffusion = build_model(ckpt, device, ema=not args.no_ema)
    x = to_model_range(load_fashion_mnist(args.data_dir, False)[0])
    g = torch.Generator(device).manual_seed(args.seed)
    batch = args.batch_size or (1000 if device.type == "cuda" else 250)
    result = {"checkpoint": args.checkpoint[0], "step": ckpt["step"], "weights": "raw" if args.no_ema else "ema"}

    def summary(values, started):  # per-image bits/dim [N] -> their mean, its standard error, the time taken
        n = len(values)
        return {"images": n, "bpd": values.mean().item(), "seconds": time.perf_counter() - started,
                "standard_error": (values.std() / n**0.5).item() if n > 1 else None}

    started, values = time.perf_counter(), []
    for i in tqdm(range(0, len(x), batch), desc="bits/dim, estimate", disable=None):
        values.append(diffusion.bits_per_dim_estimate(model, x[i:i + batch].to(device), g).cpu().double())
    estimate = result["estimate"] = summary(torch.cat(values), started)
    print(f"bits/dim, estimated over the {len(x)} test images: {estimate['bpd']:.4f} +- "
          f"{estimate['standard_error']:.4f} (1 standard error), {estimate['seconds']:.0f} s")
    if args.bpd_exact:
        started, values, n = time.perf_counter(), [], min(args.bpd_exact, len(x))
        with tqdm(total=n * diffusion.timesteps, unit="eval", desc="bits/dim, exact", disable=None) as bar:
            for i in range(0, n, batch):
                part = x[i:min(i + batch, n)].to(device)
                total = diffusion.bits_per_dim(model, part, g, callback=lambda t: bar.update(len(part)))
                values.append(total.cpu().double())
        exact = result["exact"] = summary(torch.cat(values), started)
        print(f"bits/dim, exact bound on the first {n} test images: {exact['bpd']:.4f} (their spread: "
              f"+- {exact['standard_error'] or 0:.4f}), {exact['seconds']:.0f} s")
    atomic_write(out / "bpd.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"wrote {out / 'bpd.json'}")


def run(args):
    check(args.batch_size is None or args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    check(len(args.checkpoint) == 1 or args.sweep, "only --sweep compares several checkpoints: add it, or give one "
                                                   "--checkpoint")
    if args.bpd:
        return likelihood(args, load_checkpoint(args.checkpoint[0]), pick_device(args.device))
    args.n = 10000 if args.n is None else args.n  # defaults filled after --bpd has refused them
    args.classifier_dir = args.classifier_dir or "checkpoints"
    check(args.n >= 2, f"--n must be at least 2 (a covariance needs two images), got {args.n}")
    device = pick_device(args.device)
    ckpts = {path: load_checkpoint(path) for path in args.checkpoint}
    kinds = {ckpt["config"]["model"].get("num_classes", 0) > 0 for ckpt in ckpts.values()}
    check(len(kinds) == 1, "--sweep compares checkpoints of one kind: all class-conditional, or none")
    conditional = kinds.pop()
    check(not (args.grid and all(ckpt["distillation"] for ckpt in ckpts.values())), "--grid lists a teacher's "
          "samplers, and students sample with their own: add the teacher's checkpoint, or drop --grid")
    runs = [(path, *entry) for path, ckpt in ckpts.items()
            for entry in plan(args, ckpt["config"]["diffusion"]["timesteps"], conditional, len(ckpts) == 1,
                              ckpt["distillation"])]
    models = {(path, w): build_model(ckpts[path], device, ema=w == "ema") for path, w, *_ in runs}
    out, classifier_dir = check_writable(args.output_dir, "--output-dir"), check_writable(args.classifier_dir,
                                                                                         "--classifier-dir")
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(args.data_dir), load_fashion_mnist(args.data_dir, False)
    classifier, accuracy = load_classifier(classifier_dir / "classifier.pt", train_x, train_y, test_x, test_y, device)
    print(f"evaluation classifier: test accuracy {accuracy:.2%}")

    reference, _ = embed(classifier, to_model_range(test_x))
    subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))[:args.n]
    started = time.perf_counter()
    floor = {"name": "real train images", **score(*embed(classifier, to_model_range(train_x[subset])), reference,
                                                  train_y[subset] if conditional else None, test_y)}
    score_seconds = time.perf_counter() - started
    rows = [floor]
    print_table(rows, header=True)

    conditional = conditional and not args.unconditional
    labels = torch.arange(args.n) % 10 if conditional else None  # every class equally often
    for path, weights, settings, guidance in runs:
        model, diffusion = models[path, weights]
        steps_seen = set()
        started = time.perf_counter()
        images = generate(model, diffusion, args.n, args.seed, batch_size=args.batch_size, labels=labels,
                          guidance=guidance, callback=lambda i, t, x, x0: steps_seen.add(i), **settings)
        seconds = time.perf_counter() - started
        eta = f" eta={settings['eta']:g}" if "eta" in settings else ""
        learned = ckpts[path]["distillation"]  # a student samples with the guidance it learned
        guidance = learned["guidance"] if learned else guidance
        name = (f"{settings['sampler']}-{settings['steps']}{eta}{' student' * bool(learned)} {weights}"
                + (f" w={guidance:g}" if conditional else ""))
        name = f"{path} {name}" if len(ckpts) > 1 else name
        row = {"name": name, "checkpoint": path, **settings, "weights": weights, "guidance": guidance, "nfe": len(steps_seen),
               "images_per_s": args.n / seconds, **score(*embed(classifier, images), reference, labels, test_y)}
        rows.append(row)
        print_table([row])

    steps = {path: ckpt["step"] for path, ckpt in ckpts.items()}  # one checkpoint: its path and step, as before
    where = {"checkpoint": args.checkpoint[0], "step": steps[args.checkpoint[0]]} if len(steps) == 1 else \
        {"checkpoint": args.checkpoint, "step": steps}
    result = {**where, "n": args.n, "seed": args.seed, "conditional": bool(conditional),
              "classifier_test_accuracy": accuracy, "score_seconds_per_set": score_seconds, "rows": rows}
    atomic_write(out / "eval.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"scoring {args.n} images took {score_seconds:.1f} s (features and metrics, generation excluded); "
          f"wrote {out / 'eval.json'}")
    if args.sweep:
        plot_sweep(rows, out / "fid_vs_steps.png")
        print(f"wrote {out / 'fid_vs_steps.png'}")
    if args.guidance_sweep:
        plot_guidance(rows[1:], out / "guidance.png")
        print(f"wrote {out / 'guidance.png'}")


def main(argv=None):
    run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
