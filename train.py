"""Train a classifier: the base model that PruneLoRA unlearns from, or the Retrain baseline.

    python train.py                                    # CIFAR-10, ResNet-18 (CIFAR stem)
    python train.py --exclude-class 3                  # Retrain: never sees class 3
    python train.py --dataset fashion-mnist --arch cnn --train-limit 6000 --epochs 5
    python train.py --arch resnet18 --width 16         # a ResNet-18 a 2-core CPU can train

fit() is the training loop that unlearn.py uses too; train() trains and checkpoints a base
model every epoch, so that --resume continues a run that was cut.
"""
import math
import shlex
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import distributed
import prunelora as pl
from checkpoints import (check_checkpoint_fits, check_writable, checkpoint_dict, default_checkpoint, load_checkpoint,
                         save_checkpoint)
from cli import (ArgumentParser, Diverged, UserError, autocast, pick_device, positive_float, positive_int,
                 run_cli)
from data import DATASET_HELP, check_classes, check_dataset_name, load_dataset, make_batch, predict, training_index
from models import ARCHS, build_model, check_arch, to_device

# -----------------------------------------------------------------------------
# the training loop, shared with unlearn.py


def fit(model, data, index, *, epochs, batch_size, optimizer, generator, lr_at=None, loss_fn=F.cross_entropy,
        start_epoch=0, on_epoch_end=None, test_images=None, test_labels=None, freeze_bn=False, log=print,
        progress=None, compile=False):
    """Train on data.train_images[index] for epochs, augmented, with bf16 autocast on CUDA.

    lr_at(step) sets the learning rate per step (None: keep the optimizer's). loss_fn(logits, labels)
    may be anything (unlearn.py passes gradient ascent and random labels). on_epoch_end(epoch, test_acc) runs
    after each epoch with the test accuracy when test images are given (train.py saves there). freeze_bn keeps
    every BatchNorm in eval mode (pl.freeze_batchnorm). progress: the whole run's Progress, so that
    the ETA covers more than this training (default: this training alone). compile: the training
    forward and backward run through torch.compile (CUDA graphs on CUDA); the seconds the first
    step spent compiling are logged and returned apart, {"compile_seconds": s}, and left out of img/s.
    Evaluation stays eager. Raises Diverged on a NaN/inf loss.
    """
    images, labels = data.train_images, data.train_labels
    device = images.device
    index = index.to(device)
    processes = distributed.world_size()
    if batch_size % processes:
        raise UserError(f"batch size {batch_size} does not split evenly over {processes} processes; "
                        f"allowed: a multiple of {processes}")
    steps_per_epoch = max(len(index) // batch_size, 1)  # drop the last partial batch: BatchNorm needs > 1 image

    def train_mode():
        model.train()
        if freeze_bn:
            pl.freeze_batchnorm(model)
    train_mode()
    progress = progress or Progress((epochs - start_epoch) * steps_per_epoch * batch_size)
    # every batch has the same shape (the last partial one is dropped), so one graph serves all steps
    forward = distributed.wrap(model)  # DistributedDataParallel under torchrun: gradients averaged over processes
    if compile:
        forward = torch.compile(forward, mode="reduce-overhead" if device.type == "cuda" else None)
    compile_seconds = None
    said_estimate = False
    for epoch in range(start_epoch, epochs):
        start, last_live = time.time(), time.time()
        order = index[torch.randperm(len(index), generator=generator).to(device)]
        loss_sum = correct = seen = uncounted = 0  # uncounted: the images of a compiling step, not in img/s
        for step in range(steps_per_epoch):
            batch = order[step * batch_size:(step + 1) * batch_size]
            x, y = make_batch(data, images, batch, generator), labels[batch]  # the same global batch everywhere
            x, y = distributed.share(x), distributed.share(y)                  # this process's part of it
            global_step = epoch * steps_per_epoch + step
            if lr_at is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(global_step, epochs * steps_per_epoch)
            step_start = time.time()
            with autocast(device):
                logits = forward(x)
                loss = loss_fn(logits.float(), y)
            if not distributed.all_finite(loss):
                lr = optimizer.param_groups[0]["lr"]
                raise Diverged(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                               f"(learning rate {lr:g}); the learning rate is probably too high")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if compile and compile_seconds is None:  # the first step compiled the graphs: time it apart
                compile_seconds = time.time() - step_start
                start, uncounted = time.time(), len(y)
                progress.start += compile_seconds
                log(f"  compiled the training step in {compile_seconds:.1f} s (not counted in img/s or the eta)")
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            progress.add(len(batch))
            # a live line on long epochs: the first after 10 s, so a slow run says early how slow it is
            if time.time() - last_live > (30 if said_estimate else 10):
                last_live, eta = time.time(), progress.eta()
                rate = processes * (seen - uncounted) / (time.time() - start)
                if not said_estimate and device.type == "cpu" and eta > 600:
                    log(f"  at {rate:.0f} img/s this run takes about {duration(eta)} more on the CPU; "
                        "for a quicker one use a smaller --width (resnet18/resnet50), --arch cnn, or --train-limit N")
                said_estimate = True
                log(f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch}  loss {loss_sum / seen:.4f}  "
                    f"{rate:.0f} img/s  run eta {duration(eta)}")
        seconds = time.time() - start
        loss_sum, correct, seen, uncounted = distributed.total(loss_sum, correct, seen, uncounted)
        line = (f"epoch {epoch + 1}/{epochs}  loss {loss_sum / seen:.4f}  train {100 * correct / seen:.2f}%")
        # the last step's update can break the model without any loss showing it: check its outputs
        # (on the test images, else on the last batch) before the epoch counts and anything saves it
        outputs = predict(model, data, test_images if test_images is not None else images[batch])
        train_mode()
        if not torch.isfinite(outputs).all():
            lr = optimizer.param_groups[0]["lr"]
            raise Diverged(f"the model's outputs became NaN or infinite after epoch {epoch + 1}, "
                           f"step {steps_per_epoch} "
                           f"(learning rate {lr:g}); the learning rate is probably too high")
        if test_images is not None:
            test_acc = 100 * (outputs.argmax(1) == test_labels).float().mean().item()
            line += f"  test {test_acc:.2f}%"
        log(f"{line}  {(seen - uncounted) / seconds:.0f} img/s  run eta {duration(progress.eta())}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, test_acc if test_images is not None else None)
    return {} if compile_seconds is None else dict(compile_seconds=compile_seconds)


class Progress:
    """The whole run's clock, so that every progress line's ETA covers the rest of the run: the work
    planned and done, counted in images trained on (an image only evaluated counts EVAL_COST of one:
    a forward pass without backward). The ETA is the rate so far applied to the work left."""
    EVAL_COST = 1 / 3

    def __init__(self, planned):
        self.planned, self.done, self.start = planned, 0, time.time()

    def add(self, images):
        self.done += images

    def evaluated(self, images):
        self.add(images * self.EVAL_COST)

    def eta(self):
        return (time.time() - self.start) / max(self.done, 1) * max(self.planned - self.done, 0)


def duration(seconds):
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def warmup_cosine(step, total_steps, peak, warmup=0.05):
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warm = max(int(warmup * total_steps), 1)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total_steps - warm, 1)))


# ViT trained from scratch with SGD diverged at 0.2 and trained at 0.05 (RESULTS.md, ViT-S/4); the
# torchvision transformers (tv:vit_*, tv:VisionTransformer, tv:swin_*, tv:maxvit_t) get the same
PEAK_LR = {"vit": 0.05}
TRANSFORMERS = ("tv:vit_", "tv:VisionTransformer", "tv:swin", "tv:maxvit")


def peak_lr(arch):
    return PEAK_LR.get(arch, 0.05 if arch.startswith(TRANSFORMERS) else 0.2)

# the arguments that must match for --resume to continue a run
RUN_KEYS = ("dataset", "arch", "width", "epochs", "batch_size", "lr", "momentum", "weight_decay", "seed",
            "exclude_class", "train_limit", "exclude_index")


def resume_settings(path):
    """The run settings stored in the checkpoint at path, so that 'train.py --resume --out PATH' needs
    no other option; {} where it cannot be read (train() then says why in one line)."""
    try:
        ckpt = load_checkpoint(path)
    except UserError:
        return {}
    return {key: value for key, value in ckpt.get("args", {}).items() if key in RUN_KEYS}


def train(args, data, device, log=print, progress=None):
    """Train args.arch on data (already on device) and save args.out; returns the checkpoint dict.
    progress: the whole run's Progress, where this training is part of a longer run (unlearn.py)."""
    out = Path(args.out)
    if args.lr is None:
        args.lr = peak_lr(args.arch)
    run = {k: getattr(args, k, None) for k in RUN_KEYS}  # a checkpoint from before --width has no width
    ckpt = None
    if args.resume:  # every check on the checkpoint before any work
        ckpt = load_checkpoint(out, args.dataset, args.arch)
        if ckpt.get("complete"):
            log(f"{out} is already complete ({ckpt['epochs_done']} epochs); nothing to resume")
            return ckpt
        lacks = [k for k in ("args", "optimizer", "generator", "torch_rng", "epochs_done", "seconds") if k not in ckpt]
        if lacks:
            raise UserError(f"--resume: {out} cannot be resumed (it has no {', '.join(lacks)}); "
                            "train afresh without --resume")
        for key in RUN_KEYS:
            if ckpt["args"].get(key) != run[key]:
                raise UserError(f"--resume: {out} was started with {key}={ckpt['args'].get(key)!r}, "
                                f"not {run[key]!r}; use the same settings or train afresh without --resume")
        check_checkpoint_fits(ckpt, data, out)
    torch.manual_seed(args.seed)
    width = check_arch(args.arch, run["width"])
    model = to_device(build_model(args.arch, data.train_images.shape[1], data.num_classes, width), device)
    generator = torch.Generator().manual_seed(args.seed)  # data order and augmentation
    decay = [p for p in model.parameters() if p.ndim > 1]   # no weight decay on biases and norms
    other = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([dict(params=decay, weight_decay=args.weight_decay), dict(params=other)],
                                lr=args.lr, momentum=args.momentum, nesterov=True)
    start_epoch, seconds_before, test_history = 0, 0.0, []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            generator.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])
        except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--resume: {out} does not fit this run ({first}); train afresh without --resume") from None
        start_epoch, seconds_before = ckpt["epochs_done"], ckpt["seconds"]
        # a checkpoint from before test_history was kept: its epochs' accuracies are unknown (None)
        test_history = list(ckpt.get("test_history") or [None] * start_epoch)
        log(f"resuming {out} after epoch {start_epoch}")
    index = training_index(data, args.exclude_class, args.train_limit, run["exclude_index"] or ())
    test_keep = ~torch.isin(data.test_labels, torch.tensor(args.exclude_class, dtype=torch.long, device=device))
    test_images, test_labels = data.test_images[test_keep], data.test_labels[test_keep]
    log(f"training {args.arch} on {data.name}: {len(index)} images, {data.num_classes} classes"
        + (f", without class {' '.join(map(str, args.exclude_class))}" if args.exclude_class else "")
        + (f", without {len(run['exclude_index'])} forgotten images" if run["exclude_index"] else "")
        + f", on {device}")
    started = time.time()

    def save(epochs_done, test_acc):
        complete = epochs_done == args.epochs
        test_history[epochs_done - 1:] = [test_acc]  # one per epoch: whether the base had stopped improving
        extra = {} if complete else dict(optimizer=optimizer.state_dict(), generator=generator.get_state(),
                                         torch_rng=torch.get_rng_state())
        ckpt = checkpoint_dict(model, data, args.arch, run, width=width, test_acc=test_acc, epochs_done=epochs_done,
                               complete=complete, seconds=seconds_before + time.time() - started,
                               test_history=list(test_history), **extra)
        save_checkpoint(ckpt, out)
        saved.append(epochs_done)

    saved = [start_epoch] if start_epoch else []  # epochs whose checkpoint of this run is at out
    try:
        fit(model, data, index, epochs=args.epochs, batch_size=args.batch_size, optimizer=optimizer,
            generator=generator, lr_at=lambda step, total: warmup_cosine(step, total, args.lr),
            start_epoch=start_epoch, on_epoch_end=save, test_images=test_images, test_labels=test_labels, log=log,
            progress=progress, compile=getattr(args, "compile", False))
    except Diverged as e:
        kept = (f"the checkpoint after epoch {saved[-1]} is kept at {out}" if saved else
                f"{out} is left as it was" if out.exists() else "no checkpoint was written")
        raise Diverged(f"{e}; {kept}") from None
    ckpt = load_checkpoint(out)
    log(f"saved {out}: test accuracy {ckpt['test_acc']:.2f}% after {ckpt['seconds']:.0f} s")
    return ckpt

# -----------------------------------------------------------------------------
# command line


def add_data_args(group, many_seeds=False):
    """The data and model options every script shares, added to `group` (a parser or an argument group)."""
    group.add_argument("--dataset", default="cifar10", help=DATASET_HELP)
    group.add_argument("--data-dir", default="data", help="where torchvision datasets and caches live")
    group.add_argument("--arch", default="resnet18", help=f"{', '.join(ARCHS)}, or tv:NAME[:key=value,...] for any "
                       "torchvision classifier (e.g. tv:mobilenet_v3_small), trained from scratch at 32 x 32")
    group.add_argument("--width", type=positive_int, default=None,
                       help="channels of a ResNet's first stage, doubling per stage (default 64, the standard); "
                       "16 makes ResNet-18 trainable on a CPU")
    group.add_argument("--train-limit", type=positive_int, default=None,
                       help="use only this many training images, the same number per class (default all)")
    if many_seeds:  # unlearn.py: the whole comparison once per seed
        group.add_argument("--seed", type=int, nargs="+", default=[0], metavar="S",
                           help="seeds model init, data order and augmentation; several: one comparison each, "
                           "and a table of mean and standard deviation")
    else:
        group.add_argument("--seed", type=int, default=0, help="seeds model init, data order and augmentation")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: cuda where PyTorch sees a GPU, else cpu")
    group.add_argument("--compile", action="store_true",
                       help="run training steps through torch.compile (CUDA graphs on CUDA); compiling takes "
                       "its own time, reported apart")


def add_train_args(group, prefix=""):
    """Base-training hyper-parameters; unlearn.py adds them as --base-epochs etc."""
    p = f"--{prefix}" if prefix else "--"
    group.add_argument(f"{p}epochs", type=positive_int, default=30, help="training epochs")
    group.add_argument(f"{p}batch-size", type=positive_int, default=512, help="training batch size")
    group.add_argument(f"{p}lr", type=positive_float, default=None,
                       help="peak SGD learning rate, warm-up then cosine (default 0.2; 0.05 for vit)")
    group.add_argument(f"{p}momentum", type=float, default=0.9, help="SGD Nesterov momentum")
    group.add_argument(f"{p}weight-decay", type=float, default=5e-4, help="weight decay, not on biases and norms")


EXAMPLES = """examples:
  python train.py                                        # CIFAR-10, ResNet-18
  python train.py --exclude-class 3                      # Retrain: never sees class 3
  python train.py --dataset fashion-mnist --arch cnn --train-limit 6000 --epochs 10
  python train.py --resume --out checkpoints/cifar10-resnet18.pt      # continue a cut run"""
OUT = {}  # the checkpoint main() writes, for the Ctrl-C line


def main():
    parser = ArgumentParser(description="Train a classifier (the base model, or Retrain with --exclude-class).",
                            epilog=EXAMPLES)
    add_data_args(parser.add_argument_group("data and model"))
    group = parser.add_argument_group("training")
    add_train_args(group)
    group.add_argument("--exclude-class", type=int, nargs="+", default=[], metavar="K",
                       help="train without these classes (the Retrain baseline)")
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=None,
                       help="checkpoint path (default checkpoints/<dataset>-<arch>[-w<W>][-n<N>][-seed<S>].pt)")
    group.add_argument("--resume", action="store_true",
                       help="continue --out from its last complete epoch, with the settings it was started with "
                       "(an option given here must match them)")
    args = parser.parse_args()
    if args.resume and args.out:  # options left off the command line take the cut run's values
        parser.set_defaults(**resume_settings(args.out))
        args = parser.parse_args()
    check_dataset_name(args.dataset)
    check_arch(args.arch, args.width)  # unknown arch, or a width it has not: fail before loading any data
    args.out = str(args.out or default_checkpoint(args.dataset, args.arch, args.exclude_class, args.width, args.seed,
                                                       args.train_limit))
    check_writable(args.out)
    OUT.update(path=args.out, data_dir=args.data_dir)
    device = distributed.start(pick_device(args.device))  # under torchrun: join the other processes
    data = load_dataset(args.dataset, args.data_dir)
    check_classes(args.exclude_class, data.num_classes, "--exclude-class", must_leave=2)
    train(args, data.to(device), device)


def interrupted():
    """What Ctrl-C leaves: the checkpoint of the last finished epoch (saved whole or not at all)."""
    try:
        ckpt = load_checkpoint(OUT["path"])
    except (KeyError, UserError):
        return "no epoch had finished, so no checkpoint was written"
    if ckpt.get("complete", True):
        return f"no epoch of this run had finished; {OUT['path']} is as it was"
    data = [] if OUT["data_dir"] == "data" else ["--data-dir", OUT["data_dir"]]
    return (f"{OUT['path']} keeps epoch {ckpt['epochs_done']} of {ckpt['args']['epochs']}; continue with: "
            + shlex.join(["python", "train.py", *data, "--resume", "--out", OUT["path"]]))


if __name__ == "__main__":
    run_cli(main, interrupted)
