"""The PruneLoRA variants aimed at deeper forgetting (deep.py, tie.py, projection.py), on synthetic data."""
import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deep
import methods
import projection
import prunelora as pl
import tie
import unlearn
from cli import UserError
from conftest import unlearn_args
from data import predict
from evaluate import unlearning_metrics
from methods import Task
from models import build_model
from report import method_runs

HERE = Path(__file__).resolve().parent.parent


def base_model(base, data):
    model = build_model("cnn", 3, data.num_classes)
    model.load_state_dict(base["state_dict"])
    return model


# -----------------------------------------------------------------------------
# --project-start


def test_forget_directions_find_a_direction_only_the_forget_inputs_use():
    generator = torch.Generator().manual_seed(0)
    d, planted = 12, torch.zeros(12, dtype=torch.float64)
    planted[5] = 1.0
    retain = torch.randn(500, d, generator=generator, dtype=torch.float64)
    retain -= (retain @ planted)[:, None] * planted                        # no retained input along it
    forget = torch.randn(200, d, generator=generator, dtype=torch.float64) + 3 * planted
    q = projection.forget_directions(forget.T @ forget / 200, retain.T @ retain / 500, k=1)
    assert q.shape == (d, 1) and abs(float(q[:, 0] @ planted)) > 0.999
    q3 = projection.forget_directions(forget.T @ forget / 200, retain.T @ retain / 500, k=3)
    assert torch.allclose(q3.T @ q3, torch.eye(3, dtype=torch.float64), atol=1e-10)  # orthonormal


@pytest.mark.parametrize("amount", [0.0, 0.5])
def test_projection_start_is_a_rank_k_edit_that_removes_its_directions_and_keeps_the_mask(amount, class_1_task):
    data, base, split = class_1_task
    model = base_model(base, data)
    pl.prune_global(model, amount, exclude=("head",))
    pl.add_lora(model, r=4, alpha=8, exclude=("head",))
    before = {name: getattr(m, t).detach().clone() for name, m, t in pl.prunable(model, ("head",))}
    started = projection.projection_start(model, data, split, k=2)
    assert started == [name.removesuffix(".weight") for name in before]  # every conv and Linear of the cnn
    for name, m, t in pl.prunable(model, ("head",)):
        p = m.parametrizations[t][0]
        update = p.scaling * p.lora_B.detach().double() @ p.lora_A.detach().double()  # (out, d)
        assert torch.linalg.matrix_rank(update) == 2                                     # exactly rank k
        weight = getattr(m, t).detach().reshape(len(update), -1).double()
        assert torch.equal(weight[before[name].reshape(len(update), -1) == 0],
                           torch.zeros_like(weight[before[name].reshape(len(update), -1) == 0]))  # zeros stay zero
        q = torch.linalg.qr(p.lora_A[:2].T.detach().double()).Q                          # the removed directions
        if amount == 0:  # nothing masked: the edited weight maps those directions to exactly nothing
            assert (weight @ q).abs().max() < 1e-4 * before[name].abs().max()
    x = data.train_images[:16]
    unmerged = predict(model, data, x)
    assert torch.allclose(predict(pl.merge_lora(model), data, x), unmerged, rtol=1e-4, atol=1e-4)


def test_projection_start_above_the_rank_is_a_one_line_error(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = subprocess.run([sys.executable, str(HERE / "unlearn.py"), "--dataset", dataset, "--data-dir", data_dir,
                             "--base", str(base_checkpoint), "--arch", "cnn", "--forget-class", "1", "--rank", "4",
                             "--project-start", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--project-start 5 is above --rank 4" in result.stderr and not list(tmp_path.iterdir())

# -----------------------------------------------------------------------------
# --push, --hold


def test_feature_loss_without_its_terms_is_cross_entropy_on_the_retained_images_only(class_1_task):
    data, base, split = class_1_task
    model = base_model(base, data)
    loss = deep.forget_feature_loss(model, data, split, [1], unlearn_args())
    pick = torch.arange(0, len(data.train_labels), 6)  # the images are stored class by class: every class
    x, y = data.train_images[pick], data.train_labels[pick]
    logits = model(((x.float() / 255) - data.mean[:, None, None]) / data.std[:, None, None])
    kept = y != 1
    assert 0 < kept.sum() < len(y)
    assert torch.allclose(loss(logits, y), F.cross_entropy(logits[kept], y[kept]))
    loss.hold = 0.5  # + hold * (1 - cosine of each retained feature to its own class's prototype)
    features = F.normalize(loss.features, dim=1)
    own = torch.stack([features[i] @ loss.prototypes[[0, 2, 3].index(int(y[i]))] for i in range(len(y)) if kept[i]])
    assert torch.allclose(loss(logits, y), F.cross_entropy(logits[kept], y[kept]) + 0.5 * (1 - own).mean())
    loss.remove()
    assert not model.head._forward_pre_hooks  # nothing left on the model


def test_push_moves_the_forget_features_toward_the_retained_prototypes(class_1_task):
    data, base, split = class_1_task
    model = base_model(base, data)
    loss = deep.forget_feature_loss(model, data, split, [1], unlearn_args(push=1.0))
    forget = split["forget"][:32]
    normalised = lambda: (data.train_images[forget].float() / 255 - data.mean[:, None, None]) / data.std[:, None, None]
    nearest = lambda: float((F.normalize(model.features(normalised()), dim=1) @ loss.prototypes.T).max(1).values.mean())
    model.eval()
    with torch.no_grad():
        before = nearest()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(10):  # forget images only: the push term is the whole loss
        value = loss(model(normalised()), data.train_labels[forget])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        assert nearest() > before + 0.05
    loss.remove()


def test_push_prices_a_forget_class_gathered_at_one_prototype_at_log_2_and_a_scattered_one_lower():
    prototypes = F.normalize(torch.eye(4)[:3] + 0.1, dim=1)  # three retained classes; class 3 is forgotten
    loss = deep.ForgetFeatureLoss(build_model("cnn", 3, 4), prototypes, [0, 1, 2], [3], push=1.0)
    labels, logits = torch.tensor([3, 3, 3]), torch.zeros(3, 4)
    loss.features = prototypes[[0, 0, 0]] * 5                # the whole class at one retained prototype
    assert loss(logits, labels).item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-3)
    loss.features = prototypes[[0, 1, 2]] * 5                # scattered: each at another retained prototype
    assert loss(logits, labels).item() < 0.5
    loss.remove()


def test_prunelora_with_push_and_hold_trains_merges_sparse_and_leaves_no_hook(class_1_task):
    data, base, split = class_1_task
    args = unlearn_args(push=0.5, hold=0.5, project_start=2, epochs=2)
    model, row = unlearn.run_method("prunelora", Task(0, base, None, split), data, args, torch.device("cpu"))
    assert not model.head._forward_pre_hooks and not any(m._forward_pre_hooks for m in model.modules())
    assert row["sparsity"] == pytest.approx(0.5, abs=0.02) and row["UA"] >= 90 and row["RA"] >= 80


def test_repair_epochs_train_the_fitted_head_on_the_retained_images_with_the_forget_images_still_tied(class_1_task,
                                                                                                    monkeypatch):
    """--repair-epochs N: the tied phase (all training images, the tied loss, --epochs), the head fitted,
    then N epochs in which the head scores the retained images and trains; merged as sparse."""
    data, base, split = class_1_task
    phases, real = [], methods.finetune_on

    def spy(model, data, index, args, task, **options):
        phases.append((index, type(options.get("loss_fn")).__name__, options.get("epochs") or args.epochs))
        head = model.head.weight.detach().clone()
        facts = real(model, data, index, args, task, **options)
        phases[-1] += (not torch.equal(head, model.head.weight),)  # did the head train in this phase?
        return facts
    monkeypatch.setattr(methods, "finetune_on", spy)
    model, row = unlearn.run_method("prunelora", Task(0, base, None, split), data,
                                    unlearn_args(tie_head=1, repair_epochs=2, epochs=1), data.train_images.device)
    (tied_on, tied_loss, tied_epochs, tied_head), (repair_on, repair_loss, repair_epochs, repair_head) = phases
    assert torch.equal(tied_on, split["train"]) and tied_loss == "TiedHeadLoss" and tied_epochs == 1 and not tied_head
    assert torch.equal(repair_on, split["train"]) and repair_loss == "TiedHeadLoss" and repair_epochs == 2
    assert repair_head  # the head trains in the repair
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any("lora_" in name for name, _ in model.named_parameters())  # merged
    assert row["sparsity"] == pytest.approx(0.5, abs=0.02) and row["UA"] >= 90 and row["RA"] >= 80


def test_the_run_s_eta_counts_the_forget_images_the_tie_trains_on_and_the_repair_epochs(class_1_task):
    data, base, split = class_1_task
    run = unlearn.Run(["prunelora"], data.train_images.device, data, [Task(0, {"complete": True}, None, split)],
                      None, {})
    work = lambda **changes: unlearn.planned_work(run, unlearn_args(**dict(epochs=[3], base_epochs=1, **changes)))
    forget, retain = len(split["forget"]), len(split["retain"])
    assert work(tie_head=1) - work() == 3 * forget                           # the tie: every training image
    assert work(tie_head=1, repair_epochs=2) - work(tie_head=1) == 2 * (retain + forget)  # the repair: all of them


def test_repair_epochs_without_the_tied_head_is_a_one_line_error():
    with pytest.raises(UserError, match="--repair-epochs 2 trains after --tie-head 1"):
        deep.check_args(unlearn_args(repair_epochs=2), ["prunelora"])


def test_push_without_forget_classes_is_a_one_line_error(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = subprocess.run([sys.executable, str(HERE / "unlearn.py"), "--dataset", dataset, "--data-dir", data_dir,
                             "--base", str(base_checkpoint), "--arch", "cnn", "--forget-share", "0.1", "--push", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--forget-class" in result.stderr

# -----------------------------------------------------------------------------
# --tie-head


def test_tied_head_loss_scores_by_class_means_not_the_head_and_sends_forget_images_to_the_nearest_retained():
    means = F.normalize(torch.eye(4)[:, :3] + 0.1, dim=1)  # four classes in three dimensions; class 3 is forgotten
    loss = tie.TiedHeadLoss(build_model("cnn", 3, 4), means, [3], momentum=0.9)
    labels = torch.tensor([0, 3, 3])
    loss.features = torch.tensor([[2.0, 0, 0], [0.1, 1, 0.2], [0.3, 0, 1]], requires_grad=True)  # forget: near 1, 2
    logits = torch.zeros(3, 4, requires_grad=True)
    value = loss(logits, labels)
    scores = 10 * F.normalize(loss.features, dim=1) @ means.T
    assert torch.allclose(value, F.cross_entropy(scores, torch.tensor([0, 1, 2])))
    assert torch.autograd.grad(value, logits, allow_unused=True)[0] is None  # the head gets no gradient
    batch_mean = lambda rows: F.normalize(F.normalize(loss.features[rows].detach(), dim=1).mean(0), dim=0)
    assert torch.allclose(loss.means[0], 0.9 * means[0] + 0.1 * batch_mean([0]))      # a running mean per class,
    assert torch.allclose(loss.means[3], 0.9 * means[3] + 0.1 * batch_mean([1, 2]))   # the forget class's too
    assert torch.equal(loss.means[1:3], means[1:3])                                    # classes not in the batch
    loss.through_head, loss.means = True, means.clone()  # --repair-epochs: the retained image through the head
    logits = torch.tensor([[0.5, 2.0, 0, 0], [9.0, 0, 0, 0], [9.0, 0, 0, 0]], requires_grad=True)
    per_image = [F.cross_entropy(logits[0], torch.tensor(0)), F.cross_entropy(scores[1], torch.tensor(1)),
                 F.cross_entropy(scores[2], torch.tensor(2))]                          # forget: still by the means
    assert torch.allclose(loss(logits, labels), torch.stack(per_image).mean())
    loss.remove()


def test_balanced_assignment_spreads_rows_that_all_prefer_one_column_and_keeps_rows_that_do_not():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(18, 4, generator=generator)
    scores[:, 0] += 5                                   # every row's best column is 0
    scores[:, 3] = float("-inf")                        # a forget class: never a target
    spread = tie.balanced_assignment(scores)
    assert torch.equal(scores.argmax(1), torch.zeros(18, dtype=torch.long))
    assert torch.bincount(spread, minlength=4).tolist() == [6, 6, 6, 0]
    distinct = torch.eye(4)[:, :3] * 5 + 0.1 * torch.rand(4, 3, generator=generator)  # rows 0-2 differ; row 3: tie
    assert torch.equal(tie.balanced_assignment(distinct[:3]), torch.arange(3))    # nothing over-subscribed: kept
    assert torch.equal(tie.balanced_assignment(scores[:1]), torch.tensor([0]))   # one row: its nearest


def test_tied_head_loss_with_spread_sends_the_forget_images_of_a_batch_to_every_retained_class():
    means = F.normalize(torch.eye(4)[:, :3] + 0.1, dim=1)  # class 3 is forgotten
    features = torch.tensor([[0.2, 1, 0.1], [0.1, 1, 0.2], [0.3, 1, 0], [0, 1, 0.3], [0.2, 1, 0.2], [0.1, 1, 0]])
    labels = torch.full((6,), 3)
    losses = {}
    for spread in (False, True):
        loss = tie.TiedHeadLoss(build_model("cnn", 3, 4), means, [3], spread=spread)
        loss.features = features
        scores = 10 * F.normalize(features, dim=1) @ means.T
        targets = tie.balanced_assignment(scores.index_fill(1, torch.tensor([3]), float("-inf"))) if spread else \
            torch.ones(6, dtype=torch.long)                 # all nearest to class 1
        losses[spread] = loss(torch.zeros(6, 4), labels)
        assert torch.allclose(losses[spread], F.cross_entropy(scores, targets))
        loss.remove()
    assert torch.bincount(targets, minlength=4).tolist() == [2, 2, 2, 0] and losses[True] > losses[False]


def term_added(**option):
    """(features, labels) -> what the option adds to the tied head's loss on these head inputs, class 3 forgotten
    (two losses on throwaway models, one without the option, called on the same features in turn)."""
    means = F.normalize(torch.eye(4)[:, :3] + 0.1, dim=1)
    plain, changed = (tie.TiedHeadLoss(build_model("cnn", 3, 4), means, [3], **o) for o in ({}, option))

    def added(features, labels):
        plain.features = changed.features = features
        return changed(torch.zeros(len(labels), 4), labels) - plain(torch.zeros(len(labels), 4), labels)
    return added


def test_tie_match_adds_the_relative_gap_between_the_forget_and_retained_mean_features_and_moves_only_the_forget():
    labels, added = torch.tensor([0, 1, 2, 3, 3]), term_added(match=0.5)
    features = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [2, 2, 0], [0, 2, 2]], requires_grad=True)
    gap = added(features, labels)
    retained, forget = torch.full((3,), 1 / 3), torch.tensor([1., 2, 1])         # the two classes' mean features
    assert torch.allclose(gap, 0.5 * (forget - retained).square().sum() / retained.square().sum())
    gap.backward()
    assert features.grad[:3].abs().max() == 0 and features.grad[3:].abs().max() > 0  # the retained mean is held
    # the next batch's forget mean enters at (1 - momentum): a batch at the retained mean closes 10 % of the gap
    third = 1 / 3
    second = added(torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [third] * 3, [third] * 3]), labels)
    assert torch.allclose(second, 0.5 * (0.9 * (forget - retained)).square().sum() / retained.square().sum())


def test_tie_norm_adds_each_forget_image_s_squared_relative_norm_gap_and_holds_the_retained_norm():
    labels, added = torch.tensor([0, 1, 2, 3, 3]), term_added(norm=2.0)
    # retained norms 1, 2, 3 (mean 2); forget norms 1 and 4: relative gaps -0.5 and +1
    features = torch.tensor([[1., 0, 0], [0, 2, 0], [0, 0, 3], [1, 0, 0], [0, 0, 4]], requires_grad=True)
    gap = added(features, labels)
    assert torch.allclose(gap, torch.tensor(2.0 * (0.25 + 1.0) / 2))
    gap.backward()
    assert features.grad[:3].abs().max() == 0                               # the retained norm is held
    assert features.grad[3, 0] < 0 and features.grad[4, 2] > 0              # descent lengthens 1, shortens 4
    # a forget image at the retained mean norm, in any direction, adds nothing
    at_mean_norm = torch.tensor([[1., 0, 0], [0, 2, 0], [0, 0, 3], [0, 2, 0], [1.2, 1.6, 0]])
    assert torch.allclose(added(at_mean_norm, labels), torch.tensor(0.0), atol=1e-6)


def test_tie_whiten_adds_the_gap_a_linear_probe_reads_so_a_gap_where_the_retained_hardly_vary_costs_more():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2] * 4 + [3, 3])
    retained = torch.randn(12, 3, generator=generator) * torch.tensor([3.0, 0.1, 1.0]) + 5  # x wide, y narrow
    mean, covariance = retained.double().mean(0), torch.cov(retained.double().T, correction=0)
    ridged = covariance + 0.01 * covariance.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    whiten, match = {}, {}
    for axis in (0, 1):                                    # the forget mean 0.5 off the retained mean along x, y
        offset = torch.eye(3)[axis] * 0.5
        forget = (mean.float() + offset) + torch.tensor([[0.2, -0.1, 0.3]]) * torch.tensor([[1.0], [-1.0]])
        features = torch.cat([retained, forget]).requires_grad_()
        whiten[axis] = term_added(whiten=1.0)(features, labels)
        assert torch.allclose(whiten[axis].double(), offset.double() @ torch.linalg.solve(ridged, offset.double()),
                              rtol=1e-4)
        whiten[axis].backward()
        assert features.grad[:12].abs().max() < 1e-6 < features.grad[12:].abs().max()  # the retained: held
        match[axis] = term_added(match=1.0)(features.detach(), labels)
    assert torch.allclose(match[0], match[1]) and whiten[1] > 100 * whiten[0]  # plain distance: the same
    # the gap is the running one: a second batch (the same retained images) whose forget mean is the retained
    # mean leaves 0.99 * 2 / (0.99 * 2 + 2) of the first gap, its square that share squared
    added = term_added(whiten=1.0)
    first = added(features.detach(), labels)
    second = added(torch.cat([retained, mean.float().expand(2, 3)]), labels)
    assert torch.allclose(second, first * (0.99 / 1.99) ** 2, rtol=1e-4)


def test_running_moments_are_the_mean_and_covariance_of_every_image_seen_without_decay():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 4, generator=generator) * 2 + 1 for n in (5, 9, 7)]
    loss = tie.TiedHeadLoss(build_model("cnn", 3, 4), torch.eye(4), [3])
    loss.MOMENTS_DECAY = 1.0                               # no decay: plain averages over all images seen
    for batch in batches:
        mean, covariance = loss.running_moments("retained", batch)
    seen = torch.cat(batches).double()
    assert torch.allclose(mean, seen.mean(0)) and torch.allclose(covariance, torch.cov(seen.T, correction=0))
    loss.remove()


@pytest.mark.parametrize("flag,option", [("--tie-match 0.5", dict(tie_match=0.5)),
                                         ("--tie-whiten 0.5", dict(tie_whiten=0.5))])
def test_a_term_of_the_tied_head_without_the_tied_head_is_a_one_line_error(flag, option):
    with pytest.raises(UserError, match=f"{flag} adds to the loss of --tie-head 1"):
        deep.check_args(unlearn_args(**option), ["prunelora"])


def test_tie_spread_without_the_tied_head_is_a_one_line_error():
    with pytest.raises(UserError, match="--tie-spread 1 spreads the targets of --tie-head 1"):
        deep.check_args(unlearn_args(tie_spread=1), ["prunelora"])


@pytest.mark.parametrize("terms", [dict(), dict(tie_spread=1, tie_match=1.0, tie_norm=1.0, tie_whiten=1.0)])
def test_prunelora_with_a_tied_head_trains_merges_sparse_fits_the_head_and_leaves_no_hook(terms, class_1_task):
    data, base, split = class_1_task
    model, row = unlearn.run_method("prunelora", Task(0, base, None, split), data,
                                    unlearn_args(tie_head=1, epochs=2, **terms), data.train_images.device)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert row["sparsity"] == pytest.approx(0.5, abs=0.02) and row["UA"] >= 90 and row["RA"] >= 80


def test_the_tied_head_under_torchrun_is_refused_before_any_process_joins(monkeypatch):
    """Its class means live in one process: checked from torchrun's WORLD_SIZE, since the check runs
    before distributed.start() joins the processes (world_size() is still 1 then)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for option, shown in ((dict(tie_head=1), "--tie-head 1"), (dict(deep=1), "--deep 1")):
        with pytest.raises(UserError, match=f"{shown} keeps its class means in one process"):
            deep.check_args(unlearn_args(**option), ["prunelora"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    deep.check_args(unlearn_args(tie_head=1), ["prunelora"])


def test_deep_1_selects_the_measured_setting_and_refuses_options_of_its_own():
    args = unlearn_args(deep=1, epochs=None)  # --epochs not given
    deep.check_args(args, ["retrain", "prunelora"])
    assert {key: getattr(args, key) for key in deep.DEEP} == deep.DEEP and deep.DEEP["tie_head"] == 1
    assert vars(args) == vars(unlearn_args(deep=1, epochs=None, own_epochs={"prunelora": deep.DEEP_EPOCHS},
                                           **deep.DEEP))  # and nothing else changed
    # its own epoch count is PruneLoRA's alone; the other methods keep theirs, and a given --epochs is PruneLoRA's too
    assert method_runs(["finetune", "prunelora", "retrain"], [5], args.own_epochs) == [
        ("finetune", 5, "finetune"), ("prunelora", deep.DEEP_EPOCHS, "prunelora"), ("retrain", 5, "retrain")]
    given = unlearn_args(deep=1, epochs=[3])
    deep.check_args(given, ["prunelora"])
    assert given.own_epochs is None
    assert method_runs(["prunelora"], [3], given.own_epochs) == [("prunelora", 3, "prunelora")]
    for clash in (dict(tie_head=1), dict(push=1.0), dict(project_start=2), dict(repair_epochs=2)):
        with pytest.raises(UserError, match="--deep 1 sets the options"):
            deep.check_args(unlearn_args(deep=1, **clash), ["prunelora"])
    with pytest.raises(UserError, match="--deep 1 changes prunelora only"):
        deep.check_args(unlearn_args(deep=1), ["finetune"])
    with pytest.raises(UserError, match=r"--deep 1 needs the forget classes"):
        deep.check_args(unlearn_args(deep=1, forget_class=[]), ["prunelora"])


def test_deep_left_out_is_1_wherever_it_applies_and_0_elsewhere(monkeypatch, capsys):
    """The default: --deep 1 where whole classes are forgotten with prunelora in one process and none of its
    options is given; PruneLoRA as the paper has it otherwise, never an error for a run that gave no --deep."""
    args = unlearn_args(epochs=None)
    assert args.deep is None  # what the command line leaves, resolved by check_args
    deep.check_args(args, ["retrain", "prunelora"])
    assert args.deep == 1 and {key: getattr(args, key) for key in deep.DEEP} == deep.DEEP
    for changes, methods in ((dict(forget_class=[], forget_share=0.1), ["prunelora"]),  # a random sample
                             (dict(), ["finetune", "retrain"]),                         # no prunelora
                             (dict(tie_head=1, epochs=[3]), ["prunelora"]),             # the user's own setting
                             (dict(deep=0), ["prunelora"])):                            # said so
        args = unlearn_args(**changes)
        deep.check_args(args, methods)
        assert args.deep == 0 and args.repair_epochs == 0 and args.tie_whiten == 0 and args.own_epochs is None
        assert args.tie_head == changes.get("tie_head", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: the tie keeps its class means in one process
    args = unlearn_args()
    deep.check_args(args, ["prunelora"])
    assert args.deep == 0 and args.tie_head == 0 and "--deep 0 under torchrun" in capsys.readouterr().out


def test_deep_1_from_the_command_line_trains_prunelora_its_own_epochs_and_the_other_methods_theirs(
        synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = subprocess.run([sys.executable, str(HERE / "unlearn.py"), "--dataset", dataset, "--data-dir", data_dir,
                             "--base", str(base_checkpoint), "--arch", "cnn", "--forget-class", "1", "--deep", "1",
                             "--method", "prunelora,finetune", "--batch-size", "32"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = {method: torch.load(next((tmp_path / "checkpoints" / "unlearned").glob(f"*-{method}.pt")),
                                weights_only=True) for method in ("prunelora", "finetune")}
    assert saved["prunelora"]["args"]["unlearn_epochs"] == deep.DEEP_EPOCHS
    assert saved["finetune"]["args"]["unlearn_epochs"] == unlearn.EPOCHS
    settings = json.loads(next((tmp_path / "results").glob("*.json")).read_text())["settings"]
    assert {key: settings[key] for key in deep.DEEP} == deep.DEEP and settings["epochs"] == [unlearn.EPOCHS]


def test_tie_head_with_push_is_a_one_line_error(synthetic_dataset, base_checkpoint, tmp_path):
    dataset, data_dir = synthetic_dataset
    result = subprocess.run([sys.executable, str(HERE / "unlearn.py"), "--dataset", dataset, "--data-dir", data_dir,
                             "--base", str(base_checkpoint), "--arch", "cnn", "--forget-class", "1", "--tie-head", "1",
                             "--push", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--tie-head" in result.stderr
    assert not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------
# --salient-prune, --relabel-forget


def test_saliency_is_weight_times_gradient_and_prunes_what_the_loss_leans_on():
    torch.manual_seed(0)
    model, x = build_model("cnn", 3, 4), torch.randn(8, 3, 32, 32)
    loss = lambda: model(x)[:, 0].sum()
    scores = deep.saliency(model, loss())
    assert all(p.grad is None for p in model.parameters())  # torch.autograd.grad, not backward
    loss().backward()
    assert "head.weight" not in scores and list(scores) == [name for name, _, _ in pl.prunable(model, ("head",))]
    for name, score in scores.items():
        weight = model.get_parameter(name)
        assert torch.allclose(score, (weight * weight.grad).abs())
    before, small = loss().item(), copy.deepcopy(model)
    pl.prune_global(model, 0.05, exclude=("head",), importance=lambda name, w: -scores[name])  # the most salient 5%
    pl.prune_global(small, 0.05, exclude=("head",))                                          # the smallest 5%
    assert abs(loss().item() - before) > abs(small(x)[:, 0].sum().item() - before)


def test_salient_prune_first_prunes_what_the_forget_images_lean_on(class_1_task):
    data, base, split = class_1_task
    model = base_model(base, data)
    before = unlearning_metrics(model, data, [1], split["train"])["forget_test_acc"]
    deep.prune_forget_salient(model, data, split["forget"], unlearn_args(salient_prune=0.1))
    assert pl.sparsity(model) == pytest.approx(0.1, abs=0.01)  # the head (not pruned) is counted in the total
    assert unlearning_metrics(model, data, [1], split["train"])["forget_test_acc"] < before  # its weights went first


def test_relabel_forget_gives_each_forget_image_the_class_the_base_ranks_next_never_a_forget_class(class_1_task):
    data, base, split = class_1_task
    model = base_model(base, data)
    for forget_class, forget in (([1], split["forget"]), ([], split["retain"][:20])):  # a class; a sample
        relabelled = deep.relabel_forget_nearest(model, data, forget, argparse.Namespace(forget_class=forget_class))
        new, own = relabelled.train_labels[forget], data.train_labels[forget]
        assert not (new == own).any() and not torch.isin(new, torch.tensor(forget_class, dtype=new.dtype)).any()
        logits = predict(model, data, data.train_images[forget])
        allowed = torch.ones_like(logits, dtype=torch.bool)
        allowed[torch.arange(len(own)), own] = False
        allowed[:, forget_class] = False
        best_allowed = logits.masked_fill(~allowed, float("-inf")).max(1).values
        assert torch.equal(logits.gather(1, new[:, None]).squeeze(1), best_allowed)  # the next class, by the base
        untouched = torch.ones(len(data.train_labels), dtype=torch.bool)
        untouched[forget] = False
        assert torch.equal(relabelled.train_labels[untouched], data.train_labels[untouched])
