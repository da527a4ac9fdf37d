"""torchrun: joining the process group, each rank's device, and the collectives the training
loop needs (averages, gathers, stopping together). A single process is world (0, 1) and needs
none of it."""
import os

import torch
import torch.distributed as dist

from cli import UserError
from device import pick_device


TORCHRUN_SETS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # beside WORLD_SIZE


def start_distributed(device_flag):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join its process group: NCCL with
    one GPU per process (cuda:LOCAL_RANK) when CUDA is there, gloo on the CPU otherwise."""
    size = os.environ.get("WORLD_SIZE", "1")
    if size.strip() == "1":
        return 0, 1, pick_device(device_flag)
    missing = [k for k in TORCHRUN_SETS if k not in os.environ]
    if not size.strip().isdecimal() or int(size) < 1 or missing:
        raise UserError(f"WORLD_SIZE={size} is set, but not as torchrun sets it (no "
                        f"{', '.join(missing) or 'positive process count'}): start with "
                        f"torchrun --nproc_per_node N, or unset WORLD_SIZE for one process")
    if device_flag not in ("auto", "cuda", "cpu"):
        raise UserError(f"under torchrun each process takes the GPU of its LOCAL_RANK: "
                        f"give --device auto, cuda or cpu, not {device_flag} "
                        f"(CUDA_VISIBLE_DEVICES picks the GPUs)")
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA device here")
    cuda = device_flag != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def world():
    """(rank, world size): (0, 1) for a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def agree_to_stop(reason, device):
    """reason if this rank wants to stop, else "another process's stop" if any rank does, else
    None."""
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
    """work() on every process; if it raises on any, every process raises (the failing one its own
    error, the others a UserError), so that none waits forever for a process that has stopped."""
    try:
        result, error = work(), None
    except Exception as e:
        # any failure: the others must hear of it before they wait on this process
        result, error = None, e
    if world()[1] > 1 and agree_to_stop("failed" if error else None, device) and error is None:
        raise UserError("another process stopped on a problem; its own message says which")
    if error is not None:
        raise error
    return result


def smallest_over_ranks(n, device):
    """The smallest of each rank's int n, on every rank: the ranks' clocks and rates differ a
    little."""
    if world()[1] == 1:
        return n
    n = torch.tensor([n], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    return int(n)
