"""What serving engines accept of a PEFT LoRA adapter, checked before ``save_peft_adapter`` writes one.

vLLM (checked against vLLM 0.32.0 by tools/serving_check.py, and its ``PEFTHelper`` and
``LoRAModel`` loaders): a rank r up to 512, served with ``max_lora_rank`` set to one of
``VLLM_MAX_LORA_RANKS`` at least r (smaller ranks are padded); LoRA on linear layers (also fused
ones: q/k/v, gate/up) and on the embeddings a model lists (Llama: ``embed_tokens``, ``lm_head``),
not on convolutions; ``modules_to_save`` only a classification head named "classifier" or
"score", and one at most. Adapters on fused MoE expert parameters (``Experts``, PEFT's
``target_parameters``) are refused: vLLM's MoE LoRA reads the expert deltas transposed relative
to PEFT's ``target_parameters`` layout that ``save_peft_adapter`` writes, so it would serve
them wrong without an error. DoRA, ``lora_bias``, ``bias`` other than "none" and initialisations
that change the base weights are refused too, but ``save_peft_adapter`` never writes them.
"""

from ..layers.conv import Conv
from ..layers.experts import Experts

ENGINES = ("vllm",)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_HEADS_TO_SAVE = ("classifier", "score")


def vllm_max_lora_rank(r):
    """The smallest ``max_lora_rank`` vLLM accepts that serves rank ``r`` (None above 512)."""
    return next((rank for rank in VLLM_MAX_LORA_RANKS if rank >= r), None)


def refusals(engine, config, layers):
    """Why ``engine`` would not load the PEFT adapter of ``config``
    (what ``save_peft_adapter`` writes to adapter_config.json) for the
    adapted ``layers`` ({name: layer}): a list of reasons, empty if none."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES} (or None for no engine check), got {engine!r}")
    reasons = []
    r = max([config["r"], *(config.get("rank_pattern") or {}).values()])  # layers of other ranks: rank_pattern
    if vllm_max_lora_rank(r) is None:
        reasons.append(f"r={r}: vLLM serves ranks up to {VLLM_MAX_LORA_RANKS[-1]} (max_lora_rank)")
    heads = config["modules_to_save"] or []
    others = [name for name in heads if name not in VLLM_HEADS_TO_SAVE]
    if others or len(heads) > 1:
        reasons.append(f"modules_to_save={heads}: vLLM takes at most one, a classification head named "
                       f"{' or '.join(map(repr, VLLM_HEADS_TO_SAVE))}")
    convolutions = sorted(name for name, layer in layers.items() if isinstance(layer, Conv))
    if convolutions:
        reasons.append(f"adapters on convolutions ({', '.join(convolutions)}): vLLM's LoRA takes linear and "
                       "embedding layers only")
    experts = sorted(name for name, layer in layers.items() if isinstance(layer, Experts))
    if experts:
        reasons.append(f"adapters on fused MoE expert parameters ({', '.join(experts)}): vLLM reads expert LoRA "
                       "deltas transposed relative to PEFT's target_parameters layout that this folder would hold, "
                       "so it would load them without an error and serve wrong outputs; serve the merged model "
                       "(moslora_ext.merge_and_unload) instead, or save without engine= for PEFT")
    return reasons
