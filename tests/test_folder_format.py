"""One folder format for save_adapter and the PEFT route: folders of older save_adapter still load, a
save_adapter folder opens in PEFT, and a route folder loads with load_adapter, all with the same outputs."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import moslora_ext
from tests.data.make_old_save_adapter_folder import base_model

DATA = os.path.join(os.path.dirname(__file__), "data")
OLD_FOLDER = os.path.join(DATA, "old_save_adapter_folder")


def old_reference():
    """The output of the saved model, computed here in plain PyTorch from the folder's tensors and settings."""
    saved = load_file(os.path.join(DATA, "old_save_adapter_reference.safetensors"))
    tensors = load_file(os.path.join(OLD_FOLDER, "adapter_model.safetensors"))
    with open(os.path.join(OLD_FOLDER, "adapter_config.json")) as f:
        layers = json.load(f)["layers"]
    h = saved["x"]
    for name in ("0", "2"):
        weight, bias = saved[f"base.{name}.weight"], saved[f"base.{name}.bias"]
        scale = layers[name]["lora_alpha"] / layers[name]["r"]
        A, M, B = (tensors[f"{name}.{t}"] for t in ("lora_A", "lora_mixer", "lora_B"))
        h = torch.tanh(F.linear(h, weight, bias) + scale * F.linear(F.linear(F.linear(h, A), M), B))
    return saved, F.linear(h, tensors["4.weight"], tensors["4.bias"])


def test_a_folder_of_the_old_save_adapter_loads_with_the_same_outputs():
    saved, expected = old_reference()
    torch.testing.assert_close(expected, saved["y"], rtol=0, atol=1e-6)
    model = base_model()
    model.load_state_dict({k.removeprefix("base."): v for k, v in saved.items() if k.startswith("base.")})
    moslora_ext.load_adapter(model, OLD_FOLDER)
    torch.testing.assert_close(model.eval()(saved["x"]), expected, rtol=0, atol=1e-6)
    settings = {name: layer.active.config for name, layer in moslora_ext.adapted_layers(model).items()}
    assert {(c.r, c.lora_alpha, c.lora_dropout, c.mixer_init) for c in settings.values()} == {(2, 3, 0.1, "orthogonal")}
