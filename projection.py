"""--project-start K: a closed-form start for PruneLoRA's factors (deep.py's options; the depth issue's first
mechanism). In each adapted layer, the directions of the layer's input that the forget images use and the
retained images do not are taken out by a rank-k edit, dW = -(M * W) Q Q^T, which the factors B A start at
instead of B = 0; training on the retained images then repairs what the edit cost.
"""
import torch
import torch.nn.functional as F
from torch import nn

import prunelora as pl
from data import predict
from models import HEAD


def forget_directions(forget_cov, retain_cov, k, eps=1e-3):
    """(d, k) orthonormal: the span of the top-k generalised eigenvectors of F v = mu (R + eps I) v, the
    input directions with the most forget energy per unit of retained energy (Kodge et al., arXiv
    2312.00761, build such subspaces from SVDs of the two activation sets). eps is relative to R's mean
    eigenvalue, so that directions no retained input uses score high but finite."""
    d = retain_cov.shape[0]
    ridge = eps * float(retain_cov.trace()) / d + 1e-12
    lower = torch.linalg.cholesky(retain_cov + ridge * torch.eye(d, dtype=retain_cov.dtype))
    whitened = torch.linalg.solve_triangular(lower, torch.linalg.solve_triangular(lower, forget_cov, upper=False).T,
                                             upper=False)  # L^-1 F L^-T, symmetric
    _, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)  # ascending
    directions = torch.linalg.solve_triangular(lower.T, vectors[:, -k:], upper=True)  # back to input space
    return torch.linalg.qr(directions).Q


def _patches(module, x):
    """A layer's inputs as rows (n, d) in its weight's (out, d) layout: im2col patches for a conv."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, d, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def input_covariances(model, layers, data, index, batch_size=200):
    """{name: (d, d) mean outer product of the layer's inputs} over data.train_images[index], eval mode."""
    sums, counts, handles = {}, {}, []

    def hook(name):
        def grab(module, inputs):
            rows = _patches(module, inputs[0].float()).double()
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + len(rows)
        return grab
    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        predict(model, data, data.train_images[index], batch_size=batch_size)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in sums}  # a layer its parent reads: never called


@torch.no_grad()
def projection_start(model, data, split, k, images=600, seed=0):
    """Start the factors of every adapted Conv2d (groups 1) and Linear at the rank-k edit that takes out
    of the layer's input the directions the forget images use and the retained images do not:
    B A = -(M * W) Q Q^T / s, i.e. A[:k] = Q^T, B[:, :k] = -(M * W) Q / s, the other k..r slots as
    add_lora left them (B = 0). Call after add_lora; needs k <= r. The mask applies to the edit too,
    so M * (W + s B A) removes those directions only up to the pruned entries. Other adapted weights
    (grouped convs, attention projections) keep B = 0. Inputs from up to `images` forget and retained
    training images each, drawn with seed. Returns the names of the weights started this way."""
    layers = {}
    for name, module, tensor in pl.prunable(model, HEAD):
        p = pl._parametrization(module, tensor)
        if p is not None and p.lora_A is not None and tensor == "weight" and getattr(module, "groups", 1) == 1:
            if k > p.lora_A.shape[0]:
                raise ValueError(f"projection start rank {k} is above the LoRA rank {p.lora_A.shape[0]}")
            layers[name.removesuffix(".weight")] = (module, p)
    generator = torch.Generator().manual_seed(seed)
    draw = lambda index: index[torch.randperm(len(index), generator=generator)[:images]].to(data.train_labels.device)
    modules = {name: module for name, (module, _) in layers.items()}
    forget = input_covariances(model, modules, data, draw(split["forget"]))
    retain = input_covariances(model, modules, data, draw(split["retain"]))
    layers = {name: layer for name, layer in layers.items() if name in forget and name in retain}
    for name, (module, p) in layers.items():
        q = forget_directions(forget[name], retain[name], k).to(p.lora_A)   # (d, k)
        weight = module.weight.reshape(len(p.lora_B), -1)                   # M * W, as B = 0 still
        p.lora_A[:k] = q.T
        p.lora_B[:, :k] = -(weight @ q) / p.scaling
    return list(layers)
