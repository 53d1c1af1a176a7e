"""What every script shares on the command line: one-line errors for people, argument types,
the device and its autocast.

A user mistake raises UserError and ends as one line on stderr with exit status 2, never a
traceback; a diverging loss raises Diverged and ends with exit status 1.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

# -----------------------------------------------------------------------------
# errors for people: one line, exit status 2, no traceback


class UserError(Exception):
    """A mistake in the user's input or files."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def run_cli(main):
    """Run a script's main(); a UserError becomes one line and exit 2, a divergence exit 1."""
    prog = Path(sys.argv[0]).name
    try:
        main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        sys.exit(1)


def number(kind, allowed, ok):
    """An argparse type: text -> kind, refused with 'VALUE is not allowed; it must be ALLOWED'."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} is not allowed; it must be {allowed}")
        return value
    return parse


positive_int = number(int, "a positive whole number", lambda v: v > 0)
positive_float = number(float, "a positive number", lambda v: v > 0 and math.isfinite(v))
fraction = number(float, "in [0, 1)", lambda v: 0 <= v < 1)

# -----------------------------------------------------------------------------
# the device


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; allowed here: auto, cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU (bf16 there is slower and less exact)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

