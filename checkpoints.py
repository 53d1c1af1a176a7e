"""Checkpoints and result files: written atomically, loaded with weights_only=True, checked.

A checkpoint is a plain dict of tensors and plain data (CHECKPOINT_KEYS, plus the run's args and
metrics), so torch.load(..., weights_only=True) can read it and nothing in it can run code.
"""
import os
import pickle
import warnings
from pathlib import Path

import torch

import distributed
from cli import UserError
from models import ARCHS, build_model, to_device

# -----------------------------------------------------------------------------
# files: written to a temporary name and renamed, so a kill never leaves half a file


def save_atomic(path, write):
    """write(tmp_path) then rename over path; on failure the previous file stays as it was."""
    if not distributed.is_main():  # under torchrun every process holds the same model: rank 0 alone writes
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
        except RuntimeError as e:  # torch.save reports a failed write (disk full, quota) as a RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OSError(f"the write failed part-way, is the disk full? ({first})") from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path}: {e.strerror or e}; {kept}") from None
    except BaseException:  # Ctrl-C or a bug: still no half-written temporary left behind
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(obj, path):
    save_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_text(text, path):
    save_atomic(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(path):
    """Fail before any work if path cannot be written (its folder is a file, or is read-only)."""
    path = Path(path)
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {folder} is not a writable folder; choose another path")


CHECKPOINT_KEYS = ("arch", "dataset", "num_classes", "in_channels", "mean", "std", "state_dict")


def load_checkpoint(path, dataset=None, arch=None):
    """Load a checkpoint with weights_only=True: tensors and plain data only, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one with 'python train.py' or pass another path")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles on stderr before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"checkpoint {path} was refused: it holds objects other than tensors and plain data "
                        "(a pickle that could run code), so it was not loaded") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                        "retrain it or pass another file") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a PruneLoRA checkpoint (it needs the keys {', '.join(CHECKPOINT_KEYS)})")
    for key, wanted in (("dataset", dataset), ("arch", arch)):
        if wanted is not None and ckpt[key] != wanted:
            raise UserError(f"checkpoint {path} is for {key} {ckpt[key]!r}, not {wanted!r}; "
                            f"pass --{key} {ckpt[key]} or another checkpoint")
    return ckpt


def check_checkpoint_fits(ckpt, data, path):
    """The checkpoint's classes and channels must be the dataset's (a folder may have changed since)."""
    shape = (ckpt["num_classes"], ckpt["in_channels"])
    if shape != (data.num_classes, data.train_images.shape[1]):
        raise UserError(f"checkpoint {path} has {shape[0]} classes and {shape[1]} channels, but {data.name} has "
                        f"{data.num_classes} and {data.train_images.shape[1]}; use a checkpoint trained on this data")


def model_from_checkpoint(ckpt, path="checkpoint"):
    """The model the checkpoint holds, rebuilt from the checkpoint alone (a checkpoint without
    a width, from before --width existed, has the architecture's standard width)."""
    model = build_model(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"], ckpt.get("width"))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path} does not match the {ckpt['arch']} architecture ({first})") from None
    return model


def checkpoint_dict(model, data, arch, args, width=None, **extra):
    return dict(arch=arch, width=width, dataset=data.name, num_classes=data.num_classes,
                in_channels=data.train_images.shape[1], classes=data.classes, mean=data.mean.cpu(), std=data.std.cpu(),
                state_dict={k: v.cpu() for k, v in model.state_dict().items()}, args=args,
                world_size=distributed.world_size(), **extra)


def default_checkpoint(dataset, arch, exclude=(), width=None, seed=0, train_limit=None):
    """checkpoints/<dataset>-<arch>[-w<width>][-n<N>][-seed<S>][-without<K>].pt: the width only when
    not the standard one, n<N> for a --train-limit N run (so a run on all images never picks up, or
    trains over, a model of N images), the seed only when not 0 (each seed its own base and Retrain)."""
    name = f"folder-{Path(dataset[len('folder:'):]).resolve().name}" if dataset.startswith("folder:") else dataset
    if arch.startswith("tv:"):  # tv:NAME:key=value,... -> tv-NAME-key=value-...: a plain file name
        arch = arch.replace(":", "-").replace(",", "-")
    elif width is not None and width != ARCHS[arch][1]:
        arch = f"{arch}-w{width}"
    if train_limit is not None:
        arch = f"{arch}-n{train_limit}"
    suffix = (f"-seed{seed}" if seed else "") + (f"-without{'-'.join(map(str, exclude))}" if exclude else "")
    return Path("checkpoints") / f"{name}-{arch}{suffix}.pt"


def fresh_model(base, device):
    """A new copy of the base model on the device, laid out as train.py trains it."""
    return to_device(model_from_checkpoint(base), device)
