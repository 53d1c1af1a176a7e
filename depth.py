"""Forgetting depth: has the class left the features, or only the head?

Accuracy cannot tell forgetting from hiding: zero the forget class's head row and push its bias to
-1e9, and UA = 100 while the features still hold the class. These measures look past the head:
    relearn_steps  SGD steps on a few forget images until the class is recognised again (fewer: shallower)
    probe_acc      a linear probe on the frozen features tells forget-class images from retained ones
    ncm_acc_50     a 50-shot nearest-class-mean classifier on the features finds the forget class
                   (ncm_acc: 10 shots, ncm_acc_5: 5)
    depth_score    ncm_acc_50 on the scale 0 = hidden (the base's features), 1 = Retrain, from one run's rows
"""
import copy
import math

import torch
import torch.nn.functional as F

from cli import UserError, autocast
from data import forget_mask, index_or_all, make_batch, percent, predict


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


def relearn(model, data, forget_classes, train_index=None, share=0.01, minimum=10, cap=100, lr=0.01,
            batch_size=128, target=50.0, reset_head=True, seed=0, at=(1, 5, 20)):
    """Relearn the forget classes with SGD on the whole model (a copy); return (steps, after).

    steps: SGD steps until the classes are recognised again (fewer: shallower forgetting). after:
    recognition() after each of the `at` step counts, as relearn_<k>, and relearn_auc, its mean
    over steps 1..max(at): graded readings that do not saturate at the cap as the count can.

    The relearning set is share (1%) of the forget classes' training images in train_index, at least
    minimum (10), plus as many retained ones, drawn with seed. Each step is one augmented batch of at
    most batch_size of them (all of them when they fit), plain SGD at lr: without momentum or Adam's
    normalisation a step is as large as the gradient, and a model that still holds the class gives
    large, aligned gradients (Adam made the first steps of every model alike).
    Recognised: recognition() >= target, i.e. the forget classes' test accuracy minus the share of
    an equal number of retained test images (drawn with seed) called a forget class. It is checked
    before the first step and after every step; the first step count where it holds is the count.
    cap (default 100) is returned when it does not hold within cap steps: read it as 'cap or more'.
    With reset_head (default) the forget rows of the head are first reset to the mean row
    (reset_head_rows), so the count measures what the features kept, not what the head hides, and
    the count starts from a head that does not predict the class. The input model is untouched;
    the same seed gives the same readings on the CPU.
    """
    device = data.train_images.device
    train_index = index_or_all(data, train_index)
    is_forget = forget_mask(data.train_labels[train_index], forget_classes)
    forget, retain = train_index[is_forget], train_index[~is_forget]
    test_forget = forget_mask(data.test_labels, forget_classes)
    test_index = torch.arange(len(data.test_labels), device=device)
    if not len(forget) or not len(retain) or not test_forget.any() or test_forget.all():
        raise UserError("relearning needs forget-class and retained images in both the training and test sets")
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
    steps, curve = None, []  # curve[k]: recognition after k steps
    for step in range(max(cap, *at) + 1):
        curve.append(recognition(model, data, check, forget_classes, n_check))
        if steps is None and curve[-1] >= target and step <= cap:
            steps = step
        if (steps is not None or step >= cap) and step >= max(at):
            break
        batch = draw(pool, batch_size)
        x, y = make_batch(data, data.train_images, batch, generator), data.train_labels[batch]
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = {f"relearn_{k}": curve[k] for k in at}
    return (cap if steps is None else steps), dict(after, relearn_auc=sum(curve[1:max(at) + 1]) / max(at))


def relearn_steps(model, data, forget_classes, train_index=None, **settings):
    """SGD steps until the forget classes are recognised again (relearn(); `cap` or more: cap)."""
    return relearn(model, data, forget_classes, train_index, **settings)[0]


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
    train_index = index_or_all(data, train_index)
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
    train_index = index_or_all(data, train_index)
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


@torch.no_grad()
def feature_similarity(model, reference, data, forget_classes):
    """Linear CKA (0 to 1) of the model's penultimate features of the forget classes' test images with
    the reference model's: 1 when they are the same up to rotation and scale. With the base model as
    reference (cka_base), how much of the base's view of the forgotten classes the model kept."""
    images = data.test_images[forget_mask(data.test_labels, forget_classes)]
    x = predict(model, data, images, features=True).double()      # (N, D)
    y = predict(reference, data, images, features=True).double()  # (N, D')
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm()))


NCM_SHOTS = (5, 10, 50)  # 10 is ncm_acc, the others ncm_acc_<shots> (50 only where every class has 50 images)


def depth_metrics(model, data, forget_classes, train_index=None, seed=0, reference=None):
    """Every depth measure with its defaults: the one call unlearn.py and evaluate.py make.
    reference: the base model, where known, for cka_base."""
    steps, after = relearn(model, data, forget_classes, train_index, seed=seed)
    row = dict(relearn_steps=steps, **after,
               probe_acc=probe_accuracy(model, data, forget_classes, train_index, seed=seed))
    labels = data.train_labels[index_or_all(data, train_index)]
    fewest = int(torch.bincount(labels, minlength=data.num_classes).min())
    for shots in NCM_SHOTS:
        if shots <= max(fewest, 10):  # 10 always: too few images is an error there, as before
            key = "ncm_acc" if shots == 10 else f"ncm_acc_{shots}"
            row[key] = ncm_recognition(model, data, forget_classes, train_index, shots=shots, seed=seed)
    if reference is not None:
        row["cka_base"] = feature_similarity(model, reference, data, forget_classes)
    return row


DEPTH_MEASURES = ("relearn_steps", "relearn_1", "relearn_5", "relearn_20", "relearn_auc", "probe_acc",
                  "ncm_acc_5", "ncm_acc", "ncm_acc_50", "cka_base")


def separation(per_seed):
    """How well each depth measure tells the two ends of the scale apart, over seeds: the hidden end
    (the base row: the hidden model's features are the base's) against Retrain. per_seed: {seed:
    rows}. Returns {measure: dict(hidden, hidden_std, retrain, retrain_std, separation)}, where
    separation = |hidden - retrain| / the larger standard deviation (inf when both are 0): above 1,
    the two ends differ by more than one seed's spread."""
    runs = [rows for rows in per_seed.values() if "base" in rows and "retrain" in rows]
    table = {}
    for measure in DEPTH_MEASURES:
        if len(runs) < 2 or any(measure not in rows["base"] or measure not in rows["retrain"] for rows in runs):
            continue
        ends = {end: torch.tensor([float(rows[end][measure]) for rows in runs], dtype=torch.float64)
                for end in ("base", "retrain")}
        spread = max(float(ends["base"].std()), float(ends["retrain"].std()))
        gap = abs(float(ends["base"].mean() - ends["retrain"].mean()))
        table[measure] = dict(hidden=float(ends["base"].mean()), hidden_std=float(ends["base"].std()),
                              retrain=float(ends["retrain"].mean()), retrain_std=float(ends["retrain"].std()),
                              separation=gap / spread if spread else (math.inf if gap else 0.0))
    return table


# The score's measure, chosen by data (RESULTS.md, "Forgetting depth: CIFAR-10"): over three seeds on
# both datasets, 50-shot NCM set the hidden and Retrain ends furthest apart in seed spreads among
# the measures that look for the class (CKA measures change, not forgetting). 10 shots where some
# class has fewer than 50 training images.
SCORE_MEASURES = ("ncm_acc_50", "ncm_acc")
# A second readout that is not a nearest-class-mean probe, so that a method cannot pass by moving the
# class means alone: the linear probe, which on the converged Fashion-MNIST bases (RESULTS.md, "Which
# measure reads depth on converged bases") set the ends 8.3 seed spreads apart over three seeds, the most
# of the non-NCM measures that look for the class (relearning 3.4-6.9)
SECOND_MEASURES = ("probe_acc",)
SCORES = {"depth_score": SCORE_MEASURES, "depth_score_2": SECOND_MEASURES}  # score key: the measures it may read


def add_depth_scores(rows, scores=SCORES):
    """Depth scores on a scale fixed by two models of the same run: 0 = the hidden model (the base's
    features: the base row serves, its features are the hidden model's) and 1 = Retrain.
    Each score (key) = (hidden - method) / (hidden - Retrain) of the first of its measures that both
    ends have; each scored row names it in depth_measure (depth_measure_2, ...). Past 1 the features
    lost more of the class than Retrain's, below 0 less. Without a base and a retrain row the rows
    are returned unscored."""
    ends = rows.get("base", {}), rows.get("retrain", {})
    for key, measures in scores.items():
        measure = next((m for m in measures if all(m in end for end in ends)), None)
        if measure is None or ends[0][measure] == ends[1][measure]:  # no scale to read on
            continue
        hidden, retrain = ends[0][measure], ends[1][measure]
        for row in rows.values():
            if measure in row:
                row[key] = (hidden - row[measure]) / (hidden - retrain)
                row[key.replace("score", "measure")] = measure
    return rows
