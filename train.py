"""Train a classifier: the base model that PruneLoRA unlearns from, or the Retrain baseline.

    python train.py                                    # CIFAR-10, ResNet-18 (CIFAR stem)
    python train.py --exclude-class 3                  # Retrain: never sees class 3
    python train.py --dataset fashion-mnist --arch cnn --train-limit 6000 --epochs 5

train.py owns the data and the models; unlearn.py and evaluate.py import them from here.
The whole dataset lives on the device as uint8 tensors: batches are drawn by index and
augmented (random crop with 4 pixels of padding, horizontal flip) on the device, with no
DataLoader workers.
"""
import argparse
import hashlib
import math
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; allowed here: auto, cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU (bf16 there is slower and less exact)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

# -----------------------------------------------------------------------------
# files: written to a temporary name and renamed, so a kill never leaves half a file


def save_atomic(path, write):
    """write(tmp_path) then rename over path; on failure the previous file stays as it was."""
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
    model = build_model(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path} does not match the {ckpt['arch']} architecture ({first})") from None
    return model

# -----------------------------------------------------------------------------
# data


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
DATASET_HELP = f"{', '.join(TORCHVISION_DATASETS)}, or folder:PATH"


def check_dataset_name(name):
    if name not in TORCHVISION_DATASETS and not (name.startswith("folder:") and len(name) > 7):
        raise UserError(f"unknown dataset {name!r}; allowed: {DATASET_HELP}")


def load_dataset(name, data_dir="data"):
    """Everything as uint8 tensors on the CPU; move with .to(device)."""
    check_dataset_name(name)
    if name.startswith("folder:"):
        arrays = load_folder(Path(name[len("folder:"):]), Path(data_dir))
        flip = True
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


def balanced_subset(labels, limit, num_classes):
    """Indices of the first limit // num_classes images of each class (same per class, same every run)."""
    per_class = limit // num_classes
    if per_class == 0:
        raise UserError(f"--train-limit {limit} is too small: it must be at least the class count, {num_classes}")
    index = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)]
    return torch.cat(index).sort().values


def check_classes(classes, num_classes, flag, must_leave=0):
    """Each class in range and named once; with must_leave, that many classes remain without them."""
    for c in classes:
        if not 0 <= c < num_classes:
            raise UserError(f"{flag} {c} is out of range; allowed: 0 to {num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise UserError(f"{flag} repeats a class ({' '.join(map(str, classes))}); name each class once")
    if num_classes - len(classes) < must_leave:
        raise UserError(f"{flag} leaves {num_classes - len(classes)} class(es); at least {must_leave} must remain")


def random_crop_flip(x, generator, flip, pad=4):
    """Per-image random crop (zero padding) and horizontal flip of a batch (B, C, H, W), on its device."""
    B, C, H, W = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (2, B), generator=generator)).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    x = padded[torch.arange(B, device=x.device)[:, None, None, None], torch.arange(C, device=x.device)[None, :, None, None], rows, cols]
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
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


@torch.no_grad()
def predict(model, data, images, batch_size=1000, features=False):
    """Logits (N, classes), or with features=True the penultimate features (N, D), in fp32,
    in eval mode, without augmentation."""
    was_training = model.training
    model.eval()
    forward = model.features if features else model
    device = images.device
    with autocast(device):
        outputs = [forward(make_batch(data, images, torch.arange(i, min(i + batch_size, len(images)), device=device))).float()
                   for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0, data.num_classes, device=device)

# -----------------------------------------------------------------------------
# models: every one names its classifier "head", so exclude=("head",) means the same everywhere


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = shortcut(in_planes, planes * 4, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def shortcut(in_planes, out_planes, stride):
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """CIFAR variant: a 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their detail."""

    def __init__(self, block, blocks_per_stage, in_channels, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            layers = []
            for j in range(n):
                layers.append(block(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = nn.Linear(in_planes, num_classes)

    def features(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 512 * expansion)

    def forward(self, x):
        return self.head(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention with nn.Linear projections, so pruning and LoRA reach them."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3x (B, h, T, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sincos_position_embedding(h, w, dim):
    """Fixed 2-D sin-cos embedding (h*w, dim): a quarter of the channels for each of sin/cos of y/x."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class ViT(nn.Module):
    """ViT-S/4 for 32x32 inputs: 4x4 patches -> 64 tokens, 12 blocks of width 384, mean-pooled."""

    def __init__(self, in_channels, num_classes, patch=4, dim=384, depth=12, heads=6, mlp_dim=1536):
        super().__init__()
        self.dim = dim
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x):
        x = self.patch(x)                                   # (B, dim, H/4, W/4)
        pos = sincos_position_embedding(x.shape[2], x.shape[3], self.dim).to(x.device, x.dtype)
        x = x.flatten(2).transpose(1, 2) + pos              # (B, T, dim)
        return self.norm(self.blocks(x)).mean(1)            # (B, dim)

    def forward(self, x):
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """Four conv layers, each followed by a 2x2 max-pool but the last: ~0.4 M parameters and
    ~10 M multiply-adds per 32x32 image, fast enough for real-data runs on a CPU."""

    def __init__(self, in_channels, num_classes, width=32):
        super().__init__()
        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        w = width
        self.body = nn.Sequential(conv(in_channels, w), nn.MaxPool2d(2), conv(w, 2 * w), nn.MaxPool2d(2),
                                  conv(2 * w, 4 * w), nn.MaxPool2d(2), conv(4 * w, 8 * w))
        self.head = nn.Linear(8 * w, num_classes)

    def features(self, x):
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)  # (B, 8 * width)

    def forward(self, x):
        return self.head(self.features(x))


ARCHS = {
    "resnet18": lambda c, k: ResNet(BasicBlock, (2, 2, 2, 2), c, k),
    "resnet50": lambda c, k: ResNet(Bottleneck, (3, 4, 6, 3), c, k),
    "vit": lambda c, k: ViT(c, k),
    "cnn": lambda c, k: SmallCNN(c, k),
}


def build_model(arch, in_channels, num_classes):
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    return ARCHS[arch](in_channels, num_classes)

# -----------------------------------------------------------------------------
# the training loop, shared with unlearn.py


def fit(model, data, index, *, epochs, batch_size, optimizer, generator, lr_at=None, loss_fn=F.cross_entropy,
        start_epoch=0, on_epoch_end=None, test_images=None, test_labels=None, log=print):
    """Train on data.train_images[index] for epochs, augmented, with bf16 autocast on CUDA.

    lr_at(step) sets the learning rate per step (None: keep the optimizer's). loss_fn(logits, labels)
    may be anything (unlearn.py passes gradient ascent and random labels). on_epoch_end(epoch, test_acc) runs
    after each epoch with the test accuracy when test images are given (train.py saves there). Raises Diverged on a NaN/inf loss.
    """
    images, labels = data.train_images, data.train_labels
    device = images.device
    index = index.to(device)
    steps_per_epoch = max(len(index) // batch_size, 1)  # drop the last partial batch: BatchNorm needs > 1 image
    model.train()
    for epoch in range(start_epoch, epochs):
        start, last_live = time.time(), time.time()
        order = index[torch.randperm(len(index), generator=generator).to(device)]
        loss_sum = correct = seen = 0
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            x, y = make_batch(data, images, batch, generator), labels[batch]
            global_step = epoch * steps_per_epoch + step
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(global_step, epochs * steps_per_epoch)
            with autocast(device):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                lr = optimizer.param_groups[0]["lr"]
                raise Diverged(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                               f"(learning rate {lr:g}); the learning rate is probably too high")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            if time.time() - last_live > 30:  # a live line on long epochs
                last_live = time.time()
                log(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch}  loss {loss_sum / seen:.4f}  "
                    f"{seen / (time.time() - start):.0f} img/s")
        seconds = time.time() - start
        line = (f"epoch {epoch + 1}/{epochs}  loss {loss_sum / seen:.4f}  train {100 * correct / seen:.2f}%")
        # the last step's update can break the model without any loss showing it: check its outputs
        # (on the test images, else on the last batch) before the epoch counts and anything saves it
        outputs = predict(model, data, test_images if test_images is not None else images[batch])
        model.train()
        if not torch.isfinite(outputs).all():
            lr = optimizer.param_groups[0]["lr"]
            raise Diverged(f"the model's outputs became NaN or infinite after epoch {epoch + 1}, step {steps_per_epoch} "
                           f"(learning rate {lr:g}); the learning rate is probably too high")
        if test_images is not None:
            test_acc = 100 * (outputs.argmax(1) == test_labels).float().mean().item()
            line += f"  test {test_acc:.2f}%"
        eta = (time.time() - start) * (epochs - epoch - 1)
        log(f"{line}  {seen / seconds:.0f} img/s  eta {eta / 60:.1f} min")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, test_acc if test_images is not None else None)


def warmup_cosine(step, total_steps, peak, warmup=0.05):
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warm = max(int(warmup * total_steps), 1)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total_steps - warm, 1)))


def checkpoint_dict(model, data, arch, args, **extra):
    return dict(arch=arch, dataset=data.name, num_classes=data.num_classes, in_channels=data.train_images.shape[1],
                classes=data.classes, mean=data.mean.cpu(), std=data.std.cpu(),
                state_dict={k: v.cpu() for k, v in model.state_dict().items()}, args=args, **extra)


def training_index(data, exclude_classes=(), train_limit=None):
    """Which training images a run uses: the balanced --train-limit subset, without excluded classes."""
    index = torch.arange(len(data.train_labels))
    if train_limit:
        index = balanced_subset(data.train_labels, train_limit, data.num_classes)
    keep = ~torch.isin(data.train_labels[index], torch.tensor(list(exclude_classes), dtype=torch.long))
    return index[keep]


# the arguments that must match for --resume to continue a run
RUN_KEYS = ("dataset", "arch", "epochs", "batch_size", "lr", "momentum", "weight_decay", "seed",
            "exclude_class", "train_limit")


def train(args, data, device, log=print):
    """Train args.arch on data (already on device) and save args.out; returns the checkpoint dict."""
    out = Path(args.out)
    run = {k: getattr(args, k) for k in RUN_KEYS}
    ckpt = None
    if args.resume:  # every check on the checkpoint before any work
        ckpt = load_checkpoint(out, args.dataset, args.arch)
        if ckpt.get("complete"):
            log(f"{out} is already complete ({ckpt['epochs_done']} epochs); nothing to resume")
            return ckpt
        lacks = [k for k in ("args", "optimizer", "generator", "torch_rng", "epochs_done", "seconds") if k not in ckpt]
        if lacks:
            raise UserError(f"--resume: {out} cannot be resumed (it has no {', '.join(lacks)}); train afresh without --resume")
        for key in RUN_KEYS:
            if ckpt["args"].get(key) != run[key]:
                raise UserError(f"--resume: {out} was started with {key}={ckpt['args'].get(key)!r}, "
                                f"not {run[key]!r}; use the same settings or train afresh without --resume")
        check_checkpoint_fits(ckpt, data, out)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, data.train_images.shape[1], data.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(args.seed)  # data order and augmentation
    decay = [p for p in model.parameters() if p.ndim > 1]   # no weight decay on biases and norms
    other = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([dict(params=decay, weight_decay=args.weight_decay), dict(params=other)],
                                lr=args.lr, momentum=args.momentum, nesterov=True)
    start_epoch, seconds_before = 0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            generator.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--resume: {out} does not fit this run ({first}); train afresh without --resume") from None
        start_epoch, seconds_before = ckpt["epochs_done"], ckpt["seconds"]
        log(f"resuming {out} after epoch {start_epoch}")
    index = training_index(data, args.exclude_class, args.train_limit)
    test_keep = ~torch.isin(data.test_labels, torch.tensor(args.exclude_class, dtype=torch.long, device=device))
    test_images, test_labels = data.test_images[test_keep], data.test_labels[test_keep]
    log(f"training {args.arch} on {data.name}: {len(index)} images, {data.num_classes} classes"
        + (f", without class {' '.join(map(str, args.exclude_class))}" if args.exclude_class else "")
        + f", on {device}")
    started = time.time()

    def save(epochs_done, test_acc):
        complete = epochs_done == args.epochs
        extra = {} if complete else dict(optimizer=optimizer.state_dict(), generator=generator.get_state(),
                                         torch_rng=torch.get_rng_state())
        ckpt = checkpoint_dict(model, data, args.arch, run, test_acc=test_acc, epochs_done=epochs_done,
                               complete=complete, seconds=seconds_before + time.time() - started, **extra)
        save_checkpoint(ckpt, out)
        saved.append(epochs_done)

    saved = [start_epoch] if start_epoch else []  # epochs whose checkpoint of this run is at out
    try:
        fit(model, data, index, epochs=args.epochs, batch_size=args.batch_size, optimizer=optimizer,
            generator=generator, lr_at=lambda step, total: warmup_cosine(step, total, args.lr),
            start_epoch=start_epoch, on_epoch_end=save, test_images=test_images, test_labels=test_labels, log=log)
    except Diverged as e:
        kept = (f"the checkpoint after epoch {saved[-1]} is kept at {out}" if saved else
                f"{out} is left as it was" if out.exists() else "no checkpoint was written")
        raise Diverged(f"{e}; {kept}") from None
    ckpt = load_checkpoint(out)
    log(f"saved {out}: test accuracy {ckpt['test_acc']:.2f}% after {ckpt['seconds']:.0f} s")
    return ckpt

# -----------------------------------------------------------------------------
# command line


def add_data_args(parser):
    parser.add_argument("--dataset", default="cifar10", help=f"{DATASET_HELP} (default cifar10)")
    parser.add_argument("--data-dir", default="data", help="where torchvision datasets and caches live")
    parser.add_argument("--arch", default="resnet18", help=f"{', '.join(ARCHS)} (default resnet18)")
    parser.add_argument("--train-limit", type=positive_int, default=None,
                        help="use only this many training images, the same number per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def add_train_args(parser, prefix=""):
    """Base-training hyper-parameters; unlearn.py adds them as --base-epochs etc."""
    p = f"--{prefix}" if prefix else "--"
    parser.add_argument(f"{p}epochs", type=positive_int, default=30, help="30 epochs: ResNet-18 reaches ~94%% on CIFAR-10")
    parser.add_argument(f"{p}batch-size", type=positive_int, default=512)
    parser.add_argument(f"{p}lr", type=positive_float, default=0.2, help="peak SGD learning rate (batch 512)")
    parser.add_argument(f"{p}momentum", type=float, default=0.9)
    parser.add_argument(f"{p}weight-decay", type=float, default=5e-4)


def default_checkpoint(dataset, arch, exclude=()):
    name = f"folder-{Path(dataset[len('folder:'):]).resolve().name}" if dataset.startswith("folder:") else dataset
    suffix = f"-without{'-'.join(map(str, exclude))}" if exclude else ""
    return Path("checkpoints") / f"{name}-{arch}{suffix}.pt"


def main():
    parser = ArgumentParser(description="Train a classifier (the base model, or Retrain with --exclude-class).")
    add_data_args(parser)
    add_train_args(parser)
    parser.add_argument("--exclude-class", type=int, nargs="+", default=[], metavar="K",
                        help="train without these classes (the Retrain baseline)")
    parser.add_argument("--out", default=None, help="checkpoint path (default checkpoints/<dataset>-<arch>.pt)")
    parser.add_argument("--resume", action="store_true", help="continue --out from its last complete epoch")
    args = parser.parse_args()
    check_dataset_name(args.dataset)
    build_model(args.arch, 1, 2)  # unknown arch: fail before loading any data
    args.out = str(args.out or default_checkpoint(args.dataset, args.arch, args.exclude_class))
    check_writable(args.out)
    device = pick_device(args.device)
    data = load_dataset(args.dataset, args.data_dir)
    check_classes(args.exclude_class, data.num_classes, "--exclude-class", must_leave=2)
    train(args, data.to(device), device)


if __name__ == "__main__":
    run_cli(main)
