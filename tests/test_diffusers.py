"""MoSLoRA adapters in diffusers (moslora_ext.peft.diffusers), through the PEFT route, on a tiny
UNet2DConditionModel built from a config: adapter state dict, disable, save and load (UNet and SDXL
pipeline), refusals of MoSLoRA files that diffusers would read as plain LoRA, fuse, two weighted adapters.
References are hand-merged plain-PyTorch weights (W + w s B M A) in a fresh UNet. The documentation's diffusers
example (docs/diffusers.md) runs in tests/test_docs.py."""

import textwrap

import pytest
import torch
from conftest import run_python

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

import moslora_ext  # noqa: E402

if not moslora_ext.supported_peft_installed():
    pytest.skip(moslora_ext.unsupported_peft_reason(), allow_module_level=True)

from peft.utils import get_peft_model_state_dict  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


UNET_CONFIG = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, norm_num_groups=32)


def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 32, 32, generator=g), torch.tensor([1, 10]), torch.randn(2, 7, 32, generator=g)


def run(unet):
    with torch.no_grad():
        return unet(*inputs()).sample


def trained_unet(adapter_name="default", seed=0, unet=None):
    """A tiny UNet with a MoSLoRA adapter trained for a few steps (B and the mixer moved off their init)."""
    unet = unet if unet is not None else tiny_unet()
    torch.manual_seed(seed)
    unet.add_adapter(moslora_ext.MoSLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name)
    return train(unet)


def train(unet):
    """A few AdamW steps on the active adapter's trainable tensors; the UNet, in eval mode."""
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        unet(*inputs()).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return unet.eval()


def hand_merged(unet, weights):
    """A fresh tiny UNet whose adapted weights are W + sum of w * (alpha / r) * B M A over ``weights``
    ({adapter name: w}), the factors read from ``unet``'s PEFT state dict: plain PyTorch."""
    terms = []
    for adapter, weight in weights.items():
        config = unet.peft_config[adapter]
        state = get_peft_model_state_dict(unet, adapter_name=adapter)
        for key in [k for k in state if k.endswith(".lora_A.weight")]:
            name = key[: -len(".lora_A.weight")]
            A, M, B = (state[f"{name}.{part}.weight"] for part in ("lora_A", "lora_mixer", "lora_B"))
            terms.append((name, weight * config.lora_alpha / config.r, A, M, B))
    return merged_reference(terms)


def merged_reference(terms, reference=None):
    """``reference`` (a fresh tiny UNet by default) with W + s B M A for each (layer name, s, A, M, B) of
    ``terms``: plain PyTorch."""
    reference = reference if reference is not None else tiny_unet()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, scale, A, M, B in terms:
            modules[name].weight += scale * (B @ M @ A)
    return reference


def test_adapter_state_dict_holds_the_mixers_and_disable_gives_the_base():
    unet = trained_unet()
    state = get_peft_model_state_dict(unet)
    mixers = [k for k in state if k.endswith(".lora_mixer.weight")]
    assert mixers and len(mixers) == len([k for k in state if k.endswith(".lora_A.weight")])
    assert all(state[k].shape == (4, 4) for k in mixers)
    assert not all(torch.equal(state[k], torch.eye(4)) for k in mixers)
    torch.testing.assert_close(run(unet), run(hand_merged(unet, {"default": 1.0})), atol=1e-5, rtol=1e-5)
    unet.disable_lora()
    torch.testing.assert_close(run(unet), run(tiny_unet()), atol=0, rtol=0)
    unet.enable_lora()
    torch.testing.assert_close(run(unet), run(hand_merged(unet, {"default": 1.0})), atol=1e-5, rtol=1e-5)


def test_save_lora_adapter_and_load_lora_adapter_give_equal_outputs(tmp_path):
    unet = trained_unet()
    unet.save_lora_adapter(tmp_path)
    loaded = tiny_unet()
    loaded.load_lora_adapter(tmp_path, prefix=None, weight_name=WEIGHT_NAME, adapter_name="loaded")
    assert isinstance(loaded.peft_config["loaded"], moslora_ext.MoSLoRAConfig)
    assert (run(loaded) - run(unet)).abs().max() <= 1e-6


def tiny_sdxl_pipeline(unet, text_encoder=None):
    """An SDXL pipeline around ``unet`` (the LoRA loader needs no text encoders or tokenizers)."""
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    return diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=None,
                                               tokenizer=None, tokenizer_2=None, unet=unet,
                                               scheduler=diffusers.EulerDiscreteScheduler())


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4)
    return CLIPTextModel(config).eval()


def encode(text_encoder):
    with torch.no_grad():
        return text_encoder(torch.tensor([[1, 5, 7, 9, 2]])).last_hidden_state


def save_with_pipeline(unet, folder, with_metadata=True):
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict() if with_metadata else None)


def test_pipeline_save_lora_weights_and_load_lora_weights_give_equal_outputs(tmp_path):
    unet = trained_unet()
    save_with_pipeline(unet, tmp_path)
    pipe = tiny_sdxl_pipeline(tiny_unet())
    pipe.load_lora_weights(tmp_path, adapter_name="subject")
    assert isinstance(pipe.unet.peft_config["subject"], moslora_ext.MoSLoRAConfig)
    assert (run(pipe.unet) - run(unet)).abs().max() <= 1e-6
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(pipe.unet), run(tiny_unet()), atol=0, rtol=0)


def test_a_file_with_mixers_but_no_metadata_is_refused_before_the_unet_changes(tmp_path):
    save_with_pipeline(trained_unet(), tmp_path, with_metadata=False)
    pipe = tiny_sdxl_pipeline(tiny_unet())
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="lora_mixer.*no MoSLoRA adapter metadata.*unet_lora_adapter_metadata"):
        pipe.load_lora_weights(tmp_path)
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not getattr(pipe.unet, "peft_config", None)


def load_in_subprocess(folder, import_moslora_ext, prefix=None):
    """Load a saved UNet adapter (keys under ``prefix``) into a fresh tiny UNet in a new process (importing
    moslora_ext after diffusers, or not at all); returns the process."""
    code = textwrap.dedent(f"""
        import diffusers
        import diffusers.loaders.peft  # diffusers' PEFT helpers first: moslora_ext must still take effect
        {"import moslora_ext" if import_moslora_ext else ""}
        unet = diffusers.UNet2DConditionModel(**{UNET_CONFIG!r})
        unet.load_lora_adapter({str(folder)!r}, prefix={prefix!r}, weight_name={WEIGHT_NAME!r})
        print(type(unet.peft_config["default_0"]).__name__)
    """)
    return run_python(code)


def test_diffusers_without_moslora_ext_refuses_a_moslora_file_saying_what_to_do(tmp_path):
    trained_unet().save_lora_adapter(tmp_path)
    without = load_in_subprocess(tmp_path, import_moslora_ext=False)
    assert without.returncode != 0
    assert "unexpected keyword argument 'MOSLORA_adapter_import_moslora_ext_before_loading'" in without.stderr
    with_ = load_in_subprocess(tmp_path, import_moslora_ext=True)
    assert with_.returncode == 0, with_.stderr
    assert with_.stdout.strip().splitlines()[-1] == "MoSLoRAConfig"


def released_factors(model, targets, generator):
    """Random factors, as the released MoSLoRA code's PEFT fork holds them, for the layers of ``model`` named
    ``...<target>``: (its ``get_peft_model_state_dict``, keys ``<layer>.lora_A`` / ``lora_AB`` (the mixer) /
    ``lora_B.weight``; the hand-merged terms (layer, 1, A, M, B): it trains with lora_alpha = r, scale 1).
    Rank 4, and 2 on the output projections (diffusers' rank_pattern)."""
    state, terms = {}, []
    for name, module in model.named_modules():
        if any(name.endswith(f".{target}") for target in targets):
            r = 2 if name.endswith(("to_out.0", "out_proj")) else 4
            A = torch.randn(r, module.in_features, generator=generator) / 8
            M = torch.randn(r, r, generator=generator)
            B = torch.randn(module.out_features, r, generator=generator) / 8
            state.update({f"{name}.lora_A.weight": A, f"{name}.lora_AB.weight": M, f"{name}.lora_B.weight": B})
            terms.append((name, 1.0, A, M, B))
    return state, terms


def released_sdxl_file(folder):
    """A file as the released MoSLoRA code's SDXL DreamBooth script (``train_dreambooth_lora_sdxl.py
    --lora_use_mixer --train_text_encoder``) writes it for the tiny UNet and text encoder: its fork's state
    dicts (``released_factors``) passed through diffusers' ``convert_state_dict_to_diffusers`` to
    ``save_lora_weights``, as that script does (no alphas, no metadata). Returns the UNet's and the text
    encoder's hand-merged terms."""
    from diffusers.utils import convert_state_dict_to_diffusers

    g = torch.Generator().manual_seed(3)
    unet_state, unet_terms = released_factors(tiny_unet(), TARGETS, g)
    text_state, text_terms = released_factors(tiny_text_encoder(), ["q_proj", "k_proj", "v_proj", "out_proj"], g)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_state))
    return unet_terms, text_terms


@pytest.mark.parametrize("loader", ["pipeline.load_lora_weights", "unet.load_lora_adapter"])
def test_a_released_moslora_sdxl_file_loads_exactly_with_its_mixers(tmp_path, loader):
    unet_terms, text_terms = released_sdxl_file(tmp_path)
    if loader == "pipeline.load_lora_weights":  # the UNet's and the text encoder's adapters
        pipe = tiny_sdxl_pipeline(tiny_unet(), tiny_text_encoder())
        pipe.load_lora_weights(tmp_path, adapter_name="released")
        unet, models = pipe.unet, [(pipe.unet, unet_terms), (pipe.text_encoder, text_terms)]
        torch.testing.assert_close(encode(pipe.text_encoder), encode(merged_reference(text_terms, tiny_text_encoder())),
                                   atol=1e-5, rtol=1e-5)
    else:
        unet = tiny_unet()
        unet.load_lora_adapter(tmp_path, prefix="unet", weight_name=WEIGHT_NAME, adapter_name="released")
        models = [(unet, unet_terms)]
    for model, terms in models:
        assert isinstance(model.peft_config["released"], moslora_ext.MoSLoRAConfig)
        state = get_peft_model_state_dict(model, adapter_name="released")
        assert all(torch.equal(state[f"{name}.lora_mixer.weight"], M) for name, _, _, M, _ in terms)
    torch.testing.assert_close(run(unet), run(merged_reference(unet_terms)), atol=1e-5, rtol=1e-5)


def test_diffusers_without_moslora_ext_drops_a_released_files_mixers_with_a_warning(tmp_path):
    released_sdxl_file(tmp_path)
    without = load_in_subprocess(tmp_path, import_moslora_ext=False, prefix="unet")
    assert without.returncode == 0, without.stderr
    assert without.stdout.strip().splitlines()[-1] == "LoraConfig"
    assert "unexpected keys" in without.stderr and ".lora_AB.weight" in without.stderr


def test_a_file_with_both_mixer_names_for_a_layer_is_refused_before_the_unet_changes(tmp_path):
    (name, _, _, M, _), *_ = released_sdxl_file(tmp_path)[0]
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    state = diffusers.StableDiffusionXLPipeline.lora_state_dict(tmp_path)[0]
    state[f"unet.{name}.lora_mixer.weight"] = M
    with pytest.raises(ValueError, match="both lora_AB and lora_mixer"):
        unet.load_lora_adapter(state, prefix="unet")
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_import_moslora_ext_imports_no_diffusers():
    code = "import sys, moslora_ext; print('diffusers' in sys.modules)"
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_fuse_lora_equals_the_unfused_output_and_unfuse_restores_it():
    unet = trained_unet()
    unfused = run(unet)
    unet.fuse_lora()
    torch.testing.assert_close(run(unet), unfused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run(unet), run(hand_merged(unet, {"default": 1.0})), atol=1e-5, rtol=1e-5)
    unet.unfuse_lora()
    torch.testing.assert_close(run(unet), unfused, atol=1e-5, rtol=1e-5)


def test_set_adapters_with_two_adapters_and_weights():
    unet = trained_unet("first", seed=0)
    trained_unet("second", seed=1, unet=unet)
    unet.set_adapters(["first", "second"], weights=[0.7, -0.4])
    torch.testing.assert_close(run(unet), run(hand_merged(unet, {"first": 0.7, "second": -0.4})),
                               atol=1e-5, rtol=1e-5)
    unet.set_adapters("second", weights=0.5)
    torch.testing.assert_close(run(unet), run(hand_merged(unet, {"second": 0.5})), atol=1e-5, rtol=1e-5)
