"""What every command line shares: the one-line errors and their exit status, the parser, and the
check that an output folder can be written before any long work starts. Devices are device.py's,
ranks distributed.py's, the sampler's settings samplers.py's."""
import argparse
import sys
import tempfile
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
    except KeyboardInterrupt:
        # Ctrl-C where no handler of ours runs, or a second one while training
        print("\naborted", file=sys.stderr)
        sys.exit(130)


def check(ok, message):
    """Raise UserError(message) unless ok: the flag checks read as a list of rules."""
    if not ok:
        raise UserError(message)


def check_writable(folder, flag):
    """Create folder if needed and prove a file can be written there, before any long work
    starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder}/ ({e.strerror or e}); choose another folder "
                        f"with {flag}") from None
    return folder


def first_line(error, limit=150):
    """The first line of an exception's message (its type's name if it has none), at most limit
    characters: what a one-line error quotes of a library's multi-line complaint."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
