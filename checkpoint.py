"""The checkpoint file, written and read here only: its format and version, atomic writes, safe
loading with the fallback to the previous file, rebuilding the model, and the folder's lock."""
import contextlib
import os
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from cli import UserError, WriteError, first_line
from diffusion import Diffusion, DiffusionConfig
from samplers import DISTILLED_SAMPLER
from unet import UNet, UNetConfig

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

FORMAT = "ddpm-fashion-mnist"  # stored in every checkpoint; anything else is not ours
VERSION = 6  # bumped whenever what a checkpoint holds changes; _upgrade() reads every older one
CHECKPOINT_NAMES = ("ckpt.pt", "ckpt.prev.pt")  # newest first
REQUIRED = ("model", "ema", "config", "step", "epoch")  # to sample; resuming needs RESUME too
RESUME = ("optimizer", "ema_updates", "history", "timestep_history")
# A distilled student's record (distill.py); None for every trained model.
DISTILLED = ("steps", "sampler", "round", "from_steps", "to_steps", "guidance", "source", "teacher")
UMASK = os.umask(0o022)  # read once: the permission bits every file written here gets, as open() would give
os.umask(UMASK)


# ---------------------------------------------------------------------------- writing

def atomic_write(path, write, previous=None):
    """Call write(f) on a fresh temporary file beside path, sync it, and rename it over path, so that
    a crash at any moment leaves the old file or the new one, never half of one. The file replaced is
    moved to `previous` if given. A failure removes the temporary file and raises WriteError."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name: two writers of one file never share a temporary file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError, TypeError):
            os.remove(tmp)
        cause = e
        while cause is not None and not isinstance(cause, OSError):  # torch.save wraps a failed write in
            cause = cause.__context__                                  # a RuntimeError of its zip writer
        if cause is not None:
            kept = f"{path} or {previous}" if previous is not None else str(path)
            raise WriteError(f"could not write {path}: {cause.strerror or cause}; whatever was there before is kept "
                             f"({kept}). Free some space or choose another folder") from None
        raise
    return path


def atomic_save(obj, path, previous=None):
    """torch.save obj to path through atomic_write."""
    return atomic_write(path, lambda f: torch.save(obj, f), previous)


def save_checkpoint(ckpt, folder):
    """Write folder/ckpt.pt atomically, keeping the one it replaces as ckpt.prev.pt."""
    newest, previous = (Path(folder) / name for name in CHECKPOINT_NAMES)
    return atomic_save(ckpt, newest, previous=previous)


def make_checkpoint(model, ema, diffusion, optimizer, train_config, state, world_size, distillation=None):
    """Everything needed to rebuild the model (configs as plain types) and to resume exactly.

    Random draws need no saved state: train.py derives each step's from (seed, step, rank). distillation:
    a distilled student's record (distill.py): its step count, its sampler, its round, and its teacher, weights
    included.
    """
    return {"format": FORMAT, "version": VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.module.state_dict(), "ema_updates": int(ema.n_averaged),
            "step": state["step"], "epoch": state["epoch"], "history": state["history"],
            "timestep_history": state["timesteps"].state_dict() if state.get("timesteps") else None,  # loss vlb
            "config": {"model": model.config.to_dict(), "diffusion": diffusion.config.to_dict(), "train": train_config},
            "world_size": world_size,  # data order and steps depend on the process count
            "distillation": distillation}


# ---------------------------------------------------------------------------- reading

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


class Damaged(UserError):
    """The file cannot be what it claims: unreadable, cut short, or missing parts. A damaged ckpt.pt gives
    way to the ckpt.prev.pt beside it; other refusals (foreign, newer, non-finite) do not."""


def _read(path):
    """torch.load with weights_only (tensors and plain data, never code), onto the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))  # how torch names a callable the file wants to import
        if code:
            raise UserError(f"refusing {path}: it asks to run {code[1]}, which weights_only loading never does; "
                            f"load only checkpoints made by train.py") from None
        raise Damaged(f"cannot read checkpoint {path} (damaged or not a checkpoint): not a valid pickle") from None
    except Exception as e:  # truncated, not a zip, not a torch file: all mean the file is unusable
        raise Damaged(f"cannot read checkpoint {path} (damaged or not a checkpoint): {first_line(e, 100)}") from None


def _upgrade(ckpt, path):
    """The checkpoint in today's layout, from any version this code knows; a newer or foreign one is refused."""
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (FORMAT, "ddpm-fashion-mnist/1"):
        raise UserError(f"{path} is not a checkpoint of this project (expected format {FORMAT!r})")
    version = 1 if ckpt["format"] == "ddpm-fashion-mnist/1" else ckpt.get("version")
    if not isinstance(version, int) or version < 1:
        raise Damaged(f"checkpoint {path} is damaged: its format version is {version!r}, not a number from 1 up")
    if version > VERSION:
        raise UserError(f"{path} is checkpoint version {version}, and this code reads versions 1 to {VERSION}: "
                        f"update this repository (git pull) to read it")
    missing = sorted(set(REQUIRED) - set(ckpt))
    if missing:
        raise Damaged(f"checkpoint {path} (version {version}) is incomplete: it lacks {', '.join(missing)}")
    config = ckpt["config"]
    tables = (ckpt["model"], ckpt["ema"], *((config.get(k, {}) for k in ("model", "diffusion", "train"))
                                            if isinstance(config, dict) else [None]))
    if not all(isinstance(t, dict) for t in tables):
        raise Damaged(f"checkpoint {path} (version {version}) is damaged: its weights or config are not tables")
    if version == 1:  # 2 dropped the RNG state and the per-command limits, and versions the format
        train = dict(ckpt["config"].get("train", {}))
        for key in ("max_steps", "max_minutes", "compile"):
            train.pop(key, None)
        # Fields added to version 1 over time, with what a run behaved like before each existed.
        train.setdefault("grad_clip", 0.0)
        train.setdefault("cond_drop", 0.1)
        # "auto" (bf16 on CUDA, fp32 elsewhere, for a while) becomes fp32: --precision bf16 brings CUDA's back.
        train["precision"] = "bf16" if train.get("precision") == "bf16" else "fp32"
        model = dict(ckpt["config"]["model"])
        if "attn_resolutions" in model:  # sizes the network lacks were once accepted and had no effect
            sizes = [model.get("image_size", 28) // 2**k for k in range(len(model.get("channel_mults", (1, 2, 2))))]
            model["attn_resolutions"] = [r for r in model["attn_resolutions"] if r in sizes]
        ckpt = {**{k: v for k, v in ckpt.items() if k != "rng"}, "format": FORMAT, "version": 2,
                "config": {**ckpt["config"], "model": model, "train": train}, "world_size": ckpt.get("world_size", 1)}
    if ckpt["version"] == 2:  # 3 added Improved DDPM's variances and losses; before, every run was the first
        config = ckpt["config"]
        ckpt = {**ckpt, "version": 3, "config": {
            **config, "model": {**config["model"], "learned_variance": False},
            "diffusion": {**config["diffusion"], "variance": "fixed_small", "loss": "simple"}}}
        if "optimizer" in ckpt:  # a resumable one: it had no timestep history, as loss simple keeps none
            ckpt["timestep_history"] = None
    if ckpt["version"] == 3:  # 4 added the learning-rate decay, the EMA's power, steps and the memory format
        config = ckpt["config"]
        ckpt = {**ckpt, "version": 4, "config": {**config, "train": {
            "steps": 0, "lr_schedule": "constant", "ema_power": 8.0, "memory_format": "contiguous", **config["train"]}}}
    if ckpt["version"] == 4:  # 5 added distilled students; every earlier checkpoint is a model trained as usual
        ckpt = {**ckpt, "version": 5, "distillation": None}
    if "distillation" not in ckpt:
        raise Damaged(f"checkpoint {path} (version {ckpt['version']}) is incomplete: it lacks its distillation "
                      f"record")
    distilled = ckpt["distillation"]
    if ckpt["version"] == 5:  # 6 records a student's sampler; every version-5 student sampled with this one
        distilled = {"sampler": DISTILLED_SAMPLER, **distilled} if isinstance(distilled, dict) else distilled
        ckpt = {**ckpt, "version": 6, "distillation": distilled}
    if distilled is not None and not (isinstance(distilled, dict) and all(k in distilled for k in DISTILLED)):
        raise Damaged(f"checkpoint {path} is damaged: its distillation record lacks some of {', '.join(DISTILLED)}")
    return ckpt


def _checked(ckpt, path):
    """_upgrade(ckpt), refusing weights (raw or averaged) that hold NaN or Inf: nothing sampled or
    resumed from them could be right."""
    ckpt = _upgrade(ckpt, path)
    for key in ("model", "ema"):
        bad = next((k for k, v in ckpt[key].items() if torch.is_tensor(v) and v.is_floating_point()
                    and not v.isfinite().all()), None)
        if bad:
            raise UserError(f"{path}: its {key} weights hold NaN or Inf (first in {bad}), so nothing can be sampled "
                            f"or resumed from it; use an earlier checkpoint or train again")
    return ckpt


def open_checkpoint(path, fallback=True):
    """(checkpoint, the file it came from). A damaged ckpt.pt gives way to the ckpt.prev.pt beside it,
    with a warning on stderr, when fallback is set; anything else wrong is a UserError."""
    file = resolve_checkpoint(path)
    try:
        return _checked(_read(file), file), file
    except UserError as e:
        previous = file.with_name(CHECKPOINT_NAMES[1])
        if not (fallback and file.name == CHECKPOINT_NAMES[0] and previous.is_file() and isinstance(e, Damaged)):
            raise
        ckpt = _checked(_read(previous), previous)
        print(f"warning: {e}; using the previous checkpoint {previous} (step {ckpt['step']}) instead", file=sys.stderr)
        return ckpt, previous


def load_checkpoint(path, fallback=True):
    """The checkpoint at path (a file, or a folder's newest), checked and in today's layout."""
    return open_checkpoint(path, fallback)[0]


def restore(ckpt, model, ema, optimizer, state):
    """Load a checkpoint's training state into a freshly built model, its EMA (an AveragedModel), Adam and
    the loop state dict; a checkpoint that lacks it or does not fit them is refused in one line."""
    missing = [k for k in RESUME if k not in ckpt]
    if missing:
        raise UserError(f"the checkpoint cannot be resumed: it lacks {', '.join(missing)} (sample.py can still "
                        f"draw from it)")
    try:
        model.load_state_dict(ckpt["model"])
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(ckpt["ema_updates"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for p, kept in optimizer.state.items():  # Adam's moments in their parameter's memory format, which fused
            for k, v in kept.items():             # Adam requires, and a resumed run may have changed (channels_last)
                if torch.is_tensor(v) and v.shape == p.shape:
                    kept[k] = torch.empty_like(p).copy_(v)
        state.update(step=ckpt["step"], epoch=ckpt["epoch"], history=[tuple(h) for h in ckpt["history"]])
        if (ckpt["timestep_history"] is None) != (state.get("timesteps") is None):
            raise ValueError("a timestep history is kept for loss vlb, and only there")
        if state.get("timesteps"):
            state["timesteps"].load_state_dict(ckpt["timestep_history"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"the checkpoint does not fit its own config, so it cannot be resumed: {first_line(e, 200)}") \
            from None


def build_model(ckpt, device="cpu", ema=True):
    """Rebuild the U-Net (EMA weights unless ema=False) and diffusion from the checkpoint alone."""
    config = ckpt["config"]
    try:
        model = UNet(UNetConfig.from_dict(config["model"]))
        model.load_state_dict(ckpt["ema" if ema else "model"])
        diffusion = Diffusion(DiffusionConfig(**config["diffusion"]))
        if model.config.learned_variance != (diffusion.config.variance == "learned"):
            raise ValueError(f"variance {diffusion.config.variance}, "
                             f"learned_variance {model.config.learned_variance}")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint config does not match its weights, or is no longer accepted: "
                        f"{first_line(e, 200)}") from None
    return model.to(device).eval(), diffusion.to(device)


def teacher_checkpoint(model, diffusion):
    """A model's weights and configs as a distilled checkpoint keeps its teacher: build_teacher() reads it back."""
    return {"config": {"model": model.config.to_dict(), "diffusion": diffusion.config.to_dict()},
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def build_teacher(ckpt, device="cpu"):
    """The teacher a distilled checkpoint learned from, rebuilt from the copy it keeps: (model, diffusion)."""
    teacher = ckpt["distillation"]["teacher"]
    return build_model({"config": teacher["config"], "ema": teacher["weights"]}, device)


# ---------------------------------------------------------------------------- the folder a run writes

@contextlib.contextmanager
def locked(folder, flag="--checkpoint-dir"):
    """Hold folder/.lock while inside, so that a second run on the same folder stops at once. The lock
    is the operating system's (flock), so it dies with its process: a killed run leaves no stale lock."""
    f = open(Path(folder) / ".lock", "a+")
    try:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{folder}/ is in use by {holder}; wait for it to end, or choose another {flag}") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{Path(sys.argv[0]).name} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def continues(folder, source):
    """Whether a run resuming from the file `source` continues the run saved in folder: it is one of that
    folder's own checkpoints (another file there, such as a kept copy, is not)."""
    return source is not None and source.name in CHECKPOINT_NAMES and source.parent.resolve() == Path(folder).resolve()


def claim_folder(folder, source, overwrite):
    """Before a run writes checkpoints to folder (holding its lock): refuse to start afresh over an earlier
    run there unless told to overwrite it. source: the file the run resumes from, or None."""
    folder = Path(folder)
    ours = continues(folder, source)
    if ours and overwrite:
        raise UserError("--overwrite starts a new run over an old one, --resume continues it: give one of them")
    earlier = [name for name in CHECKPOINT_NAMES if (folder / name).exists()]
    if earlier and not (ours or overwrite):
        raise UserError(f"{folder}/ already holds a run ({', '.join(earlier)}): continue it with --resume {folder}, "
                        f"replace it with --overwrite, or choose another --checkpoint-dir")


def take_folder(folder, resume, source, overwrite):
    """Once every check has passed, make folder ready for the run's saves: remove temporary files of a run
    killed while saving, the earlier run's checkpoints if overwrite (so that nothing could resume it by
    mistake), and move a damaged ckpt.pt that open_checkpoint() fell back from (resume: what --resume
    named) aside to ckpt.damaged*.pt, out of the rotation."""
    folder = Path(folder)
    for leftover in folder.glob(".ckpt*.tmp"):  # no one else writes here: the caller holds the lock
        leftover.unlink()
    if overwrite:
        for name in CHECKPOINT_NAMES:
            (folder / name).unlink(missing_ok=True)
    damaged = resolve_checkpoint(resume) if resume else None
    if continues(folder, source) and damaged != source:
        aside, i = folder / "ckpt.damaged.pt", 1
        while aside.exists():  # an earlier one is kept too
            aside, i = folder / f"ckpt.damaged.{i}.pt", i + 1
        os.replace(damaged, aside)
        print(f"moved the damaged {damaged} to {aside}")
