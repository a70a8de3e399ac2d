"""The MoE row of benchmarks/latency.py (``--moe``): one mixture-of-experts block's
training step with adapters on its fused experts.

A Mixtral sparse-MoE block (8 experts, top-2, hidden 1024, expert width 1024;
divided by 32 with --small), float32 on the CPU (bf16 on CUDA), transformers'
grouped_mm experts path, N tokens. Contenders, all rank r on gate_up_proj and
down_proj: the frozen block alone (moe_base), PEFT's target_parameters LoRA
(moe_peft: PEFT adds the delta to the whole expert stack every step) and our
expert adapters (moe_ours, per expert on the routed rows, identity frozen
mixer so the two compute the same function; moe_ours_mixer with a trained
mixer). Reported: the median training-step time (forward + backward) and the
bytes saved for backward beyond x.
"""

import copy

import torch

import moslora_ext
from timing import saved_bytes, time_round_robin, training_step

TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def moe_block(device, dtype, shrink):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=1024 // shrink, intermediate_size=1024 // shrink, num_local_experts=8,
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


def measure_moe(tokens, r, device, args, progress):
    """The MoE row for N = ``tokens`` and rank ``r`` (see the module docstring)."""

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contenders = moe_contenders(moe_block(device, dtype, args.shrink), r)
    x = torch.randn(1, tokens, contenders["moe_base"].gate.hidden_dim, device=device, dtype=dtype,
                    requires_grad=True)
    grad_y = torch.randn_like(x)
    steps = {name: training_step(module, x, grad_y) for name, module in contenders.items()}
    times = time_round_robin(steps, args.reps, args.warmup, device, progress)
    saved = {name: saved_bytes(module, x)[1] for name, module in contenders.items()}
    return {"tokens": tokens, "r": r, "dtype": str(dtype), "training_s": times, "saved_bytes": saved}


def format_moe(row):
    base = row["training_s"]["moe_base"][0]
    return (f"MoE block (Mixtral, 8 experts, top-2) N={row['tokens']} r={row['r']} {row['dtype']}: training step "
            "/ frozen block, bytes saved beyond x\n  " + "  ".join(
                f"{name} {t / base:.3f} ({t * 1e3:.1f} ms) / {row['saved_bytes'][name] / 2**20:.1f} MiB"
                for name, (t, _) in row["training_s"].items()))
