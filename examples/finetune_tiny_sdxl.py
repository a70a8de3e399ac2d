"""Fine-tune a tiny SDXL-style UNet with a MoSLoRA adapter through diffusers, on a CPU.

    python examples/finetune_tiny_sdxl.py

The DreamBooth LoRA workflow with a mixer: add a MoSLoRA adapter to the UNet's
attention projections (``unet.add_adapter(moslora_ext.MoSLoRAConfig(...))``),
train it for a few steps on the denoising loss of one "subject" image, save it
with the pipeline's ``save_lora_weights`` (with the adapter's metadata), load
it into a fresh pipeline with ``load_lora_weights``, check that both pipelines
generate the same latents, and that ``fuse_lora`` gives what the unfused
adapter gives. The pipeline's parts are built from small configs (no
download); the prompt embeddings, which SDXL's two text encoders would compute,
are fixed random tensors. With a real checkpoint, build the pipeline with
``StableDiffusionXLPipeline.from_pretrained`` instead.
"""

import argparse
import tempfile
import time

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft.utils import get_peft_model_state_dict

import moslora_ext

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_DIM, POOLED_DIM, TIME_DIM = 32, 32, 8  # SDXL: 2048, 1280, 256


def tiny_pipeline():
    """An SDXL pipeline of tiny parts with fixed weights (a UNet with SDXL's text-and-time conditioning)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_DIM, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt):
    """The latents that ``pipe`` generates for the prompt embeddings ``prompt`` (fixed noise)."""
    return pipe(prompt_embeds=prompt["embeds"], pooled_prompt_embeds=prompt["pooled"], guidance_scale=1.0,
                num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def relative(a, b):
    """The largest difference of ``a`` from ``b``, relative to the largest value of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def train(pipe, prompt, steps, lr):
    """A few AdamW steps on the denoising loss of one subject image (DreamBooth's loss, no prior)."""
    unet, vae, noise_scheduler = pipe.unet, pipe.vae, DDPMScheduler()
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1  # stands for a photo of the subject
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mode() * vae.config.scaling_factor
    time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]], dtype=torch.float32)  # original size, crop, target size
    conditioning = {"text_embeds": prompt["pooled"], "time_ids": time_ids}
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr)
    unet.train()
    for step in range(1, steps + 1):
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        prediction = unet(noisy, t, prompt["embeds"], added_cond_kwargs=conditioning).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.4f}")
    unet.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", help="folder for the LoRA file (default: a new temporary folder)")
    args = parser.parse_args()
    start = time.perf_counter()

    g = torch.Generator().manual_seed(2)
    prompt = {"embeds": torch.randn(1, 7, TEXT_DIM, generator=g), "pooled": torch.randn(1, POOLED_DIM, generator=g)}
    pipe = tiny_pipeline()
    pipe.unet.add_adapter(moslora_ext.MoSLoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS))
    trainable = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    print(f"MoSLoRA adapter (r={args.r}) on the UNet's attention projections: {trainable:,} trainable parameters")
    train(pipe, prompt, args.steps, args.lr)

    out = args.out or tempfile.mkdtemp(prefix="moslora-tiny-sdxl-lora-")
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())  # the mixer's settings
    print(f"saved the LoRA file to {out}")

    with torch.no_grad():
        trained = generate(pipe, prompt)
        fresh = tiny_pipeline()
        base = generate(fresh, prompt)
        fresh.load_lora_weights(out, adapter_name="subject")
        loaded = generate(fresh, prompt)
        fresh.fuse_lora()
        fused = generate(fresh, prompt)

    print(f"the adapter changes the generated latents by {relative(trained, base):.1%} (max, relative)")
    loaded_error, fused_error = relative(loaded, trained), relative(fused, trained)
    print(f"loaded with load_lora_weights as a {type(fresh.unet.peft_config['subject']).__name__}: same latents: "
          f"{loaded_error <= 1e-6}; fuse_lora gives the unfused latents: {fused_error <= 1e-5} "
          f"(relative differences {loaded_error:.1e}, {fused_error:.1e})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
