"""The tied head (--tie-head 1 and the options that change it; deep.py lists them all): while the LoRA
factors train, every image is classified by the cosine of its penultimate feature to running class
means instead of by the head, each forget image toward a retained class, so that the forgetting has to
happen in the features; the head is fitted afterwards (fit_head). The fix of "An Illusion of
Unlearning?" (arXiv 2604.08271) for a head that hides a class its features keep."""
import torch
import torch.nn.functional as F

from data import forget_mask, predict
from deep import HeadInputLoss, class_prototypes

# -----------------------------------------------------------------------------
# the loss


class TiedHeadLoss(HeadInputLoss):
    """loss_fn(logits, labels) for fit() on retained and forget images together that leaves the head's
    logits unused: the scores are SCALE * cos(f(x), m_c) for every class c, m_c a running mean of the
    class's normalised features (the base's class prototypes at first, then after each step
    momentum * m_c + (1 - momentum) * the batch's normalised mean), the target of a retained image its
    class, of a forget image its nearest retained class by these scores. The forget classes keep their
    own means, so a forget image only scores as retained once its feature is nearer a retained class's
    mean than its own class's. The head gets no gradient; fit_head() fits it afterwards. With
    through_head set (--repair-epochs), the retained images are scored by the head's logits instead
    (cross-entropy, the head trains) while the forget images stay tied. With spread (--tie-spread), the
    forget images of a batch go to the retained classes in equal numbers (balanced_assignment). With
    match W (--tie-match), + W * |mu_f - mu_r|^2 / |mu_r|^2 on the raw features, mu_r the batch's
    retained mean (held), mu_f = momentum * the last mu_f + (1 - momentum) * the batch's forget mean:
    the batch's few forget images alone would give a noisy gap whose square also pulls them together.
    With norm W (--tie-norm), + W * the mean of (|f(x)| / n_r - 1)^2 over the forget images, n_r the
    batch's mean retained feature norm (held): each forget image keeps a retained image's norm. With
    whiten W (--tie-whiten), + W * (m_f - m_r)^T (S_r + eps I)^-1 (m_f - m_r), m_f the forget features'
    running mean, m_r and S_r the retained ones' mean and covariance (running_moments; held): the value
    is the running gap, the gradient that of the batch's forget mean put in m_f's place. Why not mu_f:
    the mean of a batch's dozen forget images, whitened in hundreds of dimensions, is mostly noise."""
    SCALE = 10  # as ForgetFeatureLoss: cosines as logits
    MOMENTS_DECAY = 0.99  # --tie-whiten's running sums: about the last 100 batches' images
    RIDGE = 0.01  # eps, as a share of the mean variance: directions with no retained variance stay finite

    def __init__(self, model, means, forget_classes, momentum=0.9, spread=False, match=0.0, norm=0.0, whiten=0.0):
        self.means, self.momentum, self.through_head, self.spread = means.clone(), momentum, False, spread
        self.match, self.norm, self.whiten = match, norm, whiten
        self.forget_mean, self.moments = None, {}  # the running mu_f (detached between steps); running_moments'
        self.forget_classes = list(forget_classes)
        self.forget = torch.tensor(self.forget_classes, device=means.device)
        super().__init__(model)

    def __call__(self, logits, labels):
        raw = self.features.float()
        features = F.normalize(raw, dim=1)
        scores = self.SCALE * features @ F.normalize(self.means, dim=1).T
        is_forget = forget_mask(labels, self.forget_classes)
        targets = labels.clone()
        if is_forget.any():
            nearest = scores.detach()[is_forget].index_fill(1, self.forget, float("-inf"))
            targets[is_forget] = balanced_assignment(nearest) if self.spread else nearest.argmax(1)
        loss = F.cross_entropy(scores, targets, reduction="none")
        if self.through_head:  # the repair: the retained images through the head, the forget ones still tied
            loss = torch.where(is_forget, loss, F.cross_entropy(logits.float(), labels, reduction="none"))
        loss = loss.mean()
        mixed = bool(is_forget.any()) and not bool(is_forget.all())  # the terms compare forget with retained
        if self.match and mixed:
            forget, retained = self._running_forget_mean(raw[is_forget].mean(0)), raw[~is_forget].mean(0).detach()
            loss = loss + self.match * (forget - retained).square().sum() / retained.square().sum().clamp_min(1e-12)
        if self.whiten and mixed:
            loss = loss + self.whiten * self._whitened_gap(raw[is_forget], raw[~is_forget])
        if self.norm and mixed:
            norms = raw.norm(dim=1)
            loss = loss + self.norm * (norms[is_forget] / norms[~is_forget].mean().detach() - 1).square().mean()
        with torch.no_grad():  # each class seen in the batch moves its mean toward the batch's
            sums = torch.zeros_like(self.means).index_add_(0, labels, features.detach())
            seen = torch.bincount(labels, minlength=len(self.means)) > 0
            self.means[seen] = self.momentum * self.means[seen] + (1 - self.momentum) * F.normalize(sums[seen], dim=1)
        return loss

    def _running_forget_mean(self, batch):
        """mu_f = momentum * the last mu_f + (1 - momentum) * this batch's forget mean: the gradient
        through the batch's share; the last mu_f is held."""
        forget = batch if self.forget_mean is None else self.momentum * self.forget_mean + (1 - self.momentum) * batch
        self.forget_mean = forget.detach()
        return forget

    def _whitened_gap(self, forget, retained):
        """(m_f - m_r)^T (S_r + eps I)^-1 (m_f - m_r) after this batch's images are counted in; the
        gradient reaches the batch's forget images as if their mean stood for m_f."""
        forget_mean, _ = self.running_moments("forget", forget.detach(), covariance=False)
        mean, covariance = self.running_moments("retained", retained.detach())
        batch = forget.double().mean(0)
        gap = forget_mean + (batch - batch.detach()) - mean
        eps = self.RIDGE * covariance.diagonal().mean().clamp_min(1e-12)
        ridged = covariance + eps * torch.eye(len(gap), dtype=gap.dtype, device=gap.device)
        return (gap @ torch.linalg.solve(ridged, gap)).float()

    @torch.no_grad()
    def running_moments(self, key, features, covariance=True):
        """(mean, covariance or None), in float64, of the features (n, D) seen under key so far: each step
        the sums so far are decayed by MOMENTS_DECAY, then this batch's added; plain averages over the
        first batches. float64: E[x x^T] - m m^T loses the small variances in float32. covariance=False
        keeps no D x D sum (the forget images' mean needs none)."""
        features = features.double()
        sums = (len(features), features.sum(0)) + ((features.T @ features,) if covariance else ())
        if key in self.moments:
            sums = tuple(self.MOMENTS_DECAY * old + new for old, new in zip(self.moments[key], sums))
        self.moments[key] = sums
        mean = sums[1] / sums[0]
        return mean, (sums[2] / sums[0] - torch.outer(mean, mean) if covariance else None)


def balanced_assignment(scores):
    """(n,) a column for each row of scores (n, k), no column taken more than ceil(n / usable columns) times:
    greedy, in order of score, each row takes its best column that still has room. A row keeps its best
    column unless rows that score it higher have filled it; columns scored -inf are never taken. An exact
    equipartition, as SwAV's (arXiv 2006.09882) Sinkhorn-Knopp plan approximates it: one host loop over
    n * k entries, a few hundred for a batch's forget images."""
    n, k = scores.shape
    usable = torch.isfinite(scores).all(0).tolist()
    room = [-(-n // max(sum(usable), 1)) if ok else 0 for ok in usable]
    target = [-1] * n
    for flat in scores.flatten().argsort(descending=True).tolist():
        row, column = divmod(flat, k)
        if target[row] < 0 and room[column] > 0:
            target[row], room[column] = column, room[column] - 1
    return torch.tensor(target, device=scores.device)


def tie_options(args):
    """TiedHeadLoss's options, as the command line set them."""
    return dict(spread=bool(args.tie_spread), match=args.tie_match, norm=args.tie_norm, whiten=args.tie_whiten)


def tied_head_loss(model, data, split, args):
    """--tie-head's loss for this model (the base: the means start at its class prototypes)."""
    means = class_prototypes(model, data, split["train"].to(data.train_labels.device), range(data.num_classes),
                             seed=args.seed)
    return TiedHeadLoss(model, means, args.forget_class, **tie_options(args))


def fit_head(model, data, index, seed, epochs=10, batch_size=512, lr=1e-2):
    """Fit model.head alone on the penultimate features of data.train_images[index] (eval mode, no
    augmentation; computed once): Adam, the learning rate falling linearly to 0. The head starts as it
    is (for PruneLoRA: the base's, the forget rows reset), so the forget classes, never a target here,
    are pushed down as in the usual unlearning."""
    with torch.no_grad():
        features = predict(model, data, data.train_images[index.to(data.train_images.device)], features=True)
    labels = data.train_labels[index.to(data.train_labels.device)]
    optimizer = torch.optim.Adam(model.head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    total, step = epochs * -(-len(labels) // batch_size), 0
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).to(labels.device).split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / total)
            loss = F.cross_entropy(model.head(features[batch]).float(), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

