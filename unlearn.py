"""Make a trained classifier forget classes, or a random sample of its training images: PruneLoRA and
the paper's baselines (methods.py), compared in one table.

    python unlearn.py --forget-class 3                    # CIFAR-10 ResNet-18, PruneLoRA
    python unlearn.py --forget-class cat --method all     # and every baseline, in one table

It loads checkpoints/<dataset>-<arch>.pt (training it first, or finishing it where it was cut, if
need be), unlearns with each --method, and writes results/<dataset>-<arch>-forget<K>.json and .md,
plus each unlearned model, merged, as checkpoints/unlearned/...-<method>.pt (`hidden`, a reference
that is not unlearning, is never saved there).
"""
import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import deep
import distributed
import prunelora as pl
from bench import BENCH_METHODS, COMPILED, bench_step_times, inference_time_ratio, print_bench, profile_bench
from checkpoints import (check_checkpoint_fits, check_writable, checkpoint_dict, default_checkpoint, fresh_model,
                         load_checkpoint, model_from_checkpoint, save_checkpoint)
from cli import (ArgumentParser, UserError, command_line, fraction, number, pick_device, positive_float, positive_int,
                 run_cli)
from data import (check_classes, check_dataset_name, class_numbers, forget_split, forget_tag, load_dataset,
                  training_index)
from depth import add_depth_scores, depth_metrics
from evaluate import gaps_to_retrain, unlearning_metrics
from methods import METHODS, NOT_UNLEARNED, UNLEARN, Task, retrain_run
from models import check_arch, to_device
from report import finished_seeds, method_runs, near_chance, report, save_partial
from train import RUN_KEYS, Progress, add_data_args, add_train_args, train

share = number(float, "between 0 and 1, both excluded", lambda v: 0 < v < 1)
EPOCHS = 5  # unlearning epochs where --epochs is not given

# -----------------------------------------------------------------------------
# one method, measured


def run_method(method, task, data, args, device, base_model=None):
    """Unlearn with `method` on a fresh copy of the task's base model; (model, its row of metrics)."""
    torch.manual_seed(args.seed)
    model = fresh_model(task.ckpt, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    model, facts = UNLEARN[method](model, data, task, args)
    facts = dict(dict(seconds=time.time() - start), **facts)  # Retrain's seconds: its training time
    print(f"    evaluating: UA, MIA, RA, TA over {len(task.split['train']) + len(data.test_labels):,} images"
          + (", then the depth measures" if args.depth else ""), flush=True)
    row = unlearning_metrics(model, data, args.forget_class, task.split["train"], task.split["forget"])
    if args.depth:
        row.update(depth_metrics(model, data, args.forget_class, task.split["train"], seed=args.seed,
                                 reference=base_model))
    if task.progress is not None:
        task.progress.evaluated(evaluation_images(task, data, args))
    row.update(facts, trainable_share=facts["trainable_params"] / sum(p.numel() for p in model.parameters()),
               sparsity=pl.sparsity(model))
    if device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return model, row

# -----------------------------------------------------------------------------
# the whole run's work, for an ETA that covers every method and seed


def evaluation_images(task, data, args):
    """Images one row's evaluation passes forward: the metrics, and with --depth about three passes more."""
    return (len(task.split["train"]) + len(data.test_labels)) * (4 if args.depth else 1)


def planned_work(run, args):
    """Images to train on and (counted at Progress.EVAL_COST) to evaluate, over every seed and method."""
    work = 0
    for task in run.tasks:
        if task.seed in run.finished:
            continue
        split, evaluate = task.split, evaluation_images(task, run.data, args) * Progress.EVAL_COST
        base = task.ckpt or {}
        base_epochs = base.get("args", {}).get("epochs", args.base_epochs)
        if not base.get("complete", False):  # a base to train, or to finish
            work += (base_epochs - base.get("epochs_done", 0)) * len(split["train"])
        work += evaluate  # the base row
        for method, epochs, _ in method_runs(run.methods, args.epochs, args.own_epochs):
            images = {"retrain": 0, "hidden": 0, "ga": len(split["forget"]),
                      "rl": len(split["train"])}.get(method, len(split["retain"]))
            work += epochs * images + evaluate
            if method == "prunelora" and args.tie_head:  # the forget images train too, also in --repair-epochs
                work += epochs * len(split["forget"]) + args.repair_epochs * len(split["train"])
            if method == "retrain":  # the base's schedule, without the forget set: what is left of it
                done = retrain_run(run.data, task, args)[2] if task.ckpt else None
                work += (base_epochs - (done or {}).get("epochs_done", 0)) * len(split["retain"])
    return work

# -----------------------------------------------------------------------------
# command line


def parse_methods(text):
    names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",")]
    for name in names:
        if name not in METHODS:
            raise UserError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}, a comma list of them, or all")
    if len(set(names)) != len(names):
        raise UserError(f"--method repeats a method ({text}); name each once")
    return names


EXAMPLES = """examples:
  python unlearn.py --forget-class 3                       # CIFAR-10, ResNet-18: PruneLoRA
  python unlearn.py --forget-class cat --method all        # every method, one table
  python unlearn.py --dataset fashion-mnist --arch cnn --train-limit 6000 --base-epochs 10 \\
      --forget-class 3 --method all                        # a few minutes on a CPU
  python unlearn.py --forget-class 3 --method prunelora,retrain --seed 0 1 2 --depth
  python unlearn.py --forget-share 0.1 --method all        # a random 10 % of the images
Measured results of these and more: RESULTS.md."""


def build_parser():
    """unlearn.py's command line (the tests build their runs' options from its defaults too)."""
    parser = ArgumentParser(description="Unlearn classes with PruneLoRA and baselines; print the paper's table.",
                            epilog=EXAMPLES)
    group = parser.add_argument_group("what to forget (exactly one)")
    forget = group.add_mutually_exclusive_group(required=True)
    forget.add_argument("--forget-class", nargs="+", default=[], metavar="K",
                        help="forget these classes, by number or name (e.g. 3 or cat)")
    forget.add_argument("--forget-share", type=share, default=None, metavar="F",
                        help="forget this share of the training images, 0 < F < 1, the same share of every class, "
                        "drawn with --seed")
    forget.add_argument("--forget-index", dest="forget_index_file", default=None, metavar="FILE",
                        help="forget the training images a file names, one index (into the training set) per line")
    group = parser.add_argument_group("methods")
    group.add_argument("--method", default="prunelora", help=f"{', '.join(METHODS)}, a comma list, or all")
    group.add_argument("--depth", action="store_true",
                       help="also measure how deep the forgetting goes (relearning, probes, CKA; with retrain in the "
                       "run a depth score, 0 = hidden in the head, 1 = Retrain); slower")
    group.add_argument("--bench-steps", type=positive_int, default=None, metavar="N",
                       help="instead of unlearning, time N training steps of finetune, lora and prunelora side by side")
    group.add_argument("--bench-profile", action="store_true",
                       help="with --bench-steps: also where each method's step spends its time (torch.profiler)")
    add_data_args(parser.add_argument_group("data and model"), many_seeds=True)
    group = parser.add_argument_group("unlearning")
    group.add_argument("--epochs", type=positive_int, nargs="+", default=None, metavar="E",
                       help="unlearning epochs; several (e.g. 1 2 3 5): each method once per count, and a table of "
                       f"the fewest epochs after which each meets the targets (default {EPOCHS}; PruneLoRA's "
                       f"{deep.DEEP_EPOCHS} under --deep 1, its default)")
    group.add_argument("--batch-size", type=positive_int, default=128, help="unlearning batch size")
    group.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate of the full-weight methods")
    group.add_argument("--lora-lr", type=positive_float, default=3e-3,
                       help="Adam learning rate of prunelora and lora (few parameters take larger steps)")
    group.add_argument("--prune-amount", type=fraction, default=0.5, help="share of weights pruned, in [0, 1)")
    group.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    group.add_argument("--alpha", type=positive_float, default=16, help="LoRA alpha; scaling = alpha / r")
    group.add_argument("--reset-head", type=int, choices=(0, 1), default=1,
                       help="1: re-initialise the forget classes' head rows before fine-tuning on retained data "
                       "(prunelora, lora, finetune, prune-finetune); 0: keep them, as the paper does")
    group.add_argument("--freeze-bn", type=int, choices=(0, 1), default=1,
                       help="1: BatchNorm statistics stay the base's during prunelora and lora, so only the low-rank "
                       "update and the head change; 0: they drift with the retained data, as in the paper's code")
    deep.add_args(parser.add_argument_group("prunelora aimed at deeper forgetting (deep.py; --deep 1 where it "
                                            "applies, the rest off by default)"))
    group = parser.add_argument_group("base model (trained first where --base does not exist)")
    group.add_argument("--base", default=None,
                       help="base checkpoint for every seed (default: checkpoints/<dataset>-<arch>[-w<W>][-n<N>]"
                       "[-seed<S>].pt, one per seed)")
    add_train_args(group, prefix="base-")
    group = parser.add_argument_group("output")
    group.add_argument("--out-dir", default="results", help="where the .json and .md tables go")
    group.add_argument("--resume", action="store_true",
                       help="several seeds: take the seeds a cut run of the same command finished from its "
                       ".partial.json, and run only the rest (a cut base or Retrain is finished either way)")
    parser.set_defaults(own_epochs=None)  # not an option: {method: epochs} where a setting has its own (deep.py)
    return parser


@dataclass
class Run:
    """What setup() found and prepared: everything the methods and the report need besides args."""
    methods: list
    device: torch.device
    data: object          # data.Data, on the device
    tasks: list           # a methods.Task per seed
    results: Path         # the .json; the .md beside it
    finished: dict        # --resume: {seed: rows} of the seeds a cut run finished


def check_base(path, args):
    """Load and check an existing base checkpoint (complete, or cut: then it is finished first);
    None where it is to be trained."""
    if not (args.base or path.exists()):
        return None
    ckpt = load_checkpoint(path, args.dataset, args.arch)
    if args.width is not None and check_arch(args.arch, ckpt.get("width")) != args.width:
        raise UserError(f"--width {args.width} does not match base checkpoint {path}, whose width is "
                        f"{check_arch(args.arch, ckpt.get('width'))}; leave --width out or pass another --base")
    limit = ckpt.get("args", {}).get("train_limit")
    if args.train_limit is not None and limit != args.train_limit:
        raise UserError(f"--train-limit {args.train_limit} does not match base checkpoint {path}, trained on "
                        f"{'all training images' if limit is None else f'--train-limit {limit}'}; "
                        "leave --train-limit out or pass another --base")
    if not ckpt.get("complete", True) and any(k not in ckpt for k in ("args", "optimizer", "epochs_done")):
        raise UserError(f"base checkpoint {path} is unfinished and cannot be resumed; delete it or pass another --base")
    return ckpt


def train_base(task, args, data, progress):
    """Train the task's base model with train.py's settings from the command line, or finish a cut one
    with the settings it was started with; returns the complete checkpoint."""
    if task.ckpt is None:
        print(f"no base checkpoint at {task.path}: training one first with train.py's defaults", flush=True)
        settings = dict(dataset=args.dataset, arch=args.arch, width=args.width, epochs=args.base_epochs,
                        batch_size=args.base_batch_size, lr=args.base_lr, momentum=args.base_momentum,
                        weight_decay=args.base_weight_decay, seed=task.seed, exclude_class=[],
                        train_limit=args.train_limit, resume=False)
    else:
        print(f"base checkpoint {task.path} is unfinished ({task.ckpt['epochs_done']} of "
              f"{task.ckpt['args']['epochs']} epochs): finishing it with the settings it was started with", flush=True)
        settings = dict({k: task.ckpt["args"].get(k) for k in RUN_KEYS}, resume=True)
    return train(argparse.Namespace(**settings, out=str(task.path), compile=args.compile), data,
                 data.train_images.device, progress=progress)


def setup(args):
    """Every check before any work, so that a mistake writes nothing; then the data, each seed's base
    model (trained or finished first where need be) and the split into forget and retained images."""
    methods = parse_methods(args.method)
    if not args.forget_class:  # a random sample: no class to hide, and the depth measures are per class
        if args.depth:
            raise UserError("--depth measures how deeply classes are forgotten; use it with --forget-class, "
                            "not with --forget-share or --forget-index")
        if "hidden" in methods and args.method != "all":
            raise UserError("--method hidden masks whole classes; it has no meaning with --forget-share or "
                            "--forget-index")
        methods = [m for m in methods if m != "hidden"]
    deep.check_args(args, methods)
    if args.bench_profile and not args.bench_steps:
        raise UserError("--bench-profile profiles the --bench-steps steps; give --bench-steps N too")
    check_dataset_name(args.dataset)
    check_arch(args.arch, args.width)
    args.epochs = args.epochs or [EPOCHS]  # after deep.check_args, which reads whether it was given
    if len(set(args.epochs)) != len(args.epochs):
        raise UserError(f"--epochs repeats a count ({' '.join(map(str, args.epochs))}); name each once")
    args.epochs = sorted(args.epochs)
    if len(set(args.seed)) != len(args.seed):
        raise UserError(f"--seed repeats a seed ({' '.join(map(str, args.seed))}); name each once")
    if args.bench_steps and "RANK" in os.environ:
        raise UserError("--bench-steps times one process's steps; run it with python, not torchrun")
    device = distributed.start(pick_device(args.device))  # under torchrun: join the other processes
    tasks = []
    for seed in args.seed:
        path = Path(args.base or default_checkpoint(args.dataset, args.arch, width=args.width, seed=seed,
                                                    train_limit=args.train_limit))
        tasks.append(Task(seed, check_base(path, args), path))
    data = load_dataset(args.dataset, args.data_dir)
    for task in tasks:
        if task.ckpt is not None:
            check_checkpoint_fits(task.ckpt, data, task.path)
    args.forget_class = class_numbers(args.forget_class, data.classes, "--forget-class")
    check_classes(args.forget_class, data.num_classes, "--forget-class", must_leave=2)
    forget = forget_tag(args.forget_class, args.forget_share, args.forget_index_file)
    for task in tasks:
        width = check_arch(args.arch, task.ckpt.get("width") if task.ckpt is not None else args.width)
        train_limit = task.ckpt["args"].get("train_limit") if task.ckpt is not None else args.train_limit
        stem = default_checkpoint(args.dataset, args.arch, width=width, seed=task.seed, train_limit=train_limit).stem
        task.tag = f"{stem}-{forget}"
        task.split, task.forget_index, task.forget_name = forget_split(
            data, training_index(data, (), train_limit), args.forget_class, args.forget_share, args.forget_index_file,
            task.seed)
    if len(tasks) == 1:
        name = tasks[0].tag
    else:  # one file for all seeds: <dataset>-<arch>[-w<W>][-n<N>]-forget<K>-seeds<S>-<S>...
        name = (f"{default_checkpoint(args.dataset, args.arch, width=width, train_limit=train_limit).stem}-{forget}"
                f"-seeds{'-'.join(map(str, args.seed))}")
    results = Path(args.out_dir) / f"{name}.json"
    for path in (results, results.with_suffix(".md"), Path("checkpoints/unlearned") / f"{tasks[0].tag}.pt",
                 *(task.path for task in tasks)):
        check_writable(path)
    # several seeds: each finished seed's rows go to a .partial.json, so that --resume loses at most one seed
    finished = finished_seeds(results.with_suffix(".partial.json"), args) if args.resume and len(tasks) > 1 else {}
    data.to(device)
    run = Run(methods, device, data, tasks, results, finished)
    progress = Progress(0 if args.bench_steps else planned_work(run, args))
    for task in tasks:
        task.progress = progress
        if task.ckpt is None or not task.ckpt.get("complete", True):
            task.ckpt = train_base(task, args, data, progress)
    what = (f"class {' '.join(map(str, args.forget_class))} ({', '.join(data.classes[c] for c in args.forget_class)})"
            if args.forget_class else "a random sample")
    print(f"forgetting {what} of {data.name}: {len(tasks[0].split['forget'])} forget and "
          f"{len(tasks[0].split['retain'])} retained training images, {args.arch}, on {device}", flush=True)
    return run

# -----------------------------------------------------------------------------
# the comparison: every method on each seed's base model


def run_methods(run, task, args):
    """One seed's comparison: the base row, then each method's row; each unlearned model is saved,
    merged; depth scores last. args is this seed's: args.seed is task.seed."""
    data, device = run.data, run.device
    base_model = to_device(model_from_checkpoint(task.ckpt, task.path), device)
    print(f"evaluating the base model{f' (seed {task.seed})' if len(run.tasks) > 1 else ''}", flush=True)
    rows = {"base": unlearning_metrics(base_model, data, args.forget_class, task.split["train"], task.split["forget"])}
    rows["base"].update(seconds=task.ckpt.get("seconds"), sparsity=pl.sparsity(base_model))
    if args.depth:
        rows["base"].update(depth_metrics(base_model, data, args.forget_class, task.split["train"], seed=args.seed,
                                          reference=base_model))
    task.progress.evaluated(evaluation_images(task, data, args))
    for method, epochs, name in method_runs(run.methods, args.epochs, args.own_epochs):
        print(f"{name}:" + (" --deep 1" if method == "prunelora" and args.deep else "")
              + (f" (seed {args.seed})" if len(run.tasks) > 1 else ""), flush=True)
        method_args = argparse.Namespace(**dict(vars(args), epochs=epochs))
        model, rows[name] = run_method(method, task, data, method_args, device, base_model)
        rows[name]["inference_time_ratio"] = inference_time_ratio(model, base_model, data)
        if method not in NOT_UNLEARNED:
            save_checkpoint(checkpoint_dict(model, data, args.arch, dict(task.ckpt["args"], method=method,
                                            unlearn_epochs=epochs, forget_class=args.forget_class,
                                            forget_index=task.forget_index),
                                            width=task.ckpt.get("width"), metrics=rows[name]),
                            Path("checkpoints/unlearned") / f"{task.tag}-{name.replace('@', '-')}.pt")
        print(f"    UA {rows[name]['UA']:.2f}  MIA {rows[name]['MIA']:.2f}  RA {rows[name]['RA']:.2f}  "
              f"TA {rows[name]['TA']:.2f}  {rows[name]['seconds']:.1f} s", flush=True)
    if "retrain" in rows:
        for name in rows:
            if name != "base":
                rows[name]["time_vs_retrain"] = rows[name]["seconds"] / rows["retrain"]["seconds"]
    if set(BENCH_METHODS) & set(run.methods):  # step times on one batch, side by side
        print("timing one training step of finetune, lora and prunelora side by side", flush=True)
        benched = bench_step_times(task.ckpt, data, task.split, args, device, steps=10, eager=False)
        for method, bench in benched.items():  # with --compile: the compiled steps, as the methods trained
            for name in (name for m, _, name in method_runs(run.methods, args.epochs, args.own_epochs)
                         if m == method.removesuffix(COMPILED)):
                rows[name]["step_time_vs_finetune"] = bench["step_time_vs_finetune"]
    noisy = near_chance(rows)
    for method in gaps_to_retrain(rows):
        gap = f"{method}'s MIA ({rows[method]['MIA']:.2f}) is far above Retrain's ({rows['retrain']['MIA']:.2f})"
        if method in noisy:  # a near-chance threshold moves MIA by many points: no verdict from it
            print(f"note: {gap}, but its attack is near chance ({rows[method]['MIA_attack_acc']:.2f} % on held-out "
                  "images): read the gap as noise, not as over-unlearning", flush=True)
        else:
            print(f"warning: {gap}: over-unlearning; its forget images look less like training data than "
                  "unseen images do", flush=True)
    return add_depth_scores(rows)


def main():
    args = build_parser().parse_args()
    run = setup(args)
    if args.bench_steps:
        task = run.tasks[0]
        rows = bench_step_times(task.ckpt, run.data, task.split, args, run.device, args.bench_steps, memory=True)
        print_bench(rows, args, run.device)
        if args.bench_profile:
            profile_bench(task.ckpt, run.data, task.split, args, run.device, args.bench_steps)
        return
    partial, per_seed = run.results.with_suffix(".partial.json"), dict(run.finished)
    for task in (task for task in run.tasks if task.seed not in per_seed):
        per_seed[task.seed] = run_methods(run, task, argparse.Namespace(**dict(vars(args), seed=task.seed)))
        if len(run.tasks) > 1:
            save_partial(per_seed, args, partial)
    report({task.seed: per_seed[task.seed] for task in run.tasks}, run, args)
    if distributed.is_main():
        partial.unlink(missing_ok=True)


def interrupted():
    """What Ctrl-C leaves: every checkpoint and result is written whole or not at all."""
    return ("the base and Retrain checkpoints keep their last finished epoch, finished seeds their rows "
            "(<results>.partial.json), and nothing is half-written; continue with: " + command_line("--resume"))


if __name__ == "__main__":
    run_cli(main, interrupted)
