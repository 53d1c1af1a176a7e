"""PruneLoRA variants aimed at deeper forgetting: making the rank-r update reach the features, not
only the head. Each is an option of unlearn.py, off by default; depth.py measures them; the tied head
and its terms are in tie.py.

    --push L          forget-feature term: L * cross-entropy of a nearest-class-mean classifier on the forget
                      images x of a batch, whose classes are the forget images' own centre m (the normalised
                      mean of their features) and the base model's prototypes p_c of the retained classes,
                      scores 10 * cos(f(x), .), f the L2-normalised penultimate feature, and the target each
                      image's nearest retained prototype: the class scatters. (Drawn onto one class mean, the
                      forget images moved as one tight cluster that every probe still found.)
    --hold M          + M * mean(1 - cos(f(x), p_y)) over the retained images (x, y): they stay at their
                      own class's base prototype while the forget images move (no extra forward pass)
    --project-start K the factors start at the rank-K edit dW = -(M * W) Q Q^T, Q the input directions the
                      forget images use and the retained images do not (generalised eigenvectors; projection.py)
    --tie-head 1      while the factors train, the head is not used: every image is classified by 10 * cos(f(x),
                      m_c), m_c a running mean of class c's normalised features (the forget classes' too), and
                      each forget image's target is its nearest retained class, so the forgetting has to happen
                      in the features (the fix of "An Illusion of Unlearning?", arXiv 2604.08271, for a head that
                      hides a class its features keep); then the head alone is fitted on the retained features
    --repair-epochs N after --tie-head's epochs, the head fitted, N epochs more in which the retained images are
                      scored by the head (cross-entropy: the head trains too) and the forget images stay tied
    --tie-spread 1    with --tie-head 1, each batch's forget images are spread evenly over the retained classes
                      (in order of score, each takes its best class with room left), not each to its nearest: sent to
                      their nearest, they may gather in one neighbour's region, which a linear probe can tell apart
    --tie-match W     with --tie-head 1, + W * |mu_f - mu_r|^2 / |mu_r|^2 on the raw penultimate features, mu_f a
                      running mean over the forget images (gradient through the batch's share), mu_r the retained
                      images' (held): with equal class-conditional means no linear probe beats a constant (LEACE, arXiv
                      2306.03819), so the forget class cannot stay linearly decodable where the NCM readout says gone
                      (measured, Fashion-MNIST seed 0: W = 1 barely moved the probe, W = 10 wrecked RA; RESULTS.md)
    --tie-norm W      with --tie-head 1, + W * mean over forget images of (|f(x)| / n_r - 1)^2 on the raw features,
                      n_r the batch's mean retained norm (held): the tie scores cosines only, and spread forget images
                      shrank to 0.14-0.34 of a retained image's norm, a place a linear probe can find (measured,
                      CIFAR-10 seed 0: W = 1 took the probe readout from 0.52 to 1.31; RESULTS.md)
    --tie-whiten W    with --tie-head 1, + W * (m_f - m_r)^T (S_r + eps I)^-1 (m_f - m_r) on the raw features, m_f and
                      m_r the forget and retained images' running means, S_r the retained ones' running covariance
                      (about the last 100 batches; held), eps 1 % of its mean variance: the squared distance between
                      the two means that a linear probe reads (Fisher's discriminant). --tie-match's plain distance
                      counts a gap along a direction in which the retained features hardly vary as little as any,
                      though a probe on standardised features finds it as easily as any (measured, CIFAR-10 seed 0,
                      with --epochs 1 --repair-epochs 8: W = 0.01 took the probe readout from 0.01 to 3.48 at RA
                      -0.89; W = 1 cost 20 points of RA; RESULTS.md)
    --deep 1          the best combination measured so far: --tie-head 1 --tie-spread 1 --tie-whiten 0.01 for
                      one epoch, then --repair-epochs 8 (the depth issue's targets met on three seeds of Fashion-MNIST
                      and of CIFAR-10; RESULTS.md); the default wherever it applies (whole classes forgotten,
                      prunelora among the methods, one process, none of these options given); --deep 0 is PruneLoRA
                      as the paper has it (the earlier choice, the tied head alone for 5 epochs, cost 3.3 points of
                      RA on CIFAR-10)
    --salient-prune Q prune first the share Q of weights the forget images' loss leans on most
    --relabel-forget 1  train on the forget images too, each labelled as its nearest other class
"""
import torch
import torch.nn.functional as F

import distributed
import prunelora as pl
from cli import UserError, autocast, fraction, number
from data import forget_mask, make_batch, predict, with_labels
from models import HEAD

# -----------------------------------------------------------------------------
# the options

# what --deep 1 selects: the one setting that met every target of the depth issue on three seeds of Fashion-MNIST
# and of CIFAR-10 (RESULTS: "--deep 1"), hence the default wherever it applies (check_args).
DEEP = dict(tie_head=1, tie_spread=1, tie_whiten=0.01, repair_epochs=8)
DEEP_EPOCHS = 1  # its tied epochs, before the repair: PruneLoRA's --epochs under --deep 1 where --epochs is not given
OPTIONS = (("--push", "push"), ("--hold", "hold"), ("--project-start", "project_start"), ("--tie-head", "tie_head"),
           ("--repair-epochs", "repair_epochs"), ("--tie-spread", "tie_spread"), ("--tie-match", "tie_match"),
           ("--tie-norm", "tie_norm"), ("--tie-whiten", "tie_whiten"),
           ("--salient-prune", "salient_prune"), ("--relabel-forget", "relabel_forget"))

non_negative = number(float, "a number >= 0", lambda v: v >= 0 and v < float("inf"))
whole = number(int, "a whole number >= 0", lambda v: v >= 0)


def add_args(group):
    group.add_argument("--push", type=non_negative, default=0.0, metavar="L",
                       help="weight L of the forget-feature term: each forget image's feature leaves its class's "
                       "centre for its nearest retained class's base prototype (the forget images train too)")
    group.add_argument("--hold", type=non_negative, default=0.0, metavar="M",
                       help="weight M of a term that holds each retained image's feature at its own class's base "
                       "prototype (with --push: spares the retained features)")
    group.add_argument("--project-start", type=whole, default=0, metavar="K",
                       help="start the factors at the rank-K edit that removes the input directions the forget "
                       "images use and the retained ones do not (K <= --rank; 0: B = 0 as usual)")
    group.add_argument("--tie-head", type=int, choices=(0, 1), default=0,
                       help="1: train the factors against the cosine to each class's running mean feature instead "
                       "of the head, the forget images toward their nearest retained class; then fit the head alone")
    group.add_argument("--repair-epochs", type=whole, default=0, metavar="N",
                       help="with --tie-head 1: then N epochs more with the fitted head: the retained images through "
                       "the head (cross-entropy), the forget images still tied to their nearest retained class")
    group.add_argument("--tie-spread", type=int, choices=(0, 1), default=0,
                       help="1: with --tie-head 1, spread each batch's forget images evenly over the retained classes "
                       "(a balanced assignment) instead of sending each to its nearest")
    group.add_argument("--tie-match", type=non_negative, default=0.0, metavar="W",
                       help="with --tie-head 1: weight W of a term that brings the mean raw feature of the forget "
                       "images to the retained images' mean, which leaves a linear probe nothing to read "
                       "(W = 10 wrecked RA on Fashion-MNIST: RESULTS.md)")
    group.add_argument("--tie-norm", type=non_negative, default=0.0, metavar="W",
                       help="with --tie-head 1: weight W of a term that keeps each forget image's feature norm at "
                       "the retained images' mean norm (the tie scores cosines only, and spread images shrank)")
    group.add_argument("--tie-whiten", type=non_negative, default=0.0, metavar="W",
                       help="with --tie-head 1: weight W of a term that brings the mean raw feature of the forget "
                       "images to the retained images' mean, the gap measured in the retained features' whitened "
                       "coordinates (the distance a linear probe reads)")
    group.add_argument("--deep", type=int, choices=(0, 1), default=None,
                       help=f"1: the best combination for deeper forgetting measured so far, today {DEEP_EPOCHS} "
                       "epoch of " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEEP.items()
                                             if k != "repair_epochs")
                       + f", then --repair-epochs {DEEP['repair_epochs']} ({DEEP_EPOCHS}: PruneLoRA's --epochs unless "
                       "given; RESULTS.md); 0: PruneLoRA as the paper has it. Default: 1 wherever it applies (whole "
                       "classes forgotten, prunelora among the methods, one process, none of the options here given)")
    group.add_argument("--salient-prune", type=fraction, default=0.0, metavar="Q",
                       help="first prune the share Q of weights the forget images' loss leans on most "
                       "(|w * dL/dw|), then --prune-amount of the rest by magnitude")
    group.add_argument("--relabel-forget", type=int, choices=(0, 1), default=0,
                       help="1: train on the forget images too, each labelled as the class the base model ranks "
                       "highest after its own (never a forget class)")


def check_args(args, methods):
    """One line for a combination that cannot work, before any work; --deep 1 sets its options here,
    and --deep left out becomes 1 wherever it applies, else 0."""
    named = [flag for flag, key in OPTIONS if getattr(args, key)]
    if args.deep is None:
        applies = bool(args.forget_class) and "prunelora" in methods and not named
        args.deep = int(applies and distributed.planned_world_size() == 1)
        if applies and not args.deep and distributed.planned_main():  # said once, not by every process
            print("note: PruneLoRA runs as --deep 0 under torchrun (--deep 1, the default in one process, keeps its "
                  "class means in one process)", flush=True)
    if args.deep:
        if named:
            raise UserError(f"--deep 1 sets the options for deeper forgetting itself; leave out {', '.join(named)}, "
                            "or leave out --deep and give each option")
        vars(args).update(DEEP)
        if args.epochs is None:  # PruneLoRA's alone: the run's other methods keep --epochs' default
            args.own_epochs = {"prunelora": DEEP_EPOCHS}
    tie = "--deep 1" if args.deep else "--tie-head 1"  # as the user wrote it
    if (args.push or args.hold) and not args.forget_class:
        raise UserError("--push and --hold work on the forget classes' features; use them with --forget-class, "
                        "not with --forget-share or --forget-index")
    if (args.push or args.hold) and args.relabel_forget:
        raise UserError("--relabel-forget 1 gives the forget images other labels, which --push and --hold read as "
                        "retained; use one or the other")
    if args.tie_head and not args.forget_class:
        raise UserError(f"{tie} needs the forget classes' means; use it with --forget-class, "
                        "not with --forget-share or --forget-index")
    if args.tie_head and (args.push or args.hold or args.relabel_forget):
        raise UserError("--tie-head 1 replaces the loss that --push, --hold and --relabel-forget change; "
                        "use one or the other")
    if args.tie_head and distributed.planned_world_size() > 1:  # checked before start() joins them
        raise UserError(f"{tie} keeps its class means in one process; run it without torchrun")
    for flag, key, what in (("--repair-epochs", "repair_epochs", "trains after"), ("--tie-spread", "tie_spread",
                            "spreads the targets of"), ("--tie-match", "tie_match", "adds to the loss of"),
                            ("--tie-norm", "tie_norm", "adds to the loss of"),
                            ("--tie-whiten", "tie_whiten", "adds to the loss of")):
        if getattr(args, key) and not args.tie_head:
            raise UserError(f"{flag} {getattr(args, key)} {what} --tie-head 1; use it with --tie-head 1")
    if args.project_start > args.rank:
        raise UserError(f"--project-start {args.project_start} is above --rank {args.rank}; allowed: 0 to {args.rank}")
    used = ["--deep 1"] if args.deep else named  # as written
    if used and "prunelora" not in methods:
        raise UserError(f"{', '.join(used)} change{'s' if len(used) == 1 else ''} prunelora only, and --method has "
                        "no prunelora")

# -----------------------------------------------------------------------------
# --push, --hold: a term on the penultimate features, beside the cross-entropy on retained images


@torch.no_grad()
def class_prototypes(model, data, index, classes, per_class=300, seed=0):
    """(len(classes), D): each class's normalised mean of the L2-normalised penultimate features of up to
    per_class of its training images in index, drawn with seed. Computed once, on the base model."""
    generator = torch.Generator().manual_seed(seed)
    labels = data.train_labels[index]
    picks = [index[labels == c][torch.randperm(int((labels == c).sum()), generator=generator)[:per_class]
                                .to(index.device)] for c in classes]
    features = F.normalize(predict(model, data, data.train_images[torch.cat(picks)], features=True), dim=1)
    return F.normalize(torch.stack([part.mean(0) for part in features.split([len(p) for p in picks])]), dim=1)


class HeadInputLoss:
    """Base of the losses on the penultimate features: a hook on model.head keeps its input from the
    forward pass the loss follows (no second forward); call remove() when training ends."""

    def __init__(self, model):
        self.features = None
        self.handle = model.head.register_forward_pre_hook(self._grab)

    def _grab(self, module, inputs):
        self.features = inputs[0]

    def remove(self):
        self.handle.remove()


class ForgetFeatureLoss(HeadInputLoss):
    """loss_fn(logits, labels) for fit() on retained and forget images together: cross-entropy on the
    retained ones; push * the cross-entropy of a nearest-class-mean classifier (the forget images' own
    centre and the retained prototypes) that should send each forget image to its nearest retained
    class; hold * (1 - cosine to their own class's prototype) on the retained ones. The features are the
    head's input, taken by a hook in the same forward pass; call remove() when training ends."""
    SCALE = 10  # cosines in [-1, 1] as logits: 10 lets a margin of a few tenths reach a confident softmax

    def __init__(self, model, prototypes, retained_classes, forget_classes, push=0.0, hold=0.0):
        self.prototypes, self.forget_classes = prototypes, forget_classes
        self.push, self.hold = push, hold
        self.column = torch.full((len(retained_classes) + len(forget_classes),), -1, dtype=torch.long,
                                 device=prototypes.device)
        self.column[torch.tensor(retained_classes, device=prototypes.device)] = torch.arange(
            len(retained_classes), device=prototypes.device)  # class -> its prototype's row
        super().__init__(model)

    def __call__(self, logits, labels):
        is_forget = forget_mask(labels, self.forget_classes)
        features = F.normalize(self.features.float(), dim=1)
        kept = ~is_forget
        loss = F.cross_entropy(logits[kept], labels[kept]) if kept.any() else logits.sum() * 0
        if self.hold and kept.any():
            own = (features[kept] * self.prototypes[self.column[labels[kept]]]).sum(1)
            loss = loss + self.hold * (1 - own).mean()
        if self.push and is_forget.any():  # away from the forget images' own centre, to the nearest retained class
            forget = features[is_forget]
            centre = F.normalize(forget.mean(0), dim=0)
            scores = self.SCALE * torch.cat([(forget @ centre)[:, None], forget @ self.prototypes.T], 1)
            loss = loss + self.push * F.cross_entropy(scores, scores[:, 1:].argmax(1) + 1)
        return loss


def forget_feature_loss(model, data, split, forget_classes, args):
    """--push/--hold's loss for this model (the base, before pruning: its prototypes are fixed now)."""
    retained = [c for c in range(data.num_classes) if c not in forget_classes]
    prototypes = class_prototypes(model, data, split["retain"].to(data.train_labels.device), retained,
                                  seed=args.seed)
    return ForgetFeatureLoss(model, prototypes, retained, forget_classes, args.push, args.hold)

# -----------------------------------------------------------------------------
# --salient-prune, --relabel-forget


def saliency(model, loss):
    """|w * dL/dw| of every prunable weight outside the head, {weight name: scores}: a first-order estimate
    of how much the loss would change were that weight zeroed. Leaves no .grad behind. The model is
    not pruned or adapted yet, so each weight is a plain parameter that the loss was computed from."""
    weights = {name: getattr(m, t) for name, m, t in pl.prunable(model, HEAD)}  # what prune_global scores
    grads = torch.autograd.grad(loss, list(weights.values()))
    return {name: (w * g).detach().abs() for (name, w), g in zip(weights.items(), grads)}


def prune_forget_salient(model, data, forget, args, images=512):
    """--salient-prune Q: prune the share Q of weights the forget images' loss leans on most (highest
    |w * dL/dw| over up to `images` of them, drawn with the seed)."""
    device = data.train_images.device
    batch = forget[torch.randperm(len(forget), generator=torch.Generator().manual_seed(args.seed))[:images]].to(device)
    model.eval()  # BatchNorm with the base's statistics, none of them updated
    with autocast(device):
        loss = F.cross_entropy(model(make_batch(data, data.train_images, batch)).float(), data.train_labels[batch])
    scores = saliency(model, loss)
    pl.prune_global(model, args.salient_prune, exclude=HEAD, importance=lambda name, weight: -scores[name])


def relabel_forget_nearest(model, data, forget, args):
    """--relabel-forget 1: the data with each forget image labelled as the class the base model ranks
    highest after its own, never a forget class. Trained on with the retained images, these labels
    give the features a reason to move the forget images into their nearest other class, not only
    the head a reason to stop naming it."""
    forget = forget.to(data.train_labels.device)
    logits = predict(model, data, data.train_images[forget])  # (n, classes)
    own = data.train_labels[forget]
    logits[torch.arange(len(own), device=logits.device), own] = float("-inf")
    logits[:, list(args.forget_class)] = float("-inf")
    return with_labels(data, forget, logits.argmax(1))
