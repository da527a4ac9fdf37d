"""What every command line shares: the one-line errors, the parser, the device, precision and
signals, writable folders, and the sampler flags' defaults and rules."""
import argparse
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

# What each sampler does unless told otherwise (README, "Sampling"): DPM-Solver++ in its SDE form
# (eta = 1) matched 1000-step DDPM's FID in 20 steps, 50x sooner; the ODE samplers did not.
DEFAULT_SAMPLER = "dpm++"
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpm++": 20}  # None: all T
DEFAULT_ETA = {"ddim": 0.0, "dpm++": 1.0}
GUIDANCE = 0.5  # default classifier-free guidance scale for conditional models (README, "Classes on request")


class UserError(Exception):
    """A problem with the user's input: one line on stderr, status 2, nothing written."""


class WriteError(Exception):
    """A file could not be written (disk full, I/O error): one line on stderr, status 1."""


class Diverged(Exception):
    """Training's loss or weights stopped being finite; nothing after that point was saved."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one line on stderr (status 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_command(run, args):
    """Call run(args), turning the errors a user can act on into one line and an exit status."""
    try:
        return run(args)
    except (UserError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except Diverged as e:
        print(f"error: training diverged: {e}. Resume from it with a lower --lr.", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C where no handler of ours runs, or a second one while training
        print("\naborted", file=sys.stderr)
        sys.exit(130)


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


def first_line(error, limit=150):
    """The first line of an exception's message (its type's name if it has none), at most limit characters:
    what a one-line error quotes of a library's multi-line complaint."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def check(ok, message):
    """Raise UserError(message) unless ok: the flag checks read as a list of rules."""
    if not ok:
        raise UserError(message)


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


def start_distributed(device_flag):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join its process group: NCCL with
    one GPU per process (cuda:LOCAL_RANK) when CUDA is there, gloo on the CPU otherwise."""
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


def default_batch_size(device):
    """Images per sampling batch: on a CPU 64 is fastest (more spills the caches), a GPU wants many."""
    return 64 if device.type == "cpu" else 1000


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


def gather_from_ranks(x):
    """Every process's x [n], joined in rank order on every process: [W * n]."""
    ranks = world()[1]
    if ranks == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ranks)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def together(work, device):
    """work() on every process; if it raises on any, every process raises (the failing one its own error,
    the others a UserError), so that none waits forever for a process that has stopped."""
    try:
        result, error = work(), None
    except Exception as e:  # any failure: the others must hear of it before they wait on this process
        result, error = None, e
    if world()[1] > 1 and agree_to_stop("failed" if error else None, device) and error is None:
        raise UserError("another process stopped on a problem; its own message says which")
    if error is not None:
        raise error
    return result


def autocast_for(device, precision):
    """bf16 autocast for precision "bf16", else nullcontext(): plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def fastest_settings(device, precision="auto", memory_format="auto"):
    """Training's precision and memory format on this device, each "auto" replaced by what it picks there, the
    format after the precision (README, "Speed"); a setting given as anything else is kept.
    A CPU with bf16 instructions (AVX512-BF16 or AMX) trains 1.6-1.85x faster in bf16 autocast; channels_last
    adds 5-13% in fp32 on a CPU but cost 25% with bf16 on the Intel Xeon. A GPU keeps fp32 and contiguous: bf16
    and channels_last both measured slower on the H100."""
    has = lambda name: getattr(torch.cpu, name, lambda: False)()  # private probes; older torch may lack them
    if precision == "auto":
        bf16 = device.type == "cpu" and (has("_is_avx512_bf16_supported") or has("_is_amx_tile_supported"))
        precision = "bf16" if bf16 else "fp32"
    if memory_format == "auto":
        memory_format = "channels_last" if device.type == "cpu" and precision == "fp32" else "contiguous"
    return {"precision": precision, "memory_format": memory_format}


@contextlib.contextmanager
def tf32(enabled):
    """TF32 for CUDA matmuls and convolutions on or off while inside, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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


def sampler_settings(sampler, timesteps, steps=None, eta=None, distilled=None):
    """{sampler, steps, eta[, spacing]} for sample.generate(), with the sampler's defaults for what is None.
    distilled: a distilled checkpoint's record (distill.py), whose student samples only as it was distilled to."""
    if distilled is not None:
        n = distilled["steps"]
        own = {**distilled["sampler"], "steps": n}
        check(sampler is None and eta is None, f"this checkpoint is a student distilled to sample in {n} steps "
                                               f"with its own sampler ({describe(own)}): drop --sampler, --eta")
        check(steps in (None, n), f"this student was distilled for {n} steps and cannot take {steps}: other counts lie "
                                  f"off the grid it learned; drop --steps, or take the student for {steps} beside it")
        return own
    sampler = sampler or DEFAULT_SAMPLER
    check(eta is None or sampler in DEFAULT_ETA, f"--eta applies to ddim and dpm++, not {sampler}")
    check(eta is None or 0 <= eta <= 1, f"--eta must be between 0 (deterministic, ODE) and 1 (ancestral, SDE), "
                                        f"got {eta}")
    check(steps is None or 1 <= steps <= timesteps, f"--steps must be between 1 and {timesteps}, got {steps}")
    steps = steps or min(DEFAULT_STEPS[sampler] or timesteps, timesteps)
    eta = DEFAULT_ETA[sampler] if eta is None and sampler in DEFAULT_ETA else eta
    return {"sampler": sampler, "steps": steps, **({"eta": eta} if eta is not None else {})}


def describe(settings):
    """'dpm++ sampler, 20 steps, eta 1' for a sampler_settings() dict."""
    eta = f", eta {settings['eta']:g}" if "eta" in settings else ""
    grid = f", {settings['spacing']} grid (a distilled student)" if "spacing" in settings else ""
    return f"{settings['sampler']} sampler, {settings['steps']} steps{eta}{grid}"
