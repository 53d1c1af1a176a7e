"""The classifiers: ResNet-18/50 (CIFAR stem), ViT-S/4, a small CNN, any torchvision classifier
(--arch tv:NAME), and build_model().

Every model names its classifier "head" and has features(x) -> the penultimate features (B, D),
so exclude=("head",) and the depth measures mean the same thing everywhere.
"""
import torch
import torch.nn.functional as F
from torch import nn

from cli import UserError

# -----------------------------------------------------------------------------
# ResNet


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
    """CIFAR variant: a 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their detail.

    width scales every stage (W, 2W, 4W, 8W channels); 64 is the standard ResNet. A smaller width
    keeps the depth and shape at a fraction of the cost: what makes ResNet-18 trainable on a CPU."""

    def __init__(self, block, blocks_per_stage, in_channels, num_classes, width=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, in_planes = [], width
        for i, (planes, n) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), blocks_per_stage)):
            layers = []
            for j in range(n):
                layers.append(block(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = nn.Linear(in_planes, num_classes)

    def features(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 8 * width * expansion)

    def forward(self, x):
        return self.head(self.features(x))


# -----------------------------------------------------------------------------
# ViT


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


# -----------------------------------------------------------------------------
# a small CNN for real-data runs on a CPU


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


# -----------------------------------------------------------------------------
# any torchvision classifier: --arch tv:NAME[:key=value,...]

TV_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}  # the input these need at least; the rest: 32 x 32


def tv_size(name):
    """The input side a torchvision model is built and fed at: 32 (this project's images), more where the
    model needs it; a ViT builder's patch size is in its name (vit_h_14), and the side a multiple of it."""
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        return patch * max(2, -(-32 // patch))  # at least 2 x 2 patches and 32 x 32
    return TV_SIZE.get(name, 32)


def parse_tv(arch):
    """'tv:NAME[:key=value,...]' -> (NAME, {key: value}): a torchvision.models builder (as listed by
    torchvision.models.list_models) or model class, and keyword arguments for it (ints, floats or words)."""
    import torchvision
    name, _, settings = arch[len("tv:"):].partition(":")
    builders = torchvision.models.list_models(module=torchvision.models)
    if name not in builders and not (name[:1].isupper() and isinstance(getattr(torchvision.models, name, None), type)):
        raise UserError(f"--arch {arch}: no torchvision classification model {name!r}; allowed: tv:NAME with NAME "
                        f"one of {', '.join(builders[:6])}, ... (torchvision.models.list_models()) or a model class "
                        "such as VisionTransformer, with settings as tv:NAME:key=value,...")
    kwargs = {}
    for item in filter(None, settings.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise UserError(f"--arch {arch}: {item!r} is not key=value; allowed: tv:NAME:key=value,key=value")
        kwargs[key] = _number(value)
    return name, kwargs


def _number(text):
    """'4' -> 4, '0.1' -> 0.1, anything else stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class Torchvision(nn.Module):
    """A torchvision classifier shaped like this project's models: its last Linear with num_classes
    outputs becomes `head` (an Identity takes its place inside, so features(x) is what fed it).
    Trained from scratch at 32 x 32, the size of this project's datasets (Fashion-MNIST's 28 x 28 is
    resized up, and so is every input for the few models that need more, see TV_SIZE); grey images
    are repeated over three channels. ViT builders get image_size=tv_size(name) (vit_b_16: 32, 2 x 2 patches)."""

    def __init__(self, arch, in_channels, num_classes):
        super().__init__()
        import torchvision
        name, kwargs = parse_tv(arch)
        self.size = tv_size(name)
        if name.startswith("vit_") or name == "VisionTransformer":
            kwargs.setdefault("image_size", self.size)
        if name in ("googlenet", "inception_v3"):  # one output, not the training-time auxiliary heads
            kwargs = dict(aux_logits=False, init_weights=True, **kwargs)
        try:
            if name[:1].isupper():  # a model class, e.g. VisionTransformer
                self.net = getattr(torchvision.models, name)(num_classes=num_classes, **kwargs)
            else:
                self.net = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
        except (TypeError, ValueError, AssertionError) as error:  # a missing or bad setting (a patch size not dividing)
            raise UserError(f"--arch {arch}: {error}") from None
        heads = [n for n, m in self.net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        if not heads:
            raise UserError(f"--arch {arch}: its classifier is not a Linear layer with {num_classes} outputs "
                            "(SqueezeNet's is a convolution); allowed: a model that ends in a Linear classifier")
        # torchvision sets BatchNorm momentum 0.01 (MobileNet v3, EfficientNet) or 0.0003 (MNASNet) for
        # hundreds of ImageNet epochs; over the few epochs of a run here the running statistics then lag
        # far behind (a MobileNet v3 at 70 % train accuracy tested at chance in eval mode): PyTorch's 0.1
        for m in self.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.1
        self.head = self.net.get_submodule(heads[-1])
        parent, _, child = heads[-1].rpartition(".")
        setattr(self.net.get_submodule(parent) if parent else self.net, child, nn.Identity())
        self.in_channels = in_channels

    def features(self, x):
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x)

    def forward(self, x):
        return self.head(self.features(x))

# -----------------------------------------------------------------------------
# by name

HEAD = ("head",)  # every architecture here names its classifier "head": exclude=HEAD means the same everywhere

# name: (constructor(in_channels, num_classes, width), default width or None where --width does not apply)
ARCHS = {
    "resnet18": (lambda c, k, w: ResNet(BasicBlock, (2, 2, 2, 2), c, k, w), 64),
    "resnet50": (lambda c, k, w: ResNet(Bottleneck, (3, 4, 6, 3), c, k, w), 64),
    "vit": (lambda c, k, w: ViT(c, k), None),
    "cnn": (lambda c, k, w: SmallCNN(c, k), None),
}


def check_arch(arch, width=None):
    """Fail early on an unknown arch, or a width given to an arch that has none; returns the width to use."""
    if arch.startswith("tv:"):
        parse_tv(arch)
    elif arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}, or tv:NAME for a torchvision model")
    default = ARCHS.get(arch, (None, None))[1]
    if width is not None and default is None:
        with_width = [a for a, (_, w) in ARCHS.items() if w is not None]
        raise UserError(f"--width {width} is for {' and '.join(with_width)} only, not {arch}; leave it out for {arch}")
    return width or default


def build_model(arch, in_channels, num_classes, width=None):
    """A fresh model; width=None gives the architecture's standard width."""
    width = check_arch(arch, width)
    if arch.startswith("tv:"):
        return Torchvision(arch, in_channels, num_classes)
    return ARCHS[arch][0](in_channels, num_classes, width)


def to_device(model, device):
    """Move to the device in channels_last: faster for convolutions on CUDA and on this project's
    2-core CPU alike (RESULTS.md, "Cost")."""
    return model.to(device, memory_format=torch.channels_last)
