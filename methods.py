"""The method and its baselines, each one function: PruneLoRA first (reset the forget rows, prune,
adapt, unlearn, merge), then the paper's baselines and the UNLEARN table that unlearn.py runs.

Every method takes a fresh copy of the base model, the data, the Task (one seed's base checkpoint
and forget split) and the command line's args, and returns (unlearned model, facts), where facts
holds trainable_params and, for Retrain, the seconds its training took.
"""
import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

import deep
import projection
import prunelora as pl
import tie
from checkpoints import default_checkpoint, load_checkpoint
from cli import UserError
from data import with_labels
from depth import hide_classes
from models import HEAD
from train import RUN_KEYS, fit, train, warmup_cosine


@dataclasses.dataclass
class Task:
    """One seed's unlearning task: what the methods need besides the command line's args."""
    seed: int
    ckpt: dict                 # the base checkpoint (None until trained, where it was missing)
    path: Path                 # where the base checkpoint lives
    split: dict = None         # train / retain / forget: training-image indices
    tag: str = ""              # <dataset>-<arch>[-w<W>][-n<N>][-seed<S>]-forget<K>: names its unlearned checkpoints
    forget_index: list = None  # random-sample forgetting: the forget images (None: whole classes)
    forget_name: str = ""      # names its Retrain checkpoint: the classes, or <n>images-<hash> of a sample
    progress: object = None    # the whole run's train.Progress, for an ETA that covers every method and seed

# -----------------------------------------------------------------------------
# PruneLoRA: prune -> adapt -> unlearn -> merge


def prepare_prunelora(model, args):
    """Everything before PruneLoRA's training; returns the trainable parameter count."""
    reset_forget_rows(model, args)                           # 0. the forget classes' head rows start afresh
    pl.prune_global(model, args.prune_amount, exclude=HEAD)  # 1. prune: global magnitude, head excluded
    return adapt(model, args)                                # 2. adapt: LoRA on the frozen, pruned weights


def unlearn_prunelora(model, data, task, args):
    """PruneLoRA: prune the base, adapt it with LoRA on the frozen, pruned weights, unlearn by training
    only the low-rank factors and the head on the retained images, then merge (sparsity kept).
    The variants aimed at deeper forgetting (deep.py) are options, each off by default."""
    train_data, train_on, loss_fn = data, task.split["retain"], F.cross_entropy
    if args.relabel_forget:  # the forget images too, labelled by the base model (before any change)
        train_data, train_on = deep.relabel_forget_nearest(model, data, task.split["forget"], args), task.split["train"]
    if args.push or args.hold:  # the forget images too, under a term on their features (the base's prototypes)
        loss_fn = deep.forget_feature_loss(model, data, task.split, args.forget_class, args)
        train_on = task.split["train"]
    if args.tie_head:  # the forget images too, classified by class means of the features, not by the head
        loss_fn = tie.tied_head_loss(model, data, task.split, args)
        train_on = task.split["train"]
    if args.salient_prune:  # before the head's forget rows are reset: the saliency is the base model's
        deep.prune_forget_salient(model, data, task.split["forget"], args)
    prepare_prunelora(model, args)                            # 0-2. reset the forget rows, prune, adapt
    if args.project_start:
        projection.projection_start(model, data, task.split, args.project_start, seed=args.seed)
    try:
        facts = finetune_on(model, train_data, train_on, args, task,  # 3. unlearn: the factors and the head train
                            loss_fn=loss_fn, lr=args.lora_lr, freeze_bn=args.freeze_bn)
        if args.repair_epochs:  # then the fitted head scores the retained images; the forget images stay tied
            tie.fit_head(model, data, task.split["retain"], args.seed)
            loss_fn.through_head = True
            finetune_on(model, train_data, train_on, args, task, loss_fn=loss_fn, lr=args.lora_lr,
                        freeze_bn=args.freeze_bn, epochs=args.repair_epochs)
    finally:
        if isinstance(loss_fn, deep.HeadInputLoss):
            loss_fn.remove()
    pl.merge_lora(model)                                      # 4. merge under the mask
    # the head got no gradient: fitted now on the merged model's retained features (the repair fitted it before
    # the merge, as its factors train after; here it stays after, where the measured --tie-head runs fitted it)
    if args.tie_head and not args.repair_epochs:
        tie.fit_head(model, data, task.split["retain"], args.seed)
    return model, facts


def reset_forget_rows(model, args):
    """With --reset-head 1, give the forget classes' rows of the head fresh initial values, as a
    model that never saw those classes had before training. Fine-tuning on retained data then only
    ever pushes these logits down, as in Retrain, instead of slowly wearing down what the rows learned."""
    if not args.reset_head or not args.forget_class:  # random-sample forgetting: no rows belong to the forget set
        return
    head = model.head
    fresh = torch.nn.Linear(head.in_features, head.out_features).to(head.weight.device)
    rows = torch.tensor(args.forget_class, device=head.weight.device)
    with torch.no_grad():
        head.weight[rows] = fresh.weight[rows]
        head.bias[rows] = fresh.bias[rows]


def adapt(model, args):
    """Stage 2 of PruneLoRA (and all of LoRA's setup): LoRA on every Conv2d/Linear/attention weight but
    the head, which trains in full; everything else frozen. Returns the trainable parameter count."""
    pl.add_lora(model, r=args.rank, alpha=args.alpha, exclude=HEAD)
    return pl.mark_only_lora_trainable(model, keep=HEAD)


def finetune_on(model, data, index, args, task, loss_fn=F.cross_entropy, lr=None, freeze_bn=False, epochs=None):
    """Adam on the trainable parameters, warm-up + cosine schedule, epochs (default args.epochs) over data[index]."""
    params = [p for p in model.parameters() if p.requires_grad]
    peak = lr or args.lr
    optimizer = torch.optim.Adam(params, lr=peak)
    generator = torch.Generator().manual_seed(args.seed)
    compiled = fit(model, data, index, epochs=epochs or args.epochs, batch_size=args.batch_size, optimizer=optimizer,
                   generator=generator, lr_at=lambda step, total: warmup_cosine(step, total, peak), loss_fn=loss_fn,
                   freeze_bn=freeze_bn, log=lambda line: print("   ", line, flush=True), progress=task.progress,
                   compile=getattr(args, "compile", False))
    return dict(trainable_params=sum(p.numel() for p in params), **compiled)

# -----------------------------------------------------------------------------
# the baselines


def prepare_lora(model, args):
    """LoRA alone: PruneLoRA without the pruning."""
    reset_forget_rows(model, args)
    return adapt(model, args)


def prepare_finetune(model, args):
    """Full fine-tuning: every weight trains."""
    reset_forget_rows(model, args)
    return sum(p.numel() for p in model.parameters())


# the model each method trains, built before its training: bench.py times steps of exactly these
PREPARE = {"finetune": prepare_finetune, "lora": prepare_lora, "prunelora": prepare_prunelora}


def unlearn_lora(model, data, task, args):
    """LoRA alone: no pruning."""
    prepare_lora(model, args)
    facts = finetune_on(model, data, task.split["retain"], args, task, lr=args.lora_lr, freeze_bn=args.freeze_bn)
    return pl.merge_lora(model), facts


def unlearn_finetune(model, data, task, args):
    """Fine-tune every weight on the retained classes."""
    prepare_finetune(model, args)
    return model, finetune_on(model, data, task.split["retain"], args, task)


def unlearn_prune_finetune(model, data, task, args):
    """Prune, then fine-tune every weight; the masks keep pruned weights at zero."""
    reset_forget_rows(model, args)
    pl.prune_global(model, args.prune_amount, exclude=HEAD)
    facts = finetune_on(model, data, task.split["retain"], args, task)
    return pl.merge_lora(model), facts  # no adapters to merge: this makes the pruning permanent


def unlearn_ga(model, data, task, args):
    """Gradient ascent on the forget set. At fine-tuning learning rates it wrecks the whole model
    within a few steps, so it runs at a tenth of --lr."""
    ascent = lambda logits, labels: -F.cross_entropy(logits, labels)
    return model, finetune_on(model, data, task.split["forget"], args, task, loss_fn=ascent, lr=args.lr / 10)


def unlearn_rl(model, data, task, args):
    """Random labels: forget images get a random retained class (drawn afresh at every step), retained
    images keep theirs. Forgetting a random sample, each forget image gets another class than its own,
    drawn once with the seed, since its class is also a retained one."""
    split = task.split
    if not args.forget_class:
        forget = split["forget"].to(data.train_labels.device)
        shift = torch.randint(1, data.num_classes, (len(forget),), generator=torch.Generator().manual_seed(args.seed))
        relabelled = with_labels(data, forget, (data.train_labels[forget] + shift.to(forget.device)) % data.num_classes)
        return model, finetune_on(model, relabelled, torch.cat([split["retain"], split["forget"]]), args, task)
    device = data.train_labels.device
    retained = torch.tensor([c for c in range(data.num_classes) if c not in args.forget_class], device=device)
    forget = torch.tensor(args.forget_class, device=device)

    def relabelled(logits, labels):
        random = retained[torch.randint(len(retained), labels.shape, device=labels.device)]
        return F.cross_entropy(logits, torch.where(torch.isin(labels, forget), random, labels))
    return model, finetune_on(model, data, torch.cat([split["retain"], split["forget"]]), args, task,
                              loss_fn=relabelled)


def retrain_run(data, task, args):
    """Retrain's settings (the base's, this seed, without the forget set), its checkpoint path, and
    the checkpoint a run of exactly these settings (train.py's RUN_KEYS) left there, or None."""
    settings = dict(task.ckpt["args"], seed=task.seed, exclude_class=list(args.forget_class),
                    exclude_index=task.forget_index)
    out = default_checkpoint(data.name, args.arch, [task.forget_name], settings.get("width"), settings["seed"],
                             settings.get("train_limit"))
    try:
        previous = load_checkpoint(out) if out.is_file() else None
    except UserError:  # not a checkpoint we can read: trained over
        previous = None
    same_run = previous is not None and all(previous.get("args", {}).get(k) == settings.get(k) for k in RUN_KEYS)
    return settings, out, previous if same_run else None


def unlearn_retrain(model, data, task, args):
    """Exact unlearning: train from scratch without the forget set, with the base's settings and
    this run's seed (with one --base for several seeds, each seed has its own Retrain).

    A Retrain checkpoint of exactly these settings is used where it is complete and continued where
    it was cut, so a long comparison can be run again without training Retrain twice; any other
    file at that path is trained over, as train.py would."""
    settings, out, previous = retrain_run(data, task, args)
    ckpt = train(argparse.Namespace(**settings, out=str(out), resume=previous is not None,
                                    compile=getattr(args, "compile", False)), data,
                 data.train_images.device, log=lambda line: print("   ", line, flush=True), progress=task.progress)
    model.load_state_dict(ckpt["state_dict"])
    return model, dict(trainable_params=sum(p.numel() for p in model.parameters()), seconds=ckpt["seconds"])


def unlearn_hidden(model, data, task, args):
    """Not an unlearning method: the reference for forgetting in the head only (depth score 0).
    The base model untrained, its forget classes' logits masked: UA 100, features untouched."""
    return hide_classes(model, args.forget_class), dict(trainable_params=0)


UNLEARN = {"prunelora": unlearn_prunelora, "retrain": unlearn_retrain, "finetune": unlearn_finetune,
           "prune-finetune": unlearn_prune_finetune, "lora": unlearn_lora, "ga": unlearn_ga, "rl": unlearn_rl,
           "hidden": unlearn_hidden}
METHODS = tuple(UNLEARN)
NOT_UNLEARNED = ("hidden",)  # references only: their models are never saved where unlearned models go
