"""The folder a run writes its checkpoints to: its lock, so that no second run writes there at
once; the checks that a new run does not replace an earlier one unless told to; and the rounds a
distillation's folder holds."""
import contextlib
import os
import sys
import time
from pathlib import Path

from checkpoint import CHECKPOINT_NAMES, open_checkpoint, resolve_checkpoint
from cli import UserError, check
from files import UMASK

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


@contextlib.contextmanager
def locked(folder, flag="--checkpoint-dir"):
    """Hold folder/.lock while inside, so that a second run on the same folder stops at once. The
    lock is the operating system's (flock), so it dies with its process: a killed run leaves no
    stale lock."""
    lock = Path(folder) / ".lock"
    try:  # never through a symbolic link: truncating would empty whatever file it names
        f = os.fdopen(os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                              0o666 & ~UMASK), "r+")
    except OSError as e:
        raise UserError(f"cannot use {lock} as the folder's lock ({e.strerror or e}; a symbolic "
                        f"link or a folder there is refused): remove it, or choose another "
                        f"{flag}") from None
    try:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{folder}/ is in use by {holder}; wait for it to end, or choose another "
                        f"{flag}") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{Path(sys.argv[0]).name} (pid {os.getpid()}, "
                f"started {time.strftime('%Y-%m-%d %H:%M:%S')})")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def continues(folder, source):
    """Whether a run resuming from the file `source` continues the run saved in folder: it is one of
    that folder's own checkpoints (another file there, such as a kept copy, is not)."""
    return (source is not None and source.name in CHECKPOINT_NAMES
            and source.parent.resolve() == Path(folder).resolve())


def claim_folder(folder, source, overwrite):
    """Before a run writes checkpoints to folder (holding its lock): refuse to start afresh over an
    earlier run there unless told to overwrite it. source: the file the run resumes from, or
    None."""
    folder = Path(folder)
    ours = continues(folder, source)
    if ours and overwrite:
        raise UserError("--overwrite starts a new run over an old one, --resume continues it: "
                        "give one of them")
    earlier = [name for name in CHECKPOINT_NAMES if (folder / name).exists()]
    if earlier and not (ours or overwrite):
        raise UserError(f"{folder}/ already holds a run ({', '.join(earlier)}): continue it with "
                        f"--resume {folder}, replace it with --overwrite, or choose another "
                        f"--checkpoint-dir")


def take_folder(folder, resume, source, overwrite):
    """Once every check has passed, make folder ready for the run's saves: remove temporary files of
    a run killed while saving, the earlier run's checkpoints if overwrite (so that nothing could
    resume it by mistake), and move a damaged ckpt.pt that open_checkpoint() fell back from (resume:
    what --resume named) aside to ckpt.damaged*.pt, out of the rotation."""
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


# the folder, under --checkpoint-dir, of the student that samples in that many steps
ROUND = "{}-steps"


def saved_rounds(folder):
    """{student steps: (checkpoint, its file)} for every round folder under `folder` that holds
    one."""
    found = {}
    for sub in sorted(Path(folder).glob(ROUND.format("*"))):
        if (sub.name.split("-")[0].isdigit()
                and any((sub / name).is_file() for name in CHECKPOINT_NAMES)):
            ckpt, file = open_checkpoint(sub)
            check(ckpt["distillation"] is not None,
                  f"{file} is not a distilled student, yet lies where distill.py keeps its rounds: "
                  f"move it, or choose another --checkpoint-dir")
            found[ckpt["distillation"]["sampler"]["steps"]] = ckpt, file
    return found
