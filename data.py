"""The data: whole datasets as uint8 tensors on the device, batches by index, augmentation on the device.

    data = load_dataset("cifar10").to(device)     # or fashion-mnist, mnist, cifar100, folder:PATH
    x = make_batch(data, data.train_images, index, generator)   # (B, C, H, W) normalised, augmented
    logits = predict(model, data, data.test_images)            # eval mode, no augmentation

No DataLoader and no workers: the whole of CIFAR-10 is 180 MB as uint8, so it sits on the device
and a batch is one gather, a random crop with 4 pixels of padding and a horizontal flip.
"""
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoints import save_checkpoint
from cli import UserError, autocast

# -----------------------------------------------------------------------------
# datasets as uint8 tensors


@dataclass
class Data:
    name: str
    classes: list              # class names; index = label
    train_images: torch.Tensor  # (N, C, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: torch.Tensor          # (C,) per-channel, from the training images, in [0, 1]
    std: torch.Tensor
    flip: bool                  # horizontal flip is a valid augmentation (not for digits)

    @property
    def num_classes(self):
        return len(self.classes)

    def to(self, device):
        for field in ("train_images", "train_labels", "test_images", "test_labels", "mean", "std"):
            setattr(self, field, getattr(self, field).to(device))
        return self


# name: (torchvision class, horizontal flip allowed)
TORCHVISION_DATASETS = {"cifar10": ("CIFAR10", True), "cifar100": ("CIFAR100", True),
                        "fashion-mnist": ("FashionMNIST", True), "mnist": ("MNIST", False)}
DATASET_HELP = f"{', '.join(TORCHVISION_DATASETS)}, stripes (made here, no download), or folder:PATH"


def check_dataset_name(name):
    if name not in (*TORCHVISION_DATASETS, "stripes") and not (name.startswith("folder:") and len(name) > 7):
        raise UserError(f"unknown dataset {name!r}; allowed: {DATASET_HELP}")


def load_dataset(name, data_dir="data"):
    """Everything as uint8 tensors on the CPU; move with .to(device)."""
    check_dataset_name(name)
    if name.startswith("folder:"):
        arrays = load_folder(Path(name[len("folder:"):]), Path(data_dir))
        flip = True
    elif name == "stripes":
        arrays, flip = make_stripes(), False  # a flip turns 36 degrees into 144: another class
    else:
        arrays, flip = load_torchvision(name, data_dir), TORCHVISION_DATASETS[name][1]
    train_images = arrays["train_images"]
    pixels = train_images.float().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return Data(name, list(arrays["classes"]), train_images, arrays["train_labels"],
                arrays["test_images"], arrays["test_labels"], pixels.mean(1), pixels.std(1), flip)


def load_torchvision(name, data_dir):
    import torchvision  # here, so that prunelora users who only import models need no torchvision
    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name][0])
    # folders torchvision makes before a download; removed again if it fails, so a failure writes nothing
    folders = [Path(data_dir), Path(data_dir) / cls.__name__, Path(data_dir) / cls.__name__ / "raw"]
    new_folders = [f for f in folders if not f.exists()]
    splits = {}
    for train in (True, False):
        try:
            try:
                ds = cls(data_dir, train=train, download=False)  # no network, no checksums when present
            except RuntimeError:
                ds = cls(data_dir, train=train, download=True)
        except Exception as e:
            for folder in reversed(new_folders):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"dataset {name} is not under {Path(data_dir).resolve()} and could not be downloaded "
                            f"({reason}); connect to the internet, point --data-dir at a folder that holds it, "
                            "or use --dataset folder:PATH") from None
        images = torch.as_tensor(np.asarray(ds.data))
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # -> (N, C, H, W)
        splits["train" if train else "test"] = (images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))
    return dict(classes=ds.classes, train_images=splits["train"][0], train_labels=splits["train"][1],
                test_images=splits["test"][0], test_labels=splits["test"][1])


# a dataset that needs no download, so that a first run works offline: the class is the stripes' angle and width
STRIPES = [f"{angle}deg-{width}" for width in ("wide", "narrow") for angle in (0, 36, 72, 108, 144)]


def make_stripes(train_per_class=500, test_per_class=100, seed=0):
    """'stripes': 32x32 RGB sinusoidal stripes, 10 classes (5 angles x 2 widths), each image with a random
    phase, random colours and pixel noise; generated from `seed`, the same images every time."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    arrays = dict(classes=STRIPES)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(len(STRIPES)), per_class)
        angle = np.deg2rad(36 * (labels % 5))[:, None, None]
        frequency = np.where(labels < 5, 0.5, 1.0)[:, None, None]  # radians per pixel: wide, then narrow
        phase = rng.uniform(0, 2 * np.pi, (len(labels), 1, 1))
        wave = np.sin(frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)  # (N, 32, 32)
        colours = rng.uniform(0.2, 1.0, (len(labels), 3, 1, 1))
        images = 0.5 + 0.25 * wave[:, None] * colours + rng.normal(0, 0.6, (len(labels), 3, 32, 32))
        arrays[f"{split}_images"] = torch.from_numpy((images.clip(0, 1) * 255).astype(np.uint8))
        arrays[f"{split}_labels"] = torch.from_numpy(labels).long()
    return arrays


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_folder(root, data_dir):
    """An ImageFolder layout root/{train,test}/<class>/*, decoded once and cached as a uint8 tensor file."""
    classes = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"folder dataset {root} has no {split}/ folder; expected "
                            f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg")
        classes[split] = sorted(d.name for d in (root / split).iterdir() if d.is_dir())
    if not classes["train"]:
        raise UserError(f"folder dataset {root}/train has no class folders; expected {root}/train/<class>/*.jpg")
    if classes["train"] != classes["test"]:
        differ = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise UserError(f"folder dataset {root}: the classes in train/ and test/ differ ({', '.join(differ)}); "
                        "both must hold the same class folders")
    files = {split: [(p, label) for label, c in enumerate(classes[split])
                     for p in sorted((root / split / c).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
             for split in ("train", "test")}
    # the cache key changes when any file is added, removed, resized or touched
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for split in files.values() for p, _ in split]
    key = hashlib.sha1(repr((str(root.resolve()), stats)).encode()).hexdigest()[:16]
    cache = data_dir / "cache" / f"folder-{root.name}-{key}.pt"
    if cache.is_file():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:
            pass  # a damaged cache is rebuilt below
    from PIL import Image
    print(f"decoding {sum(map(len, files.values()))} images from {root} (once; cached in {cache})", flush=True)
    arrays = dict(classes=classes["train"])
    size = None
    for split, items in files.items():
        if not items:
            raise UserError(f"folder dataset {root}/{split} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        images = []
        for path, _ in items:
            with Image.open(path) as img:
                img = img.convert("RGB")
                size = size or img.size
                images.append(np.asarray(img if img.size == size else img.resize(size)))
        arrays[f"{split}_images"] = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        arrays[f"{split}_labels"] = torch.tensor([label for _, label in items], dtype=torch.long)
    save_checkpoint(arrays, cache)
    return arrays


# -----------------------------------------------------------------------------
# which images a run uses


def balanced_subset(labels, limit, num_classes):
    """Indices of the first limit // num_classes images of each class (same per class, same every run)."""
    per_class = limit // num_classes
    if per_class == 0:
        raise UserError(f"--train-limit {limit} is too small: it must be at least the class count, {num_classes}")
    index = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)]
    return torch.cat(index).sort().values


def class_numbers(values, classes, flag):
    """Classes given by number or by name (any case), e.g. 3 or cat, -> their numbers; anything else
    is one error line that lists every class."""
    names = [name.lower() for name in classes]
    numbers = []
    for value in map(str, values):
        if value.lstrip("-").isdigit() and 0 <= int(value) < len(classes):
            numbers.append(int(value))
        elif value.lower() in names:
            numbers.append(names.index(value.lower()))
        else:
            listed = ", ".join(f"{i} {name}" for i, name in enumerate(classes))
            raise UserError(f"{flag} {value} is out of range or not a class name; allowed: 0 to {len(classes) - 1} "
                            f"or a name ({listed})")
    return numbers


def check_classes(classes, num_classes, flag, must_leave=0):
    """Each class in range and named once; with must_leave, that many classes remain without them."""
    for c in classes:
        if not 0 <= c < num_classes:
            raise UserError(f"{flag} {c} is out of range; allowed: 0 to {num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise UserError(f"{flag} repeats a class ({' '.join(map(str, classes))}); name each class once")
    if num_classes - len(classes) < must_leave:
        raise UserError(f"{flag} leaves {num_classes - len(classes)} class(es); at least {must_leave} must remain")


def training_index(data, exclude_classes=(), train_limit=None, exclude_index=()):
    """Which training images a run uses: the balanced --train-limit subset, without excluded classes
    and without the excluded images (indices into the whole training set)."""
    labels = data.train_labels.cpu()  # the index lives on the CPU, wherever the data is
    index = balanced_subset(labels, train_limit, data.num_classes) if train_limit else torch.arange(len(labels))
    keep = ~torch.isin(labels[index], torch.tensor(list(exclude_classes), dtype=torch.long))
    keep &= ~torch.isin(index, torch.as_tensor(list(exclude_index), dtype=torch.long))
    return index[keep]


def index_or_all(data, index=None):
    """Training-image indices on the data's device: index, or every training image when None."""
    return (torch.arange(len(data.train_labels)) if index is None else index).to(data.train_labels.device)


def forget_share_index(data, index, share, seed):
    """--forget-share: that share of the training images in index, the same share of every class
    (round(share * n_c) images of class c), drawn with seed; sorted."""
    generator = torch.Generator().manual_seed(seed)
    labels = data.train_labels.cpu()[index]
    picks = []
    for c in range(data.num_classes):
        members = index[labels == c]
        k = round(share * len(members))
        if len(members) and k >= len(members):
            raise UserError(f"--forget-share {share} forgets every image of class {c} ({data.classes[c]}); "
                            "choose a smaller share, or forget the class with --forget-class")
        picks.append(members[torch.randperm(len(members), generator=generator)[:k]])
    forget = torch.cat(picks).sort().values
    if not len(forget):
        raise UserError(f"--forget-share {share} forgets no image of the {len(index)} training images; "
                        "choose a larger share")
    return forget


def read_forget_index(path, index):
    """--forget-index FILE: one training-image index per line, each among index (the images the run
    uses), none twice; returns them sorted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--forget-index {path} does not exist; give a file with one training-image index per line")
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--forget-index {path} cannot be read as text ({type(e).__name__})") from None
    if not lines:
        raise UserError(f"--forget-index {path} is empty; give one training-image index per line")
    bad = next((line for line in lines if not line.lstrip("-").isdigit()), None)
    if bad is not None:
        raise UserError(f"--forget-index {path}: {bad!r} is not a whole number; give one training-image index per line")
    forget = torch.tensor([int(line) for line in lines], dtype=torch.long)
    outside = forget[~torch.isin(forget, index.cpu())]
    if len(outside):
        subset = " (the --train-limit subset)" if len(index) <= int(index.max()) else ""
        raise UserError(f"--forget-index {path}: image {int(outside[0])} is out of range; allowed: indices of the "
                        f"{len(index)} training images this run uses{subset}, 0 to {int(index.max())}")
    if len(forget.unique()) != len(forget):
        twice = next(int(v) for v, n in zip(*forget.unique(return_counts=True)) if n > 1)
        raise UserError(f"--forget-index {path} names image {twice} more than once; name each once")
    if len(forget) == len(index):
        raise UserError(f"--forget-index {path} names every training image; at least one must be retained")
    return forget.sort().values


def forget_tag(forget_classes=(), share=None, index_file=None):
    """How result and checkpoint names call the forget set: forget3-5, forget-share0.1, forget-index-<hash>."""
    if forget_classes:
        return "forget" + "-".join(map(str, forget_classes))
    if share:
        return f"forget-share{share:g}"
    path = Path(index_file)  # a missing file is reported by read_forget_index
    return f"forget-index-{hashlib.sha1(path.read_bytes()).hexdigest()[:8]}" if path.is_file() else "forget-index"


def forget_split(data, index, forget_classes=(), share=None, index_file=None, seed=0):
    """The forget set among the training images in index: whole classes, a random share (drawn
    with seed, the same share of every class) or the images a file names. Returns (split,
    forget_index, forget_name): split holds the train / retain / forget indices; forget_index the
    forget images as a list for a random sample (None for classes); forget_name names its Retrain
    checkpoint (the classes, or <n>images-<hash>)."""
    if forget_classes:
        forget = index[forget_mask(data.train_labels.cpu()[index], forget_classes)]
        forget_index, name = None, "-".join(map(str, forget_classes))
    else:
        forget = forget_share_index(data, index, share, seed) if share else read_forget_index(index_file, index)
        forget_index = forget.tolist()
        name = f"{len(forget)}images-{hashlib.sha1(forget.numpy().tobytes()).hexdigest()[:8]}"
    return dict(train=index, retain=index[~torch.isin(index, forget)], forget=forget), forget_index, name


def forget_mask(labels, forget_classes):
    return torch.isin(labels, torch.tensor(list(forget_classes), dtype=torch.long, device=labels.device))


def with_labels(data, index, labels):
    """The same image tensors, with the training images at index labelled `labels` instead."""
    new = data.train_labels.clone()
    new[index] = labels.to(new.device)
    return replace(data, train_labels=new)

# -----------------------------------------------------------------------------
# batches, augmentation and prediction, on the device


def random_crop_flip(x, generator, flip, pad=4):
    """Per-image random crop (zero padding) and horizontal flip of a batch (B, C, H, W), on its device."""
    B, C, H, W = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, B), generator=generator)).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    x = padded[torch.arange(B, device=x.device)[:, None, None, None],
               torch.arange(C, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mirror = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def make_batch(data, images, index, generator=None):
    """uint8 images[index] -> normalised float batch; augmented when a generator is given."""
    x = images[index].float().div_(255)
    if generator is not None:
        x = random_crop_flip(x, generator, data.flip)
    x = (x - data.mean[:, None, None]) / data.std[:, None, None]
    return x.contiguous(memory_format=torch.channels_last)  # as models.to_device lays out the weights


@torch.no_grad()
def predict(model, data, images, batch_size=1000, features=False):
    """Logits (N, classes), or with features=True the penultimate features (N, D), in fp32,
    in eval mode, without augmentation."""
    was_training = model.training
    model.eval()
    forward = model.features if features else model
    device = images.device
    with autocast(device):
        outputs = [forward(make_batch(data, images, torch.arange(i, min(i + batch_size, len(images)), device=device)))
                   .float() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0, data.num_classes, device=device)


def percent(correct):
    """Share of True in a bool tensor, in percent (NaN when empty)."""
    return 100 * correct.float().mean().item() if len(correct) else float("nan")
