"""``moslora_ext.Embedding``: MoSLoRA adapters on ``nn.Embedding``, as PEFT defines LoRA for embeddings."""

from torch import nn
from torch.nn import functional as F

from .base import AdapterLayer, class_path


class Embedding(AdapterLayer):
    """A frozen embedding with MoSLoRA adapters, PEFT's LoRA embedding with a mixer:

        y = W[ids] + s * (A^T[ids]) M^T B^T

    ``lora_A`` (r, num_embeddings) is looked up by the ids like an embedding
    table, then mixed by ``lora_mixer`` (r, r) and projected by ``lora_B``
    (embedding_dim, r); the update of the table is ``s * (B M A)^T``
    (num_embeddings, embedding_dim), which ``merge()`` adds in place. As in
    PEFT, ``lora_A`` starts at zero and ``lora_B`` normal, the lookup uses the
    base's padding_idx, max_norm, norm_type, scale_grad_by_freq and sparse
    settings, and ``lora_dropout`` is not applied (ids cannot be dropped
    out). PEFT checkpoints name the factors ``lora_embedding_A`` and
    ``lora_embedding_B``. Embeddings with a forward of their own (scaled
    embeddings, say) are refused. Plain PyTorch: the lookup and two r-wide
    products cost little next to the rest of a model.
    """

    peft_names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    @classmethod
    def refusal_reason(cls, module):
        if not isinstance(module, nn.Embedding):
            return f"is a {class_path(module)}, not a torch.nn.Embedding"
        if type(module).forward is not nn.Embedding.forward:
            return f"is a {class_path(module)}, an nn.Embedding subclass with a forward of its own"
        return super().refusal_reason(module)

    @staticmethod
    def init_factors_(lora_A, lora_B):
        nn.init.zeros_(lora_A)
        nn.init.normal_(lora_B)

    @staticmethod
    def _as_matrix(weight):
        # The table (num_embeddings, embedding_dim) is the transposed map from one-hot ids.
        return weight.t()

    def _keep_base_settings(self, module):
        self.num_embeddings, self.embedding_dim = module.num_embeddings, module.embedding_dim
        self.lookup_settings = {"padding_idx": module.padding_idx, "max_norm": module.max_norm,
                                "norm_type": module.norm_type, "scale_grad_by_freq": module.scale_grad_by_freq,
                                "sparse": module.sparse}

    def base_forward(self, ids):
        return F.embedding(ids, self.weight, **self.lookup_settings)

    def add_adapter_output(self, base_out, ids, adapter):
        after_A = F.embedding(ids, adapter.lora_A.t(), **self.lookup_settings)
        update = self.update_of_rows(after_A, adapter.lora_mixer, adapter.lora_B, adapter.config.scale)
        return base_out + update.to(base_out.dtype)

    @staticmethod
    def update_of_rows(after_A, lora_mixer, lora_B, scale):
        """``s * after_A M^T B^T``: the adapter's output from the looked-up rows
        ``after_A`` of ``A^T`` (also the PEFT route's embeddings)."""
        return after_A @ (scale * (lora_B @ lora_mixer)).t()

    def _empty_base(self):
        return nn.Embedding(self.num_embeddings, self.embedding_dim, **self.lookup_settings)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, {super().extra_repr()}"
