"""Timing and memory measurements that the benchmarks share: interleaved repetitions (CUDA events on a
GPU), one inference or training step of a module, and the bytes a forward saves for backward."""

import os
import random
import statistics
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The CPU's clock: wall time, or with use_process_time() the CPU time of this process, which other
# processes on a shared machine disturb far less (for one thread: OMP_NUM_THREADS=1).
cpu_clock = time.perf_counter


def use_process_time():
    global cpu_clock
    cpu_clock = time.process_time


def elapsed_seconds(fn, device):
    """Seconds of one call of fn: CUDA events on a GPU, ``cpu_clock`` on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = cpu_clock()
    fn()
    return cpu_clock() - begin


def time_round_robin(fns, reps, warmup, device, progress):
    """Median seconds of each fn, repetitions interleaved across fns in a
    shuffled order each round (no contender always follows the same one)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(reps):
        for name in order.sample(list(fns), len(fns)):
            times[name].append(elapsed_seconds(fns[name], device))
        progress.update(1)
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def inference_step(module, x):
    def step():
        with torch.no_grad():
            module(x)
    return step


def training_step(module, x, grad_y):
    trainable = [p for p in module.parameters() if p.requires_grad]

    def step():
        x.grad = None
        for p in trainable:
            p.grad = None
        module(x).backward(grad_y)
    return step


def saved_bytes(module, x):
    """Bytes of the tensors module's forward saves for backward, each storage
    counted once, the module's parameters not counted (they are not copies).

    Returns (all, beyond_input): the second leaves out x itself, which the
    caller holds anyway, so it is the memory this layer adds.
    """
    parameter_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    total = sum(storages.values())
    return total, total - storages.get(x.untyped_storage().data_ptr(), 0)


def profiler_activities(device):
    """The torch profiler's activities for counting on ``device``. On a CPU, kineto's messages are
    turned off first: a CUDA build of torch prints them on every profile (profiler_start/stop lines,
    and without a GPU "gpuGetDeviceCount failed"); kineto reads the setting at its first use."""
    from torch.profiler import ProfilerActivity

    if device.type != "cuda":
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        return [ProfilerActivity.CPU]
    return [ProfilerActivity.CPU, ProfilerActivity.CUDA]
