"""What people do with a trained model besides drawing from noise: inpainting (known pixels kept,
with RePaint's resampling), DDIM inversion of real images to noise, and spherical interpolation
between noises. Tensor math over samplers.py's samplers; the pictures are figures.py's."""
import math

import numpy as np
import torch

from cli import UserError, check
from device import tf32
from samplers import SAMPLERS, _schedule, ddpm_step, renoise, sample_ddim, timestep_grid

MASKS = ("left", "right", "top", "bottom", "centre")


def named_mask(name, size=28):
    """The region `name` (one of MASKS) as a mask [1, 1, size, size]: 1 where pixels are filled
    in, 0 where they are kept."""
    mask, half, quarter = torch.zeros(1, 1, size, size), size // 2, size // 4
    region = {"left": (slice(None), slice(0, half)), "right": (slice(None), slice(half, None)),
              "top": (slice(0, half), slice(None)), "bottom": (slice(half, None), slice(None)),
              "centre": (slice(quarter, size - quarter),) * 2}[name]
    mask[0, 0][region] = 1
    return mask


def read_mask(path, size=28):
    """A mask from a PNG of size x size pixels, white (or any light grey) where pixels are filled
    in: [1, 1, size, size]. Anything else is a UserError naming the fix."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32).copy())
            shape = image.size
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"--inpaint {path}: cannot read it as an image ({e}); give one of "
                        f"{', '.join(MASKS)}, or a PNG") from None
    if shape != (size, size):
        raise UserError(f"--inpaint {path} is {shape[0]}x{shape[1]} pixels; a mask must be "
                        f"{size}x{size}, as the images are")
    return (pixels.view(1, 1, size, size) >= 128).float()


def keeping(fn, diffusion, x0, mask, generator):
    """fn(x, t) as a sampler calls it, seeing the kept pixels (mask 0) of x0 [B, C, H, W] at a fresh
    draw of q(x_t | x_0) and the sampler's own x_t where mask is 1: RePaint's conditioning (Lugmayr
    et al. 2022, eq. 8), applied where every sampler reads x_t, so every sampler takes it."""
    def merged(x, t):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return fn(torch.where(mask.bool(), x, diffusion.q_sample(x0, t, noise)), t)
    return merged


@torch.no_grad()
def sample_repaint(model, diffusion, noise, steps=None, generator=None, jumps=2):
    """RePaint's resampling (Lugmayr et al. 2022, Algorithm 1, jump length 1): each ancestral step
    from t to s is taken `jumps` times, noised back to t by q(x_t | x_s) in between, so that the
    filled pixels come to agree with the kept ones. model: keeping()'s. -> x_0 [B, C, H, W]."""
    x = noise
    for _, t, s, abar_t, abar_s in _schedule(diffusion, steps, "time"):
        for jump in range(jumps if s >= 0 else 1):
            if jump:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = renoise(x_s, abar_t / abar_s, z)
            x_s, _ = ddpm_step(model, diffusion, x, t, s, abar_t, abar_s, generator)
        x = x_s
    return x


def inpaint(fn, diffusion, x0, mask, sampler, seed=0, jumps=1):
    """x0 [B, C, H, W] in [-1, 1] with the pixels where mask [1 or B, 1, H, W] is 1 filled in by the
    model fn(x, t) and `sampler` (a resolved SamplerConfig; jumps > 1: RePaint's resampling, with
    the ancestral sampler). The kept pixels of the result are x0's exactly."""
    g = torch.Generator(x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    mask = mask.to(x0.device)
    with tf32(False):
        if jumps > 1:
            x = sample_repaint(keeping(fn, diffusion, x0, mask, g), diffusion, noise,
                               sampler.steps, g, jumps)
        else:
            x = SAMPLERS[sampler.sampler](keeping(fn, diffusion, x0, mask, g), diffusion, noise,
                                          sampler.steps, generator=g, **sampler.options())
    return torch.where(mask.bool(), x, x0)  # where, not arithmetic: no NaN reaches x0's pixels


@torch.no_grad()
def invert(fn, diffusion, x0, steps):
    """DDIM run backwards (Song et al. 2021, eq. 13 read from t up to the next grid timestep; the
    inversion of Dhariwal & Nichol 2021, appendix F): the noise x_T [B, C, H, W] that decode() maps
    back to about x0, on the grid of sample_ddim's `steps`. The first step, from clean data, takes
    the eps of the cleanest timestep at x0 itself."""
    ts = timestep_grid("time", diffusion, steps or diffusion.timesteps).flip(0).tolist()
    abar = diffusion.alphas_cumprod
    with tf32(False):
        x = renoise(x0, abar[ts[0]], diffusion.predict(fn, x0, ts[0])[0])
        for t, up in zip(ts, ts[1:]):
            eps, x0_t, _ = diffusion.predict(fn, x, t)
            x = renoise(x0_t, abar[up], eps)
    return x


def decode(fn, diffusion, noise, steps):
    """The deterministic DDIM sampler (eta 0) on `steps` timesteps: noise x_T -> x_0, both
    [B, C, H, W]; what invert() runs backwards."""
    with tf32(False):
        return sample_ddim(fn, diffusion, noise, steps, eta=0.0, grid="time")


def slerp(a, b, weights):
    """Spherical interpolation (Shoemake 1985) between noises a and b [C, H, W] at fractions
    weights [K] in [0, 1]: [K, C, H, W]. Along the great circle the norm stays where Gaussian noise
    concentrates, about sqrt(C H W), which a straight line between two noises would leave."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    w = weights.view(-1, 1, 1, 1).to(a)
    if theta < 1e-4:  # nearly parallel: the straight line is the same curve
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / math.sin(theta)


def completions(fn, diffusion, x0, mask, sampler, seed=0, k=4, jumps=1, batch_size=64):
    """x0 [N, C, H, W] completed k times each where mask is 1 (seeds seed .. seed + k - 1, batch
    by batch): [k, N, C, H, W] on the CPU."""
    device = diffusion.alphas_cumprod.device
    return torch.stack([
        torch.cat([inpaint(fn, diffusion, x0[i:i + batch_size].to(device), mask, sampler,
                           seed + j, jumps).cpu() for i in range(0, len(x0), batch_size)])
        for j in range(k)])


def round_trip(fn, diffusion, x0, steps, batch_size=64):
    """(noises, reconstructions), both [N, C, H, W] on the CPU: x0 inverted, then decoded."""
    device = diffusion.alphas_cumprod.device
    noises = torch.cat([invert(fn, diffusion, x0[i:i + batch_size].to(device), steps)
                        for i in range(0, len(x0), batch_size)])
    decoded = torch.cat([decode(fn, diffusion, noises[i:i + batch_size], steps).cpu()
                         for i in range(0, len(noises), batch_size)])
    return noises.cpu(), decoded


def interpolations(fn, diffusion, a, b, steps, frames=8):
    """For each pair of noises a[i], b[i] [N, C, H, W], `frames` images decoded along slerp()
    from a[i] to b[i], its ends included: [N, frames, C, H, W] on the CPU."""
    device = diffusion.alphas_cumprod.device
    w = torch.linspace(0, 1, frames)
    return torch.stack([decode(fn, diffusion, slerp(x.to(device), y.to(device), w), steps).cpu()
                        for x, y in zip(a, b)])


def check_jumps(jumps, sampler):
    """Refuse RePaint's --jumps with a sampler other than the ancestral one they resample."""
    check(jumps == 1 or sampler == "ddpm",
          "--jumps is RePaint's resampling of ancestral steps: add --sampler ddpm")


def mask_from_flag(value):
    """--inpaint's value: one of MASKS by name, else a PNG's path; [1, 1, 28, 28]."""
    return named_mask(value) if value in MASKS else read_mask(value)


def blanked(x0, mask):
    """x0 [B, C, H, W] with the region mask [1 or B, 1, H, W] marks set to the background, -1."""
    return torch.where(mask.bool(), -1.0, x0)


def inpainting_accuracy(classify, fn, diffusion, x0, labels, mask, sampler, seed=0, jumps=1,
                        batch_size=64):
    """How often classify(images [N, C, H, W]) -> predicted classes [N] gets labels [N] right on
    x0 itself, on x0 with the filled region blanked to the background (-1), and on x0 completed
    there once by the model: {name: accuracy}. The kept pixels should decide the class."""
    done = completions(fn, diffusion, x0, mask, sampler, seed, 1, jumps, batch_size)[0]
    right = lambda x: (classify(x) == labels).float().mean().item()
    return {"originals": right(x0), "blanked": right(blanked(x0, mask)),
            "completed": right(done)}
