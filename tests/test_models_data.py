"""The models and the data: every architecture prunes, adapts and merges back; widths; batches and caches."""
from pathlib import Path

import pytest
import torch

import checkpoints
import cli
import data
import models
import prunelora as pl

# -----------------------------------------------------------------------------
# models


TV_TINY_VIT = "tv:VisionTransformer:patch_size=8,num_layers=1,num_heads=2,hidden_dim=16,mlp_dim=32"


@pytest.mark.parametrize("arch", [*models.ARCHS, "tv:mobilenet_v3_small", TV_TINY_VIT])
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_every_arch_prunes_adapts_and_merges_back_to_its_own_state_dict(arch, channels, size):
    torch.manual_seed(0)
    model = models.build_model(arch, channels, 7)
    x = torch.randn(2, channels, size, size)
    assert model(x).shape == (2, 7) and isinstance(model.head, torch.nn.Linear)
    pl.prune_global(model, 0.5, exclude=("head",))
    wrapped = pl.add_lora(model, r=2, alpha=4, exclude=("head",))
    assert wrapped and not any(name.startswith("head") for name in wrapped)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pl.PrunedLoRA):
                m.lora_B.normal_(0, 0.05)
    model.eval()
    expected = model(x)
    sparsity = pl.sparsity(model)
    pl.merge_lora(model)
    fresh = models.build_model(arch, channels, 7).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert (fresh(x) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert pl.sparsity(fresh) == sparsity


def test_a_torchvision_model_has_a_linear_head_and_its_attention_is_covered():
    model = models.build_model(TV_TINY_VIT, 3, 7)
    assert isinstance(model.head, torch.nn.Linear) and model.features(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    names = [name for name, _, _ in pl.prunable(model, exclude=("head",))]
    assert "net.encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in names
    assert checkpoints.default_checkpoint("cifar10", "tv:mobilenet_v3_small").name == "cifar10-tv-mobilenet_v3_small.pt"
    model = models.build_model("tv:mobilenet_v3_small", 3, 7)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms)  # torchvision's 0.01 lags behind in a short run


@pytest.mark.parametrize("arch, message", [("tv:nope", "no torchvision classification model 'nope'"),
                                           ("tv:squeezenet1_0", "not a Linear layer"),
                                           ("tv:VisionTransformer:patch_size", "not key=value"),
                                           ("tv:VisionTransformer:patch_size=8", "--arch tv:VisionTransformer"),
                                           (TV_TINY_VIT.replace("patch_size=8", "patch_size=5"), "indivisible")])
def test_a_bad_torchvision_arch_is_one_line_naming_it(arch, message):
    with pytest.raises(cli.UserError, match=message):
        models.build_model(arch, 3, 10)


def test_a_torchvision_model_that_needs_larger_inputs_gets_them():
    """AlexNet's pooling needs more than 32 x 32: tv_size feeds it 64 x 64 (resized), and a ViT builder
    gets a side its patch divides (vit_h_14: 42)."""
    model = models.build_model("tv:alexnet", 1, 7)
    assert model.size == 64 and model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert models.tv_size("vit_h_14") == 42 and models.tv_size("vit_b_16") == 32


def test_vit_attention_is_made_of_linear_layers_so_pruning_reaches_it():
    model = models.build_model("vit", 3, 10)
    names = [name for name, _, _ in pl.prunable(model)]
    assert "blocks.0.attn.qkv.weight" in names and "blocks.0.attn.proj.weight" in names
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())

# -----------------------------------------------------------------------------
# data


def test_random_crop_flip_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = data.random_crop_flip(x, torch.Generator().manual_seed(0), flip=True)
    assert out.shape == x.shape
    for image, original in zip(out, x):  # every pixel is zero padding or comes from the same image
        assert set(image.unique().tolist()) <= set(original.unique().tolist()) | {0.0}


def test_balanced_subset_takes_the_same_number_per_class():
    labels = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 1])
    index = data.balanced_subset(labels, 6, 3)
    assert torch.bincount(labels[index]).tolist() == [2, 2, 2]
    assert torch.equal(index, data.balanced_subset(labels, 6, 3))


def test_folder_dataset_is_cached_and_reads_the_same(synthetic_dataset):
    dataset, data_dir = synthetic_dataset
    first = data.load_dataset(dataset, data_dir)
    caches = list((Path(data_dir) / "cache").glob("*.pt"))
    second = data.load_dataset(dataset, data_dir)
    assert len(caches) == 1 and torch.equal(first.train_images, second.train_images)
    assert first.train_images.dtype == torch.uint8 and first.classes == sorted(first.classes)


@pytest.mark.parametrize("arch, expansion", [("resnet18", 1), ("resnet50", 4)])
def test_width_scales_every_resnet_stage(arch, expansion):
    model = models.build_model(arch, 3, 10, width=8)
    assert model.stem[0].out_channels == 8
    assert [stage[0].conv1.in_channels for stage in (model.layer2, model.layer3, model.layer4)] == \
           [8 * expansion, 16 * expansion, 32 * expansion]
    assert model.head.in_features == 64 * expansion
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 64 * expansion)
    standard = models.build_model(arch, 3, 10)  # no width: the standard 64
    assert standard.stem[0].out_channels == 64 and standard.head.in_features == 512 * expansion


def test_the_width_travels_in_the_checkpoint_and_names_it(synthetic_dataset):
    dataset, data_dir = synthetic_dataset
    ds = data.load_dataset(dataset, data_dir)
    model = models.build_model("resnet18", 3, ds.num_classes, width=4)
    ckpt = checkpoints.checkpoint_dict(model, ds, "resnet18", {}, width=4)
    rebuilt = checkpoints.model_from_checkpoint(ckpt)  # from the checkpoint alone
    assert rebuilt.stem[0].out_channels == 4
    # a checkpoint from before --width existed has no width and is a standard ResNet
    old = dict(ckpt, state_dict=models.build_model("resnet18", 3, ds.num_classes).state_dict())
    del old["width"]
    assert checkpoints.model_from_checkpoint(old).stem[0].out_channels == 64
    assert checkpoints.default_checkpoint("cifar10", "resnet18", width=16).name == "cifar10-resnet18-w16.pt"
    assert checkpoints.default_checkpoint("cifar10", "resnet18", width=64).name == "cifar10-resnet18.pt"
    assert checkpoints.default_checkpoint("cifar10", "resnet18", (3,), 16).name == "cifar10-resnet18-w16-without3.pt"
    assert checkpoints.default_checkpoint("cifar10", "cnn", (3,), seed=2).name == "cifar10-cnn-seed2-without3.pt"
    # a --train-limit run has its own name, so a run on all images never reuses or overwrites it
    assert checkpoints.default_checkpoint("cifar10", "cnn", (3,), seed=2, train_limit=100).name == \
        "cifar10-cnn-n100-seed2-without3.pt"


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = models.build_model("resnet18", 3, 10, width=8).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    fast = models.to_device(model, torch.device("cpu"))
    out = fast(x.contiguous(memory_format=torch.channels_last))
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_a_forget_share_takes_that_share_of_every_class_once_and_keeps_every_class(synthetic_dataset):
    dataset, data_dir = synthetic_dataset
    ds = data.load_dataset(dataset, data_dir)
    index = data.training_index(ds)
    forget = data.forget_share_index(ds, index, 0.25, seed=0)
    per_class = torch.bincount(ds.train_labels[forget], minlength=ds.num_classes)
    assert per_class.tolist() == [round(0.25 * n) for n in torch.bincount(ds.train_labels).tolist()]
    assert len(forget.unique()) == len(forget) and torch.isin(forget, index).all()
    assert torch.equal(forget, data.forget_share_index(ds, index, 0.25, seed=0))  # the seed decides
    assert not torch.equal(forget, data.forget_share_index(ds, index, 0.25, seed=1))
    # Retrain's images: the forget set is gone, nothing else
    kept = data.training_index(ds, exclude_index=forget.tolist())
    assert not torch.isin(kept, forget).any() and len(kept) + len(forget) == len(index)


def test_a_forget_index_file_is_read_sorted(tmp_path):
    path = tmp_path / "forget.txt"
    path.write_text("7\n2\n\n5\n")
    assert data.read_forget_index(path, torch.arange(10)).tolist() == [2, 5, 7]
    path.write_text("\n".join(map(str, range(10))))
    with pytest.raises(cli.UserError, match="every training image"):
        data.read_forget_index(path, torch.arange(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_which_training_images_a_run_uses_does_not_depend_on_the_device():
    labels = torch.arange(40) % 4
    images = torch.zeros(40, 1, 2, 2, dtype=torch.uint8)
    ds = data.Data("tiny", list("abcd"), images, labels, images, labels, torch.zeros(1), torch.ones(1), False)
    on_cpu = data.training_index(ds, (1,), train_limit=20)
    assert torch.equal(data.training_index(ds.to("cuda"), (1,), train_limit=20), on_cpu)


def test_the_stripes_dataset_is_made_here_the_same_every_time():
    """--dataset stripes needs no download: 10 classes of 500 training and 100 test images, uint8,
    identical from one load to the next (the seed is fixed), and no horizontal flip (it changes the class)."""
    a, b = data.load_dataset("stripes"), data.load_dataset("stripes")
    assert a.classes == data.STRIPES and len(a.classes) == 10 and not a.flip
    assert a.train_images.shape == (5000, 3, 32, 32) and a.test_images.shape == (1000, 3, 32, 32)
    assert a.train_images.dtype == torch.uint8 and torch.bincount(a.train_labels).tolist() == [500] * 10
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images[:1000], a.test_images)  # the test images are other images


def test_zoo_checks_every_equivalence_on_a_depthwise_torchvision_model():
    """zoo.py (not in the default run: the whole zoo takes long) on one small model: its checks pass."""
    import zoo
    row = zoo.check("mobilenet_v3_small")
    assert row["B=0"] and row["copy"] and row["load"] and row["keys"] and row["zeros"] and row["merged"] <= 1e-4
    assert row["adapted"][0] == row["adapted"][1] - 1 and row["reached"][0] == row["reached"][1]
