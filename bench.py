"""Measure speed: `python bench.py` (see --help).
Run it alone: another busy process skews every number.

Training images/s of the training loop as train.py runs it, in each model-path setting, against a
plain baseline (torchvision DataLoader with per-image transforms, fp32, default Adam); sampling
images/s of every sampler; FLOPs per image, counted; and the fraction of this machine's fp32
matrix-multiply peak, measured in the same run. A thin command line: what it times is training.py's
loop and samplers.generate, the code the other commands run.
"""
import argparse
import contextlib
import json
import time
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
from cli import MAX_IMAGES, MAX_STEPS, ArgumentParser, check_output, is_json, run_command, whole
from config import preset_configs
from device import default_batch_size, pick_device, tf32
from diffusion import Diffusion, DiffusionConfig
from files import atomic_write
from methods import denoising
from samplers import SAMPLER_DEFAULTS, SamplerConfig, generate
from training import measure_rate
from unet import UNet


def matmul_peak(device, n=None, repeats=10):
    """fp32 matrix-multiply GFLOP/s (TF32 off), the reference for 'fraction of peak'."""
    n = n or (8192 if device.type == "cuda" else 2048)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ a
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    sync(device)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_image(model, diffusion, batch=16):
    """(training step: forward and backward of the loss, sampling: one forward), per image."""
    x = torch.randn(batch, 1, 28, 28)
    t = torch.randint(0, diffusion.timesteps, (batch,))
    with FlopCounterMode(display=False) as counter:
        diffusion.loss(model, x, t, torch.randn_like(x)).mean().backward()
    train_flops = counter.get_total_flops() / batch
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return train_flops, counter.get_total_flops() / batch


def plain_rate(model_cfg, cfg, data_dir, device, steps, warmup):
    """The baseline a first DDPM script would write: a torchvision DataLoader of PIL images with
    ToTensor and Normalize, fp32, torch.optim.Adam's defaults, no EMA, no clipping."""
    import torchvision
    from torchvision import transforms

    torch.manual_seed(cfg.seed)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    data.prepare_fashion_mnist(data_dir)
    dataset = torchvision.datasets.FashionMNIST(data_dir, train=True, transform=to_tensor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                         drop_last=True)
    model, diffusion = UNet(model_cfg).to(device), Diffusion(DiffusionConfig()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for i, (x0, _) in enumerate(loader):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        x0 = x0.to(device)
        t = torch.randint(0, diffusion.timesteps, (len(x0),), device=device)
        loss = diffusion.loss(model, x0, t, torch.randn_like(x0)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i == warmup + steps - 1:
            break
    sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def sample_rate(model, diffusion, sampler, steps, n, precision):
    """Images per second of generate() with this sampler and step count, eta 0 where it takes one
    (the deterministic samplers, as the speed tables in docs/results.md were measured)."""
    takes_eta = SAMPLER_DEFAULTS[sampler][1] is not None
    config = SamplerConfig(sampler, steps, 0.0 if takes_eta else None)
    start = time.perf_counter()
    generate(model, diffusion, n, sampler=config, progress=False,
             precision=precision)
    return n / (time.perf_counter() - start)


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="auto", choices=["auto", "cpu", "gpu"],
                   help="model and batch to measure (auto)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--steps", type=whole(1, MAX_STEPS), default=20,
                   help="timed training steps per setting (20)")
    p.add_argument("--warmup", type=whole(1, MAX_STEPS), default=5,
                   help="untimed steps before each timing (5; compile adds 3)")
    p.add_argument("--sample-n", type=whole(1, MAX_IMAGES),
                   help="images per sampling measurement (64 on CPU, 1000 on GPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["compile", "ddpm1000", "training"],
                   help="leave out measurements: compile, ddpm1000 (sampling 1000 steps), "
                        "training (all of it)")
    p.add_argument("--data-dir", default="data", help="where Fashion-MNIST is (data)")
    p.add_argument("--json", default="output/bench.json",
                   help="where to write the results (output/bench.json)")
    return p


def run(args):
    check_output(args.json, "--json", is_json)

    device = pick_device(args.device)
    args.sample_n = args.sample_n or default_batch_size(device)
    preset = args.preset if args.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    configs = preset_configs(preset, device)
    model, diffusion = UNet(configs[0]), Diffusion(configs[1])
    train_flops, sample_flops = flops_per_image(model, diffusion)
    peak = matmul_peak(device)
    print(f"{device} ({torch.get_num_threads()} threads), preset {preset}: "
          f"{train_flops / 1e9:.2f} GFLOP per training image, {sample_flops / 1e9:.2f} per network "
          f"evaluation; fp32 matmul peak {peak:.0f} GFLOP/s")
    rows = []
    if "training" not in args.skip:
        images, labels = data.load_fashion_mnist(args.data_dir)
        labels = labels.to(device) if configs[0].num_classes else None  # as train.py passes them
        rows += training_rows(args, configs, images.to(device), labels, device,
                              train_flops / 1e9 / peak)
    rows += sampling_rows(args, model.to(device).eval(), diffusion.to(device), device,
                          sample_flops / 1e9 / peak)
    results = {"device": str(device), "threads": torch.get_num_threads(), "preset": preset,
               "train_flops_per_image": train_flops, "sample_flops_per_nfe": sample_flops,
               "matmul_peak_gflops": peak, "rows": rows}
    atomic_write(args.json, lambda f: f.write(json.dumps(results, indent=2).encode()))
    print(f"wrote {args.json}")


def training_rows(args, configs, images, labels, device, share):
    """Training images/s of the plain baseline and of the training loop in each setting. share: the
    fraction of peak one image per second is."""
    model_cfg, diffusion_cfg, cfg = configs
    rows = []

    def report(name, rate, baseline=None):
        rows.append({"setting": name, "images_per_s": rate, "fraction_of_peak": rate * share,
                     "speedup": rate / baseline if baseline else None})
        extra = f"  {rate / baseline:.2f}x the plain path" if baseline else ""
        print(f"  {name:<44}{rate:>9.1f} img/s  {rate * share:6.1%} of peak{extra}", flush=True)

    print("training")
    plain = plain_rate(model_cfg, cfg, args.data_dir, device, args.steps, args.warmup)
    report("plain: DataLoader + transforms, fp32", plain)
    last = dict(memory_format="channels_last")
    settings = [("tensor data path, fp32", dict(precision="fp32"), {}),
                ("tensor data path, fp32, channels_last", dict(precision="fp32", **last), {}),
                ("tensor data path, bf16 autocast", dict(precision="bf16"), {}),
                ("tensor data path, bf16, channels_last", dict(precision="bf16", **last), {})]
    if device.type == "cuda":
        settings += [("tensor data path, fp32, TF32", dict(precision="fp32"), dict(tf32=True))]
    if "compile" not in args.skip:
        settings += [("tensor data path, fp32, torch.compile",
                      dict(precision="fp32", compile=True), {}),
                     ("tensor data path, bf16, torch.compile",
                      dict(precision="bf16", compile=True), {})]
    for name, options, extra in settings:
        warmup = args.warmup + (3 if options.get("compile") else 0)
        with tf32(extra.pop("tf32", False)):
            # each row names its own
            setting = replace(cfg, **{"memory_format": "contiguous", **options})
            scratch, _ = denoising(model_cfg, diffusion_cfg, setting, device)
            rate = cfg.batch_size * measure_rate(scratch, images, setting, device, labels,
                                                 steps=args.steps, warmup=warmup)
        report(name, rate, plain)
    return rows


def sampling_rows(args, model, diffusion, device, share):
    """Sampling images/s of each sampler in fp32 and bf16, and under no_grad against
    inference_mode."""
    rows = []
    print(f"sampling ({args.sample_n} images, "
          f"batch {min(args.sample_n, default_batch_size(device))})")
    grid = [("ddpm", 100), ("ddim", 50), ("dpm++", 20), ("dpm++", 10)]
    if "ddpm1000" not in args.skip:
        grid.insert(0, ("ddpm", 1000))
    for sampler, steps in grid:
        for precision in ("fp32", "bf16"):
            rate = sample_rate(model, diffusion, sampler, steps, args.sample_n, precision)
            rows.append({"setting": f"sample {sampler}-{steps} {precision}", "images_per_s": rate,
                         "fraction_of_peak": rate * steps * share})
            print(f"  {sampler + '-' + str(steps) + ' ' + precision:<44}{rate:>9.2f} img/s  "
                  f"{rows[-1]['fraction_of_peak']:6.1%} of peak", flush=True)

    # The samplers run under torch.no_grad; inference_mode also skips autograd's version counters.
    for mode, context in (("no_grad", contextlib.nullcontext),
                          ("inference_mode", torch.inference_mode)) * 2:
        with context():
            rate = sample_rate(model, diffusion, "dpm++", 20, args.sample_n, "fp32")
        rows.append({"setting": f"sample dpm++-20 fp32 {mode}", "images_per_s": rate})
        print(f"  {'dpm++-20 fp32 under ' + mode:<44}{rate:>9.2f} img/s", flush=True)
    return rows


def main(argv=None):
    run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
