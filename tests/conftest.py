"""Shared test fixtures: a tiny synthetic image dataset in ImageFolder layout, and a cnn trained on it."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unlearn
from checkpoints import load_checkpoint
from data import load_dataset, training_index

SYNTHETIC_CLASSES = 4


def write_synthetic_dataset(root, train_per_class=60, test_per_class=20, classes=SYNTHETIC_CLASSES, seed=0):
    """32x32 RGB images whose class is a stripe orientation and colour, with noise: learnable in an epoch or two."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            angle = np.pi * c / classes
            colour = np.eye(3)[c % 3] * 0.6 + 0.2
            for i in range(count):
                phase = rng.uniform(0, 2 * np.pi)
                img = (np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.8 + phase)[..., None] * colour * 0.5 + 0.5
                       + rng.normal(0, 0.15, (32, 32, 3)))
                Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """(dataset flag, data dir) for a synthetic folder: dataset shared by the whole session."""
    root = write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "images")
    return f"folder:{root}", str(root.parent / "data")


@pytest.fixture(scope="session")
def base_checkpoint(synthetic_dataset, tmp_path_factory):
    """A small cnn trained on the synthetic data through the real command line."""
    dataset, data_dir = synthetic_dataset
    out = tmp_path_factory.mktemp("base") / "base.pt"
    result = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"), "--dataset",
                             dataset, "--data-dir", data_dir, "--arch", "cnn", "--epochs", "2", "--batch-size", "32",
                             "--lr", "0.05", "--out", str(out)], cwd=out.parent, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def class_1_task(synthetic_dataset, base_checkpoint):
    """(data, base checkpoint, split) for forgetting class 1 of the synthetic data."""
    dataset, data_dir = synthetic_dataset
    data = load_dataset(dataset, data_dir)
    index = training_index(data)
    forget = data.train_labels == 1
    split = dict(train=index, retain=index[~forget], forget=index[forget])
    return data, load_checkpoint(base_checkpoint, dataset, "cnn"), split


def unlearn_args(**changes):
    """unlearn.py's options with its command line's defaults, set for a quick run on the synthetic data
    (forget class 1, rank 4, one epoch of batch 32, seed 0), then changed by `changes`: a test that
    builds them by hand would have to learn of every new option."""
    args = unlearn.build_parser().parse_args(["--forget-class", "1"])
    vars(args).update({**dict(forget_class=[1], rank=4, alpha=8, epochs=1, batch_size=32, seed=0, arch="cnn"),
                       **changes})
    return args
