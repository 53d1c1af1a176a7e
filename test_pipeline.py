"""End-to-end tests of train.py, unlearn.py and evaluate.py on a tiny synthetic folder dataset."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunelora as pl
import train
import unlearn
from evaluate import fit_threshold, mia_efficacy, unlearning_metrics

HERE = Path(__file__).resolve().parent
FAST_BASE = ["--arch", "cnn", "--base-epochs", "2", "--base-batch-size", "32", "--base-lr", "0.05"]
FAST_UNLEARN = ["--epochs", "1", "--batch-size", "32"]


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base_checkpoint(synthetic_dataset, tmp_path_factory):
    """A small cnn trained on the synthetic data through the real command line."""
    dataset, data_dir = synthetic_dataset
    out = tmp_path_factory.mktemp("base") / "base.pt"
    result = run("train.py", "--dataset", dataset, "--data-dir", data_dir, "--arch", "cnn", "--epochs", "2",
                 "--batch-size", "32", "--lr", "0.05", "--out", out, cwd=out.parent)
    assert result.returncode == 0, result.stderr
    return out

# -----------------------------------------------------------------------------
# models


@pytest.mark.parametrize("arch", list(train.ARCHS))
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_every_arch_prunes_adapts_and_merges_back_to_its_own_state_dict(arch, channels, size):
    torch.manual_seed(0)
    model = train.build_model(arch, channels, 7)
    x = torch.randn(2, channels, size, size)
    assert model(x).shape == (2, 7) and isinstance(model.head, torch.nn.Linear)
    pl.prune_global(model, 0.5, exclude=("head",))
    wrapped = pl.add_lora(model, r=2, alpha=4, exclude=("head",))
    assert wrapped and not any(name.startswith("head") for name in wrapped)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, pl._LoRALayer):
                m.lora_B.weight.normal_(0, 0.05)
    model.eval()
    expected = model(x)
    sparsity = pl.sparsity(model)
    pl.merge_lora(model)
    fresh = train.build_model(arch, channels, 7).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert (fresh(x) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert pl.sparsity(fresh) == sparsity


def test_vit_attention_is_made_of_linear_layers_so_pruning_reaches_it():
    model = train.build_model("vit", 3, 10)
    names = [name for name, _ in pl._layers(model)]
    assert "blocks.0.attn.qkv" in names and "blocks.0.attn.proj" in names
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())

# -----------------------------------------------------------------------------
# data


def test_random_crop_flip_keeps_shape_and_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = train.random_crop_flip(x, torch.Generator().manual_seed(0), flip=True)
    assert out.shape == x.shape
    for image, original in zip(out, x):  # every pixel is zero padding or comes from the same image
        assert set(image.unique().tolist()) <= set(original.unique().tolist()) | {0.0}


def test_balanced_subset_takes_the_same_number_per_class():
    labels = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 1])
    index = train.balanced_subset(labels, 6, 3)
    assert torch.bincount(labels[index]).tolist() == [2, 2, 2]
    assert torch.equal(index, train.balanced_subset(labels, 6, 3))


def test_folder_dataset_is_cached_and_reads_the_same(synthetic_dataset):
    dataset, data_dir = synthetic_dataset
    first = train.load_dataset(dataset, data_dir)
    caches = list((Path(data_dir) / "cache").glob("*.pt"))
    second = train.load_dataset(dataset, data_dir)
    assert len(caches) == 1 and torch.equal(first.train_images, second.train_images)
    assert first.train_images.dtype == torch.uint8 and first.classes == sorted(first.classes)

# -----------------------------------------------------------------------------
# metrics


def test_threshold_separates_separable_scores():
    members, nonmembers = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0, 3.0])
    t = fit_threshold(members, nonmembers)
    assert 3.0 < t <= 5.0
    assert mia_efficacy(members, nonmembers, torch.tensor([0.0, 2.5, 6.5])) == pytest.approx(200 / 3)


def test_metrics_of_a_model_that_predicts_one_class():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 5.0, 0.0])[None].repeat(len(x), 1)
    data = train.Data("toy", ["a", "b", "c"], torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2]),
                      torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]), torch.zeros(1), torch.ones(1), False)
    metrics = unlearning_metrics(Constant(), data, [1])
    assert metrics["UA"] == 0 and metrics["RA"] == 0 and metrics["TA"] == 0 and metrics["forget_test_acc"] == 100

# -----------------------------------------------------------------------------
# the scripts, end to end


def test_unlearn_all_methods_from_the_command_line(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint,
                 "--forget-class", "1", "--method", "all", *FAST_BASE, *FAST_UNLEARN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    json_path = tmp_path / "results" / f"{Path(train.default_checkpoint(dataset, 'cnn')).stem}-forget1.json"
    rows = json.loads(json_path.read_text())["results"]
    assert set(rows) == {"base", *unlearn.METHODS}
    for method in unlearn.METHODS:
        assert {"UA", "MIA", "RA", "TA", "forget_test_acc", "seconds", "trainable_params", "sparsity"} <= set(rows[method])
        assert f"| {method} |" in result.stdout and f"| {method} |" in json_path.with_suffix(".md").read_text()
    for method in ("prunelora", "lora", "finetune"):
        assert rows[method]["step_time_vs_finetune"] > 0
    assert rows["finetune"]["step_time_vs_finetune"] == 1
    assert rows["retrain"]["UA"] == 100  # never saw the class: it cannot name it
    assert rows["prunelora"]["sparsity"] == pytest.approx(0.5, abs=0.02)  # head stays dense
    assert rows["prunelora"]["trainable_params"] < rows["finetune"]["trainable_params"] / 5
    # each unlearned model is saved merged: its state_dict loads strictly into the bare architecture
    saved = torch.load(tmp_path / "checkpoints" / "unlearned" / f"{json_path.stem}-prunelora.pt", weights_only=True)
    train.build_model("cnn", 3, 4).load_state_dict(saved["state_dict"], strict=True)


def test_bench_steps_prints_step_time_ratios(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint, "--arch", "cnn",
                 "--forget-class", "1", "--bench-steps", "2", "--batch-size", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if "ms/step" in line}
    assert set(lines) == {"finetune", "lora", "prunelora"} and "1.00 x finetune" in lines["finetune"]
    assert not (tmp_path / "results").exists()  # a benchmark writes nothing


def test_unlearn_trains_a_base_model_when_there_is_none(synthetic_dataset, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--forget-class", "2",
                 *FAST_BASE, *FAST_UNLEARN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no base checkpoint" in result.stdout
    assert (tmp_path / train.default_checkpoint(dataset, "cnn")).is_file()


def test_unlearn_as_functions_forgets_several_classes(synthetic_dataset, base_checkpoint):
    dataset, data_dir = synthetic_dataset
    data = train.load_dataset(dataset, data_dir)
    base = train.load_checkpoint(base_checkpoint, dataset, "cnn")
    args = argparse.Namespace(forget_class=[0, 3], prune_amount=0.5, rank=4, alpha=8, lora_dropout=0.0, lr=1e-3,
                              lora_lr=3e-3, reset_head=1, depth=False,
                              epochs=3, batch_size=32, seed=0, base_ckpt=base, arch="cnn")
    index = train.training_index(data)
    forget = torch.isin(data.train_labels, torch.tensor(args.forget_class))
    split = dict(train=index, retain=index[~forget], forget=index[forget])
    model, row = unlearn.run_method("prunelora", base, data, split, args, torch.device("cpu"))
    assert row["RA"] >= 90 and row["UA"] >= 90  # on this easy data both are reached in 3 epochs
    assert row["sparsity"] == pytest.approx(pl.sparsity(model)) and row["sparsity"] > 0.45


def test_evaluate_prints_the_metrics_of_a_checkpoint(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("evaluate.py", base_checkpoint, "--forget-class", "1", "--data-dir", data_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| UA | MIA | RA | TA |" in result.stdout

# -----------------------------------------------------------------------------
# real data: runs when PRUNELORA_DATA names a folder holding FashionMNIST/raw


@pytest.mark.skipif(not os.environ.get("PRUNELORA_DATA"), reason="set PRUNELORA_DATA to a data dir with Fashion-MNIST")
def test_prunelora_forgets_a_fashion_mnist_class_and_keeps_the_rest(tmp_path):
    data_dir = os.environ["PRUNELORA_DATA"]
    common = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "cnn", "--train-limit", "3000"]
    result = run("unlearn.py", *common, "--forget-class", "3", "--method", "prunelora", "--base-epochs", "6",
                 "--base-batch-size", "128", "--base-lr", "0.1", "--epochs", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "results" / "fashion-mnist-cnn-forget3.json").read_text())["results"]
    assert rows["prunelora"]["UA"] >= 99
    assert rows["prunelora"]["RA"] >= rows["base"]["RA"] - 5


def test_a_dataset_that_cannot_be_downloaded_is_one_clear_error_and_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision

    class MNIST:  # what torchvision does without a network: makes its folders, then fails
        def __init__(self, root, train, download):
            if download:
                (Path(root) / "MNIST" / "raw").mkdir(parents=True)
                raise OSError("Name or service not known")
            raise RuntimeError("Dataset not found. You can use download=True to download it")
    monkeypatch.setattr(torchvision.datasets, "MNIST", MNIST)
    with pytest.raises(train.UserError, match="could not be downloaded.*--data-dir.*folder:PATH"):
        train.load_dataset("mnist", tmp_path / "data")
    assert not (tmp_path / "data").exists()
