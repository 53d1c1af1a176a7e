"""Make a trained classifier forget classes, or a random sample of its training images: PruneLoRA and
the paper's baselines, compared in one table.

    python unlearn.py --forget-class 3                    # CIFAR-10 ResNet-18, PruneLoRA
    python unlearn.py --forget-class 3 --method all       # and every baseline, in one table
    python unlearn.py --forget-class 3 5 --method prunelora,retrain
    python unlearn.py --forget-share 0.1 --method all --seed 0 1 2   # 10% of the images, three seeds

It loads checkpoints/<dataset>-<arch>.pt (training it first with train.py's defaults if
there is none), unlearns with each --method, and writes results/<dataset>-<arch>-forget<K>.json
and .md, plus each unlearned model, merged, as checkpoints/unlearned/...-<method>.pt
(`hidden`, a reference that is not unlearning, is never saved there).
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import prunelora as pl
from baselines import (adapt, finetune_on, prune_forget_salient, relabel_forget_nearest, reset_forget_rows,
                       unlearn_finetune, unlearn_ga, unlearn_hidden, unlearn_lora, unlearn_prune_finetune,
                       unlearn_retrain, unlearn_rl)
from bench import bench_step_times, inference_time_ratio, print_bench, profile_bench
from checkpoints import (check_checkpoint_fits, check_writable, checkpoint_dict, default_checkpoint, load_checkpoint,
                         fresh_model, model_from_checkpoint, save_checkpoint)
from cli import ArgumentParser, UserError, fraction, number, pick_device, positive_float, positive_int, run_cli
from data import check_classes, check_dataset_name, forget_split, forget_tag, load_dataset, training_index
from depth import add_depth_scores, depth_metrics
from evaluate import gaps_to_retrain, near_chance, unlearning_metrics
from models import HEAD, check_arch, to_device
from results import finished_seeds, method_runs, report, save_partial
from train import add_data_args, add_train_args, train

METHODS = ("prunelora", "retrain", "finetune", "prune-finetune", "lora", "ga", "rl", "hidden")
NOT_UNLEARNED = ("hidden",)  # references only: their models are never saved where unlearned models go
share = number(float, "between 0 and 1, both excluded", lambda v: 0 < v < 1)

# -----------------------------------------------------------------------------
# the method: each method takes a fresh copy of the base model and returns (unlearned model, facts),
# where facts holds trainable_params and, for Retrain, the seconds its training took (baselines.py)


def unlearn_prunelora(model, data, split, args):
    """PruneLoRA: prune the base, adapt it with LoRA on the frozen, pruned weights, unlearn by training
    only the low-rank factors and the head on the retained images, then merge (sparsity kept)."""
    train_data, train_on = data, split["retain"]
    if args.relabel_forget:  # variant: the forget images too, labelled by the base model (before any change)
        train_data, train_on = relabel_forget_nearest(model, data, split["forget"], args), split["train"]
    if args.salient_prune:  # before the head's forget rows are reset: the saliency is the base model's
        prune_forget_salient(model, data, split["forget"], args)
    reset_forget_rows(model, args)
    pl.prune_global(model, args.prune_amount, exclude=HEAD)                                      # 1. prune
    adapt(model, args)                                                                           # 2. adapt
    facts = finetune_on(model, train_data, train_on, args, lr=args.lora_lr, freeze_bn=args.freeze_bn)  # 3. unlearn
    return pl.merge_lora(model), facts


UNLEARN = {"prunelora": unlearn_prunelora, "retrain": unlearn_retrain, "finetune": unlearn_finetune,
           "prune-finetune": unlearn_prune_finetune, "lora": unlearn_lora, "ga": unlearn_ga, "rl": unlearn_rl,
           "hidden": unlearn_hidden}

# -----------------------------------------------------------------------------
# one method, measured


def run_method(method, base, data, split, args, device, base_model=None):
    torch.manual_seed(args.seed)
    model = fresh_model(base, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    model, facts = UNLEARN[method](model, data, split, args)
    facts = dict(dict(seconds=time.time() - start), **facts)  # Retrain's seconds: its training time
    row = unlearning_metrics(model, data, args.forget_class, split["train"], split["forget"])
    if args.depth:
        row.update(depth_metrics(model, data, args.forget_class, split["train"], seed=args.seed, reference=base_model))
    row.update(facts, trainable_share=facts["trainable_params"] / sum(p.numel() for p in model.parameters()),
               sparsity=pl.sparsity(model))
    if device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return model, row

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


def parse_args():
    parser = ArgumentParser(description="Unlearn classes with PruneLoRA and baselines; print the paper's table.")
    forget = parser.add_mutually_exclusive_group(required=True)
    forget.add_argument("--forget-class", type=int, nargs="+", default=[], metavar="K", help="forget these classes")
    forget.add_argument("--forget-share", type=share, default=None, metavar="F",
                        help="forget this share of the training images, 0 < F < 1, the same share of every class, "
                        "drawn with --seed")
    forget.add_argument("--forget-index", dest="forget_index_file", default=None, metavar="FILE",
                        help="forget the training images a file names, one index (into the training set) per line")
    parser.add_argument("--method", default="prunelora", help=f"{', '.join(METHODS)}, a comma list, or all")
    add_data_args(parser, many_seeds=True)
    parser.add_argument("--base", default=None,
                        help="base checkpoint for every seed (default checkpoints/<dataset>-<arch>[-w<W>][-n<N>][-seed<S>].pt, one per seed)")
    parser.add_argument("--epochs", type=positive_int, nargs="+", default=[5], metavar="E",
                        help="unlearning epochs (the paper's 5); several (e.g. 1 2 3 5): each method once per count, "
                        "and a table of the fewest epochs after which each meets the targets")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate of the full-weight methods")
    parser.add_argument("--lora-lr", type=positive_float, default=3e-3,
                        help="Adam learning rate of prunelora and lora (few parameters take larger steps)")
    parser.add_argument("--prune-amount", type=fraction, default=0.5, help="share of weights pruned, in [0, 1)")
    parser.add_argument("--salient-prune", type=fraction, default=0.0, metavar="Q",
                        help="prunelora only: first prune the share Q of weights the forget images' loss leans on "
                        "most (|w * dL/dw|), then --prune-amount of the rest by magnitude (default 0: off)")
    parser.add_argument("--relabel-forget", type=int, choices=(0, 1), default=0,
                        help="prunelora only: 1 also trains on the forget images, each labelled as the class the "
                        "base model ranks highest after its own (never a forget class); a variant for deeper forgetting")
    parser.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=positive_float, default=16, help="LoRA alpha; scaling = alpha / r")
    # 0, not loralib's usual 0.1: with dropout a pruned layer runs a second full convolution per step
    # (up to 2.6x the step, twice the memory); 0.1 gave the same UA/MIA/RA/TA over 3 seeds on both datasets
    parser.add_argument("--lora-dropout", type=fraction, default=0.0, help="dropout on the LoRA input (default 0)")
    parser.add_argument("--reset-head", type=int, choices=(0, 1), default=1,
                        help="1: re-initialise the forget classes' head rows before fine-tuning on retained data "
                        "(prunelora, lora, finetune, prune-finetune); 0: keep them, as the paper does")
    parser.add_argument("--freeze-bn", type=int, choices=(0, 1), default=1,
                        help="1: BatchNorm statistics stay the base's during prunelora and lora (eval-mode BatchNorm), "
                        "so only the low-rank update and the head change; 0: they drift with the retained data, "
                        "as in the paper's code (0.3-0.4 more RA over three seeds on two datasets; README)")
    parser.add_argument("--depth", action="store_true",
                        help="also measure forgetting depth: relearn steps, linear-probe and few-shot NCM accuracy, CKA "
                        "to the base, and with retrain in the run a depth score, 0 = hidden, 1 = Retrain (slower)")
    parser.add_argument("--bench-steps", type=positive_int, default=None, metavar="N",
                        help="instead of unlearning, time N training steps of finetune, lora and prunelora on one batch")
    parser.add_argument("--bench-profile", action="store_true",
                        help="with --bench-steps: also where each method's step spends its time (torch.profiler)")
    parser.add_argument("--out-dir", default="results", help="where the .json and .md tables go")
    parser.add_argument("--resume", action="store_true",
                        help="several seeds: take the seeds a cut run of the same command finished from its "
                        ".partial.json, and run only the rest")
    add_train_args(parser, prefix="base-")
    return parser.parse_args()


@dataclass
class Base:
    """One seed's base model and what follows from it."""
    seed: int
    ckpt: dict            # the base checkpoint (None until trained, where it was missing)
    path: Path
    split: dict = None    # train / retain / forget: training-image indices
    tag: str = ""         # <dataset>-<arch>[-w<W>][-n<N>][-seed<S>]-forget<K>: names its unlearned checkpoints
    forget_index: list = None  # random-sample forgetting: the forget images (None: whole classes)
    forget_name: str = ""      # names its Retrain checkpoint: the classes, or <n>images-<hash> of a sample


@dataclass
class Run:
    """What setup() found and prepared: everything the methods and the report need besides args."""
    methods: list
    device: torch.device
    data: object          # data.Data, on the device
    bases: list           # a Base per seed
    results: Path         # the .json; the .md beside it
    finished: dict        # --resume: {seed: rows} of the seeds a cut run finished


def check_base(path, args):
    """Load and check an existing base checkpoint; None where it is to be trained."""
    if not (args.base or path.exists()):
        return None
    ckpt = load_checkpoint(path, args.dataset, args.arch)
    if not ckpt.get("complete", True):
        raise UserError(f"base checkpoint {path} is unfinished; finish it with "
                        f"'python train.py --data-dir {args.data_dir} --resume --out {path}'")
    if args.width is not None and check_arch(args.arch, ckpt.get("width")) != args.width:
        raise UserError(f"--width {args.width} does not match base checkpoint {path}, whose width is "
                        f"{check_arch(args.arch, ckpt.get('width'))}; leave --width out or pass another --base")
    limit = ckpt.get("args", {}).get("train_limit")
    if args.train_limit is not None and limit != args.train_limit:
        raise UserError(f"--train-limit {args.train_limit} does not match base checkpoint {path}, trained on "
                        f"{'all training images' if limit is None else f'--train-limit {limit}'}; "
                        "leave --train-limit out or pass another --base")
    return ckpt


def train_base(base, args, data, device):
    print(f"no base checkpoint at {base.path}: training one first with train.py's defaults", flush=True)
    base_args = argparse.Namespace(dataset=args.dataset, arch=args.arch, width=args.width, epochs=args.base_epochs,
                                   batch_size=args.base_batch_size, lr=args.base_lr, momentum=args.base_momentum,
                                   weight_decay=args.base_weight_decay, seed=base.seed, exclude_class=[],
                                   train_limit=args.train_limit, out=str(base.path), resume=False)
    return train(base_args, data, device)


def setup(args):
    """Every check before any work, so that a mistake writes nothing; then the data, each seed's base
    model (trained first if missing) and the split into forget and retained training images."""
    methods = parse_methods(args.method)
    if not args.forget_class:  # a random sample: no class to hide, and the depth measures are per class
        if args.depth:
            raise UserError("--depth measures how deeply classes are forgotten; use it with --forget-class, "
                            "not with --forget-share or --forget-index")
        if "hidden" in methods and args.method != "all":
            raise UserError("--method hidden masks whole classes; it has no meaning with --forget-share or --forget-index")
        methods = [m for m in methods if m != "hidden"]
    if args.bench_profile and not args.bench_steps:
        raise UserError("--bench-profile profiles the --bench-steps steps; give --bench-steps N too")
    check_dataset_name(args.dataset)
    check_arch(args.arch, args.width)
    if len(set(args.epochs)) != len(args.epochs):
        raise UserError(f"--epochs repeats a count ({' '.join(map(str, args.epochs))}); name each once")
    args.epochs = sorted(args.epochs)
    if len(set(args.seed)) != len(args.seed):
        raise UserError(f"--seed repeats a seed ({' '.join(map(str, args.seed))}); name each once")
    device = pick_device(args.device)
    bases = []
    for seed in args.seed:
        path = Path(args.base or default_checkpoint(args.dataset, args.arch, width=args.width, seed=seed,
                                                    train_limit=args.train_limit))
        bases.append(Base(seed, check_base(path, args), path))
    data = load_dataset(args.dataset, args.data_dir)
    for base in bases:
        if base.ckpt is not None:
            check_checkpoint_fits(base.ckpt, data, base.path)
    check_classes(args.forget_class, data.num_classes, "--forget-class", must_leave=2)
    forget = forget_tag(args.forget_class, args.forget_share, args.forget_index_file)
    for base in bases:
        width = check_arch(args.arch, base.ckpt.get("width") if base.ckpt is not None else args.width)
        train_limit = base.ckpt["args"].get("train_limit") if base.ckpt is not None else args.train_limit
        stem = default_checkpoint(args.dataset, args.arch, width=width, seed=base.seed, train_limit=train_limit).stem
        base.tag = f"{stem}-{forget}"
        base.split, base.forget_index, base.forget_name = forget_split(
            data, training_index(data, (), train_limit), args.forget_class, args.forget_share, args.forget_index_file,
            base.seed)
    if len(bases) == 1:
        name = bases[0].tag
    else:  # one file for all seeds: <dataset>-<arch>[-w<W>][-n<N>]-forget<K>-seeds<S>-<S>...
        name = (f"{default_checkpoint(args.dataset, args.arch, width=width, train_limit=train_limit).stem}-{forget}"
                f"-seeds{'-'.join(map(str, args.seed))}")
    results = Path(args.out_dir) / f"{name}.json"
    for path in (results, results.with_suffix(".md"), Path("checkpoints/unlearned") / f"{bases[0].tag}.pt",
                 *(base.path for base in bases)):
        check_writable(path)
    # several seeds: each finished seed's rows go to a .partial.json, so that --resume loses at most one seed
    finished = finished_seeds(results.with_suffix(".partial.json"), args) if args.resume and len(bases) > 1 else {}
    data.to(device)

    for base in bases:
        base.ckpt = base.ckpt or train_base(base, args, data, device)
    split = bases[0].split
    what = (f"class {' '.join(map(str, args.forget_class))} ({', '.join(data.classes[c] for c in args.forget_class)})"
            if args.forget_class else "a random sample")
    print(f"forgetting {what} of {data.name}: {len(split['forget'])} forget and {len(split['retain'])} retained "
          f"training images, {args.arch}, on {device}", flush=True)
    return Run(methods, device, data, bases, results, finished)

# -----------------------------------------------------------------------------
# the comparison: every method on each seed's base model


def run_methods(run, base, args):
    """One seed's comparison: the base row, then each method's row; each unlearned model is saved,
    merged; depth scores last. args is this seed's: args.seed is base.seed."""
    data, split, device = run.data, base.split, run.device
    base_model = to_device(model_from_checkpoint(base.ckpt, base.path), device)
    rows = {"base": unlearning_metrics(base_model, data, args.forget_class, split["train"], split["forget"])}
    rows["base"].update(seconds=base.ckpt.get("seconds"), sparsity=pl.sparsity(base_model))
    if args.depth:
        rows["base"].update(depth_metrics(base_model, data, args.forget_class, split["train"], seed=args.seed,
                                          reference=base_model))
    for method, epochs, name in method_runs(run.methods, args.epochs):
        print(f"{name}:" + (f" (seed {args.seed})" if len(run.bases) > 1 else ""), flush=True)
        method_args = argparse.Namespace(**dict(vars(args), epochs=epochs))
        model, rows[name] = run_method(method, base.ckpt, data, split, method_args, device, base_model)
        rows[name]["inference_time_ratio"] = inference_time_ratio(model, base_model, data)
        if method not in NOT_UNLEARNED:
            save_checkpoint(checkpoint_dict(model, data, args.arch, dict(base.ckpt["args"], method=method,
                                            unlearn_epochs=epochs, forget_class=args.forget_class,
                                            forget_index=args.forget_index),
                                            width=base.ckpt.get("width"),
                                            metrics=rows[name]),
                            Path("checkpoints/unlearned") / f"{base.tag}-{name.replace('@', '-')}.pt")
        print(f"    UA {rows[name]['UA']:.2f}  MIA {rows[name]['MIA']:.2f}  RA {rows[name]['RA']:.2f}  "
              f"TA {rows[name]['TA']:.2f}  {rows[name]['seconds']:.1f} s", flush=True)
    if "retrain" in rows:
        for name in rows:
            if name != "base":
                rows[name]["time_vs_retrain"] = rows[name]["seconds"] / rows["retrain"]["seconds"]
    if {"prunelora", "lora", "finetune"} & set(run.methods):  # step times on one batch, side by side
        for method, bench in bench_step_times(base.ckpt, data, split, args, device, steps=10).items():
            for name in (name for m, _, name in method_runs(run.methods, args.epochs) if m == method):
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
    args = parse_args()
    run = setup(args)
    if args.bench_steps:
        base = run.bases[0]
        rows = bench_step_times(base.ckpt, run.data, base.split, args, run.device, args.bench_steps, memory=True)
        print_bench(rows, args, run.device)
        if args.bench_profile:
            profile_bench(base.ckpt, run.data, base.split, args, run.device, args.bench_steps)
        return
    partial, per_seed = run.results.with_suffix(".partial.json"), dict(run.finished)
    for base in (base for base in run.bases if base.seed not in per_seed):
        seed_args = argparse.Namespace(**dict(vars(args), seed=base.seed, base_ckpt=base.ckpt,
                                              forget_index=base.forget_index, forget_name=base.forget_name))
        per_seed[base.seed] = run_methods(run, base, seed_args)
        if len(run.bases) > 1:
            save_partial(per_seed, args, partial)
    report({base.seed: per_seed[base.seed] for base in run.bases}, run, args)
    partial.unlink(missing_ok=True)


if __name__ == "__main__":
    run_cli(main)
