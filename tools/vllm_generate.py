"""The vLLM half of tools/serving_check.py, run in vLLM's own virtual environment.

    python tools/vllm_generate.py REQUEST.json RESULT.json

REQUEST.json: {"model": folder, "max_lora_rank": int, "max_tokens": int, "prompts": [token ids...],
"adapters": [adapter folder or null per prompt], "spare_lora_slot": bool (default true),
"probes": [adapter folders vLLM should refuse]}. Serves every prompt in one batch with vLLM's
offline engine (greedy, no tokenizer: prompts and outputs are token ids), each with its
LoRARequest, and writes {"tokens": [[id...]...], "logprobs": [[float...]...]}: each prompt's
generated tokens and the log-probability vLLM gives each of them, and "refusals": {probe: vLLM's
error, or null if it served the probe}.
"""

import json
import sys


def main(request_file, result_file):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    with open(request_file) as f:
        request = json.load(f)
    folders = sorted({folder for folder in request["adapters"] if folder})
    lora_ids = {folder: i + 1 for i, folder in enumerate(folders)}  # vLLM's LoRA ids start at 1
    # One LoRA slot more than the adapters: vLLM 0.32's CPU LoRA ops (vllm/lora/ops/torch_ops) index the
    # stacked adapter weights with -1 for requests without a LoRA, which picks the last slot; a slot
    # left empty (zero) is what gives those requests the base model. "spare_lora_slot": false shows it.
    spare = 1 if request.get("spare_lora_slot", True) else 0
    llm = LLM(model=request["model"], skip_tokenizer_init=True, dtype="float32", enable_lora=True,
              max_lora_rank=request["max_lora_rank"], max_loras=max(len(folders) + spare, 1), max_model_len=128,
              max_num_seqs=len(request["prompts"]), seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=0, detokenize=False,
                            ignore_eos=True)
    lora_requests = [LoRARequest(f"adapter{lora_ids[folder]}", lora_ids[folder], folder) if folder else None
                     for folder in request["adapters"]]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params,
                           lora_request=lora_requests)
    tokens, logprobs = [], []
    for output in outputs:
        completion = output.outputs[0]
        tokens.append(list(completion.token_ids))
        logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)])
    # Adapters that vLLM should refuse: the error of serving one prompt with each (None: it served it).
    refusals = {}
    for folder in request.get("probes", []):
        try:
            llm.generate([{"prompt_token_ids": request["prompts"][0]}], params,
                         lora_request=LoRARequest("probe", len(folders) + 1, folder))
            refusals[folder] = None
        except Exception as error:  # noqa: BLE001 - the engine's own words are the result
            refusals[folder] = f"{type(error).__name__}: {error}"
    with open(result_file, "w") as f:
        json.dump({"tokens": tokens, "logprobs": logprobs, "refusals": refusals}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
