"""Tests of what a run tells its user: the verdicts, the weak-base warning, the terminal table, class
names on the command line and the whole run's ETA."""
import pytest

import data as data_module
import plot
import report
from cli import UserError
from train import Progress


def row(UA=100.0, MIA=100.0, RA=90.0, TA=85.0, **more):
    return dict(UA=UA, MIA=MIA, RA=RA, TA=TA, **more)


def test_a_verdict_names_the_missed_target_and_by_how_much():
    rows = {"base": row(UA=10.0, MIA=20.0), "retrain": row(), "prunelora": row(RA=89.8), "finetune": row(RA=89.6),
            "ga": row(UA=95.0, TA=80.0), "hidden": row(RA=70.0)}
    lines = dict(line.split(None, 1) for line in report.verdicts({0: rows}, [3]))
    assert lines == {"prunelora": "meets every target", "finetune": "misses RA by 0.10",
                     "ga": "misses UA by 4.90, TA by 4.00"}  # RA target 89.7, TA 84.0; hidden is a reference


def test_over_seeds_a_verdict_counts_the_seeds_and_gives_the_largest_shortfall():
    per_seed = {s: {"retrain": row(), "lora": row(RA=ra)} for s, ra in ((0, 89.8), (1, 89.2), (2, 89.5))}
    assert report.verdicts(per_seed, [3]) == ["lora             misses RA by 0.50 on 2 of 3 seeds"]
    per_seed[1]["lora"]["RA"] = 90.0
    assert report.verdicts(per_seed, [3]) == ["lora             misses RA by 0.20 on 1 of 3 seeds"]


def test_without_retrain_or_a_class_there_is_no_target_verdict():
    (line,) = report.verdicts({0: {"base": row(), "prunelora": row()}}, [3])
    assert line.startswith("no verdict") and "retrain" in line
    sample = {0: {"retrain": row(avg_gap=0.0), "prunelora": row(avg_gap=1.25)}}
    (line,) = report.verdicts(sample, [])
    assert line.split()[0] == "prunelora" and "1.25" in line


def test_a_base_under_half_right_is_called_too_weak():
    strong = {0: {"base": row(TA=80.0, forget_test_acc=75.0)}}
    assert report.weak_base(strong, [3]) is None
    weak_forget = {0: {"base": row(TA=80.0, forget_test_acc=30.0)}}
    assert "30.0 % on the forgotten ones" in report.weak_base(weak_forget, [3])
    weak = {0: strong[0], 1: {"base": row(TA=39.0, forget_test_acc=75.0)}}  # one weak seed is enough
    assert "only 39.0 %" in report.weak_base(weak, [3])
    # the weakest seed on each reading, even when they are different seeds
    mixed = {0: {"base": row(TA=80.0, forget_test_acc=30.0)}, 1: {"base": row(TA=70.0, forget_test_acc=75.0)}}
    said = report.weak_base(mixed, [3])
    assert "70.0 % test accuracy on the retained classes and 30.0 % on the forgotten ones" in said
    assert report.weak_base({0: {"base": row(TA=39.0)}}, []) is not None  # a random sample: TA alone


def test_the_note_on_the_base_shows_its_last_epochs_per_seed_and_marks_unknown_ones():
    from types import SimpleNamespace as Task
    one = [Task(seed=0, ckpt=dict(test_history=[70.0, 80.0, 81.0, 81.25]))]
    assert "last epochs: 80.00 / 81.00 / 81.25 %." in report.last_epochs(one)
    resumed = Task(seed=1, ckpt=dict(test_history=[None, None, 79.5]))  # resumed from a checkpoint without a record
    assert "80.00 / 81.00 / 81.25 % (seed 0); ? / ? / 79.50 % (seed 1)" in report.last_epochs([*one, resumed])
    assert report.last_epochs([Task(seed=0, ckpt={}), Task(seed=1, ckpt=dict(test_history=[None]))]) is None


def test_the_terminal_table_is_aligned_and_shows_the_spread():
    rows = {"base": row(seconds=10.0), "prunelora-long-name": row(RA=9.5, seconds=1.0)}
    spread = {"base": {"RA": 0.25}, "prunelora-long-name": {"RA": 1.5}}
    lines = report.terminal_table(rows, spread).splitlines()
    assert lines[0].split() == ["method", "UA", "MIA", "RA", "TA", "seconds"]
    ends = {len(line) for line in lines}  # right-aligned numbers: every line ends in the same column
    assert len(ends) == 1, lines
    assert "90.00 ± 0.25" in lines[1] and "9.50 ± 1.50" in lines[2]


def test_classes_are_taken_by_number_or_by_name_in_any_case():
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress"]
    assert data_module.class_numbers(["3", "trouser", "PULLOVER"], classes, "--forget-class") == [3, 1, 2]
    for bad in ("4", "-1", "skirt"):
        with pytest.raises(UserError, match=f"--forget-class {bad} .*0 to 3 .*3 Dress"):
            data_module.class_numbers([bad], classes, "--forget-class")


def test_the_eta_is_the_rate_so_far_applied_to_the_work_left(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("train.time.time", lambda: clock[0])
    progress = Progress(planned=1000)
    progress.add(200)
    clock[0] = 110.0                  # 200 images in 10 s
    assert progress.eta() == pytest.approx(40.0)  # 800 left at 20 images/s
    progress.evaluated(300)           # an evaluated image counts a third of a trained one
    assert progress.eta() == pytest.approx(10 / 300 * 700)
    progress.add(10_000)
    assert progress.eta() == 0        # past the plan: no negative time


def test_frontier_names_each_run_by_the_settings_that_differ_and_reads_both_depth_scores_against_retrain():
    rows = lambda ncm, probe, ra: {"base": dict(ncm_acc_50=90.0, probe_acc=97.0, RA=94.0, TA=92.0),
                                   "retrain": dict(ncm_acc_50=60.0, probe_acc=95.0, RA=95.0, TA=93.0),
                                   "prunelora": dict(ncm_acc_50=ncm, probe_acc=probe, RA=ra, TA=92.5)}
    runs = [dict(settings=dict(push=0.0, hold=0.0, seed=0), results=rows(90.0, 97.0, 95.1)),
            dict(settings=dict(push=1.0, hold=0.0, seed=0), results=rows(75.0, 96.0, 94.0))]
    for saved in runs:
        plot.add_depth_scores(saved["results"])
    assert plot.labels(runs, ["a/x.json", "b/x.json"]) == [" push=0.0", " push=1.0"]
    table = plot.frontier(runs, ["a/x.json", "b/x.json"]).splitlines()
    assert "| push=1.0 | prunelora | -1.00 | -0.50 | 0.50 | 0.50 | 1 |" in table
    assert sum("retrain" in line for line in table) == 1  # the references once, from the first run
    same = [dict(runs[1]), dict(runs[1])]  # the same options (other code): named by their folders
    assert plot.labels(same, ["results/v1/x.json", "results/v2/x.json"]) == [" v1", " v2"]
