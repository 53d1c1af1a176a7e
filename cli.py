"""What every script shares on the command line: one-line errors for people, argument types,
the device and its autocast.

A user mistake raises UserError and ends as one line on stderr with exit status 2, never a
traceback; a diverging loss raises Diverged and ends with exit status 1; Ctrl-C ends with one line
saying what was kept and the command that continues, exit status 130.
"""
import argparse
import math
import os
import shlex
import signal
import sys
from pathlib import Path

import torch

# -----------------------------------------------------------------------------
# errors for people: one line, exit status 2, no traceback


class UserError(Exception):
    """A mistake in the user's input or files."""


class Diverged(Exception):
    """The loss became NaN or infinite."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: each option's default after its help text (where it has one the text does not already
    give); the description and the examples at the end as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if action.option_strings and shown and "default" not in text:  # (0 is shown: only False is no default)
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default {default})" if default != "" else ""
        return text


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


class Terminated(BaseException):
    """SIGTERM: `kill`, or torchrun ending the other processes after one of them failed. A BaseException,
    as KeyboardInterrupt is, so that no `except Exception` swallows it."""


def _terminate(signum, frame):
    raise Terminated()


def _lost_peer(error):
    """A collective that failed because another torchrun process died: gloo raises a plain RuntimeError
    ("Connection reset by peer"), NCCL a DistError."""
    text = str(error)
    return torch.distributed.is_initialized() and (
        isinstance(error, torch.distributed.DistError) or "gloo" in text or "NCCL" in text or "Connection" in text)


def run_cli(main, interrupted=None):
    """Run a script's main(); a UserError becomes one line and exit 2, a divergence exit 1, Ctrl-C one
    line and exit 130, SIGTERM one line and exit 143, a lost torchrun process one line and exit 1.
    interrupted() says, at that moment, what was kept and how to continue. Under torchrun every process
    meets the same errors: rank 0 alone says them, but each process says why it stopped when another
    one ended (torchrun then prints its own summary)."""
    prog = Path(sys.argv[0]).name
    rank = os.environ.get("RANK")  # set by torchrun
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except BaseException as error:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # first: torchrun's SIGTERM must not cut what follows
        ending = _ending(error, prog, rank, interrupted)
        if ending is None:  # a bug (its traceback), or sys.exit
            raise
        line, status, everywhere = ending
        if everywhere or rank in (None, "0"):
            print(line, file=sys.stderr)
        sys.exit(status)


def _ending(error, prog, rank, interrupted):
    """(the one line, the exit status, whether every torchrun process says it) for an error people
    should read as one line; None for the others."""
    kept = (lambda: interrupted()) if interrupted is not None else (lambda: "nothing half-written is left")
    if isinstance(error, UserError):
        return f"{prog}: error: {error}", 2, False
    if isinstance(error, Diverged):
        return f"{prog}: stopped: {error}", 1, False
    if isinstance(error, KeyboardInterrupt):  # every file is written atomically: none is left half-written
        return f"\n{prog}: interrupted; {kept()}", 130, False
    if isinstance(error, Terminated):
        who = "" if rank is None else f" (process {rank}; under torchrun: another process ended, see its message)"
        return f"\n{prog}: terminated{who}; {kept()}", 143, True
    if isinstance(error, RuntimeError) and _lost_peer(error):  # (DistError is a RuntimeError)
        return (f"{prog}: stopped (process {rank}): another process of this torchrun run ended "
                f"({str(error).strip().splitlines()[0][:160]}); {kept()}", 1, True)
    return None


def command_line(*extra):
    """The command that ran, as one copyable line, with `extra` options added where it lacks them."""
    words = ["python", Path(sys.argv[0]).name, *sys.argv[1:]]
    return shlex.join(words + [e for e in extra if e not in words])


def number(kind, allowed, ok):
    """An argparse type: text -> kind, refused with 'VALUE is not allowed; it must be ALLOWED'."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
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

