"""The main job's subcommands (`python -m unimoe_kernels ...`), one module each, and what they share.

    Parser (argparse, every option's default shown) --parse--> args --job.run(args)--> result
    a bad value: an argparse type below, or UsageError raised by run()
      -> one line `<prog>: error: <message>` on stderr, exit status 2 (argparse's convention)

UsageError is for what the user fixes on the command line (a value out of range, no CUDA device for
--device cuda, a run directory holding another run); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
from typing import Callable

EXIT_USAGE = 2  # argparse's exit status for a command-line error


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
    """run(args), with a UsageError turned into parser.error (one line, exit 2)."""
    try:
        return run(args)
    except UsageError as e:
        parser.error(str(e))


def _number(kind: type, lo, inclusive: bool, what: str) -> Callable[[str], object]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < lo or (value == lo and not inclusive) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


def int_at_least(lo: int) -> Callable[[str], int]:
    """argparse type: an int >= lo."""
    return _number(int, lo, True, f"an integer >= {lo}")


def float_above(lo: float) -> Callable[[str], float]:
    """argparse type: a float > lo (NaN refused)."""
    return _number(float, lo, False, f"a number > {lo:g}")


def float_at_least(lo: float) -> Callable[[str], float]:
    """argparse type: a float >= lo (NaN refused)."""
    return _number(float, lo, True, f"a number >= {lo:g}")


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


__all__ = ["UsageError", "Formatter", "Parser", "run_or_exit", "int_at_least", "float_above", "float_at_least",
           "pick_device", "EXIT_USAGE"]
