"""Score samples offline: `python evaluate.py --sampler dpm++ --steps 20 --n 10000` (see --help).

Features come from a small CNN classifier trained on the Fashion-MNIST train set (cached in
checkpoints/classifier.pt). Generated images are compared with the 10,000 test images by FID,
KID and precision/recall, and the classifier's predicted classes show whether any class is
missing. Real train images scored the same way give the floor a perfect generator would reach.
A thin command line: the classifier and the metrics are metrics.py's, the drawing samplers.generate.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import build_guide, build_model, load_checkpoint
from cli import (MAX_BATCH, MAX_IMAGES, ArgumentParser, UserError, check, check_writable,
                 finite, given, interrupted_by_signals, run_command, seed, whole)
from consistency import consistency_model
from data import load_fashion_mnist, to_model_range
from device import pick_device
from editing import MASKS, check_jumps, inpainting_accuracy, mask_from_flag
from figures import plot_guidance, plot_sweep
from files import atomic_write
from metrics import NEIGHBOURS, embed, load_classifier, score, table_rows
from samplers import (AUTOGUIDANCE, GUIDANCE, SAMPLERS, EpsScaled, SamplerConfig, autoguided,
                      generate)
from unet import counting_evaluations

# ETA left out: the sampler's default, what sample.py draws with (dpm++: 1, the SDE form; ddim: 0).
GRID = ("ddpm:1000", "ddpm:100", "ddim:50", "ddim:20", "ddim:10", "dpm++:20:0", "dpm++:10:0",
        "dpm++:20", "dpm++:10")
# the most images one evaluation scores: they and their features are held in memory, and precision
# and recall compare them pairwise, in time quadratic in n
MAX_SCORED = 10**5


# ---------------------------------------------------------------------------- command line

def parse_grid(entries, timesteps):
    """'SAMPLER:STEPS[:ETA]' strings -> SamplerConfigs, checked by the rules sample.py applies to
    its flags; a left-out ETA is the sampler's default, as in sample.py."""
    grid = []
    for entry in entries:
        try:
            name, steps, *rest = entry.split(":")
            if name not in SAMPLERS or not steps.isdigit() or len(rest) > 1:
                raise ValueError
            eta = float(rest[0]) if rest else None
            grid.append(SamplerConfig.from_flags(name, int(steps), eta, timesteps))
        except (ValueError, UserError):
            raise UserError(f"--grid entry {entry!r} is not SAMPLER:STEPS[:ETA] with SAMPLER in "
                            f"{sorted(SAMPLERS)}, STEPS in 1..{timesteps} and ETA in [0, 1] "
                            f"(ddim and dpm++ only)") from None
    return grid


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--checkpoint", nargs="+", default=["checkpoints"],
      help="checkpoint file, or folder to take the newest from (checkpoints); --sweep takes "
           "several and compares their EMA weights")
    a("--sampler", choices=sorted(SAMPLERS),
      help=f"sampler for a single evaluation ({SamplerConfig.sampler})")
    a("--steps", type=int,
      help="sampler steps for a single evaluation (the sampler's default, as in sample.py; an "
           "ECT model takes any)")
    a("--eta", type=finite,
      help="ddim and dpm++: noise, 0 (ODE) to 1 (SDE), for a single evaluation (the sampler's "
           "default, as in sample.py: dpm++ 1, ddim 0)")
    a("--n", type=whole(NEIGHBOURS + 1, MAX_SCORED),
      help="images to generate and score per evaluation (10000)")
    a("--no-ema", action="store_true", help="score the raw weights instead of their moving average")
    a("--sweep", action="store_true",
      help="score every --grid entry with EMA and raw weights, plot FID vs NFE")
    a("--grid", nargs="+", help=f"SAMPLER:STEPS[:ETA] entries for --sweep ({' '.join(GRID)})")
    a("--guidance", type=finite, help=f"conditional models: guidance scale w ({GUIDANCE:g})")
    a("--guidance-sweep", type=finite, nargs="+", metavar="W",
      help="conditional models: score each guidance scale, plot FID and accuracy against it")
    a("--autoguidance", type=finite, metavar="W",
      help=f"guide the model with the early EMA its checkpoint keeps, at scale W; 0: off "
           f"({AUTOGUIDANCE:g} where the checkpoint keeps one, else 0)")
    a("--guide", metavar="PATH",
      help="--autoguidance: guide with this checkpoint's EMA (an earlier or smaller model of the "
           "same kind) instead of the guide the checkpoint keeps")
    a("--eps-scale", type=finite, metavar="F",
      help="eps-prediction models: divide the eps predicted by F at sampling (epsilon scaling, "
           "Ning et al. 2024; 1.002-1.01 in the paper)")
    a("--unconditional", action="store_true",
      help="conditional models: sample with the 'no class' token, as an unconditional model would")
    a("--inpaint", metavar="MASK",
      help=f"score inpainting instead: the classifier's accuracy on --n test images completed "
           f"where MASK ({', '.join(MASKS)}, or a 28x28 PNG) is white, against their labels")
    a("--jumps", type=whole(1, 100), default=1,
      help="--inpaint with --sampler ddpm: RePaint's resampling, each step taken this many times")
    a("--bpd", action="store_true",
      help="instead of sampling: the test set's negative log-likelihood bound in bits/dim, "
           "estimated over all of it and exact on --bpd-exact images")
    a("--bpd-exact", type=whole(0, MAX_IMAGES), default=100, metavar="N",
      help="--bpd: test images whose whole bound is computed, T network evaluations each "
           "(100; 0 skips)")
    a("--seed", type=seed, default=0, help="seed for generation and for the real-image subset (0)")
    a("--batch-size", type=whole(1, MAX_BATCH),
      help="images generated at once (64 on CPU, 1000 on GPU)")
    a("--data-dir", default="data", help="where Fashion-MNIST is (data)")
    a("--classifier-dir", help="where classifier.pt is cached (checkpoints)")
    a("--output-dir", default="output", help="where eval.json and fid_vs_steps.png go (output)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    return p


def plan(args, timesteps, conditional, both=True, student=None):
    """[(weights, SamplerConfig, guidance)] to score, after refusing flags that would be ignored.
    both: a sweep scores the raw weights as well as the EMA. student: a distilled student's
    record."""
    check(not (student and (args.guidance is not None or args.guidance_sweep)),
          "a distilled student samples with the guidance it learned: drop --guidance and "
          "--guidance-sweep")
    check(not (student and args.guide), "a distilled student samples as it was distilled, "
                                        "unguided: drop --guide")
    check(not (args.guide and args.autoguidance == 0),
          "--guide with --autoguidance 0 guides nothing: drop one of them")
    single = given(args, "sampler", "steps", "eta", "no_ema")  # --eta 0 is given too
    check(not (args.sweep and single), f"--sweep scores every --grid entry with both weights: drop "
                                       f"{', '.join(single)}")
    check(args.sweep or args.grid is None,
          "--grid lists what --sweep scores: add --sweep, or drop --grid")
    check(not (args.sweep and args.guidance_sweep), "--sweep and --guidance-sweep are separate "
                                                    "evaluations: give one")
    check(conditional or (args.guidance is None and not args.guidance_sweep
                          and not args.unconditional),
          "--guidance, --guidance-sweep and --unconditional need a class-conditional checkpoint "
          "(train.py --conditional)")
    check(not (args.unconditional and (args.guidance is not None or args.guidance_sweep)),
          "--unconditional samples with no class, where guidance has nothing to steer: drop the "
          "guidance flag")
    check(args.guidance is None or not args.guidance_sweep,
          "--guidance-sweep scores its own scales: drop --guidance")
    check(min(args.guidance_sweep or [args.guidance or 0]) >= 0,
          "guidance scales must be 0 or more")
    guidance = GUIDANCE if args.guidance is None else args.guidance
    own = SamplerConfig(**student["sampler"]) if student else None
    if args.sweep and student:  # a student beside its teacher: scored with its own sampler, once
        return [("ema", own, 0.0)]
    if args.sweep:
        capped = lambda name, steps, *eta: ":".join([name, str(min(int(steps), timesteps)), *eta])
        # T < 1000
        grid = args.grid or list(dict.fromkeys(capped(*entry.split(":")) for entry in GRID))
        weights = ("ema", "raw") if both else ("ema",)
        return [(w, sampler, guidance) for w in weights for sampler in parse_grid(grid, timesteps)]
    sampler = SamplerConfig.from_flags(args.sampler, args.steps, args.eta, timesteps, own,
                                       any_steps=consistency_model(student))
    scales = args.guidance_sweep or [0.0 if student else guidance]
    return [("raw" if args.no_ema else "ema", sampler, w) for w in scales]


def likelihood(args, ckpt, device):
    """--bpd: the bound in bits per dimension on the test set, estimated (unbiased, two network
    evaluations per image) over all of it with its standard error, and exact on the first
    --bpd-exact images."""
    sampling = given(args, "n", "sampler", "steps", "eta", "sweep", "grid", "guidance",
                     "guidance_sweep", "unconditional", "classifier_dir", "autoguidance", "guide",
                     "inpaint") + ["--jumps"] * (args.jumps > 1)
    check(not sampling, f"--bpd scores the model's likelihood and draws no samples: drop "
                        f"{', '.join(sampling)}")
    check(ckpt["distillation"] is None,
          "--bpd: a distilled student has learned its own few steps, not the reverse process the "
          "bound is made of; score its teacher")
    out = check_writable(args.output_dir, "--output-dir")
    model, diffusion = build_model(ckpt, device, ema=not args.no_ema)
    x = to_model_range(load_fashion_mnist(args.data_dir, False)[0])
    g = torch.Generator(device).manual_seed(args.seed)
    batch = args.batch_size or (1000 if device.type == "cuda" else 250)
    result = {"checkpoint": args.checkpoint[0], "step": ckpt["step"],
              "weights": "raw" if args.no_ema else "ema"}

    # per-image bits/dim [N] -> their mean, its standard error, the time taken
    def summary(values, started):
        n = len(values)
        return {"images": n, "bpd": values.mean().item(), "seconds": time.perf_counter() - started,
                "standard_error": (values.std() / n**0.5).item() if n > 1 else None}

    started, values = time.perf_counter(), []
    for i in tqdm(range(0, len(x), batch), desc="bits/dim, estimate", disable=None):
        values.append(
            diffusion.bits_per_dim_estimate(model, x[i:i + batch].to(device), g).cpu().double())
    estimate = result["estimate"] = summary(torch.cat(values), started)
    print(f"bits/dim, estimated over the {len(x)} test images: {estimate['bpd']:.4f} +- "
          f"{estimate['standard_error']:.4f} (1 standard error), {estimate['seconds']:.0f} s")
    if args.bpd_exact:
        started, values, n = time.perf_counter(), [], min(args.bpd_exact, len(x))
        with tqdm(total=n * diffusion.timesteps, unit="eval", desc="bits/dim, exact",
                  disable=None) as bar:
            for i in range(0, n, batch):
                part = x[i:min(i + batch, n)].to(device)
                total = diffusion.bits_per_dim(model, part, g,
                                               callback=lambda t: bar.update(len(part)))
                values.append(total.cpu().double())
        exact = result["exact"] = summary(torch.cat(values), started)
        print(f"bits/dim, exact bound on the first {n} test images: {exact['bpd']:.4f} "
              f"(their spread: +- {exact['standard_error'] or 0:.4f}), {exact['seconds']:.0f} s")
    atomic_write(out / "bpd.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"wrote {out / 'bpd.json'}")


def run(args):
    check(len(args.checkpoint) == 1 or args.sweep, "only --sweep compares several checkpoints: add "
                                                   "it, or give one --checkpoint")
    if args.bpd:
        return likelihood(args, load_checkpoint(args.checkpoint[0]), pick_device(args.device))
    args.n = 10000 if args.n is None else args.n  # defaults filled after --bpd has refused them
    mask = check_inpainting(args) if args.inpaint or args.jumps > 1 else None
    args.classifier_dir = args.classifier_dir or "checkpoints"
    device = pick_device(args.device)
    ckpts = {path: load_checkpoint(path) for path in args.checkpoint}
    kinds = {ckpt["config"]["model"].get("num_classes", 0) > 0 for ckpt in ckpts.values()}
    check(len(kinds) == 1,
          "--sweep compares checkpoints of one kind: all class-conditional, or none")
    conditional = kinds.pop()
    check(not (args.inpaint and ckpts[args.checkpoint[0]]["distillation"]), "--inpaint: this is a "
          "distilled student, which samples only with its own sampler: give its teacher")
    check(not (args.grid and all(ckpt["distillation"] for ckpt in ckpts.values())),
          "--grid lists a teacher's samplers, and students sample with their own: add the "
          "teacher's checkpoint, or drop --grid")
    runs = [(path, *entry) for path, ckpt in ckpts.items()
            for entry in plan(args, ckpt["config"]["diffusion"]["timesteps"], conditional,
                              len(ckpts) == 1, ckpt["distillation"])]
    guide = load_guide(args.guide) if args.guide else None
    models = {(path, w): eps_scaled(with_guide(ckpts[path], device, w, args.autoguidance, guide),
                                    args.eps_scale, ckpts[path]["distillation"])
              for path, w, *_ in runs}
    out = check_writable(args.output_dir, "--output-dir")
    (train_x, train_y), test = (load_fashion_mnist(args.data_dir),
                                load_fashion_mnist(args.data_dir, False))
    classifier, accuracy = load_classifier(Path(args.classifier_dir) / "classifier.pt", train_x,
                                           train_y, *test, device)
    print(f"evaluation classifier: test accuracy {accuracy:.2%}")
    if args.inpaint:
        return score_inpainting(args, mask, models[runs[0][:2]], classifier, test, out)
    reference, floor, score_seconds = score_real(args, classifier, train_x, train_y, test,
                                                 conditional)
    rows = [floor]
    print(*table_rows(rows, header=True), sep="\n")
    conditional = conditional and not args.unconditional
    try:
        with interrupted_by_signals():
            for path, weights, sampler, guidance in runs:
                rows.append(score_samples(args, ckpts, path, models[path, weights], weights,
                                          sampler, guidance, classifier, reference, test[1],
                                          conditional))
                print(*table_rows(rows[-1:]), sep="\n")
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the rows scored so far are kept
        if len(rows) > 1:
            write_results(args, ckpts, rows, conditional, accuracy, score_seconds, out, False)
        raise
    write_results(args, ckpts, rows, conditional, accuracy, score_seconds, out)


def check_inpainting(args):
    """--inpaint's mask [1, 1, H, W], after refusing what it cannot score: before a classifier is
    trained or a folder made."""
    check(args.inpaint, "--jumps is RePaint's resampling, for --inpaint: drop it")
    other = given(args, "sweep", "grid", "guidance", "guidance_sweep", "unconditional", "no_ema")
    check(not other, f"--inpaint scores one sampler of one teacher's EMA, given no class: drop "
                     f"{', '.join(other)}")
    check_jumps(args.jumps, args.sampler)
    return mask_from_flag(args.inpaint)


def score_inpainting(args, mask, built, classifier, test, out):
    """--inpaint: the first --n test images completed, classified, written to inpainting.json."""
    model, diffusion, autoguidance = built
    sampler = SamplerConfig.from_flags(args.sampler, args.steps, args.eta, diffusion.timesteps)
    x0, labels = to_model_range(test[0][:args.n]), test[1][:args.n]
    accuracy = inpainting_accuracy(lambda x: embed(classifier, x)[1].argmax(1), model, diffusion,
                                   x0, labels, mask, sampler, args.seed, args.jumps,
                                   args.batch_size or 64)
    print(", ".join(f"{k} {v:.2%}" for k, v in accuracy.items()))
    result = {"checkpoint": args.checkpoint[0], "mask": args.inpaint, "n": len(x0),
              "seed": args.seed, **sampler.to_dict(), "jumps": args.jumps,
              "autoguidance": autoguidance, "eps_scale": args.eps_scale, "accuracy": accuracy}
    atomic_write(out / "inpainting.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"wrote {out / 'inpainting.json'}")


def load_guide(path):
    """--guide's checkpoint, its errors naming --guide."""
    try:
        return load_checkpoint(path)
    except UserError as e:
        raise UserError(f"--guide: {e}") from None


def with_guide(ckpt, device, weights, w, other=None):
    """(model, diffusion, autoguidance scale): the weights asked for, guided as --autoguidance
    says by the early EMA the checkpoint keeps, or by the EMA of the checkpoint `other`."""
    model, diffusion = build_model(ckpt, device, ema=weights == "ema")
    if other is None:
        guide = build_guide(ckpt, device)
    else:
        guide, guide_diffusion = build_model(other, device)
        same = lambda m: (m.config.num_classes, m.config.in_channels, m.config.image_size)
        check(same(guide) == same(model) and guide_diffusion.config == diffusion.config,
              "--guide must be a checkpoint of the same kind (classes, image size, diffusion) as "
              "the one scored")
    model, w = autoguided(model, guide, w)
    return model, diffusion, w


def eps_scaled(built, factor, student):
    """(model, diffusion, w) with the model's eps divided by --eps-scale `factor` (None: as is)."""
    if factor is None:
        return built
    model, diffusion, w = built
    check(diffusion.config.prediction == "eps" and not student,
          "--eps-scale scales an eps prediction, and this checkpoint predicts "
          f"{'v (a distilled student)' if student else diffusion.config.prediction}: "
          f"drop --eps-scale")
    check(factor > 0, f"--eps-scale must be above 0 (about 1.005), got {factor}")
    return EpsScaled(model, factor), diffusion, w


def score_real(args, classifier, train_x, train_y, test, conditional):
    """(the test set's features, the row of --n real train images scored against them, the seconds
    that scoring took): the floor a perfect generator would reach."""
    test_x, test_y = test
    reference, _ = embed(classifier, to_model_range(test_x))
    subset = torch.randperm(len(train_x),
                            generator=torch.Generator().manual_seed(args.seed))[:args.n]
    started = time.perf_counter()
    features, logits = embed(classifier, to_model_range(train_x[subset]))
    floor = {"name": "real train images",
             **score(features, logits, reference, train_y[subset] if conditional else None, test_y)}
    return reference, floor, time.perf_counter() - started


def score_samples(args, ckpts, path, built, weights, sampler, guidance, classifier, reference,
                  test_y, conditional):
    """One row: --n images drawn from one checkpoint's weights with one sampler, scored."""
    model, diffusion, autoguidance = built
    labels = torch.arange(args.n) % 10 if conditional else None  # every class equally often
    started = time.perf_counter()
    with counting_evaluations(model) as evaluated:
        images = generate(model, diffusion, args.n, args.seed, sampler,
                          batch_size=args.batch_size, labels=labels, guidance=guidance)
    seconds = time.perf_counter() - started
    student = ckpts[path]["distillation"]
    guidance = student["guidance"] if student else guidance  # a student's is the one it learned
    eta = f" eta={sampler.eta:g}" if sampler.eta is not None else ""
    name = (f"{sampler.sampler}-{sampler.steps}{eta}{' student' * bool(student)} {weights}"
            + (f" w={guidance:g}" if conditional else "")
            + (f" ag={autoguidance:g}" if autoguidance else "")
            + (f" eps/{args.eps_scale:g}" if args.eps_scale is not None else ""))
    name = f"{path} {name}" if len(ckpts) > 1 else name
    return {"name": name, "checkpoint": path, **sampler.to_dict(), "student": bool(student),
            "method": student.get("method", "progressive") if student else None,
            "weights": weights, "guidance": guidance, "autoguidance": autoguidance,
            "eps_scale": args.eps_scale,
            "nfe": evaluated[0] // args.n,  # network evaluations per image
            "images_per_s": args.n / seconds,
            **score(*embed(classifier, images), reference, labels, test_y)}


def write_results(args, ckpts, rows, conditional, accuracy, score_seconds, out, complete=True):
    """eval.json, and the sweep's figures; complete=False: the rows scored before an interrupt."""
    # one checkpoint: its path and step
    steps = {path: ckpt["step"] for path, ckpt in ckpts.items()}
    first = args.checkpoint[0]
    where = ({"checkpoint": first, "step": steps[first]} if len(steps) == 1 else
             {"checkpoint": args.checkpoint, "step": steps})
    result = {**where, "n": args.n, "seed": args.seed, "conditional": bool(conditional),
              "classifier_test_accuracy": accuracy, "score_seconds_per_set": score_seconds,
              "guide": args.guide, "complete": complete, "rows": rows}
    atomic_write(out / "eval.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"scoring {args.n} images took {score_seconds:.1f} s (features and metrics, generation "
          f"excluded); wrote {out / 'eval.json'}"
          + ("" if complete else f" with the {len(rows) - 1} rows scored before the interrupt"))
    if args.sweep:
        plot_sweep(rows, out / "fid_vs_steps.png")
        print(f"wrote {out / 'fid_vs_steps.png'}")
    if args.guidance_sweep:
        plot_guidance(rows[1:], out / "guidance.png")
        print(f"wrote {out / 'guidance.png'}")


def main(argv=None):
    sys.stdout.reconfigure(line_buffering=True)  # each row reaches a log or a pipe as it is scored
    run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
