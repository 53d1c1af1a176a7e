"""PruneLoRA: make a trained classifier forget a class by pruning, adapting and unlearning.

Reference implementation of "LoRA Unlearns More and Retains More" (arXiv 2411.11907),
in plain PyTorch (this file imports torch and the standard library only: copy it).

  1. prune   prune_global(): global magnitude pruning of every Conv2d/Linear weight (grouped and
             depthwise convs included) and of nn.MultiheadAttention's bare projection weights.
  2. adapt   add_lora(): each such weight becomes W_eff = M * (W + s * B @ A), W frozen, M the pruning
             mask, s = alpha / r. Only A, B (and the head) train; the mask keeps every pruned zero at zero.
  3. unlearn fine-tune the factors and the head on the retained classes only; merge_lora() then
             folds the update back in: a plain, sparse model with the original state_dict keys.

    import prunelora as pl
    pl.prune_global(model, amount=0.5, exclude=("head",))            # 1. prune
    pl.add_lora(model, r=8, alpha=16, exclude=("head",))              # 2. adapt
    pl.mark_only_lora_trainable(model, keep=("head",))
    ...train on retained data only, calling pl.freeze_batchnorm(model) after model.train()...  # 3.
    model = pl.merge_lora(model)                                      # plain layers, sparsity kept

How: W_eff is a torch.nn.utils.parametrize parametrization of the weight, so it is what *every* reader
of `layer.weight` gets: the layer's own forward, and parents that read the attribute themselves
(nn.MultiheadAttention reads out_proj.weight, torchvision's Swin reads qkv.weight). A forward hook, as
torch.nn.utils.prune installs, refreshes the weight only when the layer itself is called, so those
parents silently used a stale weight. The masks are still computed by torch.nn.utils.prune.
exclude/keep: module names (a name covers everything under it) or a predicate (name, module) -> bool.
"""
import math
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

PRUNABLE = (nn.Conv2d, nn.Linear)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")  # nn.MultiheadAttention's

# -----------------------------------------------------------------------------
# which weights: selection by names or by a predicate


def _selected(model, spec, what):
    """The names of the modules `spec` selects, each with everything under it. spec: module names or a
    predicate (name, module) -> bool. A name that is not a module is an error: a typo would otherwise
    silently prune the head."""
    modules = dict(model.named_modules())
    if callable(spec):
        chosen = {name for name, m in modules.items() if spec(name, m)}
    else:
        if isinstance(spec, str):
            raise ValueError(f"{what} must be a list or tuple of module names or a predicate, not the string {spec!r}")
        for name in spec:
            if name not in modules or name == "":
                raise ValueError(f"{what} names {name!r}, which is not a module of the model; "
                                 f"allowed: names from model.named_modules(), e.g. {list(modules)[1:4]}")
        chosen = set(spec)
    return {name for name in modules if any(name == c or name.startswith(c + ".") for c in chosen)}


def _has(module, tensor_name):
    return parametrize.is_parametrized(module, tensor_name) or module._parameters.get(tensor_name) is not None


def _original(module, tensor_name):
    """The stored weight W that the parametrization reads (the parameter itself when there is none)."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)


def _parametrization(module, tensor_name):
    """This file's PrunedLoRA on module.<tensor_name>, or None."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    return next((p for p in module.parametrizations[tensor_name] if isinstance(p, PrunedLoRA)), None)


def _mask(module, tensor_name):
    """The weight's pruning mask (bool, True = kept), or None where it is not pruned."""
    p = _parametrization(module, tensor_name)
    return None if p is None else p.mask


def _like(template, tensor):
    """tensor in template's memory layout. Elementwise ops on two layouts may return the default one:
    a channels_last conv with one input channel then got an NCHW weight, and every forward pass
    converted its activations (1.2-1.8x slower). A no-op when strides agree."""
    if tensor.stride() == template.stride():
        return tensor
    return torch.empty_like(template, dtype=tensor.dtype).copy_(tensor)


def prunable(model, exclude=()):
    """[(weight name, module, tensor name)] of every weight prune_global and add_lora work on, e.g.
    ("layer1.0.conv1.weight", conv, "weight") or ("encoder.layers.0.self_attention.in_proj_weight", mha, ...)."""
    excluded = _selected(model, exclude, "exclude")
    found = []
    for name, m in model.named_modules():
        if name in excluded:
            continue
        tensors = ("weight",) if isinstance(m, PRUNABLE) else ATTENTION_WEIGHTS if isinstance(
            m, nn.MultiheadAttention) else ()
        for t in tensors:
            weight_name = f"{name}.{t}" if name else t
            if hasattr(m, t + "_orig"):
                raise ValueError(f"{weight_name} was pruned with torch.nn.utils.prune, which refreshes it only in "
                                 f"the layer's own forward; allowed: call prune.remove(module, {t!r}) first")
            if _has(m, t) and not _original(m, t).is_floating_point():
                raise ValueError(f"{weight_name} is {_original(m, t).dtype}; allowed: floating-point weights")
            if _has(m, t):
                found.append((weight_name, m, t))
    return found


# -----------------------------------------------------------------------------
# the effective weight: M * (W + s * B @ A), computed whenever anyone reads it


class PrunedLoRA(nn.Module):
    """Parametrization of one weight W: returns M * (W + scaling * B @ A). prune_global sets the mask
    M (a bool buffer), add_lora the factors B (out, r), zero at first, and A (r, rest), with out = W's
    first dimension and rest the product of the others: a Linear's in_features, a conv's
    in_channels / groups * kh * kw. So for a grouped or depthwise conv the update is a rank-r update of
    the weight tensor as stored (out, in / groups, kh, kw), shared across groups: rank means the rank
    of that (out, rest) matrix, at most min(out, rest), e.g. 9 for a 3x3 depthwise conv."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", None)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.scaling = 1.0

    def forward(self, weight):
        merged = weight
        if self.lora_A is not None:
            merged = merged + (self.scaling * (self.lora_B @ self.lora_A)).reshape(weight.shape)
        if self.mask is not None:
            merged = merged * self.mask  # pruned entries are exactly zero, whatever B @ A holds there
        return _like(weight, merged)


def _own_class(module):
    """Give a parametrized module a class of its own. torch makes one class per parametrized module and
    edits it when a parametrization is added or removed, but copy.deepcopy shares it between the copies:
    merging a copy then stripped the weight property from the original as well."""
    if parametrize.is_parametrized(module):
        cls = module.__class__
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)


def _attach(module, tensor_name):
    """The weight's PrunedLoRA, registered now if it has none."""
    found = _parametrization(module, tensor_name)
    if found is None:
        found = PrunedLoRA()
        _own_class(module)
        parametrize.register_parametrization(module, tensor_name, found)
    return found


# -----------------------------------------------------------------------------
# stage 1: prune


def _kth_smallest(chunks, k):
    """The k-th smallest (k >= 1) of all the values chunks() yields (float32 tensors, every value >= 0),
    as its float32 bits, and how many values equal to it are among the k smallest. Radix select, 16 bits
    per pass over the chunks: a non-negative float orders like its bits read as an integer. So the values
    are never concatenated (a flat copy and a top-k of it took 34 bytes per parameter at the peak)."""
    prefix = 0
    for shift in (16, 0):
        counts = None
        for values in chunks():
            bits = values.view(torch.int32)
            if shift == 0:
                bits = bits[(bits >> 16) == (prefix >> 16)]  # only the values in the bin found by the first pass
            found = torch.bincount((bits >> shift) & 0xFFFF, minlength=1 << 16)
            counts = found if counts is None else counts + found
        cumulative = counts.cumsum(0)
        digit = int(torch.searchsorted(cumulative, k))  # the first bin that holds the k-th value
        k -= int(cumulative[digit - 1]) if digit else 0
        prefix |= digit << shift
    return prefix, k


def prune_global(model, amount, exclude=(), importance=None):
    """Zero the `amount` share of smallest-magnitude weights over all prunable weights together.

    Global (not per layer) so that layers with many small weights lose more. The global threshold comes
    from a radix select over all weights, then each weight's mask from torch.nn.utils.prune's
    L1Unstructured with that weight's count: the picks of prune.global_unstructured (which itself fails on
    channels_last weights; exact ties at the threshold go in layer order), at the memory of one layer.
    Pruning again prunes that share of the weights still left. importance: (weight name, weight) -> a
    tensor of its shape, lowest pruned first (default |weight|), called once per pass (four times per
    weight). Warns, naming them, about weights pruned entirely. Returns the sparsity reached.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ValueError(f"amount must be a number in [0, 1), got {amount!r}")
    targets = prunable(model, exclude)
    if not targets:
        raise ValueError("the model has no Conv2d, Linear or attention weight to prune (after exclude); "
                         "allowed: a model with at least one such weight")

    def scores():
        """Per weight: the scores (1-D float32) of its entries not pruned before, and where those are."""
        for name, m, t in targets:
            w = getattr(m, t)  # the effective weight: M * (W + s B A)
            score = (w.abs() if importance is None else importance(name, w).detach()).float().reshape(-1)
            alive = _mask(m, t)
            yield (score if alive is None else score[alive.reshape(-1)]), alive

    with torch.no_grad():
        found = [(s.min(), s.numel()) for s, _ in scores() if s.numel()]
        low = min(s for s, _ in found) if found else 0.0  # L1Unstructured ranks |score|: shifted to >= 0
        # as torch's PruningContainer prunes again: that share of the entries still alive, rounded as torch does
        count = round(amount * sum(n for _, n in found))
        threshold, ties = _kth_smallest(lambda: (s - low for s, _ in scores()), count) if count else (-1, 0)
        pruned, total, emptied = 0, 0, []
        for (name, m, t), (s, alive) in zip(targets, scores()):
            shifted = s - low
            bits = shifted.view(torch.int32)
            take = min(ties, int((bits == threshold).sum()))  # of the values equal to the threshold
            ties -= take
            keep = prune.L1Unstructured(int((bits < threshold).sum()) + take).compute_mask(
                shifted, torch.ones_like(s, dtype=torch.bool))
            if alive is not None:
                keep = alive.reshape(-1).clone().masked_scatter_(alive.reshape(-1), keep)
            if not keep.any():
                emptied.append(name)
            _attach(m, t).mask = _like(_original(m, t), keep.reshape(_original(m, t).shape))
            pruned, total = pruned + int((~keep).sum()), total + keep.numel()
    if emptied:
        warnings.warn(f"prune_global pruned every weight of {', '.join(emptied)}: their outputs no longer depend "
                      "on their inputs; exclude them, or prune less", stacklevel=2)
    return pruned / total


def sparsity(model, per_layer=False):
    """Share of exact zeros over the effective prunable weights (the LoRA factors not counted).
    per_layer=True: {weight name: share}, most pruned first, so the first and last are the extremes."""
    with torch.no_grad():
        zeros = {name: (int((getattr(m, t) == 0).sum()), getattr(m, t).numel()) for name, m, t in prunable(model)}
    if per_layer:
        return dict(sorted(((name, z / n) for name, (z, n) in zeros.items()), key=lambda item: -item[1]))
    return sum(z for z, _ in zeros.values()) / max(sum(n for _, n in zeros.values()), 1)

# -----------------------------------------------------------------------------
# stage 2: adapt


def add_lora(model, r=8, alpha=16, exclude=()):
    """Give every prunable weight not in `exclude` (and not adapted yet) the factors B (out, r) = 0 and
    A (r, rest), so that W_eff = M * (W + alpha / r * B @ A) = W at first. Freezes W.
    Returns the adapted weights' names. On an error the model is left exactly as it was."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    targets = [(name, m, t) for name, m, t in prunable(model, exclude)
               if (p := _parametrization(m, t)) is None or p.lora_A is None]
    factors = []  # made first, registered after: nothing is changed unless everything could be made
    for name, m, t in targets:
        weight = _original(m, t)
        like = dict(device=weight.device, dtype=weight.dtype)  # the factors beside the weight
        A = torch.empty(r, weight[0].numel(), **like)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        factors.append((m, t, nn.Parameter(A), nn.Parameter(torch.zeros(weight.shape[0], r, **like))))
    for m, t, A, B in factors:
        p = _attach(m, t)
        p.lora_A, p.lora_B, p.scaling = A, B, alpha / r
        _original(m, t).requires_grad_(False)
    return [name for name, _, _ in targets]


def mark_only_lora_trainable(model, keep=()):
    """requires_grad only for the LoRA factors and the parameters of the `keep` modules; returns their count."""
    kept = _selected(model, keep, "keep")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, PrunedLoRA) and m.lora_A is not None:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
        elif name in kept:
            for p in m.parameters(recurse=False):
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
    kept = _selected(model, keep, "keep")
    return {k: v for k, v in model.state_dict().items()
            if k.endswith((".lora_A", ".lora_B")) or k.rpartition(".")[0] in kept}

# -----------------------------------------------------------------------------
# stage 3 ends with a merge


@torch.no_grad()
def merge_lora(model):
    """Bake every effective weight M * (W + s B A) into a plain parameter and remove the parametrizations.

    The result has the state_dict keys of the original architecture, the same outputs as before,
    and exactly the pruned zeros. Its parameters come back with requires_grad=True.
    """
    for m in list(model.modules()):
        for t in [t for t in getattr(m, "parametrizations", {}) if _parametrization(m, t) is not None]:
            _own_class(m)
            parametrize.remove_parametrizations(m, t, leave_parametrized=True)  # W <- W_eff, same tensor object
    for p in model.parameters():
        p.requires_grad_(True)
    return model
