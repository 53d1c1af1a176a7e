"""PruneLoRA: make a trained classifier forget a class by pruning, adapting and unlearning.

Reference implementation of "LoRA Unlearns More and Retains More" (arXiv 2411.11907),
in plain PyTorch (this file imports torch and the standard library only: copy it).

  1. prune   prune_global(): global magnitude pruning of every Conv2d/Linear weight.
  2. adapt   add_lora(): wrap each pruned layer so that W_eff = M * (W + s * B @ A), W frozen,
             M the pruning mask, s = alpha / r. Only A, B (and the head) train; the mask keeps
             every pruned zero at zero, in training and after the merge.
  3. unlearn fine-tune the factors and the head on the retained classes only; merge_lora() then
             folds the update back in: a plain, sparse model with the original state_dict keys.

    import prunelora as pl
    pl.prune_global(model, amount=0.5, exclude=("head",))            # 1. prune
    pl.add_lora(model, r=8, alpha=16, exclude=("head",))              # 2. adapt
    pl.mark_only_lora_trainable(model, keep=("head",))
    ...train on retained data only, calling pl.freeze_batchnorm(model) after model.train()...  # 3.
    model = pl.merge_lora(model)                                      # plain layers, sparsity kept
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Conv2d, nn.Linear)

# -----------------------------------------------------------------------------
# helpers


def _check_names(model, names, what):
    """Every name must be a module of the model: a typo would otherwise silently prune the head."""
    if isinstance(names, str):
        raise ValueError(f"{what} must be a list or tuple of module names, not the string {names!r}")
    known = dict(model.named_modules())
    for name in names:
        if name not in known or name == "":
            raise ValueError(f"{what} names {name!r}, which is not a module of the model; "
                             f"allowed: names from model.named_modules(), e.g. {list(known)[1:4]}")


def _is_excluded(name, exclude):
    # a name excludes the module and everything under it ("layer4" also excludes "layer4.0.conv1")
    return any(name == e or name.startswith(e + ".") for e in exclude)


def _layers(model, exclude=()):
    """(name, layer) for every Conv2d/Linear that is not excluded and is not a LoRA factor."""
    factor_ids = {id(m) for w in model.modules() if isinstance(w, LoRALayer)
                  for m in (w.lora_A, w.lora_B)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and id(m) not in factor_ids and not _is_excluded(name, exclude)]


def _mask(layer):
    return getattr(layer, "weight_mask", None)  # set by torch.nn.utils.prune, else None


def _weight(layer):
    """The layer's own weight parameter: weight_orig once pruned (the mask multiplies it), else weight."""
    return layer.weight_orig if _mask(layer) is not None else layer.weight


def _effective_weight(layer):
    # after pruning, layer.weight is only refreshed by a forward pass; weight_orig * mask is always current
    mask = _mask(layer)
    return layer.weight if mask is None else layer.weight_orig * mask


def _detach_pruned_weight(layer, wrapped=False):
    # prune leaves layer.weight = weight_orig * mask with a grad_fn, which copy.deepcopy refuses;
    # its hook recomputes it at every forward anyway. A LoRA wrapper never reads it (it builds
    # M * (W + s B A) itself), so there the weight-sized copy is dropped.
    if _mask(layer) is None:
        return
    if wrapped:
        layer.__dict__.pop("weight", None)
    else:
        with torch.no_grad():
            layer.weight = layer.weight_orig * layer.weight_mask


def _like(template, tensor):
    """tensor in template's memory layout. Elementwise ops on two layouts may return the default one:
    a channels_last first conv with one input channel then got an NCHW weight, and every forward
    pass converted its activations (1.2-1.8x slower merged models). A no-op when strides agree."""
    return tensor if tensor.stride() == template.stride() else torch.empty_like(template).copy_(tensor)


# -----------------------------------------------------------------------------
# stage 1: prune


def prune_global(model, amount, exclude=(), importance=None):
    """Zero the `amount` share of smallest-magnitude weights over all Conv2d/Linear layers together.

    Global (not per layer) so that layers with many small weights lose more. Uses
    torch.nn.utils.prune, so each layer gets a weight_mask buffer and a weight_orig parameter.
    Pruning again prunes that share of the weights still left, as torch.nn.utils.prune does.
    importance: layer -> a tensor of its weight's shape, lowest pruned first (default |weight|).
    Returns the sparsity reached over the pruned weights.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ValueError(f"amount must be a number in [0, 1), got {amount!r}")
    _check_names(model, exclude, "exclude")
    layers = _layers(model, exclude)
    if not layers:
        raise ValueError("the model has no Conv2d or Linear layer to prune (after exclude="
                         f"{tuple(exclude)!r}); allowed: a model with at least one such layer")
    modules = [m for _, m in layers]  # a wrapped layer's frozen base is found as "<name>.base"
    wrapped = {id(w.base) for w in model.modules() if isinstance(w, LoRALayer)}
    # The global threshold by hand rather than prune.global_unstructured, which flattens every weight
    # with .view(-1) and so fails on channels_last weights. The same choice: the round(amount * n)
    # lowest scores among the weights not pruned yet, over all layers together (ties as torch.topk breaks them).
    weights = [_effective_weight(m).detach() for m in modules]
    scores = torch.cat([(w.abs() if importance is None else importance(m).detach()).reshape(-1)
                        for m, w in zip(modules, weights)])                       # (n,), any memory layout
    alive = torch.cat([(_mask(m) if _mask(m) is not None else torch.ones_like(w)).reshape(-1)
                       for m, w in zip(modules, weights)]).bool()                 # (n,) not pruned before
    candidates = alive.nonzero().squeeze(1)
    smallest = torch.topk(scores[candidates], round(float(amount) * len(candidates)), largest=False).indices
    keep = alive.clone()
    keep[candidates[smallest]] = False
    for m, w, part in zip(modules, weights, keep.split([w.numel() for w in weights])):
        prune.custom_from_mask(m, "weight", part.reshape(w.shape).to(w.dtype))  # weight = weight_orig * mask
        # prune stores masks as floats, in the default layout: a bool mask is a quarter of the memory
        m.weight_mask = _like(m.weight_orig, m.weight_mask).bool()
        _detach_pruned_weight(m, wrapped=id(m) in wrapped)
    return int((~keep).sum()) / len(keep)


def sparsity(model):
    """Share of exact zeros over the effective weights of all Conv2d/Linear layers (not the LoRA factors)."""
    weights = [_effective_weight(m) for _, m in _layers(model)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)

# -----------------------------------------------------------------------------
# stage 2: adapt


class LoRALayer(nn.Module):
    """W_eff = M * (W + scaling * B @ A) around a frozen Conv2d or Linear base layer. B starts at
    zero, so W_eff = W at first. Conv2d: A is a conv like the base's into r channels, B a 1x1 conv
    to the output channels; Linear: A is (r, in), B is (out, r)."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base, self.r, self.scaling = base, r, alpha / r
        self.dropout = nn.Dropout(dropout)
        like = dict(device=_weight(base).device, dtype=_weight(base).dtype)  # new factors beside the weight
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise NotImplementedError(f"LoRA supports convs with groups=1 only, got groups={base.groups}; "
                                          "exclude grouped/depthwise convs from add_lora")
            self.lora_A = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                    base.dilation, bias=False, padding_mode=base.padding_mode, **like)
            self.lora_B = nn.Conv2d(r, base.out_channels, 1, bias=False, **like)
        else:
            self.lora_A = nn.Linear(base.in_features, r, bias=False, **like)
            self.lora_B = nn.Linear(r, base.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear/Conv2d init their weight
        nn.init.zeros_(self.lora_B.weight)
        for p in base.parameters():
            p.requires_grad_(False)
        _detach_pruned_weight(base, wrapped=True)

    def delta_weight(self):
        """scaling * B @ A, in the shape of the base weight (the mask is not applied here)."""
        shape = _weight(self.base).shape
        B = self.lora_B.weight.reshape(self.lora_B.weight.shape[0], self.r)  # (out, r)
        A = self.lora_A.weight.reshape(self.r, -1)                          # (r, in * kh * kw)
        return (self.scaling * (B @ A)).reshape(shape)

    def merged_weight(self):
        weight, mask = _weight(self.base), _mask(self.base)
        merged = weight + self.delta_weight()
        return _like(weight, merged if mask is None else mask * merged)  # pruned zeros stay exactly zero

    def forward(self, x):
        mask = _mask(self.base)
        if mask is None:  # dense base: the cheap factored path, no weight-sized gradient
            return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))
        # Pruned base: M * (B @ A) is no longer low-rank, so the update is a full weight-sized
        # tensor. Without dropout on the LoRA input, one layer call with the merged weight does it.
        if self.training and self.dropout.p > 0:
            update = _like(self.base.weight_orig, mask * self.delta_weight())
            return self.base(x) + self._layer(self.dropout(x), update, None)
        return self._layer(x, self.merged_weight(), self.base.bias)

    def _layer(self, x, weight, bias):  # the base layer's own operation, with another weight
        if isinstance(self.base, nn.Conv2d):
            return self.base._conv_forward(x, weight, bias)  # honours padding_mode, stride, dilation
        return F.linear(x, weight, bias)


def _replace(model, name, new):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_lora(model, r=8, alpha=16, dropout=0.0, exclude=()):
    """Wrap every Conv2d/Linear not in `exclude` (and not already wrapped) in place; return the wrapped names."""
    _check_names(model, exclude, "exclude")
    wrapped_bases = {id(w.base) for w in model.modules() if isinstance(w, LoRALayer)}
    targets = [(name, m) for name, m in _layers(model, exclude) if id(m) not in wrapped_bases]
    # build every wrapper before replacing any, so a bad argument leaves the model untouched
    wrapped = [(name, LoRALayer(m, r, alpha, dropout)) for name, m in targets if name]
    for name, w in wrapped:
        _replace(model, name, w)
    return [name for name, _ in wrapped]


def mark_only_lora_trainable(model, keep=()):
    """requires_grad only for LoRA factors and the parameters of the `keep` modules; returns their count."""
    _check_names(model, keep, "keep")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            for p in (*m.lora_A.parameters(), *m.lora_B.parameters()):
                p.requires_grad_(True)
        elif name in keep:
            for p in m.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_batchnorm(model):
    """Every BatchNorm in eval mode; call it after each model.train(). Frozen parameters do not freeze
    the running statistics (each train-mode batch moves them); in eval mode the merged model keeps
    the base's BatchNorm buffers bit for bit."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def lora_state_dict(model, keep=()):
    """Only the LoRA factors and the `keep` modules: a small adapter. The masks are not included:
    rerun prune_global on the same base weights to get them back."""
    _check_names(model, keep, "keep")
    return {k: v for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k or _is_excluded(k.rpartition(".")[0], keep)}

# -----------------------------------------------------------------------------
# stage 3 ends with a merge


def _set_plain_weight(layer, weight):
    """One plain weight parameter holding `weight`, in the memory layout of the layer's own weight."""
    weight = _like(_weight(layer), weight.detach())
    if _mask(layer) is not None:
        prune.remove(layer, "weight")  # weight_orig/mask -> one plain parameter
    layer.weight.data = weight


@torch.no_grad()
def merge_lora(model):
    """Fold each (masked) update into its base weight, unwrap, and make all pruning permanent.

    The result has the state_dict keys of the original architecture, the same outputs as the
    wrapped model, and the pruned sparsity. Its parameters come back with requires_grad=True.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALayer):
            _set_plain_weight(m.base, m.merged_weight())
            _replace(model, name, m.base)
    for m in model.modules():
        if isinstance(m, PRUNABLE) and _mask(m) is not None:
            _set_plain_weight(m, _effective_weight(m))
    for p in model.parameters():
        p.requires_grad_(True)
    return model
