"""Reliability promises of the command lines (train.py, unlearn.py, evaluate.py), each tested through
real subprocesses on the tiny synthetic dataset of conftest.py:

1. a checkpoint that would run code when unpickled is refused, and its code never runs
2. a kill -9 at any moment leaves either no file, the previous file, or a new complete one
3. --resume after a kill gives bitwise the same model as an uninterrupted run
4. a NaN/inf loss stops with a message naming the step, keeping the last good checkpoint
5. the same unlearn.py command and --seed give the same metrics and weights
6. every user mistake: exit status 2, one line naming the bad value, nothing written
7. a failed save (disk full) keeps the previous file intact and leaves no temporary file
"""
import errno
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import checkpoints
import cli
import models

ROOT = Path(__file__).resolve().parent.parent  # the repository root, where the scripts are
# One thread per subprocess, and independent runs side by side: every run pays ~3 s of imports
# (torch, and torch._dynamo on the first optimizer), and on a small shared machine spinning OpenMP
# threads make runs up to ten times slower. Results do not depend on the thread count.
ENV = dict(os.environ, OMP_NUM_THREADS="1")
CORES = os.cpu_count() or 2
TIMEOUT = 120
# metrics in unlearn.py's results that measure time, not the model
TIMING_KEYS = {"seconds", "time_vs_retrain", "step_time_vs_finetune", "inference_time_ratio", "peak_memory_mb"}


def command(script, *args):
    return [sys.executable, str(ROOT / f"{script}.py"), *map(str, args)]


def run(script, *args, cwd, **kwargs):
    """Run a script to the end; returns the CompletedProcess with text stdout/stderr."""
    return subprocess.run(command(script, *args), cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT, **kwargs)


def start(script, *args, cwd):
    return subprocess.Popen(command(script, *args), cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def temporaries(path):
    """The atomic-save temporaries of path (.NAME.PID.tmp beside it)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return [n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.") and n.endswith(".tmp")]


def mtime(path):
    return path.stat().st_mtime_ns if path.exists() else None


def together(*jobs, workers=None):
    """Call the jobs (functions without arguments) side by side in threads; their results, in order."""
    with ThreadPoolExecutor(max_workers=workers or len(jobs)) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def wait_for(proc, condition, what, timeout=60):
    """Poll condition() every 0.5 ms until it holds; fails if proc ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.0005)


def kill_when(proc, condition, what, timeout=60):
    """SIGKILL proc as soon as condition() holds (and in any case: no run outlives its test)."""
    try:
        wait_for(proc, condition, what, timeout)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def snapshot(*roots):
    """Every file and folder under roots: path -> (size, mtime_ns); for 'nothing created or changed'."""
    found = {}
    for root in map(Path, roots):
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            found[str(p)] = (st.st_size, st.st_mtime_ns)
    return found


def assert_one_line_error(result, status=2):
    """Exit status, exactly one non-empty line on stderr, and no traceback; returns the line."""
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr + result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    return lines[0]


def load_valid_checkpoint(path):
    """A whole checkpoint: loads with weights_only=True, has the keys, and its weights fit its model."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k in ckpt for k in checkpoints.CHECKPOINT_KEYS), sorted(ckpt)
    model = models.build_model(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return ckpt, model


def outputs_are_finite(model):
    model.eval()
    with torch.no_grad():
        return bool(torch.isfinite(model(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))).all())


def assert_state_dicts_equal(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


# -----------------------------------------------------------------------------
# shared inputs: one small base model, trained once


@pytest.fixture(scope="module")
def data_args(synthetic_dataset):
    flag, data_dir = synthetic_dataset
    return ["--dataset", flag, "--data-dir", data_dir]


@pytest.fixture(scope="module")
def base(data_args, tmp_path_factory):
    """A complete cnn checkpoint on 64 training images (this also builds the dataset cache)."""
    folder = tmp_path_factory.mktemp("base")
    path = folder / "base.pt"
    result = run("train", *data_args, "--arch", "cnn", "--epochs", 2, "--batch-size", 16, "--train-limit", 64,
                 "--lr", 0.05, "--out", path, cwd=folder)
    assert result.returncode == 0, result.stderr
    return path


def unlearn_args(data_args, base_path, *extra):
    return [*data_args, "--arch", "cnn", "--forget-class", 1, "--base", base_path, "--epochs", 1,
            "--batch-size", 16, *extra]


# -----------------------------------------------------------------------------
# 1. hostile checkpoints


class RunsCode:
    """Unpickling this calls open(marker, "w"): the marker file appears only if code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_hostile(path, marker, how):
    obj = {key: 0 for key in checkpoints.CHECKPOINT_KEYS} | {"state_dict": RunsCode(marker)}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


@pytest.mark.parametrize("script, how", [("train", "torch.save"), ("unlearn", "torch.save"),
                                         ("evaluate", "torch.save"), ("evaluate", "pickle")])
def test_a_checkpoint_that_runs_code_when_unpickled_is_refused_and_never_runs(script, how, tmp_path, data_args, base):
    """Exit 2, one line, no traceback, and the payload's marker file never appears."""
    control, control_marker = tmp_path / "control.pt", tmp_path / "control-ran"
    write_hostile(control, control_marker, how)
    with open(control, "rb") as f:  # the recipe really runs code when trusted...
        torch.load(f, weights_only=False) if how == "torch.save" else pickle.load(f)
    assert control_marker.exists()

    hostile, marker = tmp_path / "hostile.pt", tmp_path / "ran"
    write_hostile(hostile, marker, how)
    args = {"train": [*data_args, "--arch", "cnn", "--resume", "--out", hostile],
            "unlearn": unlearn_args(data_args, hostile),
            "evaluate": [hostile, "--forget-class", 1]}[script]
    before = snapshot(tmp_path)
    line = assert_one_line_error(run(script, *args, cwd=tmp_path))
    assert "refused" in line and str(hostile) in line
    assert not marker.exists()  # ...and the scripts never trust it
    assert snapshot(tmp_path) == before


# -----------------------------------------------------------------------------
# 2. kill -9 at any moment


# many 2-step epochs: a save every few tens of milliseconds
KILL_TRAIN_ARGS = ["--arch", "cnn", "--epochs", 300, "--batch-size", 4, "--train-limit", 8, "--lr", 0.01]
KILL_MOMENTS = ("while-starting", "during-first-save", "during-save-over-previous", "during-later-save",
                "between-saves")


def kill_train_at(moment, folder, data_args, base):
    """Start train.py (over a previous checkpoint for the last three moments) and SIGKILL it at moment.
    Returns (out, the previous file's bytes or None, whether the kill left a save's temporary behind)."""
    folder.mkdir()
    out = folder / "model.pt"
    previous = None
    if moment in ("during-save-over-previous", "during-later-save", "between-saves"):
        shutil.copy(base, out)
        previous = out.read_bytes()
    # a save has begun when a temporary appears beside out, or (were saves not atomic) when out changes
    saving = lambda since: temporaries(out) or mtime(out) != since
    proc = start("train", *data_args, *KILL_TRAIN_ARGS, "--out", out, cwd=folder)
    if moment == "while-starting":  # still importing torch
        deadline = time.monotonic() + 0.5
        kill_when(proc, lambda: time.monotonic() > deadline, "the kill")
    elif moment in ("during-first-save", "during-save-over-previous"):
        kill_when(proc, lambda s=mtime(out): saving(s), "a save")
    elif moment == "during-later-save":
        wait_for(proc, lambda s=mtime(out): mtime(out) != s, "a first save")
        time.sleep(0.2)
        kill_when(proc, lambda s=mtime(out): saving(s), "a later save")
    else:
        wait_for(proc, lambda s=mtime(out): mtime(out) != s, "a first save")
        deadline = time.monotonic() + 0.25
        kill_when(proc, lambda: time.monotonic() > deadline and not temporaries(out), "a moment between saves")
    return out, previous, bool(temporaries(out))


def test_train_killed_at_any_moment_leaves_no_file_the_previous_file_or_a_complete_new_one(tmp_path, data_args, base):
    """SIGKILL train.py at five moments (five runs side by side); the checkpoint at --out is always
    absent (and never existed), the previous file byte for byte, or a whole new checkpoint."""
    outcomes = together(*[lambda m=m: kill_train_at(m, tmp_path / m, data_args, base) for m in KILL_MOMENTS])
    for moment, (out, previous, interrupted_save) in zip(KILL_MOMENTS, outcomes):
        if not out.exists():
            assert previous is None, f"{moment}: the previous checkpoint was lost"
            assert moment in ("while-starting", "during-first-save"), f"{moment}: no checkpoint after a save"
        elif previous is not None and out.read_bytes() == previous:
            assert moment == "during-save-over-previous", f"{moment}: no save replaced the previous file"
        else:
            ckpt, _ = load_valid_checkpoint(out)  # a new file, whole, from this run
            assert ckpt["args"]["train_limit"] == 8 and 1 <= ckpt["epochs_done"] < 300, moment
    assert not (tmp_path / "while-starting" / "model.pt").exists()
    # the kills meant to land mid-save did: the unfinished temporary they leave proves it
    assert any(interrupted for m, (_, _, interrupted) in zip(KILL_MOMENTS, outcomes) if "save" in m)


def kill_unlearn_at(moment, folder, data_args, base):
    """Start unlearn.py over a previous results JSON and SIGKILL it while it saves (moment)."""
    results = folder / "results"
    results.mkdir(parents=True)
    json_path = results / "folder-images-cnn-n64-forget1.json"  # -n64: the base fixture's --train-limit
    previous = json.dumps({"results": {"from": "an earlier run"}}).encode()
    json_path.write_bytes(previous)
    methods = folder / "checkpoints" / "unlearned"
    # a save has begun when a temporary or (were saves not atomic) the file itself appears or changes
    saving = {"during-checkpoint-save": lambda: methods.is_dir() and os.listdir(methods),
              "during-results-save": lambda s=mtime(json_path): temporaries(json_path) or mtime(json_path) != s}[moment]
    proc = start("unlearn", *unlearn_args(data_args, base, "--method", "finetune,ga", "--out-dir", results), cwd=folder)
    kill_when(proc, saving, "a save")
    return json_path, previous, sorted(methods.glob("*.pt"))


def test_unlearn_killed_while_saving_leaves_results_and_checkpoints_whole(tmp_path, data_args, base):
    """SIGKILL unlearn.py while it writes an unlearned checkpoint, and while it writes its results JSON."""
    moments = ("during-checkpoint-save", "during-results-save")
    outcomes = together(*[lambda m=m: kill_unlearn_at(m, tmp_path / m, data_args, base) for m in moments])
    for moment, (json_path, previous, saved) in zip(moments, outcomes):
        data = json_path.read_bytes()
        assert data == previous or "results" in json.loads(data), moment
        for path in saved:
            ckpt, _ = load_valid_checkpoint(path)
            assert "metrics" in ckpt, moment
    assert outcomes[1][2], "the results are saved after the checkpoints: some must exist"


# -----------------------------------------------------------------------------
# 3. resume


def test_resume_after_a_kill_gives_bitwise_the_same_model_as_an_uninterrupted_run(tmp_path, data_args):
    """Train 3 epochs straight; and train, kill -9 after the first checkpoint, then continue it twice over:
    with the unlearn.py command that uses it as its base (it finishes the base by itself) and with
    'train.py --resume --out' and the data folder (every other setting taken from the checkpoint). Same tensors."""
    args = [*data_args, "--arch", "cnn", "--epochs", 3, "--batch-size", 8, "--train-limit", 32, "--lr", 0.05,
            "--seed", 5]
    straight, interrupted = tmp_path / "straight.pt", tmp_path / "interrupted.pt"

    def interrupt():
        kill_when(start("train", *args, "--out", interrupted, cwd=tmp_path), interrupted.exists, "the first checkpoint")

    result, _ = together(lambda: run("train", *args, "--out", straight, cwd=tmp_path), interrupt)
    assert result.returncode == 0, result.stderr
    partial = torch.load(interrupted, weights_only=True)
    assert not partial["complete"] and 1 <= partial["epochs_done"] < 3  # it really was cut short
    by_train = tmp_path / "by-train.pt"
    shutil.copy(interrupted, by_train)
    finished = run("unlearn", *data_args, "--arch", "cnn", "--base", interrupted, "--forget-class", 1,
                   "--method", "hidden", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "is unfinished" in finished.stdout and f"after epoch {partial['epochs_done']}" in finished.stdout
    resumed = run("train", *data_args[2:], "--resume", "--out", by_train, cwd=tmp_path)  # only the data folder
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {partial['epochs_done']}" in resumed.stdout

    a = torch.load(straight, weights_only=True)
    for path in (interrupted, by_train):
        b = torch.load(path, weights_only=True)
        assert a["complete"] and b["complete"] and a["epochs_done"] == b["epochs_done"] == 3
        assert_state_dicts_equal(a["state_dict"], b["state_dict"])
        assert len(a["test_history"]) == 3 and b["test_history"] == a["test_history"]  # one test accuracy per epoch


@pytest.mark.parametrize("script", ["train", "unlearn"])
def test_ctrl_c_says_in_one_line_what_was_kept_and_how_to_continue(script, tmp_path, data_args):
    """SIGINT (Ctrl-C) during base training: exit 130, one line without a traceback that names the
    command which continues, and no temporary file; that command then finishes the run."""
    out = tmp_path / checkpoints.default_checkpoint(data_args[1], "cnn", seed=5, train_limit=32)  # unlearn.py's base
    train_args = ["--arch", "cnn", "--train-limit", 32, "--seed", 5]
    argv = ({"train": [*data_args, *train_args, "--epochs", 30, "--batch-size", 8, "--lr", 0.05, "--out", out],
             "unlearn": [*data_args, *train_args, "--base-epochs", 30, "--base-batch-size", 8,
                         "--base-lr", 0.05, "--forget-class", 1, "--method", "hidden"]}[script])
    proc = subprocess.Popen(command(script, *argv), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, out.exists, "the first checkpoint")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    (line,) = stderr.strip().splitlines()
    assert "interrupted" in line and "Traceback" not in stderr and "continue with: python" in line, line
    assert not temporaries(out)
    again = line.split("continue with: ")[1].split()[2:]  # the command's options, after 'python X.py'
    result = run(script, *again, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(out, weights_only=True)["complete"]


# -----------------------------------------------------------------------------
# 4. NaN / inf


def test_train_stops_on_a_diverging_learning_rate_and_keeps_the_good_checkpoint(tmp_path, data_args, base):
    """lr 1e38 over a good checkpoint: exit 1, one line naming the step and the learning rate, and the
    checkpoint at --out still loads, gives finite outputs, and is the previous file (nothing of these runs
    was good). With 64 images the loss turns NaN at step 2; with 16 an epoch is a single step, so the
    blow-up shows only in the model after it, the one that would be saved."""
    cases = {"nan-within-an-epoch": 64, "nan-after-an-epochs-last-step": 16}

    def diverge(name, train_limit):
        folder = tmp_path / name
        folder.mkdir()
        out = folder / "model.pt"
        shutil.copy(base, out)
        return out, run("train", *data_args, "--arch", "cnn", "--epochs", 3, "--batch-size", 16, "--train-limit",
                        train_limit, "--lr", 1e38, "--out", out, cwd=folder)

    previous = base.read_bytes()
    for name, (out, result) in zip(cases, together(*[lambda c=c: diverge(*c) for c in cases.items()])):
        line = assert_one_line_error(result, status=1)
        assert re.search(r"epoch 1, step [12]\b", line) and "learning rate" in line and str(out) in line, line
        _, model = load_valid_checkpoint(out)
        assert outputs_are_finite(model), name
        assert out.read_bytes() == previous, name
        assert not temporaries(out), name


def test_unlearn_stops_on_a_diverging_learning_rate_and_writes_no_results(tmp_path, data_args, base):
    """finetune at lr 1e30: exit 1, a message naming the step, no results and no unlearned checkpoint.
    With batch 16 the loss turns NaN at step 2; with batch 64 (48 retained images) the run is a single
    step, so only the model after it is broken."""
    cases = {"nan-within-an-epoch": 16, "nan-after-the-last-step": 64}

    def diverge(name, batch_size):
        folder = tmp_path / name
        folder.mkdir()
        args = unlearn_args(data_args, base, "--method", "finetune", "--lr", 1e30, "--out-dir", folder / "results")
        args[args.index("--batch-size") + 1] = batch_size
        return folder, run("unlearn", *args, cwd=folder)

    for name, (folder, result) in zip(cases, together(*[lambda c=c: diverge(*c) for c in cases.items()])):
        line = assert_one_line_error(result, status=1)
        assert re.search(r"epoch 1, step \d+", line) and "learning rate" in line, line
        assert not (folder / "results").exists() and not (folder / "checkpoints").exists(), name


# -----------------------------------------------------------------------------
# 5. determinism


def test_the_same_unlearn_command_and_seed_gives_the_same_metrics_and_weights(tmp_path, data_args, base):
    """Twice the same command (methods with random labels and LoRA dropout), in two folders."""
    def unlearn(folder):
        folder.mkdir()
        return run("unlearn", *unlearn_args(data_args, base, "--method", "prunelora,rl", "--seed", 3,
                                            "--out-dir", folder / "results"), cwd=folder)

    folders = (tmp_path / "first", tmp_path / "second")
    tables, weights = [], []
    for folder, result in zip(folders, together(*[lambda f=f: unlearn(f) for f in folders])):
        assert result.returncode == 0, result.stderr
        rows = json.loads((folder / "results" / "folder-images-cnn-n64-seed3-forget1.json").read_text())["results"]
        tables.append({m: {k: v for k, v in row.items() if k not in TIMING_KEYS} for m, row in rows.items()})
        weights.append({p.name: torch.load(p, weights_only=True)["state_dict"]
                        for p in sorted((folder / "checkpoints" / "unlearned").glob("*.pt"))})
    assert set(tables[0]) == {"base", "prunelora", "rl"} and all(tables[0].values())
    assert tables[0] == tables[1]
    assert len(weights[0]) == 2 and weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert_state_dicts_equal(weights[0][name], weights[1][name])


# -----------------------------------------------------------------------------
# 6. bad input


@pytest.fixture(scope="module")
def bad_inputs(base, tmp_path_factory):
    """Files and folders that the mistakes point at, made once."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    data = base.read_bytes()
    (folder / "corrupt.pt").write_bytes(b"this is not a checkpoint\n" * 40)
    (folder / "truncated.pt").write_bytes(data[: len(data) // 2])
    ckpt = torch.load(base, weights_only=True)
    torch.save(dict(ckpt, dataset="cifar10"), folder / "other-dataset.pt")
    torch.save(dict(ckpt, arch="resnet18"), folder / "other-arch.pt")
    torch.save(dict(ckpt, complete=False, epochs_done=1), folder / "unfinished.pt")
    # a run of base's settings, cut short, when the dataset had a fifth class
    five = {"head.weight": torch.zeros(5, ckpt["state_dict"]["head.weight"].shape[1]), "head.bias": torch.zeros(5)}
    torch.save(dict(ckpt, complete=False, epochs_done=1, num_classes=5, state_dict=ckpt["state_dict"] | five,
                    optimizer={}, generator=torch.Generator().get_state(), torch_rng=torch.get_rng_state()),
               folder / "five-classes.pt")
    (folder / "empty.txt").write_text("\n")
    (folder / "words.txt").write_text("3\ncat\n")
    (folder / "far.txt").write_text("3\n99999\n")
    (folder / "twice.txt").write_text("4\n9\n4\n")
    (folder / "notrain" / "test" / "class0").mkdir(parents=True)
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "eel"))):
        for c in classes:
            (folder / "mismatch" / split / c).mkdir(parents=True)
    return folder


T, U, E = "train", "unlearn", "evaluate"
# (script, arguments, what the error line must name); {in} = the bad-inputs folder, {tmp} = the test's
# folder (the cwd, holding a regular file called somefile), {base} = a good checkpoint, {data} = data args,
# {data_dir} = where the dataset cache is
MISTAKES = {
    "train-unknown-arch": (T, "{data} --arch resnet9", "'resnet9'"),
    "train-unknown-dataset": (T, "--dataset imagenet --arch cnn", "'imagenet'"),
    "train-zero-epochs": (T, "{data} --arch cnn --epochs 0", "--epochs: 0"),
    "train-negative-epochs": (T, "{data} --arch cnn --epochs -3", "--epochs: -3"),
    "train-zero-batch-size": (T, "{data} --arch cnn --batch-size 0", "--batch-size: 0"),
    "train-class-out-of-range": (T, "{data} --arch cnn --exclude-class 4", "--exclude-class 4"),
    "train-class-repeated": (T, "{data} --arch cnn --exclude-class 2 2", "2 2"),
    "train-missing-checkpoint": (T, "{data} --arch cnn --resume --out {tmp}/missing.pt", "{tmp}/missing.pt"),
    "train-corrupt-checkpoint": (T, "{data} --arch cnn --resume --out {in}/corrupt.pt", "{in}/corrupt.pt"),
    "train-truncated-checkpoint": (T, "{data} --arch cnn --resume --out {in}/truncated.pt", "{in}/truncated.pt"),
    "train-other-dataset-checkpoint": (T, "{data} --arch cnn --resume --out {in}/other-dataset.pt", "'cifar10'"),
    "train-other-arch-checkpoint": (T, "{data} --arch cnn --resume --out {in}/other-arch.pt", "'resnet18'"),
    "train-checkpoint-of-other-classes": (T, "{data} --arch cnn --epochs 2 --batch-size 16 --lr 0.05 --train-limit 64 "
                                             "--resume --out {in}/five-classes.pt",
                                          "{in}/five-classes.pt has 5 classes"),
    "train-folder-without-train": (T, "--dataset folder:{in}/notrain --arch cnn", "{in}/notrain has no train/"),
    "train-classes-differ": (T, "--dataset folder:{in}/mismatch --arch cnn", "dog, eel"),
    "train-zero-width": (T, "{data} --arch resnet18 --width 0", "--width: 0"),
    "train-negative-width": (T, "{data} --arch resnet18 --width -16", "--width: -16"),
    "train-fractional-width": (T, "{data} --arch resnet18 --width 1.5", "'1.5'"),
    "train-width-of-the-cnn": (T, "{data} --arch cnn --width 16", "--width 16"),
    "unlearn-seed-repeated": (U, "{data} --arch cnn --base {base} --forget-class 1 --seed 2 2", "2 2"),
    "unlearn-epochs-repeated": (U, "{data} --arch cnn --base {base} --forget-class 1 --epochs 1 3 1", "1 3 1"),
    "unlearn-epochs-zero": (U, "{data} --arch cnn --base {base} --forget-class 1 --epochs 1 0", "--epochs: 0"),
    "unlearn-bench-profile-alone": (U, "{data} --arch cnn --base {base} --forget-class 1 --bench-profile",
                                    "--bench-steps"),
    "unlearn-forget-share-one": (U, "{data} --arch cnn --base {base} --forget-share 1", "--forget-share: 1.0"),
    "unlearn-forget-share-zero": (U, "{data} --arch cnn --base {base} --forget-share 0", "--forget-share: 0.0"),
    "unlearn-forget-share-empties-a-class": (U, "{data} --arch cnn --base {base} --forget-share 0.999", "class 0"),
    "unlearn-deep-with-its-own-option": (U, "{data} --arch cnn --base {base} --forget-class 1 --deep 1 --tie-head 1",
                                         "leave out --tie-head"),
    "unlearn-deep-without-prunelora": (U, "{data} --arch cnn --base {base} --forget-class 1 --deep 1 --method lora",
                                       "--deep 1 changes prunelora only"),
    "unlearn-repair-without-tie-head": (U, "{data} --arch cnn --base {base} --forget-class 1 --repair-epochs 1",
                                        "use it with --tie-head 1"),
    "unlearn-spread-without-tie-head": (U, "{data} --arch cnn --base {base} --forget-class 1 --tie-spread 1",
                                        "use it with --tie-head 1"),
    "unlearn-match-without-tie-head": (U, "{data} --arch cnn --base {base} --forget-class 1 --tie-match 1",
                                       "use it with --tie-head 1"),
    "unlearn-norm-without-tie-head": (U, "{data} --arch cnn --base {base} --forget-class 1 --tie-norm 1",
                                      "use it with --tie-head 1"),
    "unlearn-forget-share-forgets-nothing": (U, "{data} --arch cnn --base {base} --forget-share 0.001",
                                             "forgets no image"),
    "unlearn-forget-index-missing": (U, "{data} --arch cnn --base {base} --forget-index {tmp}/none.txt",
                                     "{tmp}/none.txt"),
    "unlearn-forget-index-empty": (U, "{data} --arch cnn --base {base} --forget-index {in}/empty.txt",
                                   "{in}/empty.txt is empty"),
    "unlearn-forget-index-not-integers": (U, "{data} --arch cnn --base {base} --forget-index {in}/words.txt", "'cat'"),
    "unlearn-forget-index-out-of-range": (U, "{data} --arch cnn --base {base} --forget-index {in}/far.txt", "99999"),
    "unlearn-forget-index-repeated": (U, "{data} --arch cnn --base {base} --forget-index {in}/twice.txt", "image 4"),
    "unlearn-forget-class-and-share": (U, "{data} --arch cnn --base {base} --forget-class 1 --forget-share 0.1",
                                       "--forget-share"),
    "unlearn-forget-nothing-named": (U, "{data} --arch cnn --base {base}", "--forget-class"),
    "unlearn-depth-of-a-random-sample": (U, "{data} --arch cnn --base {base} --forget-share 0.1 --depth", "--depth"),
    "unlearn-width-other-than-the-base": (U, "{data} --arch cnn --base {base} --forget-class 1 --width 8", "--width 8"),
    "unlearn-train-limit-other-than-the-base": (U, "{data} --arch cnn --base {base} --forget-class 1 --train-limit 7",
                                                "--train-limit 7"),
    "train-unwritable-out": (T, "{data} --arch cnn --out {tmp}/somefile/x.pt", "{tmp}/somefile"),
    "unlearn-class-out-of-range": (U, "{data} --arch cnn --base {base} --forget-class 4", "--forget-class 4"),
    "unlearn-class-repeated": (U, "{data} --arch cnn --base {base} --forget-class 1 1", "1 1"),
    "unlearn-unknown-arch": (U, "{data} --arch resnet9 --forget-class 1", "'resnet9'"),
    "unlearn-unknown-dataset": (U, "--dataset imagenet --arch cnn --forget-class 1", "'imagenet'"),
    "unlearn-unknown-method": (U, "{data} --arch cnn --base {base} --forget-class 1 --method prune", "'prune'"),
    "unlearn-zero-epochs": (U, "{data} --arch cnn --base {base} --forget-class 1 --epochs 0", "--epochs: 0"),
    "unlearn-zero-rank": (U, "{data} --arch cnn --base {base} --forget-class 1 --rank 0", "--rank: 0"),
    "unlearn-negative-rank": (U, "{data} --arch cnn --base {base} --forget-class 1 --rank -2", "--rank: -2"),
    "unlearn-negative-batch-size": (U, "{data} --arch cnn --base {base} --forget-class 1 --batch-size -8",
                                    "--batch-size: -8"),
    "unlearn-prune-amount-one": (U, "{data} --arch cnn --base {base} --forget-class 1 --prune-amount 1",
                                 "--prune-amount: 1.0"),
    "unlearn-prune-amount-negative": (U, "{data} --arch cnn --base {base} --forget-class 1 --prune-amount -0.2",
                                      "--prune-amount: -0.2"),
    "unlearn-missing-checkpoint": (U, "{data} --arch cnn --base {tmp}/missing.pt --forget-class 1", "{tmp}/missing.pt"),
    "unlearn-corrupt-checkpoint": (U, "{data} --arch cnn --base {in}/corrupt.pt --forget-class 1", "{in}/corrupt.pt"),
    "unlearn-truncated-checkpoint": (U, "{data} --arch cnn --base {in}/truncated.pt --forget-class 1",
                                     "{in}/truncated.pt"),
    "unlearn-other-dataset-checkpoint": (U, "{data} --arch cnn --base {in}/other-dataset.pt --forget-class 1",
                                         "'cifar10'"),
    "unlearn-other-arch-checkpoint": (U, "{data} --arch cnn --base {in}/other-arch.pt --forget-class 1", "'resnet18'"),
    "unlearn-unfinished-checkpoint": (U, "{data} --arch cnn --base {in}/unfinished.pt --forget-class 1",
                                      "{in}/unfinished.pt"),
    "unlearn-folder-without-train": (U, "--dataset folder:{in}/notrain --arch cnn --forget-class 1",
                                     "{in}/notrain has no train/"),
    "unlearn-unwritable-out-dir": (U, "{data} --arch cnn --base {base} --forget-class 1 --out-dir {tmp}/somefile/sub",
                                   "{tmp}/somefile"),
    "evaluate-class-out-of-range": (E, "{base} --forget-class 4 --data-dir {data_dir}", "--forget-class 4"),
    "evaluate-class-repeated": (E, "{base} --forget-class 3 3 --data-dir {data_dir}", "3 3"),
    "evaluate-missing-checkpoint": (E, "{tmp}/missing.pt --forget-class 1 --data-dir {data_dir}", "{tmp}/missing.pt"),
    "evaluate-corrupt-checkpoint": (E, "{in}/corrupt.pt --forget-class 1 --data-dir {data_dir}", "{in}/corrupt.pt"),
    "evaluate-truncated-checkpoint": (E, "{in}/truncated.pt --forget-class 1 --data-dir {data_dir}",
                                      "{in}/truncated.pt"),
    "evaluate-other-arch-checkpoint": (E, "{in}/other-arch.pt --forget-class 1 --data-dir {data_dir}", "resnet18"),
    "evaluate-negative-train-limit": (E, "{base} --forget-class 1 --data-dir {data_dir} --train-limit -5",
                                      "--train-limit"),
}
KNOWN_BUGS = {}  # mistakes a script does not catch yet: strict xfails, so fixing one makes its test say so


@pytest.fixture(scope="module")
def mistake_runs(request, tmp_path_factory, data_args, base, bad_inputs):
    """Runs each selected mistake once, one per core at a time, each in a new folder of its own (its cwd,
    holding a regular file called somefile). Returns {mistake: (result, what the line must name, the
    folder's snapshot before, after)}, and snapshots of the shared inputs (bad inputs, base checkpoint,
    data cache) before and after all the runs."""
    test = "test_every_user_mistake_exits_2_with_one_line_naming_it_and_writes_nothing"
    selected = [item.callspec.params["mistake"] for item in request.session.items
                if getattr(item, "originalname", "") == test]
    data_dir = data_args[data_args.index("--data-dir") + 1]
    folders = {mistake: tmp_path_factory.mktemp(mistake) for mistake in selected}

    def one(mistake):
        script, args, names = MISTAKES[mistake]
        folder = folders[mistake]
        (folder / "somefile").write_text("a regular file, not a folder\n")
        fill = lambda text: text.format(data=" ".join(map(str, data_args)), data_dir=data_dir, base=base, tmp=folder,
                                        **{"in": bad_inputs})
        before = snapshot(folder)
        result = run(script, *fill(args).split(), cwd=folder)
        return result, fill(names), before, snapshot(folder)

    shared = (bad_inputs, base.parent, data_dir)
    shared_before = snapshot(*shared)
    outcomes = together(*[lambda m=m: one(m) for m in selected], workers=CORES)
    return dict(zip(selected, outcomes)), shared_before, snapshot(*shared)


@pytest.mark.parametrize("mistake", [pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[m]))
                                     if m in KNOWN_BUGS else m for m in MISTAKES])
def test_every_user_mistake_exits_2_with_one_line_naming_it_and_writes_nothing(mistake, mistake_runs):
    """Through the real command line: status 2, one non-empty stderr line naming the bad value, no
    traceback, and no file created or changed, in the run's folder or in the inputs and data cache."""
    runs, shared_before, shared_after = mistake_runs
    result, named, before, after = runs[mistake]
    line = assert_one_line_error(result)
    assert named in line, line
    assert after == before, "the run created or changed files in its folder"
    assert shared_after == shared_before, "a run changed the shared inputs or the data cache"


# -----------------------------------------------------------------------------
# 7. a save that fails


def write_then_fail(obj, path, *args, **kwargs):
    """Stands in for torch.save / write_text: writes the start of the file, then fails as a full disk does."""
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 the first bytes of the file")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("saver", ["checkpoint", "text"])
@pytest.mark.parametrize("had_previous", [True, False], ids=["over-a-previous-file", "new-file"])
def test_a_save_that_fails_on_a_full_disk_keeps_the_previous_file_and_no_temporary(saver, had_previous, tmp_path,
                                                                                    monkeypatch):
    """torch.save / write_text fail part-way with ENOSPC: cli.UserError says what is kept."""
    path = tmp_path / "out.file"
    if had_previous:
        path.write_bytes(b"the previous, complete file")
    if saver == "checkpoint":
        monkeypatch.setattr(torch, "save", write_then_fail)
        save = lambda: checkpoints.save_checkpoint({"w": torch.ones(3)}, path)
    else:
        monkeypatch.setattr(Path, "write_text", lambda self, text, *a, **k: write_then_fail(text, self))
        save = lambda: checkpoints.save_text("new text", path)
    with pytest.raises(cli.UserError) as error:
        save()
    message = str(error.value)
    assert str(path) in message and "No space left on device" in message
    if had_previous:
        assert "the previous file is intact" in message
        assert path.read_bytes() == b"the previous, complete file"
    else:
        assert "nothing was written" in message and not path.exists()
    assert os.listdir(tmp_path) == (["out.file"] if had_previous else [])


def test_train_on_a_disk_that_fills_up_exits_2_and_keeps_the_previous_checkpoint(tmp_path, data_args, base):
    """A real failed write (a file-size limit: the kernel refuses bytes past 200 kB, as on a full
    disk) while train.py saves over a previous checkpoint: one line, previous file intact, no temporary."""
    out = tmp_path / "model.pt"
    shutil.copy(base, out)
    previous = out.read_bytes()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = run("train", *data_args, "--arch", "cnn", "--epochs", 1, "--batch-size", 16, "--train-limit", 16,
                 "--lr", 0.05, "--out", out, cwd=tmp_path, preexec_fn=limit_file_size)
    line = assert_one_line_error(result)
    assert str(out) in line and "the previous file is intact" in line
    assert out.read_bytes() == previous
    assert os.listdir(tmp_path) == ["model.pt"]
