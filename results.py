"""The comparison's results: one row per method and seed, their mean ± standard deviation, the
tables and the JSON that unlearn.py writes, and --resume for a run of several seeds that was cut.

Row names: the method, or method@<E>ep when --epochs names several counts. A run of several seeds
writes each finished seed's rows to <results>.partial.json, so that a kill loses at most one seed.
"""
import json

from checkpoints import save_text
from cli import UserError
from depth import add_depth_scores, separation, separation_table
from evaluate import NEAR_CHANCE, markdown_table, near_chance, summarize, time_to_target, time_to_target_table

NO_EPOCHS = ("retrain", "hidden")  # run once whatever --epochs says: Retrain trains as the base did


def method_runs(methods, epochs):
    """(method, epochs, row name) of each run: one per epoch count, named method@<E>ep where there are several."""
    return [(m, e, m if len(epochs) == 1 or m in NO_EPOCHS else f"{m}@{e}ep")
            for m in methods for e in (epochs[-1:] if m in NO_EPOCHS else epochs)]


def run_settings(args):
    """What the results record of the command, and what --resume must find unchanged. --bench-profile
    only prints, so a run cut before it existed, or resumed with or without it, still matches."""
    skip = ("base_ckpt", "resume", "bench_profile")
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
        raise UserError(f"--resume: {partial} is not a partial result of unlearn.py; delete it or run without --resume") from None
    for key, value in run_settings(args).items():
        if earlier.get(key) != value:
            raise UserError(f"--resume: {partial} was started with {key}={earlier.get(key)!r}, not {value!r}; "
                            "use the same settings or run without --resume")
    print(f"--resume: seeds {', '.join(map(str, per_seed))} finished earlier, taken from {partial}", flush=True)
    # scored again from their raw measures: a seed finished by an older version of this code must sit
    # on the same depth scale as the seeds run now, or their mean mixes two scales
    return {seed: add_depth_scores(rows) for seed, rows in per_seed.items()}


def report(per_seed, run, args):
    """One seed: its table. Several: mean ± standard deviation per cell, and every seed's rows in the JSON."""
    settings = run_settings(args)
    bases = [str(base.path) for base in run.bases]
    if len(per_seed) == 1:
        (shown,) = per_seed.values()
        settings["seed"], table = args.seed[0], markdown_table(shown)
        saved = dict(settings=settings, base=bases[0], device=str(run.device), results=shown)
    else:
        shown, spread = summarize(list(per_seed.values()))
        table = f"mean ± standard deviation over seeds {', '.join(map(str, per_seed))}\n\n{markdown_table(shown, spread)}"
        saved = dict(settings=settings, base=bases, device=str(run.device), results=shown, spread=spread,
                     per_seed={str(seed): rows for seed, rows in per_seed.items()})
    measure = next((row["depth_measure"] for rows in per_seed.values() for row in rows.values()
                    if "depth_measure" in row), None)
    if measure:  # which measure the score reads (10 shots where a class has fewer than 50 images)
        table += f"\n\ndepth score: {measure} on the scale 0 = hidden (the base's features), 1 = Retrain"
    noisy = near_chance(shown)
    if noisy and not args.forget_class:  # (a forgotten class's confidences sit far below any threshold)
        table += (f"\n\nattack acc under {NEAR_CHANCE:g} % (near chance) for {', '.join(noisy)}: the attack barely "
                  "tells training images from unseen ones, so their MIA-efficacy is mostly noise")
    if len(per_seed) > 1 and args.depth and "retrain" in run.methods:  # which depth measure tells hidden from Retrain
        saved["depth_separation"] = separation(per_seed)
        table += ("\n\ndepth measures at the two ends of the scale (separation: their gap over the larger "
                  f"standard deviation)\n\n{separation_table(saved['depth_separation'])}")
    if len(args.epochs) > 1 and "retrain" in run.methods and args.forget_class:
        runs = {}  # {method: {epochs: row name}}
        for method, epochs, name in method_runs(run.methods, args.epochs):
            if method not in NO_EPOCHS:
                runs.setdefault(method, {})[epochs] = name
        found = time_to_target(per_seed, runs)
        saved["time_to_target"] = {m: [dict(epochs=e, seconds=t) for e, t in hits] for m, hits in found.items()}
        table += ("\n\nfewest epochs to the targets (UA >= 99.9, MIA >= 99, RA >= Retrain - 0.3, TA >= Retrain - 1.0)"
                  f"\n\n{time_to_target_table(found, per_seed, args.epochs[-1])}")
    save_text(json.dumps(saved, indent=2), run.results)
    save_text(f"{table}\n", run.results.with_suffix(".md"))
    print(f"\n{table}\n\nwritten to {run.results} and {run.results.with_suffix('.md')}")
