"""Unlearning metrics, and a command line that prints them for any checkpoint (report.py makes the tables).

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

With --depth, the measures of depth.py, which accuracy cannot fake (a model can hide a class by its
head alone).
"""
import math
import statistics

import torch

from checkpoints import check_checkpoint_fits, load_checkpoint, model_from_checkpoint
from cli import ArgumentParser, pick_device, positive_int, run_cli
from data import (DATASET_HELP, check_classes, check_dataset_name, class_numbers, forget_mask, index_or_all,
                  load_dataset, percent, predict, training_index)
from depth import depth_metrics
from models import to_device
from report import markdown_table

# -----------------------------------------------------------------------------
# metrics


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


def equal_draw(members, nonmembers, seed=0):
    """As many members as non-members (the smaller count), each in a random order drawn with seed,
    the same way every run."""
    n = min(len(members), len(nonmembers))
    generator = torch.Generator().manual_seed(seed)
    return (members[torch.randperm(len(members), generator=generator)[:n].to(members.device)],
            nonmembers[torch.randperm(len(nonmembers), generator=generator)[:n].to(nonmembers.device)])


def mia_efficacy(train_scores_retain, test_scores_retain, forget_scores, seed=0):
    """Share (%) of forget-class training images the member/non-member threshold calls non-members."""
    threshold = fit_threshold(*equal_draw(train_scores_retain, test_scores_retain, seed))
    return percent(forget_scores < threshold)


def attack_accuracy(members, nonmembers, seed=0):
    """How well the threshold attack tells members from non-members at all: fit on one half of
    each (equal counts, drawn with seed), accuracy (%) on the other half. Near 50, MIA-efficacy is
    noise: the model treats its training images and unseen images alike."""
    members, nonmembers = equal_draw(members, nonmembers, seed)
    n = len(members) // 2
    if n == 0:
        return float("nan")
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


def unlearning_metrics(model, data, forget_classes, train_index=None, forget_index=None):
    """UA, MIA, RA, TA and the forget classes' test accuracy, in percent.

    train_index: the training images the model was trained on (the --train-limit subset); all by default.
    forget_index: the forget images, when they are a random sample rather than whole classes
    (forget_classes then empty): UA and MIA on them, RA on the other training images, TA on the
    whole test set, and no forget test accuracy (no test image is forgotten)."""
    device = data.train_images.device
    train_index = index_or_all(data, train_index)
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
# command line


def main():
    parser = ArgumentParser(description="Print the unlearning metrics of a checkpoint.",
                            epilog="example:\n  python evaluate.py checkpoints/unlearned/cifar10-resnet18-forget3-"
                            "prunelora.pt --forget-class 3 --depth")
    parser.add_argument("checkpoint", help="a checkpoint of train.py or unlearn.py (checkpoints/unlearned/)")
    parser.add_argument("--forget-class", nargs="+", required=True, metavar="K",
                        help="the classes to measure as forgotten, by number or name (e.g. 3 or cat)")
    parser.add_argument("--dataset", default=None,
                        help=f"{DATASET_HELP} (default: the checkpoint's dataset)")
    parser.add_argument("--data-dir", default="data", help="where torchvision datasets and caches live")
    parser.add_argument("--train-limit", type=positive_int, default=None,
                        help="the training subset to measure on (default: the checkpoint's own)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda where PyTorch sees a GPU, else cpu")
    parser.add_argument("--depth", action="store_true",
                        help="also measure forgetting depth: relearn steps, linear-probe and NCM accuracy (slower)")
    args = parser.parse_args()
    if args.dataset is not None:
        check_dataset_name(args.dataset)
    ckpt = load_checkpoint(args.checkpoint)
    names = ckpt.get("classes") or [str(c) for c in range(ckpt["num_classes"])]  # older checkpoints: numbers only
    forget_class = class_numbers(args.forget_class, names, "--forget-class")  # before any data is read
    check_classes(forget_class, ckpt["num_classes"], "--forget-class")
    device = pick_device(args.device)
    data = load_dataset(args.dataset or ckpt["dataset"], args.data_dir)
    check_checkpoint_fits(ckpt, data, args.checkpoint)
    model = to_device(model_from_checkpoint(ckpt, args.checkpoint), device)
    data.mean, data.std = ckpt["mean"], ckpt["std"]  # the normalisation the model was trained with
    train_limit = args.train_limit or ckpt.get("args", {}).get("train_limit")
    index = training_index(data, (), train_limit)
    metrics = unlearning_metrics(model, data.to(device), forget_class, index)
    if args.depth:
        metrics.update(depth_metrics(model, data, forget_class, index))
    print(markdown_table({args.checkpoint: metrics}))


if __name__ == "__main__":
    run_cli(main)
