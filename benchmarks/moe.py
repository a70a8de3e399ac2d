"""The MoE rows of benchmarks/latency.py (``--moe``): one mixture-of-experts block's
training step with adapters on its fused experts, for E = 8, 64, 128 experts
(``--moe-experts``).

A Mixtral sparse-MoE block (E experts, top-2, hidden = expert width = 256 on
the CPU, 1024 on CUDA, ``--moe-hidden``; divided by 32 with --small), float32
on the CPU (bf16 on CUDA), transformers' grouped_mm experts path, N tokens.
Contenders, all rank r on gate_up_proj and down_proj: the frozen block alone
(moe_base), PEFT's target_parameters LoRA (moe_peft: PEFT adds the delta to
the whole expert stack every step) and our expert adapters (moe_ours, on the
routed rows, identity frozen mixer so the two compute the same function;
moe_ours_mixer with a trained mixer). Reported per contender: the median
(and minimum) training-step time (forward + backward) as a ratio to the
frozen block's, the bytes saved for backward beyond x, and the GEMM calls of
one step: on the CPU the operators aten::mm, addmm(_), bmm, baddbmm(_) and
_grouped_mm the profiler records, all of them (torch's CPU grouped GEMM is a
loop of mm calls, one per expert, nested in it) and the outermost ones (those
not inside another: what a GPU launches as one kernel each); on CUDA the
kernels launched in one step.
"""

import copy

import torch

import moslora_ext
from timing import profiler_activities, saved_bytes, synchronize, time_round_robin, training_step

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::_grouped_mm"}


def moe_block(device, dtype, hidden, experts):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=hidden, intermediate_size=hidden, num_local_experts=experts,
                           num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config).to(device, dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(False)
    return block


def moe_contenders(block, r):
    import peft

    peft_block = peft.get_peft_model(copy.deepcopy(block), peft.LoraConfig(r=r, lora_alpha=2 * r,
                                                                          target_parameters=TARGETS))
    ours = {}
    for name, mixer in (("moe_ours", dict(mixer_init="identity", train_mixer=False)), ("moe_ours_mixer", {})):
        ours[name] = moslora_ext.add_adapters(copy.deepcopy(block), target_parameters=TARGETS, r=r,
                                              lora_alpha=2 * r, **mixer)
    return {"moe_base": block, "moe_peft": peft_block, **ours}


def gemm_calls(step, device):
    """What one call of ``step`` issues: on CUDA {"kernels": kernels launched}; on the CPU
    {"all": GEMM operators recorded, "outermost": those not inside another GEMM operator}."""
    from torch.profiler import profile

    step()  # warm
    synchronize(device)
    with profile(activities=profiler_activities(device)) as prof:
        step()
        synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return {"kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)}

    def inside_a_gemm(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name in GEMMS:
                return True
            parent = parent.cpu_parent
        return False

    gemms = [e for e in events if e.name in GEMMS]
    return {"all": len(gemms), "outermost": sum(not inside_a_gemm(e) for e in gemms)}


def measure_moe(tokens, r, experts, device, args, progress):
    """The MoE row for N = ``tokens``, rank ``r`` and ``experts`` experts (see the module docstring)."""

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contenders = moe_contenders(moe_block(device, dtype, args.moe_hidden // args.shrink, experts), r)
    x = torch.randn(1, tokens, contenders["moe_base"].gate.hidden_dim, device=device, dtype=dtype,
                    requires_grad=True)
    grad_y = torch.randn_like(x)
    steps = {name: training_step(module, x, grad_y) for name, module in contenders.items()}
    times = time_round_robin(steps, args.reps, args.warmup, device, progress)
    saved = {name: saved_bytes(module, x)[1] for name, module in contenders.items()}
    calls = {name: gemm_calls(step, device) for name, step in steps.items()}
    return {"tokens": tokens, "r": r, "experts": experts, "hidden": args.moe_hidden // args.shrink,
            "dtype": str(dtype), "training_s": times, "saved_bytes": saved, "gemm_calls": calls}


def format_moe(row):
    base_median, base_times = row["training_s"]["moe_base"]
    lines = [f"MoE block (Mixtral, {row['experts']} experts, top-2, hidden {row['hidden']}) N={row['tokens']} "
             f"r={row['r']} {row['dtype']}: training step / frozen block, median (min); saved beyond x; GEMM calls "
             "per step (CPU: all / outermost operators; CUDA: kernels)"]
    for name, (median, times) in row["training_s"].items():
        calls = " / ".join(str(v) for v in row["gemm_calls"][name].values())
        lines.append(f"  {name:15s} {median / base_median:.3f} ({min(times) / min(base_times):.3f})  "
                     f"{row['saved_bytes'][name] / 2**20:7.1f} MiB  {calls}")
    return "\n".join(lines)
