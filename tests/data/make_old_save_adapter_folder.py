"""How tests/data/old_save_adapter_folder was made: run with the code of commit a3475cd (before save_adapter
wrote MOSLORA folders), from the repository root:

    PYTHONPATH=. python tests/data/make_old_save_adapter_folder.py

It writes the folder (save_adapter's format of that time: "format": "moslora_ext", per-layer "layers",
tensors keyed "<layer>.lora_A/lora_mixer/lora_B" and the module to save "4") and
old_save_adapter_reference.safetensors: the base model's weights ("base.*"), an input "x" and the
adapted model's output "y" for it (eval mode, float32)."""

import os

import torch
from safetensors.torch import save_file
from torch import nn

import moslora_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def base_model():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))


def main():
    torch.manual_seed(0)
    model = base_model()
    base = {f"base.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    moslora_ext.add_adapters(model, ["0", "2"], r=2, lora_alpha=3, mixer_init="orthogonal", lora_dropout=0.1,
                             modules_to_save=["4"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # A, M, B of both layers and the module to save
                p.copy_(torch.randn(p.shape, generator=g))
    moslora_ext.save_adapter(model, os.path.join(HERE, "old_save_adapter_folder"))
    x = torch.randn(3, 5, generator=g)
    y = model.eval()(x).detach()
    save_file({**base, "x": x, "y": y}, os.path.join(HERE, "old_save_adapter_reference.safetensors"))


if __name__ == "__main__":
    main()
