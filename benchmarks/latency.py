"""What does the mixer cost? Latency and memory of moslora_ext against LoRA.

Every contender wraps the same frozen base ``nn.Linear`` and runs on the same
input in one process, measured round-robin (one repetition of each in turn,
in a shuffled order) so that machine drift hits all of them alike; the median
is reported. ours_merged computes exactly what base computes: its ratio shows
the noise of the run.

Contenders:
  base            the frozen nn.Linear alone: the floor
  lora_torch      LoRA as usually written: base(x) + lora_B(lora_A(dropout(x))) * s
  lora_compiled   lora_torch under torch.compile (inductor): LoRA as most people run it today
  moslora_torch   MoSLoRA as the released code writes it: three nn.Linear
  peft_lora       PEFT's own LoRA layer (when peft is installed)
  ours_peft       the PEFT route's layer (what get_peft_model(model, moslora_ext.MoSLoRAConfig(...)) puts
                  there: PEFT's LoRA Linear with the MoSLoRA variant; float32 adapters on a half base, as
                  PEFT's autocast_adapter_dtype): should cost what ours costs
  ours            moslora_ext.Linear, unmerged (on a float16/bfloat16 base: float32 adapter parameters)
  ours_base_dtype ours with the adapter parameters in the base dtype (autocast_adapter_dtype=False):
                  the cost of float32 adapters is ours / ours_base_dtype (the same layer on float32)
  ours_lora       moslora_ext.Linear with an identity, frozen mixer (LoRA on our kernels)
  ours_named      moslora_ext.Linear holding a second, inactive named adapter: costs what ours costs
  ours_merged     moslora_ext.Linear after merge() (inference only)

Modes: inference (forward under no_grad), training (forward + backward with an
input that requires grad, as inside a network), merge (folding the adapter
into the weight). Memory: bytes saved for backward by each contender (the
parameters themselves excluded), with dropout off and on, and on CUDA the
peak allocated memory of a training step. Launches: with dropout on, the
operators (CPU) or CUDA kernels (GPU) the torch profiler records in one
forward and in one backward, at N/4 and at N tokens.

    python benchmarks/latency.py --quick            # one LLaMA shape, ~2 min on 2 CPU cores
    python benchmarks/latency.py                    # all shapes, ranks and token counts
    python benchmarks/latency.py --device cuda      # bf16 and fp16 on the GPU
    python benchmarks/latency.py --quick --quantized  # adds a quantized-base (QLoRA) row per case
    python benchmarks/latency.py --quick --moe        # adds mixture-of-experts rows, E = 8, 64, 128 (benchmarks/moe.py)
    python benchmarks/latency.py --quick --moe-only   # those rows alone, to moe-<device>.json
    OMP_NUM_THREADS=1 python benchmarks/latency.py --cpu-clock process ...  # steadier on a shared machine
    python benchmarks/latency.py --quick --mixed      # adds a mixed-adapter batch row per case

Quantized-base row (--quantized, needs bitsandbytes): one bitsandbytes nf4
Linear4bit (compute and input in --quantized-dtype) alone (qbase), under
PEFT's QLoRA layer (peft_qlora) and under moslora_ext.QuantizedLinear
(ours_qlora, float32 adapter parameters as PEFT's): training-step time and
bytes saved for backward, with dropout off and on. The dtype defaults to
bfloat16 on GPUs and on CPUs with native bf16 matmuls (AVX-512-BF16 or AMX),
and to float32 on other CPUs, where a bf16 matmul runs about 40 times slower
than a float32 one (0.8 against 33 GFLOP/s measured on a 2-core AVX2 machine).

Mixed-batch row (--mixed): one layer holding four adapters serves a batch of
8 rows, two per adapter (N/4 tokens each), as one mixed batch (ours_mixed:
``adapter_names``), as four passes with one adapter active each
(ours_4_passes), and as PEFT's mixed batch (peft_mixed); inference time.

Writes a table to stdout, every measurement to <out>/latency-<device>.json and
a plot of the ratios to <out>/latency-<device>.png.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys

import torch
from torch import nn

import moslora_ext
from timing import (elapsed_seconds, inference_step, profiler_activities, saved_bytes, synchronize, time_round_robin,
                    training_step, use_process_time)

# (in_features, out_features) of LLaMA-7B/8B projections.
SHAPES = {
    "attn 4096x4096": (4096, 4096),
    "mlp up 4096x11008": (4096, 11008),
    "mlp down 11008x4096": (11008, 4096),
}
LORA_ALPHA = 16


class PlainLoRA(nn.Module):
    """LoRA written the usual way (as PEFT's layer computes it)."""

    def __init__(self, base, r, lora_dropout):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(lora_dropout)
        self.scale = LORA_ALPHA / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


class PlainMoSLoRA(PlainLoRA):
    """MoSLoRA as the released code writes it: the mixer is a third nn.Linear."""

    def __init__(self, base, r, lora_dropout):
        super().__init__(base, r, lora_dropout)
        self.lora_AB = nn.Linear(r, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_AB(self.lora_A(self.dropout(x)))) * self.scale


def peft_lora(base, r, lora_dropout):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout)
    layer = PeftLinear(base, "default", config=config, r=r, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout)
    layer.base_layer.requires_grad_(False)
    return layer


def ours_peft(base, r, lora_dropout):
    try:
        from moslora_ext.peft.layers import MoSLoRALinear
    except ImportError:
        return None
    config = moslora_ext.MoSLoRAConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout)
    layer = MoSLoRALinear(base, "default", config=config, r=r, lora_alpha=LORA_ALPHA)
    layer.base_layer.requires_grad_(False)
    with torch.no_grad():  # what get_peft_model's autocast_adapter_dtype does on a float16/bfloat16 base
        for name, p in layer.named_parameters():
            if "lora_" in name and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    return layer


def compiled_lora(base, r, lora_dropout):
    return torch.compile(PlainLoRA(base, r, lora_dropout))


def ours(base, r, lora_dropout, **kwargs):
    return moslora_ext.Linear.from_linear(base, r=r, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout, **kwargs)


def ours_named(base, r, lora_dropout):
    layer = ours(base, r, lora_dropout)
    layer.add_adapter("other", moslora_ext.AdapterConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout))
    return layer


def ours_merged(base, r, lora_dropout):
    layer = ours(copy.deepcopy(base), r, lora_dropout)  # merging changes the weight: a copy of its own
    layer.merge()
    return layer


CONTENDERS = {
    "base": lambda base, r, p: base,
    "lora_torch": PlainLoRA,
    "lora_compiled": compiled_lora,
    "moslora_torch": PlainMoSLoRA,
    "peft_lora": peft_lora,
    "ours_peft": ours_peft,
    "ours": ours,
    "ours_lora": lambda base, r, p: ours(base, r, p, mixer_init="identity", train_mixer=False),
    "ours_named": ours_named,
    "ours_base_dtype": lambda base, r, p: ours(base, r, p, autocast_adapter_dtype=False),
    "ours_merged": ours_merged,
}
TRAINABLE = [name for name in CONTENDERS if name != "ours_merged"]  # a merged layer has no adapter to train
# Contenders whose dropout cost is measured (those that have dropout).
WITH_DROPOUT = ["lora_torch", "lora_compiled", "moslora_torch", "peft_lora", "ours_peft", "ours"]


def build_contenders(base, r, lora_dropout, names):
    built = {}
    for name in names:
        module = CONTENDERS[name](base, r, lora_dropout)
        if module is not None:
            built[name] = module.train()
    return built


# --- measuring ------------------------------------------------------------------------------


def launches(module, x, grad_y, device):
    """(forward, backward): how many operators (CPU) or CUDA kernels (GPU) the
    torch profiler records in one forward and in one backward of module."""
    from torch.profiler import profile

    activities = profiler_activities(device)
    counted = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    module(x).backward(grad_y)  # warm (torch.compile compiles for this shape)
    synchronize(device)
    counts = []
    with profile(activities=activities) as prof:
        y = module(x)
        synchronize(device)
    counts.append(sum(e.device_type == counted for e in prof.events()))
    with profile(activities=activities) as prof:
        y.backward(grad_y)
        synchronize(device)
    counts.append(sum(e.device_type == counted for e in prof.events()))
    return tuple(counts)


def peak_training_bytes(step, device):
    """Peak CUDA memory allocated during one training step, above what was allocated before it."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def plain_merge(layer, sign=1.0):
    """Folding an adapter into the weight (sign -1: out of it) as plain PyTorch does it."""
    with torch.no_grad():
        layer.weight += sign * layer.scale * (layer.lora_B @ layer.lora_mixer) @ layer.lora_A


def check_same_function(contenders, x):
    """Every unmerged contender, given the same adapter, computes the same y."""
    reference = None
    with torch.no_grad():
        for name, module in contenders.items():
            if name in ("base", "ours_merged"):
                continue
            if reference is None:
                reference = module(x).float()
            torch.testing.assert_close(module(x).float(), reference, rtol=2e-2, atol=2e-2,
                                       msg=lambda m: f"{name} computes something else: {m}")


def share_adapter(contenders, base, r, generator):
    """Give every contender the same adapter: A, B random and the mixer the
    identity, so LoRA and MoSLoRA contenders compute the same function."""
    k, d = base.weight.shape
    factory = {"device": base.weight.device, "dtype": base.weight.dtype}
    A = (torch.randn(r, d, generator=generator) / d**0.5).to(**factory)
    B = torch.randn(k, r, generator=generator).to(**factory)
    eye = torch.eye(r, **factory)
    with torch.no_grad():
        for name, module in contenders.items():
            if name in ("peft_lora", "ours_peft"):
                module.lora_A["default"].weight.copy_(A)
                module.lora_B["default"].weight.copy_(B)
                if name == "ours_peft":
                    module.lora_mixer["default"].weight.copy_(eye)
            elif name in ("lora_torch", "lora_compiled", "moslora_torch"):
                module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
                module.lora_A.weight.copy_(A)
                module.lora_B.weight.copy_(B)
                if name == "moslora_torch":
                    module.lora_AB.weight.copy_(eye)
            elif isinstance(module, moslora_ext.Linear) and not module.merged:  # ours_merged keeps its weight
                module.lora_A.copy_(A)
                module.lora_B.copy_(B)
                module.lora_mixer.copy_(eye)


def measure_case(shape_name, tokens, r, dtype, device, args, progress):
    d, k = (size // args.shrink for size in SHAPES[shape_name])
    generator = torch.Generator().manual_seed(0)
    base = nn.Linear(d, k, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, d, generator=generator).to(device=device, dtype=dtype)
    grad_y = torch.randn(tokens, k, generator=generator).to(device=device, dtype=dtype)
    x_grad = x.clone().requires_grad_(True)
    case = {"shape": shape_name, "in_features": d, "out_features": k, "tokens": tokens, "r": r,
            "dtype": str(dtype).removeprefix("torch."), "lora_dropout": args.dropout, "device": device.type}

    contenders = build_contenders(base, r, 0.0, args.contenders)
    share_adapter(contenders, base, r, generator)
    check_same_function(contenders, x[:64])
    case["inference_s"] = time_round_robin(
        {n: inference_step(m, x) for n, m in contenders.items()}, args.reps, args.warmup, device, progress)
    training = {n: contenders[n] for n in TRAINABLE if n in contenders}
    case["training_s"] = time_round_robin(
        {n: training_step(m, x_grad, grad_y) for n, m in training.items()}, args.reps, args.warmup, device,
        progress)
    case["saved_bytes"] = {n: saved_bytes(m, x_grad) for n, m in training.items()}
    case["peak_bytes"] = {n: peak_training_bytes(training_step(m, x_grad, grad_y), device)
                          for n, m in training.items()}

    dropped = build_contenders(base, r, args.dropout, [n for n in WITH_DROPOUT if n in args.contenders])
    case["training_dropout_s"] = time_round_robin(
        {n: training_step(m, x_grad, grad_y) for n, m in dropped.items()}, args.reps, args.warmup, device,
        progress)
    case["saved_bytes_dropout"] = {n: saved_bytes(m, x_grad) for n, m in dropped.items()}
    quarter = max(1, tokens // 4)
    case["launches_dropout"] = {"tokens": [quarter, tokens], **{
        n: [launches(m, x_grad[:quarter].detach().requires_grad_(True), grad_y[:quarter], device),
            launches(m, x_grad, grad_y, device)] for n, m in dropped.items()}}

    case["merge_s"] = {}
    layer = contenders.get("ours")
    merges = {} if layer is None else {"ours": (layer.merge, layer.unmerge),
                                       "plain_torch": (lambda: plain_merge(layer), lambda: plain_merge(layer, -1.0))}
    for name, (merge, unmerge) in merges.items():
        times = []
        for _ in range(args.reps):
            times.append(elapsed_seconds(merge, device))
            unmerge()
        case["merge_s"][name] = (statistics.median(times), times)
    progress.update(1)
    return case


# --- reporting ------------------------------------------------------------------------------


def ratio(case, mode, name, reference):
    table = case[mode]
    if name not in table or reference not in table:
        return None
    return table[name][0] / table[reference][0]


def cell(value, fmt):
    """A table cell: value formatted, or "-" where there is none."""
    return format(value, fmt) if value is not None else "-"


def format_case(case):
    mib = 2**20
    lines = [f"\n{case['shape']}  N={case['tokens']}  r={case['r']}  {case['dtype']}  "
             f"(dropout {case['lora_dropout']} in the last columns)"]
    header = (f"{'contender':<14}{'infer ms':>10}{'/base':>7}{'/lora':>7}{'train ms':>10}{'/base':>7}{'/lora':>7}"
              f"{'saved MiB':>11}{'+drop MiB':>11}{'beyond x':>10}{'drop/no':>9}")
    lines += [header, "-" * len(header)]
    for name in case["inference_s"]:
        train = case["training_s"].get(name)
        saved = case["saved_bytes"].get(name, (None,))[0]
        saved_drop, drop_beyond_x = case["saved_bytes_dropout"].get(name, (None, None))
        drop_cost = (case["training_dropout_s"][name][0] / train[0]
                     if name in case["training_dropout_s"] else None)
        lines.append(
            f"{name:<14}{case['inference_s'][name][0] * 1e3:>10.2f}"
            f"{cell(ratio(case, 'inference_s', name, 'base'), '.3f'):>7}"
            f"{cell(ratio(case, 'inference_s', name, 'lora_torch'), '.3f'):>7}"
            f"{cell(train[0] * 1e3 if train else None, '.2f'):>10}"
            f"{cell(ratio(case, 'training_s', name, 'base'), '.3f'):>7}"
            f"{cell(ratio(case, 'training_s', name, 'lora_torch'), '.3f'):>7}"
            f"{cell(saved / mib if saved is not None else None, '.2f'):>11}"
            f"{cell(saved_drop / mib if saved_drop is not None else None, '.2f'):>11}"
            f"{cell(drop_beyond_x / mib if drop_beyond_x is not None else None, '.2f'):>10}"
            f"{cell(drop_cost, '.3f'):>9}")
    if "ours_peft" in case["training_s"]:
        costs = [ratio(case, mode, "ours_peft", "ours") for mode in ("training_s", "training_dropout_s")]
        saved = [case[key]["ours_peft"][0] / case[key]["ours"][0] for key in ("saved_bytes", "saved_bytes_dropout")]
        lines.append(f"PEFT route / ours: training {cell(costs[0], '.3f')}, with dropout {cell(costs[1], '.3f')}; "
                     f"saved bytes {saved[0]:.3f}, with dropout {saved[1]:.3f}")
    merge = case["merge_s"]
    if merge:
        lines.append(f"merge: ours {merge['ours'][0] * 1e3:.2f} ms, plain PyTorch "
                     f"{merge['plain_torch'][0] * 1e3:.2f} ms (ratio {merge['ours'][0] / merge['plain_torch'][0]:.3f})")
    counts = case["launches_dropout"]
    unit = "CUDA kernels" if case.get("device") == "cuda" else "profiled operators"
    lines.append(f"{unit} with dropout, forward/backward at N={counts['tokens'][0]} | N={counts['tokens'][1]}: " + ", ".join(
        f"{n} {a[0]}/{a[1]} | {b[0]}/{b[1]}" for n, (a, b) in counts.items() if n != "tokens"))
    if any(v is not None for v in case["peak_bytes"].values()):
        lines.append("peak training MiB: " + ", ".join(
            f"{n} {v / mib:.1f}" for n, v in case["peak_bytes"].items()))
    return "\n".join(lines)


def plot(cases, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 0.5 * len(cases) + 4), sharey=True)
    labels = [f"{c['shape']} N={c['tokens']} r={c['r']} {c['dtype']}" for c in cases]
    for ax, mode, title in zip(axes, ("inference_s", "training_s"), ("inference", "training (fwd+bwd)")):
        names = [n for n in cases[0][mode] if n != "base"]
        height = 0.8 / len(names)
        smallest = 1.0
        for i, name in enumerate(names):
            values = [ratio(c, mode, name, "base") or 0.0 for c in cases]
            smallest = min([smallest] + [v for v in values if v > 0])
            ax.barh([j + i * height for j in range(len(cases))], values, height=height, label=name)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlim(left=smallest - 0.1)  # the differences are a few percent: start the axis near them
        ax.set_title(f"{title}: time / frozen base layer")
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(cases))], labels)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def processor_name():
    """The CPU model: platform.processor() is empty on most Linux systems, /proc/cpuinfo says it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(device):
    info = {"platform": platform.platform(), "processor": processor_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
            "torch": torch.__version__, "moslora_ext": moslora_ext.build_info()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def quantized_contenders(base, r, lora_dropout):
    """The 4-bit base alone, under PEFT's QLoRA layer (if peft is installed) and under ours."""
    contenders = {"qbase": base, "ours_qlora": moslora_ext.QuantizedLinear.from_module(
        base, r=r, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout)}
    try:
        from peft import LoraConfig
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
    except ImportError:
        return contenders
    config = LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=lora_dropout)
    contenders["peft_qlora"] = PeftLinear4bit(base, "default", config=config, r=r, lora_alpha=LORA_ALPHA,
                                              lora_dropout=lora_dropout)
    return contenders


def has_native_bf16(device):
    """Whether bf16 matmuls run at full speed: any CUDA GPU torch supports, or a CPU with AVX-512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure_quantized(shape_name, tokens, r, device, args, progress):
    """The quantized-base row of one case (see the module docstring)."""
    import bitsandbytes

    d, k = (size // args.shrink for size in SHAPES[shape_name])
    dtype = args.quantized_dtype
    generator = torch.Generator().manual_seed(0)
    base = bitsandbytes.nn.Linear4bit(d, k, bias=False, compute_dtype=dtype, quant_type="nf4")
    base.load_state_dict(nn.Linear(d, k, bias=False).state_dict())
    base = base.to(device).requires_grad_(False)  # bitsandbytes quantizes on the move to the device
    x = torch.randn(tokens, d, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
    grad_y = torch.randn(tokens, k, generator=generator).to(device=device, dtype=dtype)
    row = {"shape": shape_name, "tokens": tokens, "r": r, "lora_dropout": args.dropout,
           "dtype": str(dtype).removeprefix("torch.")}
    for suffix, p in (("", 0.0), ("_dropout", args.dropout)):
        contenders = quantized_contenders(base, r, p)
        row["training" + suffix + "_s"] = time_round_robin(
            {n: training_step(m.train(), x, grad_y) for n, m in contenders.items()}, args.reps, args.warmup, device,
            progress)
        row["saved_bytes" + suffix] = {n: saved_bytes(m, x) for n, m in contenders.items()}
    return row


def format_quantized(row):
    lines = [f"quantized base (nf4, {row['dtype']}) {row['shape']} N={row['tokens']} r={row['r']}: training step, "
             "bytes saved for backward beyond x"]
    for suffix, label in (("", "dropout 0"), ("_dropout", f"dropout {row['lora_dropout']}")):
        times, saved = row["training" + suffix + "_s"], row["saved_bytes" + suffix]
        lines.append(f"  {label:12s} " + "  ".join(
            f"{n} {times[n][0] * 1e3:.1f} ms / {saved[n][1] / 2**20:.1f} MiB" for n in times))
    return "\n".join(lines)


MIXED_ADAPTERS = ("default", "b", "c", "d")  # "default": the one each layer is made with
MIXED_ROWS = 8  # batch rows, two per adapter: N/4 tokens for each of the four adapters


def mixed_contenders(base, r):
    """One layer holding four adapters, ours and PEFT's (if installed): a mixed batch, and four
    passes of N/4 tokens each with one adapter active. Inference only (what mixed batches are for)."""
    layer = ours(base, r, 0.0)
    for name in MIXED_ADAPTERS[1:]:
        layer.add_adapter(name, moslora_ext.AdapterConfig(r=r, lora_alpha=LORA_ALPHA))
    with torch.no_grad():
        for p in layer.adapters.parameters():
            p.normal_(std=0.02)
    names = [name for name in MIXED_ADAPTERS for _ in range(MIXED_ROWS // len(MIXED_ADAPTERS))]
    rows = {name: [i for i, row in enumerate(names) if row == name] for name in MIXED_ADAPTERS}

    def four_passes(x):
        for name, indices in rows.items():
            layer.set_adapter(name)
            layer(x[indices])

    contenders = {"base": base, "ours_mixed": lambda x: layer(x, adapter_names=names), "ours_4_passes": four_passes}
    peft_layer = peft_lora(base, r, 0.0)
    if peft_layer is not None:
        from peft import LoraConfig

        for name in MIXED_ADAPTERS[1:]:
            peft_layer.update_layer(name, r=r, lora_alpha=LORA_ALPHA, config=LoraConfig(r=r, lora_alpha=LORA_ALPHA))
        contenders["peft_mixed"] = lambda x: peft_layer(x, adapter_names=names)
    return contenders


def measure_mixed(shape_name, tokens, r, dtype, device, args, progress):
    """The mixed-batch row of one case (see the module docstring)."""
    d, k = (size // args.shrink for size in SHAPES[shape_name])
    base = nn.Linear(d, k, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(MIXED_ROWS, tokens // MIXED_ROWS, d, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    times = time_round_robin({n: inference_step(m, x) for n, m in mixed_contenders(base, r).items()}, args.reps,
                             args.warmup, device, progress)
    return {"shape": shape_name, "tokens": tokens, "r": r, "dtype": str(dtype), "inference_s": times}


def format_mixed(row):
    times = row["inference_s"]
    base = times["base"][0]
    return (f"mixed batch ({len(MIXED_ADAPTERS)} adapters x N/{len(MIXED_ADAPTERS)} rows) {row['shape']} "
            f"N={row['tokens']} r={row['r']} {row['dtype']}, inference: " + "  ".join(
                f"{n} {t * 1e3:.1f} ms ({t / base:.2f}x base)" for n, (t, _) in times.items()))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="one case: attn 4096x4096, N=2048, r=16, fewer repetitions")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: all")
    parser.add_argument("--tokens", nargs="+", type=int, help="default: 512 2048 (and 8192 on CUDA)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 64])
    parser.add_argument("--dtypes", nargs="+", help="default: float32 on CPU, bfloat16 float16 on CUDA")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS),
                        help="default: all (base, the floor of the ratios, is always measured)")
    parser.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of the dropout columns")
    parser.add_argument("--reps", type=int, help="repetitions per contender (default 10 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cpu-clock", choices=["wall", "process"], default="wall",
                        help="on a CPU, time steps by wall clock or by this process's CPU time (steadier on a "
                        "shared machine; with OMP_NUM_THREADS=1 it is the step's compute time)")
    parser.add_argument("--out", default="benchmark-results", help="folder for the JSON and PNG")
    parser.add_argument("--quantized", action="store_true",
                        help="also a quantized-base row per case: bitsandbytes nf4, ours against PEFT's QLoRA")
    parser.add_argument("--quantized-dtype", choices=["bfloat16", "float32"],
                        help="compute and input dtype of the quantized row (default: see above)")
    parser.add_argument("--moe", action="store_true",
                        help="also MoE block rows per (N, r): our expert adapters against PEFT's target_parameters")
    parser.add_argument("--moe-only", action="store_true",
                        help="only the MoE rows (the dense cases' N and r still set theirs), to moe-<device>.json")
    parser.add_argument("--moe-experts", nargs="+", type=int, default=[8, 64, 128],
                        help="numbers of experts of the MoE rows (default: 8 64 128)")
    parser.add_argument("--moe-hidden", type=int,
                        help="hidden size and expert width of the MoE block (default 256 on CPU, 1024 on CUDA)")
    parser.add_argument("--mixed", action="store_true",
                        help="also a mixed-batch row per case: 4 adapters x N/4 rows, against 4 passes and PEFT's")
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # smoke test: tiny shapes
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.contenders = [n for n in CONTENDERS if n in {"base", *args.contenders}]
    args.quantized_dtype = getattr(torch, args.quantized_dtype or (
        "bfloat16" if has_native_bf16(args.device) else "float32"))
    on_cuda = args.device.type == "cuda"
    if args.quick:
        args.shapes = args.shapes or ["attn 4096x4096"]
        args.tokens = args.tokens or [2048]
        args.ranks = [16] if args.ranks == [8, 16, 64] else args.ranks
        args.reps = args.reps or (7 if not on_cuda else 30)
    args.shapes = args.shapes or list(SHAPES)
    args.tokens = args.tokens or ([512, 2048, 8192] if on_cuda else [512, 2048])
    args.dtypes = [getattr(torch, d) for d in (args.dtypes or (["bfloat16", "float16"] if on_cuda else ["float32"]))]
    args.reps = args.reps or (50 if on_cuda else 10)
    args.shrink = 32 if args.small else 1  # --small divides every shape by 32
    args.moe_hidden = args.moe_hidden or (1024 if on_cuda else 256)
    args.moe = args.moe or args.moe_only
    if args.cpu_clock == "process":
        use_process_time()
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety
        tqdm = None
    cases = [(s, n, r, dt) for dt in args.dtypes for s in args.shapes for n in args.tokens for r in args.ranks]
    total = len(cases) * ((0 if args.moe_only else 3 * args.reps + 1) + (2 * args.reps if args.quantized else 0)
                          + (args.reps * len(args.moe_experts) if args.moe else 0) + (args.reps if args.mixed else 0))
    # The banner before the bar exists (else it lands inside the bar's line); the bar leaves no
    # final copy behind, the table rows written through it stay.
    print(f"moslora_ext {moslora_ext.__version__} on {args.device} ({processor_name()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, {torch.get_num_threads()} threads)", flush=True)
    progress = tqdm(total=total, desc="latency", file=sys.stderr, leave=False) if tqdm else _NoProgress()
    results, quantized, moe, mixed = [], [], [], []
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{'moe' if args.moe_only else 'latency'}-{args.device.type}")

    def write_json():  # after every case, so that a run stopped early keeps what it measured
        with open(stem + ".json", "w") as f:
            json.dump({"machine": machine_info(args.device), "args": {k: str(v) for k, v in vars(args).items()},
                       "cases": results, "quantized": quantized, "moe": moe, "mixed": mixed}, f, indent=1)

    for shape_name, tokens, r, dtype in () if args.moe_only else cases:
        results.append(measure_case(shape_name, tokens, r, dtype, args.device, args, progress))
        progress.write(format_case(results[-1]))
        if args.mixed:
            mixed.append(measure_mixed(shape_name, tokens, r, dtype, args.device, args, progress))
            progress.write(format_mixed(mixed[-1]))
        write_json()
    for shape_name, tokens, r in dict.fromkeys((s, n, r) for s, n, r, _ in cases) if args.quantized else ():
        quantized.append(measure_quantized(shape_name, tokens, r, args.device, args, progress))
        progress.write(format_quantized(quantized[-1]))
        write_json()
    moe_cases = dict.fromkeys((n, r, e) for _, n, r, _ in cases for e in args.moe_experts) if args.moe else ()
    for tokens, r, experts in moe_cases:
        from moe import format_moe, measure_moe

        moe.append(measure_moe(tokens, r, experts, args.device, args, progress))
        progress.write(format_moe(moe[-1]))
        write_json()
    progress.close()
    write_json()
    print(f"\nwrote {stem}.json")
    try:
        if results and args.contenders != ["base"]:  # nothing to plot against the base alone
            plot(results, stem + ".png")
            print(f"wrote {stem}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    return results


class _NoProgress:
    def update(self, n):
        pass

    def write(self, text):
        print(text)

    def close(self):
        pass


if __name__ == "__main__":
    main()
