"""Tests of prunelora.py: each one states an equivalence the method relies on."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelora as pl


def small_net(bias=True, stride=2, padding=1, dilation=1, groups=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=stride, padding=padding, dilation=dilation, bias=bias),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=bias, groups=groups),  # groups=8: depthwise-like, 2 outputs a group
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 12, bias=bias),
        nn.ReLU(),
        nn.Linear(12, 5),  # the head
    )


class ReadsWeight(nn.Module):
    """A parent that reads its child's weight instead of calling it, as nn.MultiheadAttention does with
    out_proj.weight and torchvision's Swin with qkv.weight: a forward hook on the child never runs."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.proj.bias)


class Attention(nn.Module):
    """Tokens -> nn.MultiheadAttention (bare in_proj_weight, out_proj read by its parent) -> a depthwise
    conv over the tokens -> a parent-read Linear -> the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.mix = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise
        self.reader = ReadsWeight()
        self.head = nn.Linear(6, 5)

    def forward(self, x):                                   # x: (B, 3, H, W)
        tokens = self.embed(x.flatten(2).transpose(1, 2))   # (B, HW, 6)
        tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
        b, n, d = tokens.shape
        side = int(n ** 0.5)
        grid = self.mix(tokens.transpose(1, 2).reshape(b, d, side, side)).flatten(2).transpose(1, 2)
        return self.head(self.reader(grid).mean(1))


HEAD = ("7",)
CONV_SETTINGS = [dict(stride=2, padding=0), dict(stride=2, padding=1), dict(stride=1, padding=1, dilation=2),
                 dict(stride=1, padding=0, bias=False), dict(groups=8), dict(groups=2, bias=False)]


def factors(model):
    return [m for m in model.modules() if isinstance(m, pl.PrunedLoRA) and m.lora_A is not None]


def randomize_factors(model, scale=0.1):
    """Nonzero B (and A) so that the LoRA update really changes the output."""
    with torch.no_grad():
        for m in factors(model):
            m.lora_A.normal_(0, scale)
            m.lora_B.normal_(0, scale)


def masks(model):
    return {name: pl._mask(m, t).clone() for name, m, t in pl.prunable(model) if pl._mask(m, t) is not None}


def close(a, b):
    """max |a - b| <= 1e-5 relative to the output scale"""
    return (a - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0)


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
tokens_x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))

# -----------------------------------------------------------------------------
# the effective weight M * (W + s * B @ A)


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
    assert not factors(model) and not any("parametrizations" in k for k in model.state_dict())
    assert close(model(x), unmerged)


def test_the_weight_every_reader_gets_is_mask_times_w_plus_s_b_a():
    layer = nn.Linear(10, 7)
    w = layer.weight.detach().clone()
    pl.prune_global(layer, 0.5)
    pl.add_lora(layer, r=2, alpha=4)
    randomize_factors(layer)
    (p,) = factors(layer)
    expected = pl._mask(layer, "weight") * (w + (4 / 2) * p.lora_B @ p.lora_A)
    assert torch.equal(layer.weight, expected)
    inputs = torch.randn(5, 10)
    assert close(layer(inputs), inputs @ expected.T + layer.bias)


@pytest.mark.parametrize("groups", [2, 8])
def test_a_grouped_conv_gets_a_rank_r_update_of_its_stored_weight(groups):
    """The update is B @ A over the weight as stored, (out, in / groups * kh * kw): rank <= r."""
    model = small_net(groups=groups)
    before = model[2].weight.detach().clone()
    assert "2.weight" in pl.add_lora(model, r=2, alpha=2, exclude=HEAD)
    randomize_factors(model)
    delta = (model[2].weight - before).reshape(16, -1)
    assert delta.shape == (16, 8 // groups * 9) and torch.linalg.matrix_rank(delta) == 2

# -----------------------------------------------------------------------------
# weights read by a parent, not by the layer's own forward: attention


def test_a_parent_reading_the_weight_gets_the_pruned_weight_and_trains_it():
    """torch.nn.utils.prune refreshes `weight` in the layer's forward hook only: a parent reading it kept
    the weight of the moment of pruning, and prune-then-fine-tune gave that layer no gradient at all."""
    model = ReadsWeight()
    pl.prune_global(model, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs = torch.randn(3, 6)
    for _ in range(2):
        optimizer.zero_grad()
        model(inputs).square().sum().backward()
        optimizer.step()
    original = model.proj.parametrizations.weight.original
    assert original.grad is not None and original.grad.abs().sum() > 0
    pruned = ~pl._mask(model.proj, "weight")
    assert (original.grad[pruned] == 0).all() and (model.proj.weight[pruned] == 0).all()
    assert close(model(inputs), F.linear(inputs, original * ~pruned, model.proj.bias))


def test_loading_a_pruned_state_dict_changes_what_a_parent_reads_and_the_merge_agrees():
    source, target = ReadsWeight(), ReadsWeight()
    with torch.no_grad():
        source.proj.weight.mul_(3)
    for m in (source, target):
        pl.prune_global(m, 0.5)
        pl.add_lora(m, r=2, alpha=2)
    randomize_factors(source)
    inputs = torch.randn(3, 6)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(inputs), source(inputs))
    expected = target(inputs)
    assert close(pl.merge_lora(target)(inputs), expected)


def test_multihead_attention_in_proj_and_out_proj_are_pruned_adapted_trained_and_merged():
    model = Attention()
    keys = set(model.state_dict())
    pl.prune_global(model, 0.5, exclude=("head",))
    adapted = pl.add_lora(model, r=2, alpha=4, exclude=("head",))
    assert {"attn.in_proj_weight", "attn.out_proj.weight", "mix.weight", "reader.proj.weight"} <= set(adapted)
    pl.mark_only_lora_trainable(model, keep=("head",))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):  # the second step: A gets a gradient once B is not zero
        optimizer.zero_grad()
        F.cross_entropy(model(tokens_x), torch.tensor([0, 1])).backward()
        optimizer.step()
    assert all(p.lora_A.grad.abs().sum() > 0 and p.lora_B.grad.abs().sum() > 0 for p in factors(model))
    model.eval()
    unmerged, mask = model(tokens_x), pl._mask(model.attn, "in_proj_weight")
    pl.merge_lora(model)
    assert set(model.state_dict()) == keys and close(model(tokens_x), unmerged)
    assert torch.equal(model.attn.in_proj_weight == 0, ~mask)


def test_separate_q_k_v_projections_are_covered_too():
    attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=5, batch_first=True)
    names = [name for name, _, _ in pl.prunable(attn)]
    assert names == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]

# -----------------------------------------------------------------------------
# pruning and sparsity


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.filterwarnings("ignore:prune_global pruned every weight")  # layer 2 goes at 0.9
def test_prune_global_hits_the_requested_amount(amount):
    model = small_net()
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))) - 12 * 5
    reached = pl.prune_global(model, amount, exclude=HEAD)
    zeros = sum(int((~mask).sum()) for mask in masks(model).values())
    assert abs(zeros - amount * total) <= 1 and reached == zeros / total
    assert "7.weight" not in masks(model)  # the head stays dense


def test_prune_global_with_an_importance_prunes_its_lowest_scores_first():
    """Any score works: here the largest weights go first, the opposite of magnitude pruning."""
    model = small_net()
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in model[:7] if hasattr(m, "weight")])
    pl.prune_global(model, 0.25, exclude=HEAD, importance=lambda name, weight: -weight.abs())
    kept = torch.cat([mask.flatten() for mask in masks(model).values()])
    assert magnitudes[~kept].min() >= magnitudes[kept].max()  # every pruned weight is larger than every kept one


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
@pytest.mark.filterwarnings("ignore:prune_global pruned every weight")  # layer 2 goes at 0.9
def test_prune_global_picks_the_weights_torch_global_unstructured_picks(amount):
    from torch.nn.utils import prune
    model, reference = small_net(), small_net()
    pl.prune_global(model, amount, exclude=HEAD)
    layers = [m for m in reference.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=amount)
    assert all(torch.equal(a, m.weight_mask.bool()) for a, m in zip(masks(model).values(), layers, strict=True))
    pl.prune_global(model, 0.5, exclude=HEAD)  # again: half of what is left, as torch does it
    prune.global_unstructured([(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=0.5)
    assert all(torch.equal(a, m.weight_mask.bool()) for a, m in zip(masks(model).values(), layers, strict=True))


def test_the_radix_select_finds_the_value_a_sort_finds():
    """prune_global's threshold, found 16 bits at a time over chunks that are never concatenated."""
    torch.manual_seed(0)
    chunks = [torch.rand(n) * 10 ** torch.randint(-8, 3, (n,)).float() for n in (7, 1000, 0, 333)]
    chunks.append(chunks[1][:50].clone())  # ties across chunks
    ordered = torch.cat(chunks).sort().values
    for k in (1, 2, 500, 700, len(ordered)):
        bits, ties = pl._kth_smallest(lambda: iter(chunks), k)
        value = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
        assert value == ordered[k - 1] and ties == int((ordered[:k] == value).sum())


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.77])
@pytest.mark.filterwarnings("ignore:prune_global pruned every weight")  # ties go in layer order: layer 0 at 0.77
def test_prune_global_prunes_exactly_its_share_when_many_magnitudes_tie(amount):
    """Four magnitudes for all weights: the threshold splits a tie, and exactly that many of it go."""
    model = small_net()
    with torch.no_grad():
        for m in model[:7]:
            if hasattr(m, "weight"):
                m.weight.copy_(torch.randint(1, 5, m.weight.shape) * torch.randn(m.weight.shape).sign())
    magnitudes = torch.cat([m.weight.abs().flatten() for m in model[:7] if hasattr(m, "weight")])
    pl.prune_global(model, amount, exclude=HEAD)
    kept = torch.cat([mask.flatten() for mask in masks(model).values()])
    assert int((~kept).sum()) == round(amount * len(kept))
    assert magnitudes[~kept].max() <= magnitudes[kept].min()


def test_a_channels_last_model_prunes_adapts_and_merges_like_a_contiguous_one():
    """torch's global_unstructured cannot flatten channels_last weights; prune_global can."""
    model, fast = small_net(), small_net().to(memory_format=torch.channels_last)
    for m in (model, fast):
        pl.prune_global(m, 0.5, exclude=HEAD)
        pl.add_lora(m, r=4, alpha=8, exclude=HEAD)
        torch.manual_seed(3)
        randomize_factors(m)  # the same draws for both
    assert all(torch.equal(a, b) for a, b in zip(masks(model).values(), masks(fast).values(), strict=True))
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
    assert model[0].weight.stride() == strides["0.weight"]  # the weight each training step uses
    model(torch.randn(2, in_channels, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
    assert model[0].parametrizations.weight[0].lora_B.grad.abs().sum() > 0  # the gradient passes the change of layout
    assert {name: p.stride() for name, p in pl.merge_lora(model).named_parameters()} == strides


def test_pruning_is_global_not_per_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[1].weight.fill_(1.0)
    with pytest.warns(UserWarning, match=r"every weight of 0\.weight:"):  # the first layer is pruned away
        pl.prune_global(model, 0.5)
    assert (model[0].weight == 0).all() and (model[1].weight != 0).all()


def test_sparsity_per_layer_lists_the_extremes_first_and_last():
    model = small_net()
    pl.prune_global(model, 0.5, exclude=HEAD)
    per_layer = pl.sparsity(model, per_layer=True)
    assert list(per_layer) != [] and set(per_layer) == {"0.weight", "2.weight", "5.weight", "7.weight"}
    shares = list(per_layer.values())
    assert shares == sorted(shares, reverse=True) and shares[-1] == 0.0  # the head: dense


def test_merge_keeps_zeros_where_the_mask_had_them_and_sparsity():
    model = small_net()
    pl.prune_global(model, 0.7, exclude=HEAD)
    before, kept = pl.sparsity(model), masks(model)
    pl.add_lora(model, r=4, alpha=8, exclude=HEAD)
    randomize_factors(model)
    assert pl.sparsity(model) == before  # factors are not counted
    pl.merge_lora(model)
    for name, mask in kept.items():
        assert torch.equal(model.get_parameter(name) == 0, ~mask)
    assert not any("parametrizations" in k or "mask" in k for k in model.state_dict())  # pruning made permanent
    assert pl.sparsity(model) == before


@pytest.mark.parametrize("adapt", [False, True])
def test_pruned_zeros_stay_zero_through_training(adapt):
    """With LoRA (only the factors train) and without (prune, then fine-tune every weight)."""
    model = small_net(groups=8)
    pl.prune_global(model, 0.5, exclude=HEAD)
    kept = masks(model)
    if adapt:
        pl.add_lora(model, r=4, alpha=8, exclude=HEAD)
        pl.mark_only_lora_trainable(model, keep=HEAD)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    for _ in range(3):
        loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pl.merge_lora(model)
    assert all(torch.equal(model.get_parameter(name) == 0, ~mask) for name, mask in kept.items())

# -----------------------------------------------------------------------------
# what trains, and what is selected


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
        assert changed == (key.endswith((".lora_A", ".lora_B")) or key.startswith("7.")), key


def test_trainable_parameter_count():
    model = small_net(groups=8)
    pl.add_lora(model, r=3, alpha=3, exclude=HEAD)
    count = pl.mark_only_lora_trainable(model, keep=HEAD)
    per_conv = [3 * (3 * 3 * 3 + 8), 3 * (1 * 3 * 3 + 16)]  # r * (in / groups * kh * kw + out)
    per_linear = [3 * (16 + 12)]                            # r * (in + out)
    head = 12 * 5 + 5
    assert count == sum(per_conv) + sum(per_linear) + head


def test_add_lora_twice_adapts_nothing_new():
    model = small_net()
    assert pl.add_lora(model, r=2, alpha=2, exclude=HEAD) == ["0.weight", "2.weight", "5.weight"]
    assert pl.add_lora(model, r=2, alpha=2, exclude=HEAD) == []


def test_a_predicate_excludes_every_depthwise_conv_in_one_line():
    model = Attention()
    depthwise = lambda name, m: isinstance(m, nn.Conv2d) and m.groups == m.in_channels  # noqa: E731
    pl.prune_global(model, 0.5, exclude=lambda name, m: depthwise(name, m) or name == "head")
    adapted = pl.add_lora(model, r=2, alpha=2, exclude=depthwise)
    assert "mix.weight" not in masks(model) and "mix.weight" not in adapted and "head.weight" in adapted
    assert pl.sparsity(model, per_layer=True)["mix.weight"] == 0


def test_lora_state_dict_holds_only_factors_and_keep():
    model = small_net()
    pl.add_lora(model, r=2, alpha=2, exclude=HEAD)
    keys = set(pl.lora_state_dict(model, keep=HEAD))
    factor_keys = {f"{i}.parametrizations.weight.0.lora_{ab}" for i in (0, 2, 5) for ab in "AB"}
    assert keys == factor_keys | {"7.weight", "7.bias"}

# -----------------------------------------------------------------------------
# copies, saving, loading, dtypes


def pruned_and_adapted(build=small_net, head=HEAD):
    model = build()
    pl.prune_global(model, 0.5, exclude=head)
    pl.add_lora(model, r=2, alpha=4, exclude=head)
    randomize_factors(model)
    return model.eval()


@pytest.mark.parametrize("merge_the_copy", [True, False])
def test_deepcopy_and_merging_either_copy_leaves_the_other_working(merge_the_copy):
    """torch shares one parametrized class between deep copies and edits it on removal."""
    model = pruned_and_adapted()
    clone = copy.deepcopy(model)
    expected = model(x)
    assert torch.equal(clone(x), expected)
    merged, other = (clone, model) if merge_the_copy else (model, clone)
    pl.merge_lora(merged)
    assert torch.equal(other(x), expected) and factors(other) and close(merged(x), expected)


@pytest.mark.parametrize("build, head, inputs", [(small_net, HEAD, x), (Attention, ("head",), tokens_x)])
def test_state_dict_round_trip_into_a_pruned_adapted_model(build, head, inputs):
    model = pruned_and_adapted(build, head)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = build()
    pl.prune_global(fresh, 0.1, exclude=head)  # other masks: loading must replace them
    pl.add_lora(fresh, r=2, alpha=4, exclude=head)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.eval()(inputs), model(inputs))
    assert close(pl.merge_lora(fresh)(inputs), model(inputs))


def test_merged_model_loads_strictly_into_a_fresh_architecture():
    model = pruned_and_adapted()
    expected = model(x)
    state = pl.merge_lora(model).state_dict()
    assert set(state) == set(small_net().state_dict())
    fresh = small_net()
    fresh.load_state_dict(state, strict=True)
    assert close(fresh.eval()(x), expected)


def test_to_float64_keeps_the_masks_boolean_and_the_outputs():
    model = pruned_and_adapted(Attention, ("head",))
    expected = model(tokens_x).double()
    model = model.to(torch.float64)
    assert all(mask.dtype == torch.bool for mask in masks(model).values())
    assert all(p.lora_A.dtype == torch.float64 for p in factors(model))
    assert relative(model(tokens_x.double()), expected) < 1e-5

# -----------------------------------------------------------------------------
# bad arguments, and errors that leave the model as it was


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
    (lambda m: pl.prune_global(nn.Sequential(nn.ReLU()), 0.5), "no Conv2d, Linear or attention"),
])
def test_bad_arguments_raise_value_error_naming_the_value(call, message):
    model = small_net()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        call(model)
    assert model.state_dict().keys() == state.keys()  # nothing half-done


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            [(type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()])


@pytest.mark.parametrize("call", [lambda m: pl.prune_global(m, 0.5, exclude=HEAD),
                                  lambda m: pl.add_lora(m, r=2, alpha=2, exclude=HEAD)])
def test_a_failing_call_names_the_module_and_changes_nothing(call):
    """The last layer cannot be adapted (integer weights): the layers before it are left untouched."""
    model = small_net()
    model[5].weight = nn.Parameter(torch.zeros(12, 16, dtype=torch.int8), requires_grad=False)
    pl.prune_global(model, 0.3, exclude=("5", *HEAD))  # some state of ours that must stay as it is
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"5\.weight is torch\.int8"):
        call(model)
    after = snapshot(model)
    assert before[1:] == after[1:] and all(torch.equal(v, after[0][k]) for k, v in before[0].items())


def test_a_layer_pruned_by_torch_prune_is_refused_by_name():
    from torch.nn.utils import prune
    model = small_net()
    prune.l1_unstructured(model[2], "weight", 0.5)
    with pytest.raises(ValueError, match=r"2\.weight was pruned with torch\.nn\.utils\.prune"):
        pl.add_lora(model, exclude=HEAD)

# -----------------------------------------------------------------------------
# devices and dtypes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_lora_factors_are_made_where_the_base_lives_in_its_dtype(device):
    """unlearn.py prunes and adapts a model already on the GPU: A and B must be made there too
    (in float64 here, so a float32 factor fails on the CPU as well)."""
    model = small_net().to(device, torch.float64)
    pl.prune_global(model, 0.5, exclude=HEAD)
    pl.add_lora(model, r=2, alpha=4, exclude=HEAD)
    pl.mark_only_lora_trainable(model, keep=HEAD)
    trained = [p for name, p in model.named_parameters() if "lora_" in name]
    assert trained and all(p.device.type == device and p.dtype == torch.float64 for p in trained)
    model.train()
    model(x.to(device, torch.float64)).sum().backward()
    assert all(p.grad is not None for p in trained)

# -----------------------------------------------------------------------------
# CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_under_bf16_autocast_matches_fp32_reference():
    model = pruned_and_adapted().cuda()
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
    assert not factors(merged) and not any("parametrizations" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(models.build_model("cnn", 3, 4).state_dict())
    assert 0.45 < pl.sparsity(merged) < 0.55


@pytest.mark.parametrize("build", [
    lambda: __import__("torchvision").models.VisionTransformer(16, 4, 2, 2, 8, 16, num_classes=5),
    lambda: __import__("torchvision").models.SwinTransformer([2, 2], 8, [2, 1], [2, 2], [2, 2], num_classes=5),
], ids=["vit", "swin"])
def test_torchvisions_vit_and_swin_attention_train_and_merge(build):
    """2-layer torchvision ViT (nn.MultiheadAttention) and Swin (its attention reads qkv.weight and
    proj.weight itself): every adapter gets a gradient, and the merged model gives the same output."""
    torch.manual_seed(0)
    model = build()
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    nn.init.normal_(model.get_submodule(head).weight, 0, 0.1)  # torchvision's ViT starts its head at zero
    inputs = torch.randn(2, 3, 16, 16)
    pl.prune_global(model, 0.5, exclude=(head,))
    adapted = pl.add_lora(model, r=2, alpha=4, exclude=(head,))
    assert any(name.endswith(("in_proj_weight", "qkv.weight")) for name in adapted)
    pl.mark_only_lora_trainable(model, keep=(head,))
    F.cross_entropy(model(inputs), torch.tensor([0, 1])).backward()
    assert all(p.lora_B.grad is not None and p.lora_B.grad.abs().sum() > 0 for p in factors(model))
    randomize_factors(model)
    model.eval()
    unmerged = model(inputs)
    assert relative(pl.merge_lora(model)(inputs), unmerged) < 1e-5
