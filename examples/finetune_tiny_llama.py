"""Fine-tune a tiny Llama with MoSLoRA adapters, end to end, on a CPU.

    python examples/finetune_tiny_llama.py                       # one process
    torchrun --nproc_per_node 2 examples/finetune_tiny_llama.py  # DDP, 2 processes (gloo)

The workflow: add adapters to the attention and MLP projections, train only
them on byte-level text (Python's own pydoc topics, no download), save the
adapter (a small file), load it into a fresh copy of the base model, check the
two agree, then merge it into plain nn.Linear layers for deployment.
The base model is randomly initialised from a config here; with a real
checkpoint, load it with from_pretrained instead.
"""

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
from pydoc_data.topics import topics
from transformers import LlamaConfig, LlamaForCausalLM

import moslora_ext

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model():
    torch.manual_seed(0)  # every process (and the reload below) builds the same base weights
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def text_batches(batch_size, length, generator):
    data = torch.frombuffer(bytearray("\n".join(topics.values()).encode()), dtype=torch.uint8).long()
    while True:
        starts = torch.randint(0, len(data) - length, (batch_size,), generator=generator)
        yield torch.stack([data[s:s + length] for s in starts.tolist()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch, split across processes")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", help="folder for the adapter (default: a new temporary folder)")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    log = print if rank == 0 else (lambda *a, **k: None)

    model = moslora_ext.add_adapters(base_model(), TARGETS, r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05)
    trainable, total = moslora_ext.trainable_parameters(model)
    log(f"{len(moslora_ext.adapted_layers(model))} adapted layers; training {trainable:,} of {total:,} parameters "
        f"({100 * trainable / total:.1f} %) on {world} process(es)")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batches = text_batches(args.batch_size, args.length, torch.Generator().manual_seed(1))
    local = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = next(batches)[local]
        loss = train_model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 25 == 0:
            log(f"step {step:4d}/{args.steps}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)")

    if rank == 0:
        args.out = args.out or tempfile.mkdtemp(prefix="moslora-tiny-llama-adapter-")
        model.eval()
        moslora_ext.save_adapter(model, args.out)
        size = os.path.getsize(os.path.join(args.out, moslora_ext.formats.files.WEIGHTS_NAME))
        log(f"saved the adapter to {args.out} ({size / 1e6:.2f} MB)")

        reloaded = moslora_ext.load_adapter(base_model(), args.out).eval()
        ids = next(batches)[:2]
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            same = torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
            deployed = moslora_ext.merge_and_unload(reloaded)
            merged_error = (deployed(input_ids=ids).logits - expected).abs().max().item()
        log(f"reloaded adapter gives the same logits: {same}; merged into nn.Linear, max |logit difference| "
            f"{merged_error:.1e}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
