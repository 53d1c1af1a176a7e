"""What unlearning costs, measured side by side: training-step time and peak training memory of full
fine-tuning, LoRA and PruneLoRA on one batch, and a model's inference time against another's.

    python unlearn.py --forget-class 3 --bench-steps 20     # prints step times, their ratios, peak memory

Every figure is a ratio of runs made in turn (two blocks of each method's steps, in order and then in
reverse; a pass of each model), so that other load on the machine affects all alike; the fastest of
several repeats is the least disturbed.
"""
import os
import time
import warnings

import torch
import torch.nn.functional as F

import prunelora as pl
import tie
from checkpoints import fresh_model
from cli import autocast
from data import make_batch, predict
from methods import PREPARE


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


BENCH_METHODS = tuple(PREPARE)  # finetune, lora, prunelora: each model built as its unlearning builds it
COMPILED = "@compiled"          # a bench name's suffix: the same model, its step through torch.compile


def bench_names(args, eager=True):
    """The bench's models: each method eager, and with --compile each compiled too (eager=False: compiled only)."""
    compiled = [f"{name}{COMPILED}" for name in BENCH_METHODS] if getattr(args, "compile", False) else []
    return ([*BENCH_METHODS] if eager or not compiled else []) + compiled


def bench_batch(data, split, args, device):
    """The one batch every bench step trains on: the first batch_size retained training images."""
    batch = split["retain"][:args.batch_size].to(device)
    return make_batch(data, data.train_images, batch), data.train_labels[batch]


def trainer(name, base, x, y, args):
    """`name`'s model built on the base checkpoint, in the mode unlearning trains it in, and a function
    doing one Adam step of it on the batch (x, y): (model, step). A name ending in COMPILED steps
    through torch.compile, as unlearning does with --compile: its first step compiles."""
    device = x.device
    method = name.removesuffix(COMPILED)
    model = fresh_model(base, device)
    PREPARE[method](model, args)
    model.train()
    if method != "finetune" and args.freeze_bn:  # as unlearning trains the low-rank methods: BatchNorm frozen,
        pl.freeze_batchnorm(model)               # which saves its batch statistics and their backward pass
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-9)  # a tiny step: the timing, not the weights, matters
    compiled = name != method
    forward = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None) if compiled else model
    loss_fn = F.cross_entropy
    if method == "prunelora" and getattr(args, "tie_head", 0):
        # the tied head's loss scores the features against class means; their values do not change the cost
        means = torch.randn(model.head.out_features, model.head.in_features, device=device)
        loss_fn = tie.TiedHeadLoss(model, means, args.forget_class, **tie.tie_options(args))

    def step():
        with autocast(device):
            loss = loss_fn(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return model, step


def time_steps(names, base, x, y, args, steps, after_step=None):
    """Seconds of `steps` Adam steps of each named method's model, ({name: [seconds]}, {name: trainable
    parameter count}, {name: seconds of its first step, which compiles a compiled model}). A model's
    steps run back to back, as in training, after 3 untimed warm-up
    steps. Several models run in two blocks, in order and then in reverse (A B C, C B A), the steps
    split between them: a burst of other work on the machine must then hit both of a model's blocks
    to move its fastest step. Blocks rather than single steps in turn: training runs a model's steps
    back to back, and a step just after another model's would start on that model's caches.
    after_step() runs after every step."""
    trainers = {name: trainer(name, base, x, y, args) for name in names}
    blocks = [list(names)] if len(names) == 1 else [list(names), list(names)[::-1]]
    times, first = {name: [] for name in names}, {}
    for number, order in enumerate(blocks):
        timed = steps // len(blocks) + (number < steps % len(blocks))  # this block's share of the steps
        for name in order:
            step = trainers[name][1]
            for i in range(3 + timed):
                start = time.perf_counter()
                step()
                if i >= 3:
                    times[name].append(time.perf_counter() - start)
                first.setdefault(name, time.perf_counter() - start)
                if after_step is not None:
                    after_step()
    return times, {name: sum(p.numel() for p in model.parameters() if p.requires_grad)
                   for name, (model, _) in trainers.items()}, first


def peak_memory_mb(name, base, x, y, args):
    """Peak tensor memory (MiB) from building `name`'s model on the base checkpoint through 3 Adam
    steps: the model's copy, masks, LoRA factors, gradients, optimizer state and activations. On
    the CPU, where no allocator keeps count, it is the highest point of the running sum of the
    profiler's allocation records (frees count negative); peak resident memory would also count
    library code paged in and memory freed earlier but kept by malloc."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "gpuGetDeviceCount failed" line on a machine without a GPU
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        time_steps([name], base, x, y, args, steps=0)
    try:  # kineto_results is not public API: where a torch release lacks it, no CPU figure rather than a crash
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    records = sorted((r.start_ns(), r.nbytes()) for r in events if r.name() == "[memory]")
    total = peak = 0
    for _, nbytes in records:
        total += nbytes
        peak = max(peak, total)
    return peak / 2**20


def profile_steps(name, base, x, y, args, steps, top=8):
    """Where `name`'s training step spends its time: torch.profiler over `steps` steps after the 3
    warm-up steps. Prints the `top` operators by self time per step (on CUDA by GPU time, beside
    their CPU time: there a gap between them is launch overhead) and how many operator calls and
    kernel launches one step makes."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    cuda = x.is_cuda
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=0, warmup=3, active=steps)  # the 3 warm-up steps are not recorded
    captured = []  # the profiler clears its events when the active steps end: take them then
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events")  # the reason for `captured`
        with torch.profiler.profile(activities=activities, schedule=schedule,
                                    on_trace_ready=lambda done: captured.append(done.key_averages())) as prof:
            time_steps([name], base, x, y, args, steps, after_step=prof.step)
    events = captured[0]
    ops = [e for e in events if e.key.startswith("aten::")]
    per_step = {e.key: (e.self_device_time_total / 1000 / steps if cuda else None,
                        e.self_cpu_time_total / 1000 / steps, e.count / steps) for e in ops}  # ms, ms, calls
    order = 0 if cuda else 1
    launches = sum(e.count for e in events if "LaunchKernel" in e.key) / steps
    print(f"\n{name}: self time per step, over {steps} profiled steps ({'GPU ms, CPU ms' if cuda else 'CPU ms'})")
    for key, (gpu, cpu, calls) in sorted(per_step.items(), key=lambda item: item[1][order], reverse=True)[:top]:
        print(f"  {key:38s} " + (f"{gpu:7.2f} " if cuda else "") + f"{cpu:7.2f}  {calls:5.0f} calls")
    total = sum(times[order] for times in per_step.values())
    print(f"  all operators: {total:.2f} ms, {sum(t[2] for t in per_step.values()):.0f} calls"
          + (f", {launches:.0f} kernel launches" if cuda else ""))


def profile_bench(base, data, split, args, device, steps):
    """profile_steps() for each bench method, on the batch bench_step_times() times."""
    x, y = bench_batch(data, split, args, device)
    for name in BENCH_METHODS:
        profile_steps(name, base, x, y, args, steps)


def bench_step_times(base, data, split, args, device, steps, memory=False, eager=True):
    """Seconds per training step on one fixed batch of retained images: full fine-tuning vs LoRA
    (dense base, factored path) vs PruneLoRA (pruned base, masked update), each with Adam, in two
    blocks each (time_steps); the fastest of each method's steps counts. On CUDA,
    and with memory=True on the CPU, also each one's peak training memory in MiB (CUDA's
    max_memory_allocated; peak_memory_mb on the CPU). With --compile each method compiled too (eager=False:
    only compiled), with the seconds its first step took to compile; each step is read against
    fine-tuning's in the same mode, and a compiled step against its eager one."""
    x, y = bench_batch(data, split, args, device)
    names = bench_names(args, eager)
    times, trainable, first = time_steps(names, base, x, y, args, steps)
    rows = {name: dict(step_ms=1000 * min(times[name]), trainable_params=trainable[name]) for name in names}
    for name in names:
        if name.endswith(COMPILED):
            rows[name]["compile_seconds"] = first[name] - min(times[name])
    for name in (n for n in names if not n.endswith(COMPILED)):  # memory in runs of their own, no timing
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()  # the dataset and the batch: not the setup's
            time_steps([name], base, x, y, args, steps=0)
            rows[name]["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - held) / 2**20
        elif memory:
            peak = peak_memory_mb(name, base, x, y, args)
            if peak is not None:
                rows[name]["peak_memory_mb"] = peak
    for name, row in rows.items():
        mode = COMPILED if name.endswith(COMPILED) else ""
        row["step_time_vs_finetune"] = row["step_ms"] / rows[f"finetune{mode}"]["step_ms"]
        eager_row = rows.get(name.removesuffix(COMPILED))
        if mode and eager_row:
            row["step_time_vs_eager"] = row["step_ms"] / eager_row["step_ms"]
    return rows


def print_bench(rows, args, device):
    print(f"\nbatch of {args.batch_size} on {device}, fastest of {args.bench_steps} steps each, "
          "in two blocks (A B C, C B A) of back-to-back steps after 3 warm-up steps:")
    for name, row in rows.items():
        print(f"  {name:19s} {row['step_ms']:8.1f} ms/step  {row['step_time_vs_finetune']:.2f} x finetune  "
              f"{row['trainable_params']:,} trainable"
              + (f"  {row['peak_memory_mb']:.0f} MiB peak" if "peak_memory_mb" in row else "")
              + (f"  {row['step_time_vs_eager']:.2f} x eager, compiled in {row['compile_seconds']:.1f} s"
                 if "compile_seconds" in row else ""))
    if any(name.endswith(COMPILED) for name in rows):
        print(f"{COMPILED}: the same model, its step through torch.compile, read against finetune{COMPILED}")
    if any("peak_memory_mb" in row for row in rows.values()):
        print("peak: tensor memory from building the model through 3 steps" + (
            " (max_memory_allocated)" if device.type == "cuda" else " (the profiler's allocation records)"))
