"""transformers' checkpoint names of a model's modules.

transformers saves some models under the module names of their older checkpoints
(Mixtral's ``mlp`` as ``block_sparse_moe``) and renames them when
``from_pretrained`` reads them back; a plain ``load_state_dict``, as the HF Trainer's
``resume_from_checkpoint`` does, does not. The adapter tensors are saved under those
names too, so this library reads them under the model's own names: in
``load_adapter`` of a checkpoint folder, and in a ``load_state_dict`` pre-hook that
adapted transformers models get (``renaming_hook``).
"""


def checkpoint_renamings(model_type):
    """transformers' (checkpoint name, model name) substitutions for ``model_type``, in order."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers 4 saves under the model's names
        return []

    mapping = (get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
    return [(source, target) for renaming in mapping if isinstance(renaming, WeightRenaming)
            for source, target in zip(renaming.source_patterns, renaming.target_patterns)]


def model_key(key, renamings):
    """``key`` of a saved transformers checkpoint under the model's module names."""
    for source, target in renamings:
        key = key.replace(source, target)
    return key


def renaming_hook(model):
    """A ``load_state_dict`` pre-hook for ``model`` (a transformers model) that
    reads a key it does not have under its own name where transformers
    renames it, or None when its checkpoints use its own names."""
    renamings = checkpoint_renamings(getattr(model.config, "model_type", None))
    if not renamings:
        return None

    def read_under_model_names(module, state_dict, prefix, *args):
        own = {prefix + key for key in module.state_dict()}
        for key in [key for key in state_dict if key.startswith(prefix) and key not in own]:
            renamed = prefix + model_key(key[len(prefix):], renamings)
            if renamed in own and renamed not in state_dict:
                state_dict[renamed] = state_dict.pop(key)

    return read_under_model_names
