"""The machine a command runs on: which device, and how to run fastest there (the precision and
memory-format policy, bf16 autocast, TF32). Processes and ranks are distributed.py's."""
import contextlib
import os

import torch

from cli import UserError


def pick_device(name):
    """auto: the first of cuda, mps, cpu that this machine has; otherwise the device named."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a torch device; use auto, cpu, cuda, cuda:1 "
                            f"or mps") from None
        # other types (meta, xpu, ...) are not devices this code trains or samples on
        have = (["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
                + ["mps"] * torch.backends.mps.is_available())
        index = f"{device.type}:{device.index or 0}" if device.type == "cuda" else device.type
        if index not in have:
            raise UserError(f"--device {name}: this machine has no such device (it has "
                            f"{', '.join(have)}); use --device auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def memory_bytes(device):
    """The memory a device has in all: the GPU's own, else the machine's RAM (inf where the
    operating system does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # Windows
        return float("inf")


def default_batch_size(device):
    """Images per sampling batch: on a CPU 64 is fastest (more spills the caches), a GPU wants
    many."""
    return 64 if device.type == "cpu" else 1000


def _has_bf16(device):
    """Whether the device is a CPU with bf16 instructions (AVX512-BF16 or AMX). The probes are
    private and older torch may lack them: then no."""
    has = lambda name: getattr(torch.cpu, name, lambda: False)()
    return device.type == "cpu" and (has("_is_avx512_bf16_supported")
                                     or has("_is_amx_tile_supported"))


def fastest_settings(device, precision="auto", memory_format="auto"):
    """Training's precision and memory format on this device, each "auto" replaced by what it picks
    there, the format after the precision (docs/results.md, "Speed"); anything else is kept. A CPU
    with bf16 instructions trains fastest in bf16 autocast; channels_last helps a CPU in fp32 but
    slowed bf16 on the Intel Xeon. A GPU keeps fp32 and contiguous: both measured slower on the
    H100."""
    if precision == "auto":
        precision = "bf16" if _has_bf16(device) else "fp32"
    if memory_format == "auto":
        cpu_fp32 = device.type == "cpu" and precision == "fp32"
        memory_format = "channels_last" if cpu_fp32 else "contiguous"
    return {"precision": precision, "memory_format": memory_format}


def autocast_for(device, precision):
    """bf16 autocast for precision "bf16", else nullcontext(): plain fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def tf32(enabled):
    """TF32 for CUDA matmuls and convolutions on or off while inside, restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
