"""README's prunelora.py recipe on every torchvision classification model, each equivalence checked.

    python zoo.py                         # every model in torchvision.models, random init: a table
    python zoo.py --only mobilenet vit_b  # the models whose names contain these
    python zoo.py --prune-memory --only vit_b_16   # instead: prune_global's resident-memory peak per model

Each model is built with 10 classes and random weights, its classifier found as the last layer
with 10 outputs, then run through the recipe word for word: prune_global 50 % without the head,
add_lora (r=4), mark_only_lora_trainable, two Adam steps in train mode with frozen BatchNorm,
merge_lora. The columns (an x marks a failure, and the script exits 1):
  adapted         weights adapted / all Conv2d, Linear and attention weights; share of all parameters
  B=0             the freshly adapted model gives exactly the pruned model's output
  reached         adapters whose B gets a nonzero gradient in the first step (A's is zero while B = 0);
                  the others have no path to the loss in this random model at this input size (behind an
                  emptied layer, or a depthwise conv whose kept taps all miss a 1 x 1 map): Prune+FT then
                  falls short by the same weights. Dropout and stochastic depth are off for the count
                  (with 2 images, stochastic depth drops whole blocks for the batch at random)
  prune+FT grad   pruned weights that get a gradient when every weight trains (Prune+FT)
  copy, load      copy.deepcopy, and the state_dict loaded into a model pruned and adapted otherwise,
                  give exactly the same output
  merged          max |merged - unmerged| / max |unmerged| (<= 1e-4 passes); the merged model has the
                  original state_dict keys and exactly the pruned zeros
  emptied         layers prune_global pruned entirely (it warns)
"""
import argparse
import copy
import sys
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunelora as pl
from models import tv_size

NUM_CLASSES = 10
ARGS = {"googlenet": dict(aux_logits=False, init_weights=True), "inception_v3": dict(aux_logits=False,
                                                                                      init_weights=True)}
# models.tv_size: 32 x 32, more where a model needs it (as --arch tv: builds them); SqueezeNet at 64 here,
# since at 32 x 32 its final ReLU zeroes every output of a random model, and a check on zeros checks nothing
SIZE = {"squeezenet1_0": 64, "squeezenet1_1": 64}


def build(name, **extra):
    """torchvision model `name`, random init, 10 classes, and its input size."""
    kwargs = dict(ARGS.get(name, {}), num_classes=NUM_CLASSES, **extra)
    size = SIZE.get(name) or tv_size(name)
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    return torchvision.models.get_model(name, **kwargs), size


def head_name(model):
    """The classifier: the last Conv2d/Linear with NUM_CLASSES outputs."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and getattr(m, "out_features", getattr(m, "out_channels", None)) == NUM_CLASSES][-1]


def train_mode(model):
    """Train mode with frozen BatchNorm, as the recipe has it, and no random dropping (see `reached`)."""
    model.train()
    pl.freeze_batchnorm(model)
    for m in model.modules():
        if isinstance(m, (nn.Dropout, torchvision.ops.StochasticDepth)):
            m.eval()


def prepared(name, amount, seed):
    torch.manual_seed(seed)
    model, size = build(name)
    head = head_name(model)
    nn.init.normal_(model.get_submodule(head).weight, 0, 0.01)  # ViTs zero their head: no gradient at all
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.prune_global(model, amount, exclude=(head,))
    emptied = sum(str(w.message).count(".weight") for w in caught if "every weight" in str(w.message))
    return model, size, head, emptied


def check(name, steps=2):
    torch.manual_seed(0)
    reference, size = build(name)
    keys, params = set(reference.state_dict()), sum(p.numel() for p in reference.parameters())
    del reference  # one model in memory at a time where possible: the largest have 640M parameters
    x = torch.randn(2, 3, size, size)
    labels = torch.tensor([0, 1])
    row = dict(model=name)

    # Prune+FT: every pruned weight should get a gradient, also where a parent reads it
    model, _, head, _ = prepared(name, 0.5, seed=0)
    train_mode(model)
    F.cross_entropy(model(x), labels).backward()
    pruned = [model.get_submodule(n.rpartition(".")[0]).parametrizations[n.rpartition(".")[2]].original
              for n, _, _ in pl.prunable(model, (head,))]
    row["prune+FT grad"] = (sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in pruned), len(pruned))
    del model, pruned

    # the recipe
    model, _, head, row["emptied"] = prepared(name, 0.5, seed=0)
    pruned_out = model.eval()(x)
    adapted = pl.add_lora(model, r=4, alpha=8, exclude=(head,))
    row["B=0"] = torch.equal(model(x), pruned_out)
    total = pl.prunable(model)
    adapted_params = sum(getattr(m, t).numel() for n, m, t in total if n in set(adapted))
    row["adapted"] = (len(adapted), len(total), adapted_params / params)
    pl.mark_only_lora_trainable(model, keep=(head,))
    factors = [m for m in model.modules() if isinstance(m, pl.PrunedLoRA) and m.lora_A is not None]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        train_mode(model)
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        if step == 0:
            row["reached"] = (sum(bool(m.lora_B.grad.abs().sum() > 0) for m in factors), len(factors))
        optimizer.step()
    model.eval()
    del optimizer
    with torch.no_grad():
        out = model(x)
        row["copy"] = torch.equal(copy.deepcopy(model)(x), out)
        # the state_dict loaded as it is (torch.save/load round-trips tensors bit for bit): a serialised copy
        # beside two 640M-parameter models ran a 24 GB machine out of memory
        other, _, _, _ = prepared(name, 0.2, seed=1)  # other weights, other masks
        pl.add_lora(other, r=4, alpha=8, exclude=(head,))
        other.load_state_dict(model.state_dict())
        row["load"] = torch.equal(other.eval()(x), out)
        del other
        masks = {n: pl._mask(m, t).clone() for n, m, t in pl.prunable(model) if pl._mask(m, t) is not None}
        pl.merge_lora(model)
        row["merged"] = ((model(x) - out).abs().max() / out.abs().max()).item()  # nan (a failure) if out is all 0
        row["keys"] = set(model.state_dict()) == keys
        row["zeros"] = all(torch.equal(model.get_parameter(n) == 0, ~mask) for n, mask in masks.items())
    return row


def prune_peak(name, results):
    """Child process: the rise of the resident-memory peak while prune_global prunes `name` 50 %."""
    import resource
    torch.manual_seed(0)
    model, _ = build(name)
    params = sum(p.numel() for p in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.prune_global(model, 0.5, exclude=(head_name(model),))
    results.put((params, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def prune_memory(names):
    """One fresh process per model, since the peak a process reports is that of its whole life."""
    import multiprocessing
    context = multiprocessing.get_context("spawn")
    print("| model | parameters | resident peak before -> while pruning | above the model, bytes per parameter |")
    print("|---|---|---|---|")
    for name in names:
        results = context.Queue()
        child = context.Process(target=prune_peak, args=(name, results))
        child.start()
        child.join()  # the result is three numbers: it fits the queue's pipe, so the child can end first
        if child.exitcode != 0:  # killed for memory, say: a row that says so, not a wait on an empty queue
            print(f"| {name} | x the process ended with exit code {child.exitcode} | | |", flush=True)
            continue
        params, before, after = results.get()
        print(f"| {name} | {params / 1e6:.1f} M | {before / 2**20:.2f} -> {after / 2**20:.2f} GB | "
              f"{(after - before) * 1024 / params:.1f} |", flush=True)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="only the models whose names contain these")
    parser.add_argument("--prune-memory", action="store_true",
                        help="instead: prune_global's resident-memory peak on each model (one process each)")
    args = parser.parse_args()
    names = [n for n in torchvision.models.list_models(module=torchvision.models)
             if args.only is None or any(part in n for part in args.only)]
    if args.prune_memory:
        return prune_memory(names)
    print("| model | adapted / all weights | adapted share | B=0 | reached | prune+FT grad | copy | load | "
          "merged (rel) | keys | zeros | emptied |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for name in names:
        try:
            row = check(name)
        except Exception as error:  # a model that cannot even run: a row that says so
            print(f"| {name} | x {type(error).__name__}: {str(error).splitlines()[0][:80]} |", flush=True)
            failures += 1
            continue
        ok = lambda flag: "yes" if flag else "x"  # noqa: E731
        good = (row["B=0"] and row["copy"] and row["load"] and row["keys"] and row["zeros"]
                and row["merged"] <= 1e-4)
        failures += not good
        print(f"| {name} | {row['adapted'][0]} / {row['adapted'][1]} | {100 * row['adapted'][2]:.1f} % | "
              f"{ok(row['B=0'])} | {row['reached'][0]} / {row['reached'][1]} | "
              f"{row['prune+FT grad'][0]} / {row['prune+FT grad'][1]} | {ok(row['copy'])} | {ok(row['load'])} | "
              f"{row['merged']:.1e}{'' if row['merged'] <= 1e-4 else ' x'} | {ok(row['keys'])} | "
              f"{ok(row['zeros'])} | {row['emptied']} |", flush=True)
    print(f"{len(names) - failures} of {len(names)} models pass every equivalence")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
