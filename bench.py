"""What unlearning costs, measured side by side in one process: training-step time and (on CUDA) peak memory of
full fine-tuning, LoRA and PruneLoRA on one batch, and a model's inference time.

    python unlearn.py --forget-class 3 --bench-steps 20     # prints the step-time ratios

Every figure is a ratio of runs made back to back, so that other load on the machine affects both
alike; the minimum of several repeats is the least disturbed.
"""
import time

import torch
import torch.nn.functional as F

import prunelora as pl
from checkpoints import fresh_model
from cli import autocast
from data import make_batch, predict
from models import HEAD


@torch.no_grad()
def inference_time_ratio(model, reference, data, rounds=15, batch_size=256):
    """Inference time of model over reference's on one test batch: the fastest of `rounds` forward
    passes each, taken in turn (model, reference, model, ...) so that a burst of other work on the
    machine slows both alike, and the fastest pass is the least disturbed."""
    batch = data.test_images[:batch_size]
    times = {"model": [], "reference": []}
    for _ in range(rounds + 1):
        for key, m in (("model", model), ("reference", reference)):
            if batch.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            predict(m, data, batch)
            if batch.is_cuda:
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    return min(times["model"][1:]) / min(times["reference"][1:])  # [1:]: the first round warms up


def bench_step_times(base, data, split, args, device, steps):
    """Seconds per training step on one fixed batch of retained images: full fine-tuning vs LoRA
    (dense base, factored path) vs PruneLoRA (pruned base, masked update), each with Adam."""
    batch = split["retain"][:args.batch_size].to(device)
    x, y = make_batch(data, data.train_images, batch), data.train_labels[batch]
    setups = {
        "finetune": lambda model: None,
        "lora": lambda model: pl.add_lora(model, args.rank, args.alpha, args.lora_dropout, exclude=HEAD),
        "prunelora": lambda model: (pl.prune_global(model, args.prune_amount, exclude=HEAD),
                                    pl.add_lora(model, args.rank, args.alpha, args.lora_dropout, exclude=HEAD)),
    }
    rows = {}
    for name, setup in setups.items():
        model = fresh_model(base, device)
        setup(model)
        if name != "finetune":
            pl.mark_only_lora_trainable(model, keep=HEAD)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-9)  # a tiny step: the timing, not the weights, matters
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(steps + 3):  # 3 warm-up steps
            start = time.perf_counter()
            with autocast(device):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows[name] = dict(step_ms=1000 * min(times[3:]), trainable_params=sum(p.numel() for p in params))
        if device.type == "cuda":
            rows[name]["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for row in rows.values():
        row["step_time_vs_finetune"] = row["step_ms"] / rows["finetune"]["step_ms"]
    return rows


def print_bench(rows, args, device):
    print(f"\nbatch of {args.batch_size} on {device}, fastest of {args.bench_steps} steps after 3 warm-up steps:")
    for name, row in rows.items():
        print(f"  {name:10s} {row['step_ms']:8.1f} ms/step  {row['step_time_vs_finetune']:.2f} x finetune  "
              f"{row['trainable_params']:,} trainable" + (f"  {row['peak_memory_mb']:.0f} MB peak" if "peak_memory_mb" in row else ""))
