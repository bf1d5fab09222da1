"""The main job's subcommands (`python -m unimoe_kernels ...`), one module each, and what they share.

    Parser (argparse, every option's default shown) --parse--> args --job.run(args)--> result
    a bad value: an argparse type below, or UsageError raised by run()
      -> one line `<prog>: error: <message>` on stderr, exit status 2 (argparse's convention)

UsageError is for what the user fixes on the command line (a value out of range, no CUDA device for
--device cuda, a run directory holding another run); models.errors.RunError (a damaged checkpoint, a
diverged run) prints the same way; anything else is a bug and keeps its traceback.

A job that writes a run directory holds it with run_directory(out): created and checked writable
before any training, and locked (OUT/.lock, flock) so that a second live run into it stops at once
with one line naming the first one's pid; a dead run's lock is released by the kernel and taken over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Callable, Iterator

from ..models.errors import RunError

try:
    import fcntl
except ImportError:  # not POSIX: run directories are not locked there
    fcntl = None

EXIT_USAGE = 2  # argparse's exit status for a command-line error
LOCK_NAME = ".lock"


class UsageError(ValueError):
    """A command-line value or run state the user has to change; printed as one `error:` line."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; descriptions keep their line breaks (data-flow blocks)."""

    def _get_help_string(self, action):
        # A required option has no default to show (argparse would print "(default: None)").
        return action.help if action.required else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line `<prog>: error: ...` and exit 2 (no usage block, no
    traceback), so a script can read the reason from the last line of stderr."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def run_or_exit(parser: argparse.ArgumentParser, run: Callable, args: argparse.Namespace):
    """run(args), with a UsageError or a RunError turned into parser.error (one line, exit 2)."""
    try:
        return run(args)
    except (UsageError, RunError) as e:
        parser.error(str(e))


def _number(kind: type, lo, inclusive: bool, what: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        # Infinity passes every comparison with lo and NaN fails them all: both are refused here.
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an int >= lo."""
    return _number(int, lo, True, f"an integer >= {lo}")


def float_above(lo: float) -> Callable[[str], float]:
    """argparse type: a finite float > lo (NaN and infinity refused)."""
    return _number(float, lo, False, f"a finite number > {lo:g}")


def float_at_least(lo: float) -> Callable[[str], float]:
    """argparse type: a finite float >= lo (NaN and infinity refused)."""
    return _number(float, lo, True, f"a finite number >= {lo:g}")


def pick_device(name: str, flag: str = "--device"):
    """auto | cpu | cuda[:i] -> torch.device; a UsageError for an unknown name or a missing GPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} must be auto, cpu or cuda[:index], got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} must be auto, cpu or cuda[:index], got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {name}: torch sees no CUDA device here (torch {torch.__version__}); "
                             f"use {flag} cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("unimoe_kernels", "__main__.py")):
        argv[0] = "python -m unimoe_kernels"
    return " ".join(argv)


def _holder(fd: int) -> dict:
    """What the lock file says about the run that wrote it ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        record = json.loads(os.read(fd, 1 << 16).decode() or "{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _open_run_directory(out: str, flag: str) -> int:
    """Create `out` if needed and open its lock file for writing: a UsageError naming `flag` when
    that is not possible, so an unwritable directory stops the job before it trains."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{flag} {out} is a file, not a directory: pass a directory (it is created when missing)")
    try:
        os.makedirs(out, exist_ok=True)
        return os.open(os.path.join(out, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) else out
        raise UsageError(f"{flag} {out}: cannot write there ({where}: {e.strerror}): "
                         "pass a writable directory") from None


@contextlib.contextmanager
def run_directory(out: str, flag: str = "--out") -> Iterator[None]:
    """Hold run directory `out` for the duration of the block (see the module docstring); a lock a
    dead run left behind is taken over, and the screen says so."""
    created = not os.path.isdir(out)
    fd = _open_run_directory(out, flag)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _holder(fd)
                who = (f"pid {other['pid']} ({other.get('command', '?')}, since {other.get('since', '?')})"
                       if "pid" in other else "a process that is just starting")
                raise UsageError(f"{out} is in use by another live run, {who}: wait for it to end or stop it, "
                                 f"or pass another {flag}") from None
        previous = _holder(fd)
        record = {"pid": os.getpid(), "command": _command_line(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        if previous.get("pid") not in (None, os.getpid()):
            print(f"{out}: taking over the lock of pid {previous['pid']}, which ended without releasing it", flush=True)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: the run ended cleanly
            if created and os.listdir(out) == [LOCK_NAME]:
                # A job that stopped before writing anything leaves no directory behind either.
                os.remove(os.path.join(out, LOCK_NAME))
                os.rmdir(out)
    finally:
        os.close(fd)  # closing releases the flock


__all__ = ["UsageError", "Formatter", "Parser", "run_or_exit", "int_at_least", "float_above", "float_at_least",
           "pick_device", "run_directory", "EXIT_USAGE", "LOCK_NAME"]
