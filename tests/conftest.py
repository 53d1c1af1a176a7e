"""Shared test fixtures: a tiny synthetic image dataset in ImageFolder layout."""
import numpy as np
import pytest
from PIL import Image

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
