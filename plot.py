"""One picture of a comparison: retained accuracy against how deep the forgetting goes, per method.

    python plot.py results/fashion-mnist-cnn-forget3.json              # writes results/...-forget3.png
    python plot.py results/X.json --out figures/depth.png

x: the depth score (0 = the class hidden in the head, 1 = forgotten as deeply as Retrain; a run with
--depth and retrain), or, without it, the time over Retrain's. y: RA minus Retrain's RA (a run with
retrain), else RA. One point per method and seed; a run of several seeds also marks each method's
mean. Methods meeting every target of report.py against their seed's Retrain are filled.

Needs matplotlib, which the project itself does not: pip install matplotlib
"""
import json
from pathlib import Path

from cli import ArgumentParser, UserError, run_cli
from report import REFERENCES, meets_targets


def points(saved):
    """{method: [(x, y, meets), ...]} over the seeds of a results JSON, and the axis titles."""
    per_seed = list(saved["per_seed"].values()) if "per_seed" in saved else [saved["results"]]
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
            found.setdefault(name, []).append((row[x_key], row["RA"] - retrain["RA"],
                                               judged and meets_targets(row, retrain)))
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


def main():
    parser = ArgumentParser(description="Plot a results JSON of unlearn.py: retained accuracy against depth.")
    parser.add_argument("results", help="a results/<...>.json written by unlearn.py")
    parser.add_argument("--out", default=None, help="the picture (default: the JSON's path with .png)")
    parser.add_argument("--title", default=None, help="the title (default: the JSON's name)")
    args = parser.parse_args()
    path = Path(args.results)
    try:
        saved = json.loads(path.read_text())
        found, x_title, y_title = points(saved)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a results JSON of unlearn.py ({type(e).__name__})") from None
    draw(found, x_title, y_title, args.title or path.stem, Path(args.out) if args.out else path.with_suffix(".png"))


if __name__ == "__main__":
    run_cli(main)
