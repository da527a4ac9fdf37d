"""Writing files so that nothing is lost: a crash at any moment leaves the old file or the new one.
What a checkpoint holds is checkpoint.py's, the folder a run writes folders.py's; this module
writes bytes safely."""
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from cli import WriteError

# read once: the permission bits every file written here gets, as open() would give
UMASK = os.umask(0o022)
os.umask(UMASK)


def _os_error(error):
    """The OSError behind an exception, or None: torch.save wraps a failed write in a
    RuntimeError."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def atomic_write(path, write, previous=None):
    """Call write(f) on a fresh temporary file beside path, sync it, and rename it over path, so
    that a crash at any moment leaves the old file or the new one, never half of one. The file
    replaced is moved to `previous` if given. A failure removes the temporary file and raises
    WriteError."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a unique name: two writers of one file never share a temporary file; the name cut so
        # that the temporary's, longer by 14 bytes, stays within the usual 255-byte limit
        short = os.fsencode(path.name)[:200].decode(sys.getfilesystemencoding(), errors="ignore")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{short}.", suffix=".tmp")
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
        cause = _os_error(e)
        if cause is None:
            raise
        kept = f"{path} or {previous}" if previous is not None else str(path)
        raise WriteError(f"could not write {path}: {cause.strerror or cause}; "
                         f"whatever was there before is kept ({kept}). "
                         f"Free some space or choose another folder") from None
    return path


def atomic_save(obj, path, previous=None):
    """torch.save obj to path through atomic_write."""
    return atomic_write(path, lambda f: torch.save(obj, f), previous)
