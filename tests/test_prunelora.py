"""Tests of prunelora.py: each one states an equivalence the method relies on."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelora as pl


def small_net(bias=True, stride=2, padding=1, dilation=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=bias),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12, bias=bias),
        nn.ReLU(),
        nn.Linear(12, 5),  # the head
    )


HEAD = ("7",)
CONV_SETTINGS = [dict(stride=2, padding=0), dict(stride=2, padding=1), dict(stride=1, padding=1, dilation=2),
                 dict(stride=1, padding=0, bias=False)]


def randomize_factors(model, scale=0.1):
    """Nonzero B (and A) so that the LoRA update really changes the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pl.LoRALayer):
                m.lora_A.weight.normal_(0, scale)
                m.lora_B.weight.normal_(0, scale)


def close(a, b):
    """max |a - b| <= 1e-5 relative to the output scale"""
    return (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0)


x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))

# -----------------------------------------------------------------------------
# LoRA layers


@pytest.mark.parametrize("prune_first", [False, True])
def test_zero_B_gives_exactly_the_base_output(prune_first):
    model = small_net()
    if prune_first:
        pl.prune_global(model, 0.5, exclude=HEAD)
    expected = model(x)
    pl.add_lora(model, r=4, alpha=8, exclude=HEAD)
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("prune_amount", [0.0, 0.6])
@pytest.mark.parametrize("conv", CONV_SETTINGS)
def test_merged_equals_unmerged(conv, prune_amount):
    model = small_net(**conv)
    if prune_amount:
        pl.prune_global(model, prune_amount, exclude=HEAD)
    pl.add_lora(model, r=3, alpha=6, exclude=HEAD)
    randomize_factors(model)
    model.eval()
    unmerged = model(x)
    assert not torch.allclose(unmerged, small_net(**conv)(x))  # the update really does something
    pl.merge_lora(model)
    assert not any(isinstance(m, pl.LoRALayer) for m in model.modules())
    assert close(model(x), unmerged)


def test_linear_layer_merge_alone():
    base = nn.Linear(10, 7)
    lora = pl.LoRALayer(base, r=2, alpha=4)
    randomize_factors(nn.Sequential(lora))
    inputs = torch.randn(5, 10)
    expected = base(inputs) + (4 / 2) * inputs @ (lora.lora_B.weight @ lora.lora_A.weight).T  # W + s B A
    assert close(lora(inputs), expected)
    assert close(F.linear(inputs, lora.merged_weight(), base.bias), expected)


def test_pruned_training_path_with_dropout_matches_merged_path_without_it():
    model = small_net()
    pl.prune_global(model, 0.5, exclude=HEAD)
    pl.add_lora(model, r=2, alpha=2, dropout=0.5, exclude=HEAD)
    randomize_factors(model)
    for m in model.modules():  # dropout active but p forced to 0: the two-branch training path
        if isinstance(m, nn.Dropout):
            m.p = 1e-12
    model.train()
    two_branch = model(x)
    model.eval()
    assert close(model(x), two_branch)


def test_grouped_conv_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="groups=4"):
        pl.LoRALayer(nn.Conv2d(8, 8, 3, groups=4), r=2, alpha=2)

# -----------------------------------------------------------------------------
# pruning and sparsity


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
def test_prune_global_hits_the_requested_amount(amount):
    model = small_net()
    pruned = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    total = sum(m.weight.numel() for m in pruned)
    reached = pl.prune_global(model, amount, exclude=HEAD)
    zeros = sum(int((m.weight_mask == 0).sum()) for m in pruned)
    assert abs(zeros - amount * total) <= 1 and reached == zeros / total
    assert not hasattr(model[7], "weight_mask")  # the head stays dense


def test_prune_global_with_an_importance_prunes_its_lowest_scores_first():
    """Any score works: here the largest weights go first, the opposite of magnitude pruning."""
    model = small_net()
    pruned = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in pruned])
    pl.prune_global(model, 0.25, exclude=HEAD, importance=lambda m: -m.weight.abs())
    kept = torch.cat([m.weight_mask.flatten() for m in pruned])
    assert magnitudes[~kept].min() >= magnitudes[kept].max()  # every pruned weight is larger than every kept one


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
def test_prune_global_picks_the_weights_torch_global_unstructured_picks(amount):
    from torch.nn.utils import prune
    model, reference = small_net(), small_net()
    pl.prune_global(model, amount, exclude=HEAD)
    layers = [m for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=amount)
    mine = [m.weight_mask for m in model.modules() if hasattr(m, "weight_mask")]
    assert len(mine) == len(layers) and all(torch.equal(a, m.weight_mask) for a, m in zip(mine, layers))
    pl.prune_global(model, 0.5, exclude=HEAD)  # again: half of what is left, as torch does it
    prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=0.5)
    mine = [m.weight_mask for m in model.modules() if hasattr(m, "weight_mask")]
    assert all(torch.equal(a, m.weight_mask) for a, m in zip(mine, layers))


def test_a_channels_last_model_prunes_adapts_and_merges_like_a_contiguous_one():
    """torch's global_unstructured cannot flatten channels_last weights; prune_global can."""
    model, fast = small_net(), small_net().to(memory_format=torch.channels_last)
    for m in (model, fast):
        pl.prune_global(m, 0.5, exclude=HEAD)
        pl.add_lora(m, r=4, alpha=8, exclude=HEAD)
        torch.manual_seed(3)
        randomize_factors(m)  # the same draws for both
    masks = [m.weight_mask for m in model.modules() if hasattr(m, "weight_mask")]
    assert all(torch.equal(a, b.weight_mask) for a, b in zip(masks, [m for m in fast.modules() if hasattr(m, "weight_mask")]))
    out = fast(x.contiguous(memory_format=torch.channels_last))
    assert close(out, model(x))
    assert close(pl.merge_lora(fast)(x), out) and pl.sparsity(fast) == pl.sparsity(pl.merge_lora(model))


@pytest.mark.parametrize("in_channels", [1, 3])
def test_pruned_and_merged_weights_keep_the_models_memory_layout(in_channels):
    """A conv with one input channel fits both layouts, and elementwise ops on it (weight * mask)
    may return the default one: the merged conv then reorders its activations at every call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, in_channels, 8, 8))
    model = model.to(memory_format=torch.channels_last)
    strides = {name: p.stride() for name, p in model.named_parameters()}
    pl.prune_global(model, 0.5, exclude=("4",))
    pl.add_lora(model, r=2, alpha=4, exclude=("4",))
    randomize_factors(model)
    assert model[0].merged_weight().stride() == strides["0.weight"]  # the weight each training step uses
    model(torch.randn(2, in_channels, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert model[0].lora_B.weight.grad.abs().sum() > 0  # the gradient passes the change of layout
    assert {name: p.stride() for name, p in pl.merge_lora(model).named_parameters()} == strides


def test_pruning_is_global_not_per_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[1].weight.fill_(1.0)
    pl.prune_global(model, 0.5)
    assert (model[0].weight == 0).all() and (model[1].weight != 0).all()


def test_merge_keeps_zeros_where_the_mask_had_them_and_sparsity():
    model = small_net()
    pl.prune_global(model, 0.7, exclude=HEAD)
    before = pl.sparsity(model)
    masks = {name: m.weight_mask.clone() for name, m in model.named_modules() if hasattr(m, "weight_mask")}
    pl.add_lora(model, r=4, alpha=8, exclude=HEAD)
    randomize_factors(model)
    assert pl.sparsity(model) == before  # factors are not counted
    pl.merge_lora(model)
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight == 0, mask == 0)
        assert not hasattr(model.get_submodule(name), "weight_mask")  # pruning made permanent
    assert pl.sparsity(model) == before


def test_pruned_zeros_stay_zero_through_training():
    model = small_net()
    pl.prune_global(model, 0.5, exclude=HEAD)
    pl.add_lora(model, r=4, alpha=8, exclude=HEAD)
    pl.mark_only_lora_trainable(model, keep=HEAD)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for m in model.modules():
        if isinstance(m, pl.LoRALayer):
            assert (m.merged_weight()[m.base.weight_mask == 0] == 0).all()

# -----------------------------------------------------------------------------
# what trains


def test_only_lora_factors_and_keep_change_in_an_optimizer_step():
    model = small_net()
    pl.prune_global(model, 0.5, exclude=HEAD)
    pl.add_lora(model, r=2, alpha=4, exclude=HEAD)
    pl.mark_only_lora_trainable(model, keep=HEAD)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # all parameters: requires_grad decides
    for _ in range(2):  # two steps: the first only moves B (A's gradient is zero while B = 0)
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == (".lora_" in key or key.startswith("7.")), key


def test_trainable_parameter_count():
    model = small_net()
    pl.add_lora(model, r=3, alpha=3, exclude=HEAD)
    count = pl.mark_only_lora_trainable(model, keep=HEAD)
    per_conv = [3 * (3 * 3 * 3 + 8), 3 * (8 * 3 * 3 + 16)]  # r * (in*kh*kw + out)
    per_linear = [3 * (16 + 12)]                            # r * (in + out)
    head = 12 * 5 + 5
    assert count == sum(per_conv) + sum(per_linear) + head


def test_add_lora_twice_does_not_wrap_the_factors():
    model = small_net()
    first = pl.add_lora(model, r=2, alpha=2, exclude=HEAD)
    assert first == ["0", "2", "5"]
    assert pl.add_lora(model, r=2, alpha=2, exclude=HEAD) == []


def test_lora_state_dict_holds_only_factors_and_keep():
    model = small_net()
    pl.add_lora(model, r=2, alpha=2, exclude=HEAD)
    keys = set(pl.lora_state_dict(model, keep=HEAD))
    assert keys == {f"{i}.lora_{ab}.weight" for i in (0, 2, 5) for ab in "AB"} | {"7.weight", "7.bias"}

# -----------------------------------------------------------------------------
# copies, saving and loading


def pruned_and_wrapped():
    model = small_net()
    pl.prune_global(model, 0.5, exclude=HEAD)
    pl.add_lora(model, r=2, alpha=4, exclude=HEAD)
    randomize_factors(model)
    return model.eval()


def test_deepcopy_of_a_pruned_wrapped_model():
    model = pruned_and_wrapped()
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), model(x))
    pl.merge_lora(clone)  # merging the copy leaves the original wrapped
    assert any(isinstance(m, pl.LoRALayer) for m in model.modules())


def test_state_dict_round_trip_of_a_pruned_wrapped_model():
    model = pruned_and_wrapped()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_net()
    pl.prune_global(fresh, 0.1, exclude=HEAD)  # other masks: loading must replace them
    pl.add_lora(fresh, r=2, alpha=4, exclude=HEAD)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.eval()(x), model(x))


def test_merged_model_loads_strictly_into_a_fresh_architecture():
    model = pruned_and_wrapped()
    expected = model(x)
    state = pl.merge_lora(model).state_dict()
    assert set(state) == set(small_net().state_dict())
    fresh = small_net()
    fresh.load_state_dict(state, strict=True)
    assert close(fresh.eval()(x), expected)

# -----------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("call, message", [
    (lambda m: pl.prune_global(m, 1.0), "amount"),
    (lambda m: pl.prune_global(m, -0.1), "amount"),
    (lambda m: pl.prune_global(m, 0.5, exclude=("nope",)), "'nope'"),
    (lambda m: pl.prune_global(m, 0.5, exclude="7"), "'7'"),
    (lambda m: pl.add_lora(m, r=0), "r must"),
    (lambda m: pl.add_lora(m, r=2.5), "r must"),
    (lambda m: pl.add_lora(m, alpha=0), "alpha"),
    (lambda m: pl.add_lora(m, alpha=-1), "alpha"),
    (lambda m: pl.add_lora(m, exclude=("head",)), "'head'"),
    (lambda m: pl.mark_only_lora_trainable(m, keep=("fc",)), "'fc'"),
    (lambda m: pl.lora_state_dict(m, keep=("fc",)), "'fc'"),
    (lambda m: pl.prune_global(nn.Sequential(nn.ReLU()), 0.5), "no Conv2d or Linear"),
])
def test_bad_arguments_raise_value_error_naming_the_value(call, message):
    model = small_net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        call(model)
    assert model.state_dict().keys() == state.keys()  # nothing half-done

# -----------------------------------------------------------------------------
# devices and dtypes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_lora_factors_are_made_where_the_base_lives_in_its_dtype(device):
    """unlearn.py prunes and wraps a model already on the GPU: A and B must be made there too
    (in float64 here, so a float32 factor fails on the CPU as well)."""
    model = small_net().to(device, torch.float64)
    pl.prune_global(model, 0.5, exclude=HEAD)
    pl.add_lora(model, r=2, alpha=4, dropout=0.1, exclude=HEAD)
    pl.mark_only_lora_trainable(model, keep=HEAD)
    factors = [p for name, p in model.named_parameters() if "lora_" in name]
    assert factors and all(p.device.type == device and p.dtype == torch.float64 for p in factors)
    model.train()
    model(x.to(device, torch.float64)).sum().backward()  # the dropout path: base and masked update
    assert all(p.grad is not None for p in factors)

# -----------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_under_bf16_autocast_matches_fp32_reference():
    model = pruned_and_wrapped().cuda()
    inputs = x.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        autocast_out = model(inputs).float()
    unmerged = model(inputs)
    pl.merge_lora(model)
    assert close(model(inputs), unmerged)
    assert (autocast_out - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_freeze_batchnorm_keeps_running_statistics_while_the_rest_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    model(x)  # materialise the lazy layer
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    model.train()
    pl.freeze_batchnorm(model)
    model(x)
    assert all(torch.equal(v, before[k]) for k, v in model[1].state_dict().items())
    assert not model[1].training and model[2].training  # only BatchNorm left train mode
    model.train()
    model(x)  # without it, a forward pass in train mode moves them
    assert not torch.equal(model[1].running_mean, before["running_mean"])


def test_the_readme_recipe_runs_as_written_and_forgets_in_its_merged_model():
    """README's "Use prunelora.py in your own model" block, executed word for word on a small CNN with a
    `head`: it resets the forget row, prunes, adapts, trains and merges into a plain, half-sparse model."""
    import re
    from pathlib import Path

    import models
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Use prunelora.py in your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model = models.build_model("cnn", 3, 4)
    images, labels = torch.randn(16, 3, 32, 32), torch.tensor([0, 1, 2] * 5 + [0])
    namespace = dict(model=model, forget_class=3, retain_loader=[(images, labels)])
    exec(code, namespace)
    merged = namespace["model"]
    assert not any(isinstance(m, pl.LoRALayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(models.build_model("cnn", 3, 4).state_dict())
    assert 0.45 < pl.sparsity(merged) < 0.55
