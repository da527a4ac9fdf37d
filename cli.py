"""What every command line shares: the one-line errors and their exit status, the parser, and the
check that an output folder can be written before any long work starts. Devices are device.py's,
ranks distributed.py's, the sampler's settings samplers.py's."""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import zipfile
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input: one line on stderr, status 2, nothing written."""


class WriteError(Exception):
    """A file could not be written (disk full, I/O error): one line on stderr, status 1."""


class Diverged(Exception):
    """Training's loss or weights stopped being finite; nothing after that point was saved."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one line on stderr (status 2) instead of the usage
    block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


SEED_LIMIT = 2**63  # torch's generators take 64 bits; the training loop derives seeds below this
# Upper bounds of counts, against typos (a 20-digit value): past them a command would run for
# years or allocate more than any machine holds before saying so
MAX_STEPS = 10**9  # optimizer steps: decades of training on any machine
MAX_IMAGES = 10**7  # images drawn: weeks of sampling on a CPU
MAX_BATCH = 2**16  # images in one batch


def whole(lo, hi):
    """argparse type: a whole number from lo to hi, else one line saying so."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be a whole number from {lo} to {hi}, "
                                             f"got {text!r}")
        return value
    return parse


def finite(text):
    """argparse type of every real-valued flag: a finite number (nan and inf refused in one line;
    each flag's range is checked where its meaning is)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# every --seed: `date +%s%N` fits
seed = whole(0, SEED_LIMIT - 1)


class Unbroken:
    """A text stream (stdout, stderr) that outlives its reader: once the pipe it writes to is closed
    (`python train.py | head`), what follows goes to the null device, and the command goes on,
    instead of ending in a BrokenPipeError wherever it next prints."""

    def __init__(self, stream):
        self.stream = stream

    def _guard(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:  # point the file descriptor itself at the null device, for good
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
            return len(args[0]) if args else None

    def write(self, text):
        return self._guard(self.stream.write, text)

    def flush(self):
        return self._guard(self.stream.flush)

    def __getattr__(self, name):  # isatty, fileno, encoding, reconfigure ...
        return getattr(self.stream, name)


def run_command(run, args):
    """Call run(args), turning the errors a user can act on into one line and an exit status; a
    closed stdout or stderr (Unbroken) does not stop it."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if s is None else Unbroken(s) for s in streams)  # None: pythonw
    try:
        return _run_command(run, args)
    finally:
        for stream in (sys.stdout, sys.stderr):  # what is buffered, while a closed pipe is caught
            if stream is not None:
                stream.flush()
        sys.stdout, sys.stderr = streams


def _run_command(run, args):
    try:
        return run(args)
    except (UserError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except Diverged as e:
        print(f"error: training diverged: {e}. Resume from it with a lower --lr.", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C where no handler of ours runs, or a second one while training
        print("\naborted", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupted_by_signals():
    """While inside, SIGINT and SIGTERM (a scheduler's, `kill`) raise KeyboardInterrupt, so that a
    command that keeps its work on Ctrl-C keeps it then too, even where SIGINT came in ignored (a
    background job's, `nohup`)."""
    try:
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (a caller's worker): leave the signals as they are
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def check(ok, message):
    """Raise UserError(message) unless ok: the flag checks read as a list of rules."""
    if not ok:
        raise UserError(message)


def given(args, *names):
    """The flags among names (argparse's dests) that the command line set: a value other than
    None or False (0 is a value)."""
    return [f"--{name.rstrip('_').replace('_', '-')}" for name in names
            if getattr(args, name) is not None and getattr(args, name) is not False]


def check_writable(folder, flag, fix=None):
    """Create folder if needed and prove a file can be written there, before any long work
    starts; if not, one line with the fix (by default: another folder with flag)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}/ ({e.strerror or e}); "
                        f"{fix or f'choose another folder with {flag}'}") from None
    return folder


def check_new_folder(folder, flag):
    """Refuse, before any work, a folder to fill that is a file, a symbolic link or not empty (what
    lies there would be mixed with, or lost to, what is written); create it. Returns the path."""
    folder = Path(folder)
    check(not folder.is_symlink() and not (folder.exists() and not folder.is_dir()),
          f"{flag} {folder} is not a folder: name a new or empty folder")
    check(not folder.exists() or not any(folder.iterdir()),
          f"{flag} {folder}/ is not empty (its files would be mixed with the new ones): name a new "
          f"or empty folder")
    return check_writable(folder, flag)


def first_line(error, limit=150):
    """The first line of an exception's message (its type's name if it has none), at most limit
    characters: what a one-line error quotes of a library's multi-line complaint."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def is_npz(path):
    """Whether the file is an .npz archive holding `images` alone, as --save-npz writes."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist() == ["images.npy"]
    except (OSError, zipfile.BadZipFile):
        return False


def is_json(path):
    """Whether the file is JSON text, as --json writes (at most 64 MB: no result is larger)."""
    try:
        if Path(path).stat().st_size > 2**26:
            return False
        json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return True


def check_output(path, flag, ours):
    """Refuse, before any work, a file a command would write that is a folder, a symbolic link, or
    an existing file that ours(path) does not recognise as this flag's own kind (a checkpoint, the
    data, anything else the user keeps); prove its folder writable. Returns the path."""
    path = Path(path)
    check(not path.is_symlink(), f"{flag} {path} is a symbolic link, which writing would replace: "
                                 f"give the path of a plain file")
    check(not path.is_dir(), f"{flag} {path} is a folder: name a file inside it")
    check(not path.exists() or ours(path),
          f"{flag} {path} exists and is not an earlier output of {flag} (a checkpoint, the data, "
          f"or another file of yours would be lost): choose another name, or remove it first")
    check_writable(path.parent, flag)
    return path
