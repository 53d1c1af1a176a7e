"""Unlearning metrics, and a command line that prints them for any checkpoint.

    python evaluate.py checkpoints/cifar10-resnet18.pt --forget-class 3

UA   = 100 - accuracy on the forget classes' training images  (higher: more forgotten)
MIA  = MIA-efficacy, Jia et al. 2023 (confidence-based): a threshold on the softmax probability
       of the true label is fit to tell retained training images (members) from retained test
       images (non-members), equal counts; MIA is the share of the forget classes' training
       images that it calls non-members                       (higher: more forgotten)
RA   = accuracy on the retained classes' training images      (higher: more retained)
TA   = test accuracy on the retained classes                  (higher: more retained)
"""
import torch

from train import (ArgumentParser, check_classes, load_checkpoint, load_dataset, model_from_checkpoint,
                   pick_device, predict, run_cli, training_index)

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


def unlearning_metrics(model, data, forget_classes, train_index=None):
    """UA, MIA, RA, TA and the forget classes' test accuracy, in percent.

    train_index: the training images the model was trained on (the --train-limit subset); all by default."""
    device = data.train_images.device
    forget = torch.tensor(list(forget_classes), dtype=torch.long, device=device)
    if train_index is None:
        train_index = torch.arange(len(data.train_labels))
    train_index = train_index.to(device)
    train_labels = data.train_labels[train_index]
    train_logits = predict(model, data, data.train_images[train_index])
    test_logits = predict(model, data, data.test_images)
    train_forget, test_forget = torch.isin(train_labels, forget), torch.isin(data.test_labels, forget)
    train_correct = train_logits.argmax(1) == train_labels
    test_correct = test_logits.argmax(1) == data.test_labels
    train_scores = true_label_log_prob(train_logits, train_labels)
    test_scores = true_label_log_prob(test_logits, data.test_labels)
    return dict(
        UA=100 - percent(train_correct[train_forget]),
        MIA=mia_efficacy(train_scores[~train_forget], test_scores[~test_forget], train_scores[train_forget]),
        RA=percent(train_correct[~train_forget]),
        TA=percent(test_correct[~test_forget]),
        forget_test_acc=percent(test_correct[test_forget]),
    )

# -----------------------------------------------------------------------------
# tables


COLUMNS = [("UA", "UA", "{:.2f}"), ("MIA", "MIA", "{:.2f}"), ("RA", "RA", "{:.2f}"), ("TA", "TA", "{:.2f}"),
           ("forget_test_acc", "forget test acc", "{:.2f}"), ("seconds", "seconds", "{:.1f}"),
           ("time_vs_retrain", "time / Retrain", "{:.3f}"), ("trainable_params", "trainable params", "{:,}"),
           ("trainable_share", "trainable share", "{:.4f}"), ("sparsity", "sparsity", "{:.4f}"),
           ("inference_time_ratio", "inference time / base", "{:.2f}"), ("peak_memory_mb", "peak GPU MB", "{:.0f}"),
           ("relearn_steps", "relearn steps", "{}"), ("probe_acc", "probe acc", "{:.2f}")]


def markdown_table(rows):
    """rows: {name: {metric: value}} -> a Markdown table with the columns that any row has."""
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows.values())]
    lines = ["| method | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# command line


def main():
    parser = ArgumentParser(description="Print the unlearning metrics of a checkpoint.")
    parser.add_argument("checkpoint")
    parser.add_argument("--forget-class", type=int, nargs="+", required=True, metavar="K")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="the training subset to measure on (default: the checkpoint's own)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    data = load_dataset(ckpt["dataset"], args.data_dir)
    check_classes(args.forget_class, data.num_classes, "--forget-class")
    model = model_from_checkpoint(ckpt, args.checkpoint).to(device)
    data.mean, data.std = ckpt["mean"], ckpt["std"]  # the normalisation the model was trained with
    train_limit = args.train_limit or ckpt.get("args", {}).get("train_limit")
    index = training_index(data, (), train_limit)
    metrics = unlearning_metrics(model, data.to(device), args.forget_class, index)
    print(markdown_table({args.checkpoint: metrics}))


if __name__ == "__main__":
    run_cli(main)
