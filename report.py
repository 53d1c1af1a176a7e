"""The comparison's results: the targets and each method's verdict, tables for the terminal and
for Markdown, mean ± standard deviation over seeds, the .json and .md that unlearn.py writes, and
--resume of a run of several seeds that was cut.

Row names: the method, or method@<E>ep when --epochs names several counts. A run of several seeds
writes each finished seed's rows to <results>.partial.json, so that a kill loses at most one seed.
"""
import json
import math
import statistics

import distributed
from checkpoints import save_text
from cli import UserError, command_line
from depth import SCORES, add_depth_scores, separation

NO_EPOCHS = ("retrain", "hidden")  # run once whatever --epochs says: Retrain trains as the base did
REFERENCES = ("base", "retrain", "hidden")  # rows that are not judged against the targets

# -----------------------------------------------------------------------------
# the targets, and a verdict per method

TARGETS = "UA >= 99.9, MIA >= 99, RA >= Retrain - 0.3, TA >= Retrain - 1.0"


def shortfalls(row, retrain):
    """{metric: (value, target)} for each target of class forgetting that the row misses (TARGETS)."""
    targets = dict(UA=99.9, MIA=99.0, RA=retrain["RA"] - 0.3, TA=retrain["TA"] - 1.0)
    return {key: (row[key], target) for key, target in targets.items() if row[key] < target}


def meets_targets(row, retrain):
    """The project's target for class forgetting (TARGETS); the paper's PruneLoRA reached UA 99.78, MIA 97.68."""
    return not shortfalls(row, retrain)


def verdicts(per_seed, forget_class):
    """One line per method: whether it met the targets against the same seed's Retrain, and where it
    did not, which target it missed, on how many seeds and by how much at most."""
    names = [n for n in next(iter(per_seed.values())) if n not in REFERENCES]
    if not forget_class:  # a random sample: Retrain's UA is its test error, so there are no fixed targets
        if any("avg_gap" not in rows.get(n, {}) for rows in per_seed.values() for n in names):
            return ["no verdict: add retrain to --method to read the methods against it"]
        return [f"{n:16s} average gap to Retrain over UA, MIA, RA, TA: "
                f"{statistics.fmean(rows[n]['avg_gap'] for rows in per_seed.values()):.2f} points (lower is closer)"
                for n in names]
    if any("retrain" not in rows for rows in per_seed.values()):
        return [f"no verdict on RA and TA without Retrain: add retrain to --method ({TARGETS})"]
    lines, seeds = [], len(per_seed)
    for name in names:
        missed = {}  # metric -> [shortfall, ...] over the seeds where it missed
        for rows in per_seed.values():
            for key, (value, target) in shortfalls(rows[name], rows["retrain"]).items():
                missed.setdefault(key, []).append(target - value)
        if not missed:
            lines.append(f"{name:16s} meets every target" + (f" on all {seeds} seeds" if seeds > 1 else ""))
            continue
        parts = [f"{key} by {max(gaps):.2f}" + (f" on {len(gaps)} of {seeds} seeds" if seeds > 1 else "")
                 for key, gaps in missed.items()]
        lines.append(f"{name:16s} misses {', '.join(parts)}")
    return lines


WEAK_BASE = 50.0  # % test accuracy under which the base model is called too weak for the comparison


def weak_base(per_seed, forget_class):
    """A warning line when a seed's base model is too weak for the comparison to mean anything, else None.
    Judged on the base's test accuracy: on the retained classes (TA) and, forgetting classes, on the
    forget classes (a model that never learned the class forgets it for free)."""
    bases = [rows["base"] for rows in per_seed.values()]
    retained = min(base["TA"] for base in bases)                            # the weakest seed on each
    forgotten = min(base.get("forget_test_acc", 100.0) for base in bases)
    if min(retained, forgotten) >= WEAK_BASE:
        return None
    return (f"warning: the base model reaches only {retained:.1f} % test accuracy on the retained classes"
            + (f" and {forgotten:.1f} % on the forgotten ones" if forget_class else "")
            + f" (under {WEAK_BASE:g} % counts as too weak): it has not learned what it is to forget, so this "
            "comparison says little; train the base longer (--base-epochs) or on more images")


def last_epochs(tasks, count=3):
    """A note on whether each seed's base had stopped improving: its test accuracy after each of its last
    count epochs, as train.py recorded them (test_history; a checkpoint from before it kept them has none,
    and the epochs before a --resume of such a checkpoint read '?'). None when no base has a record."""
    parts = []
    for task in tasks:
        history = task.ckpt.get("test_history") or []
        if any(acc is not None for acc in history):
            shown = " / ".join("?" if acc is None else f"{acc:.2f}" for acc in history[-count:])
            parts.append(f"{shown} %" + (f" (seed {task.seed})" if len(tasks) > 1 else ""))
    if not parts:
        return None
    return (f"the base's test accuracy over its last epochs: {'; '.join(parts)}. Depth and \"retains more\" "
            "mean something only on a base that has stopped improving")


def time_to_target(per_seed, runs):
    """per_seed: {seed: rows}; runs: {method: {epochs: row name}}. For each method, the fewest
    epochs after which it meets the targets against the same seed's Retrain (None: not within the
    epochs run), and those runs' seconds, per seed: {method: [(epochs, seconds), ...]}."""
    found = {}
    for method, names in runs.items():
        found[method] = []
        for rows in per_seed.values():
            hits = [(e, rows[name]["seconds"]) for e, name in sorted(names.items())
                    if meets_targets(rows[name], rows["retrain"])]
            found[method].append(hits[0] if hits else (None, None))
    return found


def time_to_target_table(found, per_seed, max_epochs):
    """time_to_target() as a markdown table, beside Retrain's own seconds (mean over seeds)."""
    retrain = statistics.fmean(rows["retrain"]["seconds"] for rows in per_seed.values())
    lines = [f"| method | fewest epochs to target{' (per seed)' if len(per_seed) > 1 else ''} | seconds "
             "| time / Retrain |", "|---|---|---|---|", f"| retrain |  | {retrain:.1f} | 1.000 |"]
    for method, hits in found.items():
        epochs = ", ".join(f"{e}" if e else f"> {max_epochs}" for e, _ in hits)
        seconds = [t for _, t in hits if t is not None]
        time = statistics.fmean(seconds) if len(seconds) == len(hits) else None
        lines.append(f"| {method} | {epochs} | {'' if time is None else f'{time:.1f}'} | "
                     f"{'' if time is None else f'{time / retrain:.3f}'} |")
    return "\n".join(lines)


# An attack this close to chance puts its threshold where members' and non-members' scores overlap
# most, so a small shift of it moves MIA-efficacy by many points (RESULTS.md, forgetting a random sample).
NEAR_CHANCE = 55.0


def near_chance(rows):
    """Names of the rows whose attack accuracy is under NEAR_CHANCE: their MIA-efficacy is mostly noise."""
    return [name for name, row in rows.items() if row.get("MIA_attack_acc", 100.0) < NEAR_CHANCE]

# -----------------------------------------------------------------------------
# tables

# (key, title, format, what the column means)
COLUMNS = [
    ("UA", "UA", "{:.2f}", "100 - accuracy on the forget images (higher: more forgotten)"),
    ("MIA", "MIA", "{:.2f}", "share of forget images a membership attack calls unseen (higher: more forgotten)"),
    ("RA", "RA", "{:.2f}", "accuracy on the retained training images (higher: more retained)"),
    ("TA", "TA", "{:.2f}", "test accuracy on the retained classes (higher: more retained)"),
    ("forget_test_acc", "forget test acc", "{:.2f}", "test accuracy on the forget classes"),
    ("MIA_gap", "MIA - Retrain", "{:+.2f}", "MIA minus Retrain's (far above it: over-unlearning)"),
    ("MIA_attack_acc", "attack acc", "{:.2f}", "the attack's accuracy on held-out images (near 50: MIA is noise)"),
    ("avg_gap", "avg gap to Retrain", "{:.2f}", "mean absolute gap to Retrain over UA, MIA, RA, TA"),
    ("seconds", "seconds", "{:.1f}", "wall time of the method (Retrain: its training time)"),
    ("time_vs_retrain", "time / Retrain", "{:.3f}", "seconds over Retrain's"),
    ("step_time_vs_finetune", "step time / finetune", "{:.2f}", "one training step's time over full fine-tuning's"),
    ("compile_seconds", "compile seconds", "{:.1f}", "--compile: seconds the first step spent compiling"),
    ("trainable_params", "trainable params", "{:,}", "parameters the method trains"),
    ("trainable_share", "trainable share", "{:.4f}", "trainable params over all parameters"),
    ("sparsity", "sparsity", "{:.4f}", "share of exact zeros in the Conv2d/Linear weights"),
    ("inference_time_ratio", "inference time / base", "{:.2f}", "inference time of the model over the base's"),
    ("peak_memory_mb", "peak GPU MB", "{:.0f}", "peak GPU memory while unlearning"),
    ("relearn_steps", "relearn steps", "{:.4g}", "SGD steps until the class is recognised again (fewer: shallower)"),
    ("probe_acc", "probe acc", "{:.2f}", "a linear probe on the features finds the forget class (balanced %)"),
    ("ncm_acc", "10-shot NCM acc", "{:.2f}", "a 10-shot nearest-class-mean probe finds the forget class (%)"),
    ("ncm_acc_50", "50-shot NCM acc", "{:.2f}", "the same with 50 shots"),
    ("cka_base", "CKA to base", "{:.3f}", "similarity of the forget images' features to the base's (0 to 1)"),
    ("depth_score", "depth score", "{:.2f}", "how deep the forgetting goes: 0 = hidden in the head, 1 = Retrain"),
    ("depth_score_2", "depth score 2", "{:.2f}", "the same on a second readout (depth.SECOND_MEASURES)"),
]
TERMINAL = ("UA", "MIA", "RA", "TA", "depth_score", "depth_score_2", "seconds", "time_vs_retrain")  # printed


def cell(row, spread, key, fmt, name=None):
    value = row.get(key)
    text = fmt.format(value) if value is not None else ""
    if text and spread is not None and spread.get(name, {}).get(key) is not None:
        text += " ± " + fmt.replace("+", "").format(spread[name][key])
    return text


def markdown_table(rows, spread=None):
    """rows: {name: {metric: value}} -> a Markdown table with the columns that any row has;
    with spread (the same shape), each cell reads 'value ± spread'."""
    columns = [c for c in COLUMNS if any(c[0] in row for row in rows.values())]
    lines = ["| method | " + " | ".join(title for _, title, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(row, spread, k, f, name) for k, _, f, _ in columns) + " |")
    return "\n".join(lines)


def terminal_table(rows, spread=None):
    """The main columns, aligned for a terminal (the .md and .json hold them all)."""
    columns = [c for c in COLUMNS if c[0] in TERMINAL and any(c[0] in row for row in rows.values())]
    grid = [["method", *(title for _, title, _, _ in columns)]]
    grid += [[name, *(cell(row, spread, k, f, name) for k, _, f, _ in columns)] for name, row in rows.items()]
    widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
    return "\n".join("  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in
                               enumerate(zip(line, widths))).rstrip() for line in grid)


def legend(rows):
    return "\n".join(f"- **{title}**: {meaning}" for key, title, _, meaning in COLUMNS
                     if any(key in row for row in rows.values()))


def summarize(runs):
    """runs: a list of rows dicts, one per seed -> (mean rows, standard-deviation rows), over every
    number that all runs have (sample standard deviation; 0 for a single run)."""
    mean, spread = {}, {}
    for name in runs[0]:
        mean[name], spread[name] = {}, {}
        for key in runs[0][name]:
            values = [run.get(name, {}).get(key) for run in runs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                mean[name][key] = statistics.fmean(values)
                spread[name][key] = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def separation_table(table):
    """depth.separation() as a markdown table."""
    lines = ["| measure | hidden (base) | Retrain | separation |", "|---|---|---|---|"]
    for measure, r in table.items():
        lines.append(f"| {measure} | {r['hidden']:.2f} ± {r['hidden_std']:.2f} | {r['retrain']:.2f} ± "
                     f"{r['retrain_std']:.2f} | {r['separation']:.1f} |")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# the files unlearn.py writes


def method_runs(methods, epochs, own_epochs=None):
    """(method, epochs, row name) of each run: one per epoch count, named method@<E>ep where there are several.
    own_epochs: {method: E} for a method whose setting has its own count (--deep 1's PruneLoRA), with one count."""
    own = own_epochs or {}
    return [(m, own.get(m, e), m if len(epochs) == 1 or m in NO_EPOCHS else f"{m}@{e}ep")
            for m in methods for e in (epochs[-1:] if m in NO_EPOCHS else epochs)]


def run_settings(args):
    """What the results record of the command, and what --resume must find unchanged. --bench-profile
    only prints, so a run cut before it existed, or resumed with or without it, still matches."""
    skip = ("resume", "bench_profile")
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}))


def save_partial(per_seed, args, partial):
    """After each seed of several: the rows so far, for --resume."""
    save_text(json.dumps(dict(settings=run_settings(args), per_seed=per_seed), indent=2), partial)


def finished_seeds(partial, args):
    """--resume: {seed: rows} of the seeds a cut run of the same command finished (none without a file)."""
    if not partial.is_file():
        print(f"--resume: no {partial} yet; running every seed", flush=True)
        return {}
    try:
        saved = json.loads(partial.read_text())
        earlier, per_seed = saved["settings"], {int(seed): rows for seed, rows in saved["per_seed"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"--resume: {partial} is not a partial result of unlearn.py; "
                        "delete it or run without --resume") from None
    for key, value in run_settings(args).items():
        if key not in earlier and not value:  # an option newer than the cut run, and off now: the same run
            continue
        if earlier.get(key) != value:
            raise UserError(f"--resume: {partial} was started with {key}={earlier.get(key)!r}, not {value!r}; "
                            "use the same settings or run without --resume")
    print(f"--resume: seeds {', '.join(map(str, per_seed))} finished earlier, taken from {partial}", flush=True)
    # scored again from their raw measures: a seed finished by an older version of this code must sit
    # on the same depth scale as the seeds run now, or their mean mixes two scales
    return {seed: add_depth_scores(rows) for seed, rows in per_seed.items()}


def report(per_seed, run, args):
    """Print the aligned table, the notes and one verdict per method; write the .json (every number)
    and the .md (command, settings, tables, verdicts, a legend of the columns)."""
    settings = run_settings(args)
    bases = [str(task.path) for task in run.tasks]
    if len(per_seed) == 1:
        (shown,), spread = per_seed.values(), None
        settings["seed"], title = args.seed[0], f"seed {args.seed[0]}"
        saved = dict(settings=settings, base=bases[0], device=str(run.device), results=shown)
    else:
        shown, spread = summarize(list(per_seed.values()))
        title = f"mean ± standard deviation over seeds {', '.join(map(str, per_seed))}"
        saved = dict(settings=settings, base=bases, device=str(run.device), results=shown, spread=spread,
                     per_seed={str(seed): rows for seed, rows in per_seed.items()})
    notes = []
    for score in SCORES:  # which measure each score reads (NCM: 10 shots where a class has fewer than 50 images)
        key = score.replace("score", "measure")  # as add_depth_scores names it
        measure = next((row[key] for rows in per_seed.values() for row in rows.values() if key in row), None)
        if measure:
            notes.append(f"{score}: {measure} on the scale 0 = hidden (the base's features), 1 = Retrain")
    history = last_epochs(run.tasks)
    if history:
        notes.append(history)
        saved["base_test_history"] = {str(task.seed): task.ckpt.get("test_history") for task in run.tasks}
    noisy = near_chance(shown)
    if noisy and not args.forget_class:  # (a forgotten class's confidences sit far below any threshold)
        notes.append(f"attack acc under {NEAR_CHANCE:g} % (near chance) for {', '.join(noisy)}: the attack barely "
                     "tells training images from unseen ones, so their MIA-efficacy is mostly noise")
    if len(per_seed) > 1 and args.depth and "retrain" in run.methods:  # which depth measure tells hidden from Retrain
        saved["depth_separation"] = separation(per_seed)
        notes.append("depth measures at the two ends of the scale (separation: their gap over the larger "
                     f"standard deviation)\n\n{separation_table(saved['depth_separation'])}")
    if len(args.epochs) > 1 and "retrain" in run.methods and args.forget_class:
        runs = {}  # {method: {epochs: row name}}
        for method, epochs, name in method_runs(run.methods, args.epochs):
            if method not in NO_EPOCHS:
                runs.setdefault(method, {})[epochs] = name
        found = time_to_target(per_seed, runs)
        saved["time_to_target"] = {m: [dict(epochs=e, seconds=t) for e, t in hits] for m, hits in found.items()}
        notes.append(f"fewest epochs to the targets ({TARGETS})\n\n"
                     f"{time_to_target_table(found, per_seed, args.epochs[-1])}")
    saved["world_size"] = distributed.world_size()  # processes under torchrun (1 without)
    verdict = verdicts(per_seed, args.forget_class)
    warning = weak_base(per_seed, args.forget_class)
    saved["verdicts"] = verdict + ([warning] if warning else [])
    command = command_line()
    device = f"{run.device}" + (f", {saved['world_size']} processes" if saved["world_size"] > 1 else "")
    md = "\n\n".join([f"# Unlearning results: {run.results.stem}", f"Command: `{command}`",
                      f"Device: {device}. Base model{'s' if len(bases) > 1 else ''}: {', '.join(bases)}.",
                      "Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()),
                      f"## Results ({title})", markdown_table(shown, spread), *notes,
                      f"## Verdict ({TARGETS}, against Retrain of the same seed)",
                      "\n".join(f"- {line}" for line in saved["verdicts"]), "## Columns", legend(shown)])
    save_text(json.dumps(saved, indent=2), run.results)
    save_text(md + "\n", run.results.with_suffix(".md"))
    print(f"\n{title}\n\n{terminal_table(shown, spread)}", *(f"\n{note}" for note in notes), sep="\n")
    print(f"\nverdict ({TARGETS}, against Retrain of the same seed):", *verdict, sep="\n  ")
    if warning:
        print(f"\n{warning}")
    print(f"\nevery column, the settings and the command: {run.results.with_suffix('.md')} (and .json)")
