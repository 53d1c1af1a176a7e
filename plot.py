"""One picture of a comparison: retained accuracy against how deep the forgetting goes, per method.

    python plot.py results/fashion-mnist-cnn-forget3.json              # writes results/...-forget3.png
    python plot.py results/X.json --out figures/depth.png
    python plot.py results/*/X.json --out figures/frontier.png         # several runs: the frontier

Several JSONs (runs of one comparison with other settings, e.g. --push or --hold): each method's
points are named by the settings that differ between the runs, the references are the first run's,
and a table of the frontier is printed too (means over seeds: RA and TA against Retrain, both depth
scores).

x: the depth score (0 = the class hidden in the head, 1 = forgotten as deeply as Retrain; a run with
--depth and retrain), or, without it, the time over Retrain's. y: RA minus Retrain's RA (a run with
retrain), else RA. One point per method and seed; a run of several seeds also marks each method's
mean. Methods meeting every target of report.py against their seed's Retrain are filled.

Needs matplotlib, which the project itself does not: pip install matplotlib
"""
import json
from pathlib import Path

from cli import ArgumentParser, UserError, run_cli
from depth import add_depth_scores
from report import REFERENCES, meets_targets


# the settings that name a run's points when several runs are drawn (those that differ between them)
VARIANT_KEYS = ("push", "hold", "tie_head", "repair_epochs", "tie_spread", "tie_match", "tie_norm", "tie_whiten",
                "project_start", "salient_prune", "relabel_forget", "prune_amount", "rank", "freeze_bn", "reset_head",
                "epochs", "lora_lr")


def seed_rows(saved):
    """A results JSON's rows, one {method: row} per seed (a single-seed run keeps them under "results")."""
    return list(saved["per_seed"].values()) if "per_seed" in saved else [saved["results"]]


def points(saved, label=""):
    """{method: [(x, y, meets), ...]} over the seeds of a results JSON, and the axis titles.
    label: added to the names of the methods (not of the references)."""
    per_seed = seed_rows(saved)
    depth = all("depth_score" in row for rows in per_seed for name, row in rows.items() if name != "base")
    if not all("retrain" in rows for rows in per_seed):
        raise UserError("the results have no retrain row; run unlearn.py with retrain in --method to plot them")
    x_key, x_title = (("depth_score", "depth score (0 = hidden in the head, 1 = Retrain)") if depth else
                      ("time_vs_retrain", "time / Retrain"))
    found = {}
    for rows in per_seed:
        retrain = rows["retrain"]
        for name, row in rows.items():
            if name == "base" or x_key not in row:
                continue
            judged = name not in REFERENCES and bool(saved["settings"].get("forget_class"))
            found.setdefault(name if name in REFERENCES else f"{name}{label}", []).append(
                (row[x_key], row["RA"] - retrain["RA"], judged and meets_targets(row, retrain)))
    return found, x_title, "RA - Retrain's RA (points)"


def draw(found, x_title, y_title, title, out):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot.py draws with matplotlib, which is not installed; pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=130)
    for i, (name, pts) in enumerate(sorted(found.items())):
        colour = f"C{i % 10}"
        for x, y, meets in pts:
            ax.scatter(x, y, s=28, marker="s" if name in REFERENCES else "o", color=colour if meets else "white",
                       edgecolors=colour, linewidths=1.2, zorder=3)
        mean_x, mean_y = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        if len(pts) > 1:
            ax.scatter(mean_x, mean_y, marker="x", s=40, color=colour, zorder=4)
        ax.annotate(name, (mean_x, mean_y), textcoords="offset points", xytext=(5, 4), fontsize=8, color=colour)
    ax.axhline(-0.3, color="grey", lw=0.8, ls="--")  # after the points: the axis limits are theirs
    ax.text(ax.get_xlim()[1], -0.3, "RA target: Retrain - 0.3 ", ha="right", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel(x_title)
    ax.set_ylabel(y_title)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.text(0.99, 0.01, "filled: meets every target; squares: references", ha="right", fontsize=7, color="grey")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def labels(runs, paths):
    """' key=value ...' for each run: the VARIANT_KEYS whose values differ between the runs; where that
    leaves two runs alike (the same options, other code), each JSON's folder name instead."""
    settings = [saved["settings"] for saved in runs]
    differ = [k for k in VARIANT_KEYS if len({json.dumps(s.get(k)) for s in settings}) > 1]
    found = ["".join(f" {k}={s.get(k)}" for k in differ) for s in settings]
    return found if len(set(found)) == len(found) else [f" {Path(path).parent.name}" for path in paths]


def frontier(runs, paths):
    """Markdown: per run and method, means over seeds of RA and TA minus Retrain's and both depth scores."""
    lines = ["| run | method | RA - Retrain | TA - Retrain | depth score | depth score 2 | seeds |",
             "|---|---|---|---|---|---|---|"]
    mean = lambda values: f"{sum(values) / len(values):.2f}" if values else ""
    for saved, label in zip(runs, labels(runs, paths)):
        per_seed = seed_rows(saved)
        for name in per_seed[0]:
            if name == "base" or (name in REFERENCES and saved is not runs[0]):  # references: the first run's
                continue
            column = lambda key: [rows[name][key] - (rows["retrain"][key] if key in ("RA", "TA") else 0)
                                  for rows in per_seed if key in rows[name]]
            lines.append(f"| {label.strip() or 'first'} | {name} | {mean(column('RA'))} | {mean(column('TA'))} | "
                         f"{mean(column('depth_score'))} | {mean(column('depth_score_2'))} | {len(per_seed)} |")
    return "\n".join(lines)


def main():
    parser = ArgumentParser(description="Plot a results JSON of unlearn.py: retained accuracy against depth.")
    parser.add_argument("results", nargs="+", help="results/<...>.json written by unlearn.py (several: a frontier)")
    parser.add_argument("--out", default=None, help="the picture (default: the JSON's path with .png)")
    parser.add_argument("--title", default=None, help="the title (default: the JSON's name)")
    args = parser.parse_args()
    runs, found = [], {}
    for path in map(Path, args.results):
        try:
            runs.append(json.loads(path.read_text()))
            for rows in seed_rows(runs[-1]):
                add_depth_scores(rows)  # scored again on today's scales: an older run may lack a score
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is not a results JSON of unlearn.py ({type(e).__name__})") from None
    try:
        for saved, label in zip(runs, labels(runs, args.results) if len(runs) > 1 else [""]):
            pts, x_title, y_title = points(saved, label)
            found.update({name: p for name, p in pts.items() if name not in found})  # references: the first run's
        table = frontier(runs, args.results) if len(runs) > 1 else None
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{' '.join(args.results)}: not results JSONs of unlearn.py ({type(e).__name__})") from None
    if table:
        print(table)
    first = Path(args.results[0])
    draw(found, x_title, y_title, args.title or first.stem, Path(args.out) if args.out else first.with_suffix(".png"))


if __name__ == "__main__":
    run_cli(main)
