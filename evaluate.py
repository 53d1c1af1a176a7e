"""Unlearning metrics, and a command line that prints them for any checkpoint.

    python evaluate.py checkpoints/cifar10-resnet18.pt --forget-class 3

UA   = 100 - accuracy on the forget classes' training images  (higher: more forgotten)
MIA  = MIA-efficacy, Jia et al. 2023 (confidence-based): a threshold on the softmax probability
       of the true label is fit to tell retained training images (members) from retained test
       images (non-members), equal counts; MIA is the share of the forget classes' training
       images that it calls non-members                       (higher: more forgotten)
       attack acc: that attack's accuracy on a held-out half (about 50: MIA is noise);
       MIA - Retrain: read MIA beside Retrain's (far above it is over-unlearning)
RA   = accuracy on the retained classes' training images      (higher: more retained)
TA   = test accuracy on the retained classes                  (higher: more retained)

With --depth, measures that accuracy cannot fake (a model can hide a class by its head alone):
relearn steps = SGD steps on a few forget images until the class is back    (more: deeper forgetting)
probe acc     = a linear probe on the features finds the forget class, %    (lower: deeper forgetting)
NCM acc       = a 10-shot nearest-class-mean classifier on the features finds it, %   (lower: deeper)
depth score   = NCM acc on the scale 0 = hidden (the base's features), 1 = Retrain (unlearn.py, with retrain)
"""
import copy
import math
import statistics

import torch
import torch.nn.functional as F

from checkpoints import check_checkpoint_fits, load_checkpoint, model_from_checkpoint
from cli import ArgumentParser, UserError, autocast, pick_device, positive_int, run_cli
from data import check_classes, load_dataset, make_batch, predict, training_index
from models import to_device

# -----------------------------------------------------------------------------
# metrics


def percent(correct):
    return 100 * correct.float().mean().item() if len(correct) else float("nan")


def true_label_log_prob(logits, labels):
    """log p(true label), in float64: a monotone stand-in for the confidence p that has no
    float32 ties at p = 1.0, so the threshold can separate very confident predictions."""
    return torch.log_softmax(logits.double(), dim=1).gather(1, labels[:, None]).squeeze(1)


def fit_threshold(member_scores, nonmember_scores):
    """The threshold t that best separates the two sets by 'score >= t means member' (1-D, no scikit-learn)."""
    scores = torch.cat([member_scores, nonmember_scores])
    is_member = torch.cat([torch.ones_like(member_scores), torch.zeros_like(nonmember_scores)])
    scores, order = scores.sort()
    is_member = is_member[order]
    # cut k: scores[:k] are called non-members, scores[k:] members
    members_below = torch.cat([is_member.new_zeros(1), is_member.cumsum(0)])
    nonmembers_below = torch.arange(len(scores) + 1, device=scores.device) - members_below
    correct = nonmembers_below + (members_below[-1] - members_below)
    valid = torch.ones_like(correct, dtype=torch.bool)
    valid[1:-1] = scores[1:] > scores[:-1]  # cut only between different scores
    k = int(torch.where(valid, correct, correct.new_full((), -1)).argmax())
    if k == 0:
        return scores[0].item()
    if k == len(scores):
        return float("inf")
    return (scores[k - 1].item() + scores[k].item()) / 2


def mia_efficacy(train_scores_retain, test_scores_retain, forget_scores, seed=0):
    """Share (%) of forget-class training images the member/non-member threshold calls non-members."""
    n = min(len(train_scores_retain), len(test_scores_retain))
    generator = torch.Generator().manual_seed(seed)  # equal counts, drawn the same way every run
    members = train_scores_retain[torch.randperm(len(train_scores_retain), generator=generator)[:n].to(train_scores_retain.device)]
    nonmembers = test_scores_retain[torch.randperm(len(test_scores_retain), generator=generator)[:n].to(test_scores_retain.device)]
    threshold = fit_threshold(members, nonmembers)
    return percent(forget_scores < threshold)


def attack_accuracy(members, nonmembers, seed=0):
    """How well the threshold attack tells members from non-members at all: fit on one half of
    each (equal counts, drawn with seed), accuracy (%) on the other half. Near 50, MIA-efficacy is
    noise: the model treats its training images and unseen images alike."""
    n = min(len(members), len(nonmembers)) // 2
    if n == 0:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    members = members[torch.randperm(len(members), generator=generator).to(members.device)]
    nonmembers = nonmembers[torch.randperm(len(nonmembers), generator=generator).to(nonmembers.device)]
    threshold = fit_threshold(members[:n], nonmembers[:n])
    held_out = torch.cat([members[n:2 * n] >= threshold, nonmembers[n:2 * n] < threshold])
    return percent(held_out)


def gaps_to_retrain(rows, noise_sigmas=3):
    """With a retrain row: each row's MIA_gap = its MIA - Retrain's and avg_gap, the mean absolute
    gap to Retrain over UA, MIA, RA and TA (as SalUn reports it); and the methods whose MIA is far
    above Retrain's (over-unlearning: the forget images look less like training data than unseen
    images do, which an attacker can see too). Far = more than noise_sigmas binomial standard
    errors of a share measured on the forget images (at least 1 point): a gap sampling noise of
    the forget set does not explain. Returns the names of those methods."""
    if "MIA" not in rows.get("retrain", {}):
        return []
    retrain, n = rows["retrain"]["MIA"], rows["retrain"].get("forget_count", 0)
    p = retrain / 100
    far = max(1.0, 100 * noise_sigmas * math.sqrt(p * (1 - p) / n)) if n else 1.0
    for row in rows.values():
        if "MIA" in row:
            row["MIA_gap"] = row["MIA"] - retrain
            row["avg_gap"] = statistics.fmean(abs(row[k] - rows["retrain"][k]) for k in ("UA", "MIA", "RA", "TA"))
    return [name for name, row in rows.items() if name not in ("base", "retrain") and row.get("MIA_gap", 0) > far]


def forget_mask(labels, forget_classes):
    return torch.isin(labels, torch.tensor(list(forget_classes), dtype=torch.long, device=labels.device))


def unlearning_metrics(model, data, forget_classes, train_index=None, forget_index=None):
    """UA, MIA, RA, TA and the forget classes' test accuracy, in percent.

    train_index: the training images the model was trained on (the --train-limit subset); all by default.
    forget_index: the forget images, when they are a random sample rather than whole classes
    (forget_classes then empty): UA and MIA on them, RA on the other training images, TA on the
    whole test set, and no forget test accuracy (no test image is forgotten)."""
    device = data.train_images.device
    if train_index is None:
        train_index = torch.arange(len(data.train_labels))
    train_index = train_index.to(device)
    train_labels = data.train_labels[train_index]
    train_logits = predict(model, data, data.train_images[train_index])
    test_logits = predict(model, data, data.test_images)
    train_forget = (forget_mask(train_labels, forget_classes) if forget_index is None
                    else torch.isin(train_index, forget_index.to(device)))
    test_forget = forget_mask(data.test_labels, forget_classes)
    train_correct = train_logits.argmax(1) == train_labels
    test_correct = test_logits.argmax(1) == data.test_labels
    train_scores = true_label_log_prob(train_logits, train_labels)
    test_scores = true_label_log_prob(test_logits, data.test_labels)
    metrics = dict(
        UA=100 - percent(train_correct[train_forget]),
        MIA=mia_efficacy(train_scores[~train_forget], test_scores[~test_forget], train_scores[train_forget]),
        MIA_attack_acc=attack_accuracy(train_scores[~train_forget], test_scores[~test_forget]),
        RA=percent(train_correct[~train_forget]),
        TA=percent(test_correct[~test_forget]),
        forget_test_acc=percent(test_correct[test_forget]),
        forget_count=int(train_forget.sum()),
    )
    if not forget_classes:
        del metrics["forget_test_acc"]
    return metrics

# -----------------------------------------------------------------------------
# forgetting depth: has the class left the features, or only the head?
#
# Accuracy cannot tell forgetting from hiding: zero the forget class's head row and push its bias
# to -1e9, and UA = 100 while the features still hold the class. These two measures look past the head.
#   relearn_steps  SGD steps on a few forget images until the class is recognised again (fewer: shallower)
#   probe_acc      a linear probe on the frozen features tells forget-class images from retained ones
#                  (higher: the class is still in the features; about 50: they cannot tell it apart)


def hide_classes(model, classes):
    """Hiding, not forgetting: the classes' head rows get weight 0 and bias -1e9, in place, so they are
    never predicted (UA 100) while the features are the base model's. The 0 end of the depth scale."""
    rows = torch.tensor(list(classes), dtype=torch.long, device=model.head.weight.device)
    with torch.no_grad():
        model.head.weight[rows] = 0
        model.head.bias[rows] = -1e9
    return model


def reset_head_rows(model, classes):
    """Set the classes' head rows (weight and bias) to the mean of the other rows, in place.

    Without this a bias of -1e9 (pure hiding) could not be undone by any number of optimizer steps,
    and relearn_steps would call the shallowest model the deepest. The mean row's logit is the mean
    of the other logits, never above their maximum, so a reset class is relearned, never inherited."""
    head = model.head
    rows = torch.tensor(list(classes), dtype=torch.long, device=head.weight.device)
    others = ~torch.isin(torch.arange(head.out_features, device=rows.device), rows)
    with torch.no_grad():
        head.weight[rows] = head.weight[others].mean(0)
        if head.bias is not None:
            head.bias[rows] = head.bias[others].mean()


def recognition(model, data, index, forget_classes, n_forget):
    """Forget-class test accuracy minus the share of retained test images called a forget class (%).

    index: n_forget forget-class test images, then retained ones. The false alarms are subtracted
    because a model that calls every image the forget class scores 100 on the accuracy alone: one
    that has seen nothing relearns that way through its bias, in about as many steps as Retrain."""
    predicted = predict(model, data, data.test_images[index]).argmax(1)  # (N,)
    correct = predicted[:n_forget] == data.test_labels[index[:n_forget]]
    return percent(correct) - percent(forget_mask(predicted[n_forget:], forget_classes))


def relearn_steps(model, data, forget_classes, train_index=None, share=0.01, minimum=10, cap=100, lr=0.01,
                  batch_size=128, target=50.0, reset_head=True, seed=0):
    """SGD steps on the whole model (a copy) until the forget classes are recognised again.

    The relearning set is share (1%) of the forget classes' training images in train_index, at least
    minimum (10), plus as many retained ones, drawn with seed. Each step is one augmented batch of at
    most batch_size of them (all of them when they fit), plain SGD at lr: without momentum or Adam's
    normalisation a step is as large as the gradient, and a model that still holds the class gives
    large, aligned gradients (Adam made the first steps of every model alike).
    Recognised: recognition() >= target, i.e. the forget classes' test accuracy minus the share of
    an equal number of retained test images (drawn with seed) called a forget class. It is checked
    before the first step and after every step; the first step count where it holds is returned.
    cap (default 100) is returned when it does not hold within cap steps: read it as 'cap or more'.
    With reset_head (default) the forget rows of the head are first reset to the mean row
    (reset_head_rows), so the count measures what the features kept, not what the head hides, and
    the count starts from a head that does not predict the class. The input model is untouched;
    the same seed gives the same count on the CPU.
    """
    device = data.train_images.device
    train_index = torch.arange(len(data.train_labels)) if train_index is None else train_index
    train_index = train_index.to(device)
    is_forget = forget_mask(data.train_labels[train_index], forget_classes)
    forget, retain = train_index[is_forget], train_index[~is_forget]
    test_forget = forget_mask(data.test_labels, forget_classes)
    test_index = torch.arange(len(data.test_labels), device=device)
    if not len(forget) or not len(retain) or not test_forget.any() or test_forget.all():
        raise UserError("relearn_steps needs forget-class and retained images in both the training and test sets")
    generator = torch.Generator().manual_seed(seed)  # the relearning set, the check set, batches and augmentation
    n = min(max(math.ceil(share * len(forget)), minimum), len(forget), len(retain))
    draw = lambda index, k: index[torch.randperm(len(index), generator=generator)[:k].to(device)]
    pool = torch.cat([draw(forget, n), draw(retain, n)])  # (2n,)
    n_check = int(test_forget.sum())
    check = torch.cat([test_index[test_forget], draw(test_index[~test_forget], n_check)])  # (<= 2 n_check,)

    model = copy.deepcopy(model)
    if reset_head:
        reset_head_rows(model, forget_classes)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(cap):
        if recognition(model, data, check, forget_classes, n_check) >= target:
            return step
        batch = draw(pool, batch_size)
        x, y = make_batch(data, data.train_images, batch, generator), data.train_labels[batch]
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return cap


def probe_accuracy(model, data, forget_classes, train_index=None, seed=0, max_train=10000, steps=100, lr=0.05,
                   weight_decay=1e-3):
    """Balanced accuracy (%) on the test images of a logistic-regression probe on the frozen features
    that tells forget-class images from retained ones. About 50: the features cannot tell the class
    apart. Retrain's features often still can (a class never seen still looks different), so compare
    a method's probe accuracy with Retrain's, not with 50.

    The probe is fit on at most max_train of the training images in train_index (drawn with seed;
    the probe has D + 1 weights, more images add only time), on standardised features, with a
    class-balanced BCE loss plus weight_decay * |w|^2, zero-initialised, full-batch Adam for steps steps.
    """
    device = data.train_images.device
    train_index = torch.arange(len(data.train_labels)) if train_index is None else train_index
    train_index = train_index.to(device)
    if len(train_index) > max_train:
        generator = torch.Generator().manual_seed(seed)
        train_index = train_index[torch.randperm(len(train_index), generator=generator)[:max_train].to(device)]
    y_train = forget_mask(data.train_labels[train_index], forget_classes)          # (N,) bool
    y_test = forget_mask(data.test_labels, forget_classes)
    if not y_train.any() or y_train.all() or not y_test.any() or y_test.all():
        raise UserError("probe_accuracy needs forget-class and retained images in both the training and test sets")
    x_train = predict(model, data, data.train_images[train_index], features=True)  # (N, D)
    x_test = predict(model, data, data.test_images, features=True)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    # each class carries half the loss, however many images it has
    sample_weight = torch.where(y_train, 0.5 / y_train.sum(), 0.5 / (~y_train).sum())  # (N,)
    w = torch.zeros(x_train.shape[1], device=device, requires_grad=True)
    b = torch.zeros((), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            bce = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train.float(), reduction="none")
            loss = (sample_weight * bce).sum() + weight_decay * w.square().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        called = x_test @ w + b > 0
    return (percent(called[y_test]) + percent(~called[~y_test])) / 2


def ncm_recognition(model, data, forget_classes, train_index=None, shots=10, draws=5, seed=0):
    """Share (%) of the forget classes' test images that a few-shot nearest-class-mean classifier
    on the model's penultimate features puts in their own class (higher: the features still hold
    the class). Reads past the head, like the probes, but with only `shots` images per class, so a
    class the features never learned stays hard to find (a full-data linear probe finds even that).

    Each draw takes `shots` random training images (from train_index) of every class; a class's
    prototype is the mean of their L2-normalised features, and each test image goes to the prototype
    of highest cosine similarity. The result is the mean over `draws` draws, with seed.
    """
    device = data.train_images.device
    train_index = torch.arange(len(data.train_labels)) if train_index is None else train_index
    train_index = train_index.to(device)
    test_forget = forget_mask(data.test_labels, forget_classes)
    generator = torch.Generator().manual_seed(seed)
    by_class = [train_index[data.train_labels[train_index] == c] for c in range(data.num_classes)]
    if any(len(index) < shots for index in by_class) or not test_forget.any():
        raise UserError(f"ncm_recognition needs {shots} training images of every class and forget-class test images")
    picks = torch.stack([torch.stack([index[torch.randperm(len(index), generator=generator)[:shots].to(device)]
                                      for index in by_class]) for _ in range(draws)])       # (draws, classes, shots)
    unique, where = picks.flatten().unique(return_inverse=True)  # each image's features computed once
    shot_features = F.normalize(predict(model, data, data.train_images[unique], features=True), dim=1)[where]
    prototypes = F.normalize(shot_features.view(*picks.shape, -1).mean(2), dim=2)            # (draws, classes, D)
    test_features = F.normalize(predict(model, data, data.test_images[test_forget], features=True), dim=1)  # (N, D)
    assigned = torch.einsum("nd,kcd->knc", test_features, prototypes).argmax(2)                 # (draws, N)
    return percent(assigned == data.test_labels[test_forget])


def depth_metrics(model, data, forget_classes, train_index=None, seed=0):
    """relearn_steps, probe_acc and ncm_acc with their defaults: the one call unlearn.py makes."""
    return dict(relearn_steps=relearn_steps(model, data, forget_classes, train_index, seed=seed),
                probe_acc=probe_accuracy(model, data, forget_classes, train_index, seed=seed),
                ncm_acc=ncm_recognition(model, data, forget_classes, train_index, seed=seed))


def add_depth_scores(rows, measure="ncm_acc"):
    """depth_score on a scale fixed by two models of the same run: 0 = the hidden model (the base's
    features: the base row serves, its features are the hidden model's) and 1 = Retrain.
    score = (hidden - method) / (hidden - Retrain) of the measure. Needs a base and a retrain row
    with the measure; past 1 the features lost more of the class than Retrain's, below 0 less."""
    if measure not in rows.get("base", {}) or measure not in rows.get("retrain", {}):
        return rows
    hidden, retrain = rows["base"][measure], rows["retrain"][measure]
    if hidden == retrain:  # no scale to read on
        return rows
    for row in rows.values():
        if measure in row:
            row["depth_score"] = (hidden - row[measure]) / (hidden - retrain)
    return rows

# -----------------------------------------------------------------------------
# tables


COLUMNS = [("UA", "UA", "{:.2f}"), ("MIA", "MIA", "{:.2f}"), ("RA", "RA", "{:.2f}"), ("TA", "TA", "{:.2f}"),
           ("forget_test_acc", "forget test acc", "{:.2f}"), ("MIA_gap", "MIA - Retrain", "{:+.2f}"),
           ("MIA_attack_acc", "attack acc", "{:.2f}"), ("avg_gap", "avg gap to Retrain", "{:.2f}"), ("seconds", "seconds", "{:.1f}"),
           ("time_vs_retrain", "time / Retrain", "{:.3f}"), ("step_time_vs_finetune", "step time / finetune", "{:.2f}"), ("trainable_params", "trainable params", "{:,}"),
           ("trainable_share", "trainable share", "{:.4f}"), ("sparsity", "sparsity", "{:.4f}"),
           ("inference_time_ratio", "inference time / base", "{:.2f}"), ("peak_memory_mb", "peak GPU MB", "{:.0f}"),
           ("relearn_steps", "relearn steps", "{:.4g}"), ("probe_acc", "probe acc", "{:.2f}"),
           ("ncm_acc", "10-shot NCM acc", "{:.2f}"), ("depth_score", "depth score", "{:.2f}")]


def markdown_table(rows, spread=None):
    """rows: {name: {metric: value}} -> a Markdown table with the columns that any row has;
    with spread (the same shape), each cell reads 'value ± spread'."""
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows.values())]
    lines = ["| method | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for key, _, fmt in columns:
            cell = fmt.format(row[key]) if row.get(key) is not None else ""
            if spread is not None and spread.get(name, {}).get(key) is not None and cell:
                cell += " ± " + fmt.replace("+", "").format(spread[name][key])
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(runs):
    """runs: a list of rows dicts, one per seed -> (mean rows, standard-deviation rows), over every
    number that all runs have (sample standard deviation; 0 for a single run)."""
    mean, spread = {}, {}
    for name in runs[0]:
        mean[name], spread[name] = {}, {}
        for key, first in runs[0][name].items():
            values = [run.get(name, {}).get(key) for run in runs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                mean[name][key] = statistics.fmean(values)
                spread[name][key] = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread

# -----------------------------------------------------------------------------
# command line


def main():
    parser = ArgumentParser(description="Print the unlearning metrics of a checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("--forget-class", type=int, nargs="+", required=True, metavar="K")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-limit", type=positive_int, default=None,
                        help="the training subset to measure on (default: the checkpoint's own)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--depth", action="store_true",
                        help="also measure forgetting depth: relearn steps and linear-probe accuracy (slower)")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    check_classes(args.forget_class, ckpt["num_classes"], "--forget-class")  # before any data is read
    device = pick_device(args.device)
    data = load_dataset(ckpt["dataset"], args.data_dir)
    check_checkpoint_fits(ckpt, data, args.checkpoint)
    model = to_device(model_from_checkpoint(ckpt, args.checkpoint), device)
    data.mean, data.std = ckpt["mean"], ckpt["std"]  # the normalisation the model was trained with
    train_limit = args.train_limit or ckpt.get("args", {}).get("train_limit")
    index = training_index(data, (), train_limit)
    metrics = unlearning_metrics(model, data.to(device), args.forget_class, index)
    if args.depth:
        metrics.update(depth_metrics(model, data, args.forget_class, index))
    print(markdown_table({args.checkpoint: metrics}))


if __name__ == "__main__":
    run_cli(main)
