"""End-to-end tests of train.py, unlearn.py and evaluate.py on a tiny synthetic folder dataset."""
import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import methods
import prunelora as pl
import report
import unlearn
from checkpoints import checkpoint_dict, default_checkpoint, load_checkpoint
from cli import UserError
from conftest import unlearn_args
from data import Data, load_dataset, make_batch, predict, training_index
from models import build_model
from evaluate import attack_accuracy, fit_threshold, gaps_to_retrain, mia_efficacy, unlearning_metrics
from methods import Task
from report import meets_targets, near_chance

HERE = Path(__file__).resolve().parent.parent  # the repository root, where the scripts are
FAST_BASE = ["--arch", "cnn", "--base-epochs", "2", "--base-batch-size", "32", "--base-lr", "0.05"]
FAST_UNLEARN = ["--epochs", "1", "--batch-size", "32"]


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# -----------------------------------------------------------------------------
# metrics


def test_threshold_separates_separable_scores():
    members, nonmembers = torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0, 3.0])
    t = fit_threshold(members, nonmembers)
    assert 3.0 < t <= 5.0
    assert mia_efficacy(members, nonmembers, torch.tensor([0.0, 2.5, 6.5])) == pytest.approx(200 / 3)


def test_attack_accuracy_is_100_on_separable_scores_and_about_50_on_alike_ones():
    generator = torch.Generator().manual_seed(0)
    assert attack_accuracy(torch.rand(400, generator=generator) + 2, torch.rand(400, generator=generator)) == 100
    alike = attack_accuracy(torch.rand(4000, generator=generator), torch.rand(4000, generator=generator))
    assert 45 <= alike <= 55  # the attack cannot tell them apart: MIA-efficacy would be noise


def test_gaps_to_retrain_and_the_far_above_mia_warning():
    same = dict(UA=20.0, RA=90.0, TA=85.0)
    rows = {"base": dict(same, MIA=10.0), "retrain": dict(same, MIA=50.0, forget_count=1000),
            "over": dict(same, MIA=60.0), "close": dict(same, MIA=52.0), "under": dict(same, MIA=20.0, RA=86.0)}
    assert gaps_to_retrain(rows) == ["over"]  # far = 3 standard errors of a share of 1,000 images: 4.7 points
    assert [rows[m]["MIA_gap"] for m in ("retrain", "over", "close", "under")] == [0, 10, 2, -30]
    # the mean |gap| over UA, MIA, RA, TA
    assert [rows[m]["avg_gap"] for m in ("retrain", "over", "under")] == [0, 2.5, 8.5]
    assert gaps_to_retrain({"base": dict(MIA=10.0)}) == []  # without Retrain there is nothing to read against
    rows["over"]["MIA_attack_acc"], rows["close"]["MIA_attack_acc"] = 51.0, 70.0
    assert near_chance(rows) == ["over"]  # its attack barely beats a coin: the 10-point gap is a note, not a warning


def test_metrics_of_a_model_that_predicts_one_class():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 5.0, 0.0])[None].repeat(len(x), 1)
    images = lambda n: torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    data = Data("toy", ["a", "b", "c"], images(6), torch.tensor([0, 1, 2, 0, 1, 2]), images(3), torch.tensor([0, 1, 2]),
                torch.zeros(1), torch.ones(1), False)
    metrics = unlearning_metrics(Constant(), data, [1])
    assert metrics["UA"] == 0 and metrics["RA"] == 0 and metrics["TA"] == 0 and metrics["forget_test_acc"] == 100

# -----------------------------------------------------------------------------
# the scripts, end to end


def test_unlearn_all_methods_from_the_command_line(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint,
                 "--forget-class", "1", "--method", "all", *FAST_BASE, *FAST_UNLEARN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    json_path = tmp_path / "results" / f"{Path(default_checkpoint(dataset, 'cnn')).stem}-forget1.json"
    rows = json.loads(json_path.read_text())["results"]
    assert set(rows) == {"base", *unlearn.METHODS}
    for method in unlearn.METHODS:
        assert {"UA", "MIA", "RA", "TA", "forget_test_acc", "seconds", "trainable_params",
                "sparsity"} <= set(rows[method])
        assert f"| {method} |" in json_path.with_suffix(".md").read_text()
        assert any(line.split()[:1] == [method] for line in result.stdout.splitlines())  # its row in the terminal
    md = json_path.with_suffix(".md").read_text()  # it says how it was made and what each column means
    assert md.startswith("# Unlearning results") and "Command: `python unlearn.py --dataset" in md
    assert "## Verdict" in md and "- **RA**: accuracy on the retained training images" in md
    verdicts = result.stdout.split("\nverdict (")[1].splitlines()[1:]
    judged = set(unlearn.METHODS) - {"retrain", "hidden"}
    assert {line.split()[0] for line in verdicts if line.startswith("  ")} == judged
    history = json.loads(json_path.read_text())["base_test_history"]["0"]  # the base's 2 epochs, as train.py saw them
    assert len(history) == 2 and history[-1] == torch.load(base_checkpoint, weights_only=True)["test_acc"]
    assert f"last epochs: {history[0]:.2f} / {history[1]:.2f} %" in result.stdout
    for method in ("prunelora", "lora", "finetune"):
        assert rows[method]["step_time_vs_finetune"] > 0
    assert rows["finetune"]["step_time_vs_finetune"] == 1
    assert rows["retrain"]["UA"] == 100  # never saw the class: it cannot name it
    assert rows["prunelora"]["sparsity"] == pytest.approx(0.5, abs=0.02)  # head stays dense
    assert rows["prunelora"]["trainable_params"] < rows["finetune"]["trainable_params"] / 5
    # each unlearned model is saved merged: its state_dict loads strictly into the bare architecture
    saved = torch.load(tmp_path / "checkpoints" / "unlearned" / f"{json_path.stem}-prunelora.pt", weights_only=True)
    build_model("cnn", 3, 4).load_state_dict(saved["state_dict"], strict=True)
    # the hidden reference forgets in the head only and is never saved where unlearned models go
    assert rows["hidden"]["UA"] == 100 and rows["hidden"]["trainable_params"] == 0
    assert not (tmp_path / "checkpoints" / "unlearned" / f"{json_path.stem}-hidden.pt").exists()


def test_several_seeds_run_the_comparison_once_each_with_their_own_base_and_report_the_mean(synthetic_dataset,
                                                                                           tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--forget-class", "1",
                 "--method", "prunelora,finetune", "--seed", "0", "1", *FAST_BASE, *FAST_UNLEARN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stem = Path(default_checkpoint(dataset, "cnn")).stem
    for seed in (0, 1):  # each seed trained its own base
        assert (tmp_path / default_checkpoint(dataset, "cnn", seed=seed)).is_file()
    saved = json.loads((tmp_path / "results" / f"{stem}-forget1-seeds0-1.json").read_text())
    assert set(saved["per_seed"]) == {"0", "1"} and saved["settings"]["seed"] == [0, 1]
    for method in ("base", "prunelora", "finetune"):
        per_seed = [saved["per_seed"][s][method]["RA"] for s in ("0", "1")]
        assert saved["results"][method]["RA"] == pytest.approx(sum(per_seed) / 2)
        assert saved["spread"][method]["RA"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    assert "±" in result.stdout
    unlearned = [torch.load(tmp_path / "checkpoints" / "unlearned" / f"{name}-forget1-prunelora.pt", weights_only=True)
                 for name in (stem, f"{stem}-seed1")]
    assert not torch.equal(*(u["state_dict"]["head.weight"] for u in unlearned))  # two seeds, two different runs


def test_resume_takes_the_seeds_a_cut_run_finished_and_runs_only_the_rest(synthetic_dataset, tmp_path, monkeypatch):
    dataset, data_dir = synthetic_dataset
    monkeypatch.chdir(tmp_path)
    argv = ["unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--forget-class", "1", "--method", "finetune",
            "--seed", "0", "1", *FAST_BASE, *FAST_UNLEARN]
    real, ran = unlearn.run_methods, []

    def killed_in_seed_1(run, base, args):
        if base.seed == 1:
            raise KeyboardInterrupt  # as a kill would, after seed 0 finished
        ran.append(base.seed)
        return real(run, base, args)
    monkeypatch.setattr(unlearn, "run_methods", killed_in_seed_1)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        unlearn.main()
    results = tmp_path / "results" / f"{Path(default_checkpoint(dataset, 'cnn')).stem}-forget1-seeds0-1.json"
    partial = results.with_suffix(".partial.json")
    assert not results.exists() and set(json.loads(partial.read_text())["per_seed"]) == {"0"}

    monkeypatch.setattr(sys, "argv", [*argv, "--resume", "--lr", "0.01"])  # another setting: refused
    with pytest.raises(UserError, match="--resume: .*lr=0.001"):
        unlearn.main()

    monkeypatch.setattr(unlearn, "run_methods", lambda run, base, args: ran.append(base.seed) or real(run, base, args))
    monkeypatch.setattr(sys, "argv", [*argv, "--resume"])
    unlearn.main()
    assert ran == [0, 1]  # seed 0 ran once, before the kill
    saved = json.loads(results.read_text())
    assert set(saved["per_seed"]) == {"0", "1"} and not partial.exists()


def test_several_seeds_with_depth_report_which_measures_tell_hidden_from_retrain(synthetic_dataset, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--forget-class", "1", "--depth",
                 "--method", "retrain,hidden", "--seed", "0", "1", *FAST_BASE, *FAST_UNLEARN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stem = Path(default_checkpoint(dataset, "cnn")).stem
    saved = json.loads((tmp_path / "results" / f"{stem}-forget1-seeds0-1.json").read_text())
    table = saved["depth_separation"]
    assert {"relearn_steps", "relearn_auc", "ncm_acc", "cka_base"} <= set(table)
    for measure, ends in table.items():  # the two ends are the seeds' base and Retrain rows
        runs = [saved["per_seed"][s] for s in ("0", "1")]
        assert ends["retrain"] == pytest.approx(sum(r["retrain"][measure] for r in runs) / 2)
        assert ends["hidden"] == pytest.approx(sum(r["base"][measure] for r in runs) / 2)
    assert saved["results"]["base"]["cka_base"] == pytest.approx(1.0)
    assert "separation" in result.stdout


def test_several_epoch_counts_give_a_row_each_and_the_fewest_epochs_to_the_targets(synthetic_dataset, base_checkpoint,
                                                                                   tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint, "--arch", "cnn",
                 "--forget-class", "1", "--method", "retrain,finetune,ga", "--epochs", "2", "1", "--batch-size", "32",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stem = Path(default_checkpoint(dataset, "cnn")).stem
    saved = json.loads((tmp_path / "results" / f"{stem}-forget1.json").read_text())
    rows = saved["results"]
    assert set(rows) == {"base", "retrain", "finetune@1ep", "finetune@2ep", "ga@1ep", "ga@2ep"}  # Retrain once
    for method in ("finetune", "ga"):
        meets = [e for e in (1, 2) if meets_targets(rows[f"{method}@{e}ep"], rows["retrain"])]
        (hit,) = saved["time_to_target"][method]
        assert hit["epochs"] == (meets[0] if meets else None)
        assert hit["seconds"] == (rows[f"{method}@{meets[0]}ep"]["seconds"] if meets else None)
    assert "fewest epochs to the targets" in result.stdout
    assert (tmp_path / "checkpoints" / "unlearned").joinpath(
        f"{Path(default_checkpoint(dataset, 'cnn')).stem}-forget1-finetune-1ep.pt").is_file()


def test_random_sample_forgetting_runs_every_method_and_reads_them_against_retrain(synthetic_dataset, base_checkpoint,
                                                                                     tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint, "--arch", "cnn",
                 "--forget-share", "0.2", "--method", "all", *FAST_UNLEARN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stem = Path(default_checkpoint(dataset, "cnn")).stem
    rows = json.loads((tmp_path / "results" / f"{stem}-forget-share0.2.json").read_text())["results"]
    assert set(rows) == {"base", *unlearn.METHODS} - {"hidden"}  # no class to hide
    for method, row in rows.items():
        assert {"UA", "MIA", "RA", "TA", "avg_gap", "MIA_gap"} <= set(row) and "forget_test_acc" not in row
    assert rows["retrain"]["avg_gap"] == 0 and rows["base"]["forget_count"] == 48  # 20% of 4 x 60 images
    noisy = [name for name, row in rows.items() if row["MIA_attack_acc"] < 55]  # the table names them, and only them
    notes = [line for line in (tmp_path / "results" / f"{stem}-forget-share0.2.md").read_text().splitlines()
             if "near chance" in line]
    assert notes == ([f"attack acc under 55 % (near chance) for {', '.join(noisy)}: the attack barely tells training "
                      "images from unseen ones, so their MIA-efficacy is mostly noise"] if noisy else [])
    # Retrain never saw a forget image: its checkpoint was trained without exactly the forget set
    data = load_dataset(dataset, data_dir)
    [retrain] = (tmp_path / "checkpoints").glob("*-without48images-*.pt")
    excluded = torch.tensor(load_checkpoint(retrain)["args"]["exclude_index"])
    saved = torch.load(tmp_path / "checkpoints" / "unlearned" / f"{stem}-forget-share0.2-prunelora.pt",
                       weights_only=True)
    assert torch.equal(excluded, torch.tensor(saved["args"]["forget_index"]))
    assert len(excluded) == 48 and not torch.isin(training_index(data, exclude_index=excluded.tolist()), excluded).any()


def test_retrain_uses_a_complete_retrain_checkpoint_of_the_same_settings(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    args = ("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint,
            "--forget-class", "1", "--method", "retrain", *FAST_BASE, *FAST_UNLEARN)
    json_path = tmp_path / "results" / f"{Path(default_checkpoint(dataset, 'cnn')).stem}-forget1.json"
    first = run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    trained = json.loads(json_path.read_text())["results"]["retrain"]
    second = run(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "already complete" in second.stdout and "epoch 1/" not in second.stdout  # nothing trained again
    again = json.loads(json_path.read_text())["results"]["retrain"]
    assert again["seconds"] == trained["seconds"]  # its training time, from the checkpoint
    assert {k: again[k] for k in ("UA", "RA", "TA")} == {k: trained[k] for k in ("UA", "RA", "TA")}


def test_one_base_for_several_seeds_still_gives_each_seed_its_own_retrain(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint,
                 "--forget-class", "1", "--method", "retrain", "--seed", "0", "1", *FAST_BASE, *FAST_UNLEARN,
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    retrained = [load_checkpoint(tmp_path / default_checkpoint(dataset, "cnn", ["1"], seed=seed)) for seed in (0, 1)]
    assert [r["args"]["seed"] for r in retrained] == [0, 1]
    assert not torch.equal(*(r["state_dict"]["head.weight"] for r in retrained))


def test_bench_steps_prints_step_time_ratios_and_where_each_step_goes(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--base", base_checkpoint, "--arch", "cnn",
                 "--forget-class", "1", "--bench-steps", "2", "--batch-size", "16", "--bench-profile", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if "ms/step" in line}
    assert set(lines) == {"finetune", "lora", "prunelora"} and "1.00 x finetune" in lines["finetune"]
    peaks = [float(line.split("MiB peak")[0].split()[-1]) for line in lines.values()]
    assert all(peak > 0 for peak in peaks)
    # --bench-profile: per method, its operators' time and calls per step; LoRA's factors add calls
    lines = result.stdout.splitlines()
    totals = {line.split(":")[0]: line for line in lines if line.endswith("profiled steps (CPU ms)")}
    calls = [float(line.split(" calls")[0].split()[-1]) for line in lines if "all operators" in line]
    assert list(totals) == ["finetune", "lora", "prunelora"] and len(calls) == 3 and calls[1] > calls[0] > 0
    assert not (tmp_path / "results").exists()  # a benchmark writes nothing


def bench_inputs(synthetic_dataset):
    """A random cnn's checkpoint for the synthetic data and one batch of 4 training images."""
    dataset, data_dir = synthetic_dataset
    data = load_dataset(dataset, data_dir)
    base = checkpoint_dict(build_model("cnn", data.train_images.shape[1], data.num_classes), data, "cnn", {})
    batch = torch.arange(4)
    x, y = make_batch(data, data.train_images, batch), data.train_labels[batch]
    return base, x, y


def test_the_bench_times_each_model_in_the_mode_unlearning_trains_it_in(synthetic_dataset):
    """With --freeze-bn 1 (the default) unlearning trains LoRA and PruneLoRA with BatchNorm frozen and
    fine-tuning with it in train mode; a bench step in another mode would time another computation."""
    base, x, y = bench_inputs(synthetic_dataset)
    for freeze_bn in (1, 0):
        args = argparse.Namespace(prune_amount=0.5, rank=2, alpha=4, freeze_bn=freeze_bn,
                                  forget_class=[1], reset_head=1)
        for name in bench.BENCH_METHODS:
            model, step = bench.trainer(name, base, x, y, args)
            norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            before = [m.running_mean.clone() for m in norms]
            step()
            frozen = bool(freeze_bn) and name != "finetune"
            assert all(m.training != frozen for m in norms), (name, freeze_bn)
            assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before)) == frozen, (name, freeze_bn)


def test_the_bench_times_prunelora_with_the_tied_head_s_loss_when_asked(synthetic_dataset):
    """With --tie-head 1 the timed PruneLoRA step is the one unlearning takes: the loss on the features,
    no gradient to the head."""
    base, x, y = bench_inputs(synthetic_dataset)
    for tie_head in (0, 1):
        args = unlearn_args(rank=2, alpha=4, tie_head=tie_head)
        model, step = bench.trainer("prunelora", base, x, y, args)
        step()
        assert (model.head.weight.grad is None) == bool(tie_head)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_unlearn_trains_a_base_model_when_there_is_none(synthetic_dataset, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("unlearn.py", "--dataset", dataset, "--data-dir", data_dir, "--forget-class", "2",
                 *FAST_BASE, *FAST_UNLEARN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no base checkpoint" in result.stdout
    assert (tmp_path / default_checkpoint(dataset, "cnn")).is_file()


@pytest.mark.parametrize("tie_head", [0, 1])
def test_unlearn_as_functions_forgets_several_classes(tie_head, synthetic_dataset, base_checkpoint):
    dataset, data_dir = synthetic_dataset
    data = load_dataset(dataset, data_dir)
    base = load_checkpoint(base_checkpoint, dataset, "cnn")
    args = unlearn_args(forget_class=[0, 3], freeze_bn=0, tie_head=tie_head, epochs=3)
    index = training_index(data)
    forget = torch.isin(data.train_labels, torch.tensor(args.forget_class))
    split = dict(train=index, retain=index[~forget], forget=index[forget])
    model, row = unlearn.run_method("prunelora", Task(0, base, None, split), data, args, torch.device("cpu"))
    assert row["RA"] >= 90 and row["UA"] >= 90  # on this easy data both are reached in 3 epochs
    assert row["sparsity"] == pytest.approx(pl.sparsity(model)) and row["sparsity"] > 0.45


@pytest.mark.parametrize("method", ["prunelora", "lora"])
def test_freeze_bn_keeps_the_merged_batchnorm_buffers_the_base_s_bit_for_bit(method, class_1_task):
    data, base, split = class_1_task
    buffers = {}
    for freeze in (1, 0):
        args = unlearn_args(freeze_bn=freeze)
        model, _ = unlearn.run_method(method, Task(0, base, None, split), data, args, torch.device("cpu"))
        buffers[freeze] = {k: v for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    assert buffers[1] and all(torch.equal(v, base["state_dict"][k]) for k, v in buffers[1].items())
    assert not all(torch.equal(v, base["state_dict"][k]) for k, v in buffers[0].items())  # train mode: they drift


def test_evaluate_prints_the_metrics_of_a_checkpoint(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = run("evaluate.py", base_checkpoint, "--forget-class", "1", "--data-dir", data_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| UA | MIA | RA | TA |" in result.stdout
    # the same data options as the other scripts, and the class by its name
    by_name = run("evaluate.py", base_checkpoint, "--forget-class", "CLASS1", "--dataset", dataset,
                  "--data-dir", data_dir, cwd=tmp_path)
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout.splitlines()[-1] == result.stdout.splitlines()[-1]

# -----------------------------------------------------------------------------
# real data: runs when PRUNELORA_DATA names a folder holding FashionMNIST/raw


@pytest.mark.skipif(not os.environ.get("PRUNELORA_DATA"), reason="set PRUNELORA_DATA to a data dir with Fashion-MNIST")
def test_prunelora_forgets_a_fashion_mnist_class_and_keeps_the_rest(tmp_path):
    data_dir = os.environ["PRUNELORA_DATA"]
    common = ["--dataset", "fashion-mnist", "--data-dir", data_dir, "--arch", "cnn", "--train-limit", "3000"]
    result = run("unlearn.py", *common, "--forget-class", "3", "--method", "prunelora", "--base-epochs", "6",
                 "--base-batch-size", "128", "--base-lr", "0.1", "--epochs", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "results" / "fashion-mnist-cnn-n3000-forget3.json").read_text())["results"]
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
    with pytest.raises(UserError, match="could not be downloaded.*--data-dir.*folder:PATH"):
        load_dataset("mnist", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_resume_rescores_finished_seeds_on_todays_depth_scale_and_ignores_print_only_options(tmp_path):
    """A seed finished by older code (its depth_score read on another measure, no --bench-profile in its
    settings) is taken on resume, and its score is read again from its raw measures."""
    partial = tmp_path / "run.partial.json"
    stale = {"base": {"ncm_acc_50": 40.0}, "retrain": {"ncm_acc_50": 20.0},
             "prunelora": {"ncm_acc_50": 35.0, "ncm_acc": 30.0, "depth_score": 0.9}}
    partial.write_text(json.dumps({"settings": {"dataset": "x", "lr": 0.001}, "per_seed": {"0": stale}}))
    args = argparse.Namespace(dataset="x", lr=0.001, bench_profile=True, resume=True, push=0.0)  # push: newer, off
    rows = report.finished_seeds(partial, args)[0]
    assert rows["prunelora"]["depth_score"] == pytest.approx(0.25)  # (40 - 35) / (40 - 20)
    assert rows["prunelora"]["depth_measure"] == "ncm_acc_50"
    with pytest.raises(UserError, match="push=None, not 1.0"):  # a newer option switched on: another run
        report.finished_seeds(partial, argparse.Namespace(dataset="x", lr=0.001, resume=True, push=1.0))


def test_compiled_training_gives_eager_training_s_weights_within_tolerance(synthetic_dataset):
    """--compile: PruneLoRA's model trained for one epoch through torch.compile ends where the eager
    run ends, up to float rounding (inductor may order sums differently): every trainable weight within
    1e-4, relative to its own size. The compile time is returned apart."""
    from train import fit
    dataset, data_dir = synthetic_dataset
    data = load_dataset(dataset, data_dir)
    index = training_index(data)[:64]
    weights = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = build_model("cnn", 3, data.num_classes)
        pl.prune_global(model, 0.5, exclude=("head",))
        pl.add_lora(model, r=4, alpha=8, exclude=("head",))
        pl.mark_only_lora_trainable(model, keep=("head",))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        facts = fit(model, data, index, epochs=1, batch_size=16, optimizer=optimizer, freeze_bn=True,
                    generator=torch.Generator().manual_seed(0), log=lambda line: None, compile=compile)
        assert ("compile_seconds" in facts) == compile
        weights[compile] = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    for name, eager in weights[False].items():
        assert not torch.equal(eager, torch.zeros_like(eager)) or "lora_B" not in name
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
