"""torchrun: two gloo processes on the CPU give one process's results, and a killed process leaves no
partial file. (Each test starts real processes: about half a minute each on 2 cores.)"""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent.parent
TINY_VIT = "tv:VisionTransformer:patch_size=8,num_layers=1,num_heads=2,hidden_dim=16,mlp_dim=32"  # no BatchNorm


def command(script, *args, processes=1):
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, str(HERE / script), "--device", "cpu", *map(str, args)]


def run(script, *args, cwd, processes=1):
    return subprocess.run(command(script, *args, processes=processes), cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_two_processes_train_the_weights_one_process_trains(synthetic_dataset, tmp_path):
    """Without BatchNorm a data-parallel step is one process's step over the global batch: the same
    weights up to float rounding (the gradient is averaged in another order)."""
    dataset, data_dir = synthetic_dataset
    common = ["--dataset", dataset, "--data-dir", data_dir, "--arch", TINY_VIT, "--epochs", "2", "--batch-size", "16",
              "--lr", "0.05"]
    one = run("train.py", *common, "--out", tmp_path / "one.pt", cwd=tmp_path)
    two = run("train.py", *common, "--out", tmp_path / "two.pt", cwd=tmp_path, processes=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout.count("epoch 2/2") == 1  # rank 0 alone prints
    a, b = weights(tmp_path / "one.pt"), weights(tmp_path / "two.pt")
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), key
    assert torch.load(tmp_path / "two.pt", weights_only=True)["world_size"] == 2


def test_two_processes_unlearn_as_one_process_with_frozen_batchnorm(synthetic_dataset, tmp_path):
    """PruneLoRA (BatchNorm frozen by default) on a cnn base: the merged weights of one and of two
    processes agree within 1e-4, and so do UA, RA and TA; the results JSON says how many processes ran."""
    import json
    dataset, data_dir = synthetic_dataset
    base = ["--dataset", dataset, "--data-dir", data_dir, "--arch", "cnn", "--epochs", "2", "--batch-size", "32",
            "--lr", "0.05"]
    assert run("train.py", *base, "--out", tmp_path / "base.pt", cwd=tmp_path).returncode == 0
    common = ["--dataset", dataset, "--data-dir", data_dir, "--arch", "cnn", "--base", tmp_path / "base.pt",
              "--forget-class", "1", "--epochs", "1", "--batch-size", "32",
              "--deep", "0"]  # PruneLoRA as the paper has it: --deep 1, the default in one process, is not for torchrun
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        done = run("unlearn.py", *common, "--out-dir", out, cwd=tmp_path, processes=processes)
        assert done.returncode == 0, done.stderr
        (path,) = (tmp_path / "checkpoints" / "unlearned").glob("*prunelora.pt")
        results[processes] = (json.loads(next(out.glob("*.json")).read_text()), weights(path))
        path.unlink()
    (one, merged_one), (two, merged_two) = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("UA", "RA", "TA"):
        assert abs(one["results"]["prunelora"][key] - two["results"]["prunelora"][key]) <= 0.5, key
    for key in merged_one:
        assert torch.allclose(merged_one[key].float(), merged_two[key].float(), rtol=1e-4, atol=1e-4), key


def test_a_killed_process_ends_the_run_with_no_partial_file(synthetic_dataset, tmp_path):
    dataset, data_dir = synthetic_dataset
    args = ["--dataset", dataset, "--data-dir", data_dir, "--arch", "cnn", "--epochs", "200", "--batch-size", "16",
            "--lr", "0.05", "--out", tmp_path / "cut.pt"]
    launcher = subprocess.Popen(command("train.py", *args, processes=2), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "cut.pt").exists() and time.time() < deadline:  # an epoch has finished
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2, children
        subprocess.run(["kill", "-KILL", children[-1]])  # one worker dies, mid-training
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))
    ckpt = torch.load(tmp_path / "cut.pt", weights_only=True)  # whole: the last finished epoch
    assert 1 <= ckpt["epochs_done"] < 200
    ours = [line for line in stderr.splitlines() if line.startswith("train.py:")]
    assert len(ours) == 1 and ("terminated" in ours[0] or "another process" in ours[0]), stderr[-2000:]


def test_a_diverging_loss_stops_every_process_with_one_line(synthetic_dataset, tmp_path):
    """The NaN stop is agreed by all processes (none waits forever in a collective): exit 1, one line."""
    dataset, data_dir = synthetic_dataset
    done = run("train.py", "--dataset", dataset, "--data-dir", data_dir, "--arch", "cnn", "--epochs", "2",
               "--batch-size", "16", "--lr", "1e38", "--out", tmp_path / "nan.pt", cwd=tmp_path, processes=2)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("train.py:")]
    assert len(ours) == 1 and "learning rate" in ours[0], done.stderr[-2000:]
    assert not (tmp_path / "nan.pt").exists() and not list(tmp_path.glob(".*.tmp"))
